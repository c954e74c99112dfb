"""`python tests/resume_harness.py train ...`: the `jaxscale` command with test hooks.

The checkpoint tests run training in subprocesses (to kill them, signal them and restart them)
through this script. It installs hooks chosen by environment variables, then runs `cli.main`:

  JAXSCALE_TEST_BATCH_LOG=PATH      append "<step> <sha256>" for every batch the loop takes
  JAXSCALE_TEST_BATCH_DELAY=SECONDS sleep before handing out each batch (a slower run)
  JAXSCALE_TEST_SLOW_SAVE=STEP:SECONDS:MARKER
                                    the background write of STEP's state writes MARKER (a file),
                                    then waits SECONDS before it commits (a kill lands mid-write)
  JAXSCALE_TEST_FAIL_SAVE=STEP      the background write of STEP's state fails with OSError
  JAXSCALE_TEST_KILL_AFTER_LOCAL=STEP
                                    SIGKILL this process once the local tier's write of STEP
                                    is on disk (checkpoint.local_dir)
  JAXSCALE_TEST_NO_PLOT=1           skip the loss plot at the end (matplotlib takes seconds)
  JAXSCALE_TEST_POISON_STEP=STEP    the batch of loop step STEP (0-based) holds a token far out
                                    of the vocabulary: the embedding lookup (jnp.take, fill mode)
                                    turns it into NaN, so that step's loss and gradient are NaN

`install` is importable too, for in-process tests (with pytest's monkeypatch).
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import re
import sys
import time

import numpy as np


class _HookedFuture:
    """Wraps an orbax commit future: optionally waits or fails before the wrapped one's result."""

    def __init__(self, inner, before):
        self._inner, self._before = inner, before

    def result(self, timeout=None):
        self._before()
        return self._inner.result(timeout=timeout)

    def cancel(self):
        return getattr(self._inner, "cancel", lambda: None)()


def _step_of(directory) -> int:
    path = str(getattr(directory, "path", directory))
    # e.g. <dir>/12.orbax-checkpoint-tmp/state.orbax-checkpoint-tmp (or <dir>/12/state)
    return int(re.search(r"/(\d+)(?:\.orbax-checkpoint-tmp[^/]*)?/state[^/]*/?$", path).group(1))


def install(env=os.environ, setattr_=setattr) -> None:
    """Install the hooks the environment asks for (setattr_ may be monkeypatch.setattr)."""
    poison = env.get("JAXSCALE_TEST_POISON_STEP")
    if env.get("JAXSCALE_TEST_BATCH_LOG") or env.get("JAXSCALE_TEST_BATCH_DELAY") or poison:
        from jaxscale.data import pipeline

        log = env.get("JAXSCALE_TEST_BATCH_LOG")
        delay = float(env.get("JAXSCALE_TEST_BATCH_DELAY") or 0)
        take = pipeline.DataIterator.__next__

        def logged_next(self):
            step = self.step
            time.sleep(delay)
            batch = take(self)
            if poison and step == int(poison):
                # On the host, then placed again: no device program runs beside the step.
                local = {k: np.array(v) for k, v in batch.items()}
                local["inputs"][0, 0] = 1 << 30
                batch = self.pipeline.to_global(local)
            if log:
                digest = hashlib.sha256()
                for key in sorted(batch):
                    digest.update(key.encode() + np.asarray(batch[key]).tobytes())
                with open(log, "a") as f:
                    f.write(f"{step} {digest.hexdigest()}\n")
            return batch

        setattr_(pipeline.DataIterator, "__next__", logged_next)

    if env.get("JAXSCALE_TEST_NO_PLOT"):
        from jaxscale.run import loop as trainer

        setattr_(trainer, "_plot", lambda workdir, logger: None)

    kill_after = env.get("JAXSCALE_TEST_KILL_AFTER_LOCAL")
    if kill_after:
        import signal

        from jaxscale.checkpoint import local

        write = local.LocalTier._write

        def write_then_die(self, step, *args):
            write(self, step, *args)
            if step == int(kill_after):
                os.kill(os.getpid(), signal.SIGKILL)

        setattr_(local.LocalTier, "_write", write_then_die)

    slow, fail = env.get("JAXSCALE_TEST_SLOW_SAVE"), env.get("JAXSCALE_TEST_FAIL_SAVE")
    if slow or fail:
        import orbax.checkpoint as ocp

        handler = ocp.StandardCheckpointHandler
        async_save = handler.async_save

        async def hooked_async_save(self, directory, *args, **kwargs):
            futures = list(await async_save(self, directory, *args, **kwargs) or [])
            step = _step_of(directory)
            if slow and step == int(slow.split(":")[0]):
                _, seconds, marker = slow.split(":", 2)

                def wait():
                    pathlib.Path(marker).write_text(f"{step}\n")
                    time.sleep(float(seconds))

                futures = [_HookedFuture(futures[0], wait)] + futures[1:]
            if fail and step == int(fail):

                def broken():
                    raise OSError(f"injected write failure in step {step}")

                futures = [_HookedFuture(f, broken) for f in futures] or [
                    _HookedFuture(_Done(), broken)
                ]
            return futures

        setattr_(handler, "async_save", hooked_async_save)


class _Done:
    def result(self, timeout=None):
        return None


def read_state(step_dir) -> dict:
    """A saved state as {key path: numpy array}, read onto one device (for bitwise checks)."""
    import jax
    import orbax.checkpoint as ocp
    from etils import epath

    path = epath.Path(step_dir) / "state"
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as checkpointer:
        meta = checkpointer.metadata(path)
        tree = getattr(meta, "item_metadata", meta)
        tree = getattr(tree, "tree", tree)
        target = jax.tree_util.tree_map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree
        )
        state = checkpointer.restore(path, args=ocp.args.StandardRestore(target))
    return {jax.tree_util.keystr(p): np.asarray(x)
            for p, x in jax.tree_util.tree_flatten_with_path(state)[0]}


if __name__ == "__main__":
    install()
    from jaxscale import cli

    sys.exit(cli.main(sys.argv[1:]))
