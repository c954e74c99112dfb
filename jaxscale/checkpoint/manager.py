"""Checkpoints with orbax: async saves, retention, resume, reshard-on-restore, clear errors.

Each saved step is one orbax step directory holding four items:

    <dir>/<step>/state/   the TrainState (orbax StandardSave: params, opt_state, extra, counters)
    <dir>/<step>/data/    the data iterator's state (`DataIterator.get_state()`: the next step,
                          the seed, the global batch, ...)
    <dir>/<step>/rng/     the run's seed and base RNG key (implementation and raw key data)
    <dir>/<step>/meta/    jaxscale and jax versions, mesh, jax_threefry_partitionable, step,
                          and the resolved config

`<dir>` is ``checkpoint.dir`` or ``<workdir>/checkpoints``. orbax writes every step into a
temporary directory and renames it when all of it is written, so a step directory that exists is
complete; the temporary directories a killed run leaves behind are removed when the next run
starts. Once a step has committed, process 0 writes ``<dir>/<step>/jaxscale_manifest.json`` (the
size and digest of every file, `verify.py`) from a background thread that waits for the commit,
so a step is sealed moments after it lands, not at the next save; a restore verifies the step
it is about to use and falls back to the previous verified one (checkpoint.on_corrupt).
Restoring always passes the current mesh's shardings as targets, so a checkpoint restores onto
any mesh and device count.
See docs/checkpointing.md.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.sharding import Mesh

import jaxscale
from jaxscale import config as config_lib
from jaxscale.checkpoint import local as local_lib
from jaxscale.checkpoint import verify
from jaxscale.checkpoint.checks import check_resumable, check_tree, corrupt_error
from jaxscale.config import Config
from jaxscale.core.state import TrainState, unbox
from jaxscale.core.trees import path_str
from jaxscale.errors import CheckpointError

_JSON_ITEMS = ("data", "rng", "meta")


def checkpoint_dir(cfg: Config) -> str:
    """Where the run's checkpoints live: checkpoint.dir, or <workdir>/checkpoints."""
    path = cfg.checkpoint.dir or os.path.join(cfg.workdir, "checkpoints")
    return path if "://" in path else os.path.abspath(path)


def _write_manifest(directory: str, step: int) -> None:
    """Process 0 hashes a committed step's files; the commit was a barrier, so all are there."""
    if jax.process_index() == 0 and "://" not in directory:
        verify.write_manifest(os.path.join(directory, str(step)))


def _targets(abstract: Any, shardings: Any) -> Any:
    """Restore targets: each leaf's shape and dtype on its sharding of the current mesh."""
    return jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def _rng_key(saved: Mapping[str, Any]) -> jax.Array:
    """The run's base RNG key from its saved implementation name and raw key data."""
    return jax.random.wrap_key_data(np.asarray(saved["key_data"], np.uint32), impl=saved["impl"])


def _registry() -> Any:
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    state = ocp.StandardCheckpointHandler()
    registry.add("state", ocp.args.StandardSave, state)
    registry.add("state", ocp.args.StandardRestore, state)
    registry.add("state", ocp.args.PyTreeRestore, ocp.PyTreeCheckpointHandler())
    for name in _JSON_ITEMS:
        handler = ocp.JsonCheckpointHandler()
        registry.add(name, ocp.args.JsonSave, handler)
        registry.add(name, ocp.args.JsonRestore, handler)
    return registry


def _manager(directory: str, options: dict[str, Any]) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        directory, options=ocp.CheckpointManagerOptions(**options), handler_registry=_registry()
    )


def _policies(cfg: Config) -> dict[str, Any]:
    """orbax save-decision and preservation policies for checkpoint.every/keep/keep_period."""
    c, cm = cfg.checkpoint, ocp.checkpoint_managers
    save = [cm.SpecificStepsPolicy(steps=(cfg.steps,))]  # the last step, always
    if c.every:
        save.append(cm.FixedIntervalPolicy(c.every))
    keep = [cm.LatestN(c.keep)]
    if c.keep_period:
        keep.append(cm.EveryNSteps(c.keep_period))
    return {
        "save_decision_policy": cm.AnySavePolicy(save),
        "preservation_policy": cm.AnyPreservationPolicy(keep),
    }


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """'path/to/leaf' -> shape for an abstract state or an orbax metadata tree."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {path_str(p): tuple(x.shape) for p, x in leaves}


class Resumed(NamedTuple):
    state: TrainState  # restored onto the current mesh, or freshly initialised
    rng: jax.Array  # the run's base RNG key
    data_state: dict[str, Any] | None  # the data iterator's saved state; None when fresh


class Checkpointer:
    """Saves and restores a run's state with an orbax CheckpointManager.

    Usage (the loop's checkpoint hook, jaxscale/run/hooks.py, does this)::

        with Checkpointer(cfg, mesh) as ckpt:
            state, rng, data_state = ckpt.restore_or_init(init, abstract, shardings, rng=rng)
            batches = pipeline.iterator(int(state.step), state=data_state)
            for step in ...:
                ...
                if ckpt.should_save(done):
                    ckpt.save(done, state, batches.get_state())

    Errors of a background save are raised as CheckpointError by the next `save`, `wait` or
    `close`.
    """

    def __init__(self, cfg: Config, mesh: Mesh, *, log: Callable[[str], None] | None = None):
        self.cfg = cfg
        self.mesh = mesh
        self.directory = checkpoint_dir(cfg)
        self._manager = _manager(self.directory, dict(
            enable_async_checkpointing=cfg.checkpoint.async_save,
            cleanup_tmp_directories=True, create=True, **_policies(cfg),
        ))
        self._log = log or (lambda m: print(m, flush=True) if jax.process_index() == 0 else None)
        self._rng: dict[str, Any] | None = None
        self._in_flight: int | None = None  # the last step handed to orbax, maybe still writing
        self._sealer: threading.Thread | None = None  # writes _in_flight's manifest once committed
        self._seal_error: BaseException | None = None  # what the sealer hit, raised by wait()
        self.saved_step: int | None = None  # the last step handed to orbax (or the local tier)
        self.durable_step: int | None = None  # the last step handed to orbax
        c = cfg.checkpoint
        self.local = (local_lib.LocalTier(c.local_dir, c.local_every, c.local_keep)
                      if c.local_dir and c.local_every else None)
        self._closed = False

    # -- restore -------------------------------------------------------------------------------

    def restore_or_init(
        self, init: Callable[[], TrainState], abstract: TrainState, shardings: Any, *,
        rng: jax.Array, check_data: Callable[[dict[str, Any]], Any] | None = None,
    ) -> Resumed:
        """The latest complete checkpoint (or checkpoint.restore_step), else `init()`.

        Args:
          init: builds a fresh state (called only when there is nothing to restore).
          abstract: the state's shapes (`state.abstract_state`, boxed or not).
          shardings: the state's shardings on the current mesh (`sharding.state_shardings`).
          rng: the run's base RNG key, saved with every checkpoint.
          check_data: raises if the saved data state cannot be continued (e.g. the data
            pipeline's own check); called before any array is read.

        Returns:
          Resumed(state, rng, data_state): data_state is None for a fresh state. With
          checkpoint.init_from and nothing to resume, the fresh state carries the parameters of
          that checkpoint.
        """
        c = self.cfg.checkpoint
        steps = sorted(self._manager.all_steps())
        if c.restore_step >= 0 and c.restore_step not in steps:
            raise CheckpointError(
                f"checkpoint.restore_step={c.restore_step}: there is no complete checkpoint of "
                f"that step in {self.directory}; "
                + (f"complete steps: {steps}" if steps else "it holds no checkpoint")
            )
        data_state = None
        local_step = self._local_candidate() if c.restore_step < 0 else None
        durable = None
        if steps:
            wanted = c.restore_step if c.restore_step >= 0 else steps[-1]
            if local_step is None or local_step <= wanted:
                durable = self._verified_step(wanted, steps)
        restored = None
        if local_step is not None and (durable is None or local_step > durable[0]):
            restored = self._restore_local(local_step, abstract, shardings, check_data)
            if restored is None and steps:  # the local step was saved on another mesh
                durable = self._verified_step(steps[-1], steps)
        if restored is not None:
            state, rng, data_state = restored
            step = local_step
            self._drop_later(step, steps)
            self._log(f"checkpoint: resumed from step {step} in {self.local.directory} "
                      "(local tier)")
        elif durable is not None:
            step, skipped = durable
            state, rng, data_state = self._restore(step, steps, abstract, shardings, check_data)
            self._drop_later(step, steps)
            note = (f" (skipped corrupt step{'s' if len(skipped) > 1 else ''} "
                    + ", ".join(f"{s}: {p.file}" for s, p in skipped) + ")") if skipped else ""
            tier = " (durable tier)" if self.local is not None else ""
            self._log(f"checkpoint: resumed from step {step} in {self.directory}{tier}{note}")
        else:
            params = (_initial_params(self.cfg, abstract.params, shardings.params)
                      if c.init_from else None)
            state = init()
            if params is not None:
                state = state.replace(params=params)
                self._log(f"checkpoint: parameters from {c.init_from}")
            self._drop_later(-1, steps)
        self._rng = {"seed": self.cfg.seed, "impl": str(jax.random.key_impl(rng)),
                     "key_data": np.asarray(jax.random.key_data(rng)).tolist()}
        return Resumed(state, rng, data_state)

    def _local_candidate(self) -> int | None:
        """The newest local step every process holds complete and verified (None: none, or no
        local tier). Every process calls this: they agree through an all-gather."""
        if self.local is None:
            return None
        return local_lib.agreed_step(self.local.verified_steps(self._log))

    def _restore_local(self, step, abstract, shardings, check_data):
        """(state, rng, data) of the local tier's `step`, or None (said) when it was saved on
        another mesh; a changed model or sample stream is refused as by the durable tier."""
        where = f"local checkpoint step {step} in {self.local.directory}"
        doc = self.local.read_doc(step)
        data = dict(doc["data"])
        check_resumable(doc["meta"].get("config", {}), data, self.cfg, where)
        if check_data is not None:
            check_data(data)
        try:
            state = self.local.read(step, _targets(unbox(abstract), shardings))
        except local_lib.OtherLayout as e:
            self._log(f"checkpoint: {e}; the durable tier is used")
            return None
        return state, _rng_key(doc["rng"]), data

    def _drop_later(self, step: int, steps: list[int]) -> None:
        """Delete the durable and local steps after `step`: the run continues from it."""
        for later in (s for s in steps if s > step):
            self._manager.delete(later)
            self._log(f"checkpoint: deleted step {later} (the run continues from step {step})")
        if self.local is not None:
            self.local.drop_after(step)

    def _verified_step(self, wanted: int, steps: list[int]) -> tuple[int, list]:
        """The newest step at or before `wanted` whose files match its manifest, and the
        (step, Problem) of each corrupt step skipped on the way (checkpoint.on_corrupt=skip).

        Every process verifies the same files (a shared filesystem), so all choose the same step.
        """
        if "://" in self.directory or not verify.has_manifests(self.directory, steps):
            self._log(f"checkpoint: no step in {self.directory} has a manifest (written before "
                      f"checkpoints were verified, or not on a local path): step {wanted} is "
                      "restored unverified")
            return wanted, []
        skipped = []
        for step in sorted((s for s in steps if s <= wanted), reverse=True):
            problem = verify.verify_step(os.path.join(self.directory, str(step)))
            if problem is None:
                return step, skipped
            asked = (f" (checkpoint.restore_step={step})"
                     if step == self.cfg.checkpoint.restore_step else "")
            what = f"step {step} in {self.directory}{asked} is corrupt ({problem})"
            if self.cfg.checkpoint.on_corrupt == "error":
                raise CheckpointError(f"checkpoint {what} (checkpoint.on_corrupt=error; "
                                      "on_corrupt=skip resumes from the previous verified step)")
            self._log(f"checkpoint: {what}; skipping it for the previous verified step")
            skipped.append((step, problem))
        raise CheckpointError(
            f"no checkpoint step in {self.directory} verifies: "
            + "; ".join(f"step {s}: {p}" for s, p in skipped)
            + f". Move {self.directory} away to start over"
        )

    def _restore(self, step, steps, abstract, shardings, check_data):
        where = f"checkpoint step {step} in {self.directory}"
        read = lambda **items: _read(self._manager, step, steps, items)
        saved = read(**{n: ocp.args.JsonRestore() for n in _JSON_ITEMS})
        data = dict(saved["data"])
        check_resumable(saved["meta"].get("config", {}), data, self.cfg, where)
        if data.get("step") != step:
            raise CheckpointError(f"{where} is inconsistent: its data position is step "
                                  f"{data.get('step')}")
        if check_data is not None:
            check_data(data)
        tree = _read_metadata(self._manager, step, steps)
        check_tree(_shapes(tree), _shapes(unbox(abstract)), where)
        target = _targets(unbox(abstract), shardings)
        state = read(state=ocp.args.StandardRestore(target))["state"]
        return state, _rng_key(saved["rng"]), data

    # -- save ----------------------------------------------------------------------------------

    def should_save(self, step: int) -> bool:
        """Whether to save after `step`: the interval or the last step."""
        return self._manager.should_save(step) or (self.local is not None
                                                   and self.local.should_save(step))

    def save(self, step: int, state: TrainState, data_state: Mapping[str, Any], *,
             durable: bool = False) -> None:
        """Start saving `state` as `step` (async by default): to the local tier at its interval
        between the durable saves, else (and with `durable`, e.g. on a stop signal) durably.

        Args:
          step: optimizer steps taken (state.step).
          state: the TrainState after `step` steps.
          data_state: the data iterator's `get_state()`: its next step must be `step`.
          durable: save to the durable tier whatever the intervals say.
        """
        if data_state["step"] != step:
            raise ValueError(f"saving step {step} with the data iterator at step "
                             f"{data_state['step']}; save right after the step, before the next "
                             "batch is taken")
        self.wait()
        if (self.local is not None and not durable and self.local.should_save(step)
                and not self._manager.should_save(step)):
            self.local.save(step, state, data_state, {"rng": self._rng or {"seed": self.cfg.seed},
                                                      "meta": self._meta(step)})
            self.saved_step = step
            return
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(dict(data_state)),
            rng=ocp.args.JsonSave(self._rng or {"seed": self.cfg.seed}),
            meta=ocp.args.JsonSave(self._meta(step)),
        )
        try:
            self._manager.save(step, args=args, force=True)
        except Exception as e:
            raise self._save_error(step, e) from e
        self._in_flight = self.saved_step = self.durable_step = step
        if not self.cfg.checkpoint.async_save:
            self.wait()  # committed already: write its manifest now
            return
        self._sealer = threading.Thread(target=self._seal, args=(step,), daemon=True,
                                        name=f"jaxscale-manifest-{step}")
        self._sealer.start()

    def _meta(self, step: int) -> dict[str, Any]:
        """What a checkpoint records of the run: versions, mesh, the resolved config and its
        hash."""
        meta = {
            "jaxscale_version": jaxscale.__version__, "step": step,
            "mesh": dict(self.mesh.shape), "num_devices": int(self.mesh.size),
            "num_processes": jax.process_count(), "jax_version": jax.__version__,
            "jax_threefry_partitionable": bool(jax.config.jax_threefry_partitionable),
            "config": config_lib.to_dict(self.cfg),
        }
        meta["config_hash"] = verify.config_hash(meta["config"])
        return meta

    def _seal(self, step: int) -> None:
        """Background: wait for `step` to commit, then write its manifest (process 0). What goes
        wrong is kept for `wait` to raise on the training thread."""
        try:
            self._manager.wait_until_finished()
            self._manager.check_for_errors()
            self._write_manifest(step)
        except BaseException as e:  # noqa: BLE001 - re-raised by wait()
            self._seal_error = e

    def _write_manifest(self, step: int) -> None:
        if jax.process_index() != 0:
            return
        if not (epath.Path(self.directory) / str(step)).exists():
            raise CheckpointError(f"saving checkpoint step {step} to {self.directory} failed: "
                                  "the step directory was never committed")
        _write_manifest(self.directory, step)

    def wait(self) -> None:
        """Block until the save in flight has committed and its manifest is written (and the
        local tier's write is on disk); raise CheckpointError if any failed."""
        if self.local is not None:
            self.local.wait()
        step, self._in_flight = self._in_flight, None
        sealer, self._sealer = self._sealer, None
        if sealer is not None:
            sealer.join()
        error, self._seal_error = self._seal_error, None
        if error is not None:
            with contextlib.suppress(Exception):  # orbax raises it again once on this thread
                self._manager.wait_until_finished()
        try:
            if error is not None:
                raise error
            self._manager.wait_until_finished()
            self._manager.check_for_errors()
            if sealer is None and step is not None:
                self._write_manifest(step)
        except CheckpointError:
            raise
        except Exception as e:
            raise self._save_error(step, e) from e

    def saving(self) -> bool:
        """Whether a save is still being written in the background."""
        if self.local is not None and self.local.writing():
            return True
        return self._in_flight is not None and self._manager.is_saving_in_progress()

    def _save_error(self, step: int | None, e: BaseException) -> CheckpointError:
        reason = " ".join(str(e).split()) or type(e).__name__
        what = "a checkpoint" if step is None else f"checkpoint step {step}"
        return CheckpointError(
            f"saving {what} to {self.directory} failed: {type(e).__name__}: {reason[:500]}"
        )

    def close(self) -> None:
        """Wait for the save in flight, release orbax's resources and the signal handlers."""
        if self._closed:
            return
        self._closed = True
        error = None
        try:
            self.wait()
        except CheckpointError as e:
            error = e
        try:
            self._manager.close()
        except Exception as e:
            error = error or self._save_error(None, e)
        if error is not None:
            raise error

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is None:
            self.close()
            return
        try:  # keep the error that is already propagating; report a failed save beside it
            self.close()
        except CheckpointError as e:
            self._log(f"checkpoint: {e}")


def _initial_params(cfg: Config, abstract_params: Any, shardings: Any) -> Any:
    """checkpoint.init_from's parameters: a jaxscale checkpoint, or ``hf:DIR`` (a Hugging Face
    checkpoint, read sharded by `jaxscale.convert`, whose config.json must describe cfg.model)."""
    path = cfg.checkpoint.init_from
    if path.startswith("hf:"):
        from jaxscale.convert import load_hf_params  # convert imports this module: on use

        return load_hf_params(path[3:], abstract_params, shardings, model=cfg.model,
                              what="checkpoint.init_from")
    return load_params(path, abstract_params, shardings)


def _read_metadata(manager: ocp.CheckpointManager, step: int, steps) -> Any:
    """The saved state's tree of array metadata (shapes, dtypes), read before any array."""
    try:
        return manager.item_metadata(step)["state"]
    except Exception as e:  # any failure to read it means a damaged step
        raise corrupt_error(manager.directory, step, steps, "state", e) from e


def _read(manager: ocp.CheckpointManager, step: int, steps, items: dict[str, Any]) -> Any:
    try:
        return manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:
        raise corrupt_error(manager.directory, step, steps, ",".join(items), e) from e


@contextlib.contextmanager
def _saved_step(path: str, what: str) -> Iterator[tuple[ocp.CheckpointManager, int, list[int]]]:
    """A read-only manager of the checkpoint directory at (or above) `path`, the step to read
    (a step directory's own, else the latest) and every complete step."""
    root = epath.Path(path)
    if not root.exists():
        raise CheckpointError(f"{what}={path!r}: no such directory")
    step = None
    if (root / "state").exists() and root.name.isdigit():
        root, step = root.parent, int(root.name)
    manager = _manager(str(root), dict(read_only=True, create=False))
    try:
        steps = sorted(manager.all_steps())
        if step is None:
            if not steps:
                raise CheckpointError(
                    f"{what}={path!r} holds no complete checkpoint (expected step "
                    "directories such as 1000/ with state/ inside)"
                )
            step = steps[-1]
        yield manager, step, steps
    finally:
        manager.close()


def load_params(path: str, abstract_params: Any, shardings: Any, *,
                what: str = "checkpoint.init_from") -> Any:
    """The parameters of another run's checkpoint, placed with the current `shardings`.

    Args:
      path: a checkpoint directory (its latest step is used) or one step directory in it.
      abstract_params: the current parameters' shapes (boxed or not); the saved parameters
        must have exactly these.
      shardings: the current parameters' shardings.
      what: how errors name the path's setting.
    """
    with _saved_step(path, what) as (manager, step, steps):
        where = f"{what}={path!r} (step {step})"
        saved = _read_metadata(manager, step, steps)
        params = nn.unbox(abstract_params)
        expected = {"params/" + k: v for k, v in _shapes(params).items()}
        check_tree({k: v for k, v in _shapes(saved).items() if k.startswith("params/")},
                   expected, where)
        target = {"params": _targets(params, shardings)}
        restore = ocp.args.PyTreeRestore(
            target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=True,
        )
        restored = _read(manager, step, steps, {"state": restore})["state"]
    return restored["params"]


def read_meta(path: str, *, what: str = "checkpoint") -> tuple[int, dict[str, Any]]:
    """(step, meta item) of a checkpoint directory's latest step, or of one step directory:
    the meta item holds at least the step and the resolved config (``meta["config"]``)."""
    with _saved_step(path, what) as (manager, step, steps):
        meta = _read(manager, step, steps, {"meta": ocp.args.JsonRestore()})["meta"]
    return step, dict(meta)


def save_params(directory: str, params: Any, meta: Mapping[str, Any], *, step: int = 0) -> None:
    """Write `params` as step `step` of checkpoint `directory`: a "state" item holding
    ``{"params": params}`` and a "meta" item, which `load_params` (checkpoint.init_from) reads.

    orbax writes the step into a temporary directory and renames it when complete; then its
    manifest is written (verify.py).

    Raises:
      CheckpointError: `directory` already holds that step (nothing is overwritten).
    """
    manager = _manager(directory, dict(create=True, enable_async_checkpointing=False))
    try:
        if step in manager.all_steps():
            raise CheckpointError(f"{directory} already holds checkpoint step {step}; write to "
                                  "a new directory")
        args = ocp.args.Composite(state=ocp.args.StandardSave({"params": params}),
                                  meta=ocp.args.JsonSave(dict(meta)))
        manager.save(step, args=args, force=True)
        manager.wait_until_finished()
        _write_manifest(directory, step)
    finally:
        manager.close()
