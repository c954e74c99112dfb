"""Resume end to end, in fresh processes: exact resume, kill -9 during an async save, SIGTERM,
a failing background write, a non-finite step, and a resume onto another device count.

Every run goes through tests/resume_harness.py (the `jaxscale` command plus test hooks). The runs
share a persistent compilation cache, so only the first of each program pays for compiling it.
"""

import contextlib
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import resume_harness

from jaxscale import cli
from jaxscale.analysis.metrics import read_jsonl

HARNESS = str(pathlib.Path(__file__).with_name("resume_harness.py"))
SMALL = ["model.num_layers=2", "model.d_model=32", "model.num_heads=4", "model.num_kv_heads=2",
         "model.d_ff=64", "seq_len=16", "batch_size=16", "eval_batches=1", "progress=false",
         "optim.warmup_steps=2"]
# optim.decay_steps fixes the schedule, so a run of 7 steps and one of 20 share it.
RUN = SMALL + ["steps=20", "log_every=1", "eval_every=0", "optim.decay_steps=18",
               "checkpoint.every=4", "checkpoint.keep=10"]
TIMEOUT = 600


# How long a worker waits for another to finish what it holds the lock for: the longest is the
# reference run, which `finished` gives up on after TIMEOUT.
LOCK_TIMEOUT = TIMEOUT + 120


@contextlib.contextmanager
def exclusive(path: pathlib.Path, timeout: float = LOCK_TIMEOUT):
    """A lock file shared by the xdist workers of this run (held while the block runs).

    Fails the test after `timeout` seconds rather than waiting forever on a lock whose holder
    died without removing it.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL)
            break
        except FileExistsError:
            if time.monotonic() > deadline:
                pytest.fail(
                    f"waited {timeout:.0f} s for the lock {path}: the xdist worker holding it is"
                    " stuck, or died without removing it"
                )
            time.sleep(0.1)
    try:
        yield
    finally:
        os.close(fd)
        os.unlink(path)


@pytest.fixture(scope="module")
def shared(tmp_path_factory, request) -> pathlib.Path:
    """A directory of this pytest run, the same for every xdist worker of it.

    Without xdist it is the run's base temp (pytest makes a fresh one per run). An xdist worker's
    base temp is <the controller's base temp>/<worker id>, so the run's is its parent. Nothing
    outlives the run: a reference from an earlier run (of other code) is never reused.
    """
    base = tmp_path_factory.getbasetemp()
    is_xdist_worker = hasattr(request.config, "workerinput")
    return base.parent if is_xdist_worker else base


@pytest.fixture(scope="module")
def corpus(shared) -> str:
    root = shared / "resume_corpus"
    with exclusive(shared / "resume_corpus.lock"):
        if not root.exists():
            tmp = shared / "resume_corpus.tmp"
            tmp.mkdir()
            package = pathlib.Path(cli.__file__).parent
            for i, path in enumerate(sorted(package.rglob("*.py"))):
                (tmp / f"doc{i:03d}.txt").write_text(path.read_text())
            tmp.rename(root)
    return str(root)


@pytest.fixture(scope="module")
def jax_cache(shared) -> str:
    path = shared / "jax_cache"
    path.mkdir(exist_ok=True)
    return str(path)


class RunDir:
    """What a run leaves behind: its workdir (metrics, checkpoints) and its batch log."""

    def __init__(self, workdir, batch_log):
        self.workdir, self.batch_log = pathlib.Path(workdir), pathlib.Path(batch_log)

    def batches(self) -> list[tuple[int, str]]:
        text = self.batch_log.read_text() if self.batch_log.exists() else ""
        rows = [line.split() for line in text.splitlines()]
        return [(int(r[0]), r[1]) for r in rows if len(r) == 2 and len(r[1]) == 64]

    def losses(self) -> dict[int, float]:
        # A restarted run may log a step again; the later record is the one that counts.
        return {r["step"]: r["loss"] for r in read_jsonl(self.workdir / "metrics.jsonl")}

    def checkpoints(self) -> list[str]:
        return sorted(p.name for p in (self.workdir / "checkpoints").iterdir())

    def state(self, step: int) -> dict:
        return resume_harness.read_state(self.workdir / "checkpoints" / str(step))


class Run(RunDir):
    """One `jaxscale train` in a subprocess."""

    def __init__(self, workdir, corpus, cache, *overrides, devices=8, batch_log=None, **hooks):
        super().__init__(workdir, batch_log or f"{workdir}.batches.{time.monotonic_ns()}")
        env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
        env.update(JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", PYTHONUNBUFFERED="1",
                   JAXSCALE_TEST_BATCH_LOG=str(self.batch_log), JAXSCALE_TEST_NO_PLOT="1")
        env.update({f"JAXSCALE_TEST_{k.upper()}": str(v) for k, v in hooks.items()})
        self.out = open(f"{self.batch_log}.out", "w+")
        self.proc = subprocess.Popen(
            [sys.executable, HARNESS, "train", "--config", "tiny", "--cpu-devices", str(devices),
             *RUN, f"workdir={workdir}", f"data.path={corpus}", *overrides],
            stdout=self.out, stderr=subprocess.STDOUT, env=env,
        )

    def wait(self) -> int:
        try:
            return self.proc.wait(timeout=TIMEOUT)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()

    @property
    def output(self) -> str:
        self.out.seek(0)
        return self.out.read()


def finished(run: Run, code: int = 0) -> Run:
    assert run.wait() == code, run.output[-3000:]
    return run


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key, strict=True)


@pytest.fixture(scope="module")
def reference(shared, corpus, jax_cache) -> RunDir:
    """20 steps straight, the run every interrupted one must end equal to (run once a session)."""
    ref = RunDir(shared / "reference", shared / "reference.batches")
    with exclusive(shared / "reference.lock"):
        if not (shared / "reference.done").exists():
            finished(Run(ref.workdir, corpus, jax_cache, batch_log=ref.batch_log))
            (shared / "reference.done").touch()
    assert [s for s, _ in ref.batches()] == list(range(20))
    assert ref.checkpoints() == ["12", "16", "20", "4", "8"]
    return ref


@pytest.fixture()
def warm(reference) -> None:
    """Runs that need no reference still wait for it: it fills the compilation cache, so they
    load its programs instead of compiling them again beside it."""


@pytest.mark.parametrize("bad_step, saved", [(6, ["2", "4"]), (7, ["2", "4", "6"])])
def test_nonfinite_abort_writes_no_checkpoint_at_or_after_the_bad_step(
    bad_step, saved, tmp_path, corpus, jax_cache, warm
):
    """The update of step `bad_step` is non-finite: the run stops naming it, even when it is a
    save step (6) or the step before one (7), and no checkpoint at or after it exists."""
    w = tmp_path / "w"
    run = Run(w, corpus, jax_cache, "checkpoint.every=2", poison_step=bad_step - 1)
    assert run.wait() == cli.EXIT_NONFINITE, run.output[-3000:]
    assert f"non-finite loss or gradient at step {bad_step} (on_nonfinite=abort)" in run.output
    assert run.checkpoints() == saved


def test_nonfinite_skip_leaves_params_and_optimizer_state_bitwise_unchanged(
    tmp_path, corpus, jax_cache, warm
):
    w = tmp_path / "w"
    run = finished(Run(w, corpus, jax_cache, "steps=8", "checkpoint.every=1",
                       "on_nonfinite=skip", poison_step=5))
    before, after, later = run.state(5), run.state(6), run.state(7)
    counters = ("['step']", "['skipped_steps']")
    assert len(before) > 30
    for key in before:
        if key not in counters:  # params, optimizer state (moments and its count), extra
            np.testing.assert_array_equal(after[key], before[key], err_msg=key, strict=True)
    assert [(int(before[k]), int(after[k])) for k in counters] == [(5, 6), (0, 1)]
    embedding = next(k for k in before if k.startswith("['params']") and "embedding" in k)
    assert not np.array_equal(later[embedding], after[embedding])  # training went on
    records = {r["step"]: r for r in read_jsonl(w / "metrics.jsonl")}
    assert [records[s]["skipped_steps"] for s in (5, 6, 8)] == [0, 1, 1]
    assert records[6]["finite"] == 0 and records[6]["loss"] == "nan"


def test_background_write_failure_fails_the_run(tmp_path, corpus, jax_cache, warm):
    w = tmp_path / "w"
    run = Run(w, corpus, jax_cache, fail_save=8)
    assert run.wait() == cli.EXIT_CHECKPOINT
    assert (f"jaxscale: error: saving checkpoint step 8 to {w / 'checkpoints'} failed: OSError: "
            "injected write failure in step 8") in run.output
    assert "8" not in run.checkpoints() and "4" in run.checkpoints()
    assert max(s for s, _ in run.batches()) < 12  # raised at the next save (step 12), no later


def test_exact_resume_in_a_new_process(tmp_path, corpus, jax_cache, reference):
    """7 steps, exit, resume in a new process to 20: losses, batches and state are bitwise A's."""
    w = tmp_path / "w"
    first = finished(Run(w, corpus, jax_cache, "steps=7"))
    assert first.checkpoints() == ["4", "7"]
    second = finished(Run(w, corpus, jax_cache))
    assert "resumed from step 7" in second.output
    assert first.batches() == reference.batches()[:7]
    assert second.batches() == reference.batches()[7:]  # the same bytes, from step 7 on
    assert second.losses() == reference.losses()  # every step, exactly
    assert_same_state(second.state(20), reference.state(20))


def test_kill_during_async_saves_resumes_from_the_last_complete_step(
    tmp_path, corpus, jax_cache, reference
):
    """kill -9 while a step is being written (the writer is slowed so the kill lands mid-write),
    at steps 8, 12 and 20 in turn, each restart resuming the previous one's work: a restart never
    uses the partial step, resumes from the complete one before it, and the last restart ends
    bitwise equal to the uninterrupted run."""
    w, last = tmp_path / "w", 0
    for kill_step in (8, 12, 20):
        marker = tmp_path / f"writing{kill_step}"
        run = Run(w, corpus, jax_cache, slow_save=f"{kill_step}:600:{marker}")
        deadline = time.monotonic() + TIMEOUT
        while not marker.exists():
            assert run.proc.poll() is None and time.monotonic() < deadline, run.output[-3000:]
            time.sleep(0.05)
        run.proc.send_signal(signal.SIGKILL)
        assert run.wait() == -signal.SIGKILL
        assert (f"resumed from step {last}" in run.output) == (last > 0)
        assert run.batches()[0][0] == last and run.batches() == reference.batches()[
            last:last + len(run.batches())]
        names = run.checkpoints()
        assert str(kill_step) not in names  # never committed ...
        assert [n for n in names if n.startswith(f"{kill_step}.orbax-checkpoint-tmp")]  # ... begun
        assert not [n for n in names if "tmp" in n and not n.startswith(str(kill_step))]
        last = kill_step - 4

    again = finished(Run(w, corpus, jax_cache))
    assert f"resumed from step {last}" in again.output
    assert not [n for n in again.checkpoints() if "tmp" in n]  # partial steps are cleaned up
    assert again.batches() == reference.batches()[last:]
    assert {s: v for s, v in again.losses().items() if s > last} == {
        s: v for s, v in reference.losses().items() if s > last}
    assert_same_state(again.state(20), reference.state(20))


def test_sigterm_saves_at_the_signalled_step_and_resume_skips_no_batch(
    tmp_path, corpus, jax_cache, reference
):
    w = tmp_path / "w"
    run = Run(w, corpus, jax_cache, batch_delay=0.15)
    deadline = time.monotonic() + TIMEOUT
    while len(run.batches()) < 6:
        assert run.proc.poll() is None and time.monotonic() < deadline, run.output[-3000:]
        time.sleep(0.05)
    run.proc.send_signal(signal.SIGTERM)
    assert run.wait() == cli.EXIT_PREEMPTED, run.output[-3000:]
    trained = len(run.batches())  # batches taken = steps trained: the stop takes no new batch
    assert 6 <= trained < 20
    assert f"stopped on SIGTERM after step {trained}; checkpoint saved" in run.output
    assert str(trained) in run.checkpoints()
    assert int(run.state(trained)["['step']"]) == trained

    again = finished(Run(w, corpus, jax_cache))
    assert f"resumed from step {trained}" in again.output
    # Every step's batch exactly once across the two runs, and the same bytes as run A's.
    assert run.batches() + again.batches() == reference.batches()
    assert again.losses() == reference.losses()
    assert_same_state(again.state(20), reference.state(20))


def test_resume_onto_four_devices_with_another_mesh(tmp_path, corpus, jax_cache, reference):
    """A checkpoint of an 8-device FSDP run resumes on 4 devices as fsdp=2 x tensor=2: the run
    continues with the losses of the uninterrupted run (to float tolerance)."""
    w = tmp_path / "w"
    shutil.copytree(reference.workdir / "checkpoints" / "8", w / "checkpoints" / "8")
    run = finished(Run(w, corpus, jax_cache, "mesh.fsdp=2", "mesh.tensor=2",
                       "sharding.rules=fsdp_tp", devices=4))
    assert "resumed from step 8" in run.output and "on 4 devices" in run.output
    assert run.batches() == reference.batches()[8:]
    got, want = run.losses(), reference.losses()
    assert sorted(got) == list(range(9, 21))
    np.testing.assert_allclose([got[s] for s in got], [want[s] for s in got], rtol=2e-5)


def _tiers(local) -> list[str]:
    """Durable saves every 10 steps, local ones every 2 in between (checkpoint.local_dir)."""
    return ["checkpoint.every=10", f"checkpoint.local_dir={local}", "checkpoint.local_every=2",
            "checkpoint.local_keep=10"]


def _local_steps(local, process=0) -> list[int]:
    return sorted(int(p.parent.name) for p in pathlib.Path(local).glob(f"*/process_{process}"))


@pytest.mark.parametrize("new_node", [False, True], ids=["local", "durable"])
def test_kill_after_a_local_save_resumes_from_the_newest_tier(
    tmp_path, corpus, jax_cache, reference, new_node
):
    """kill -9 right after the local tier wrote step 14 (durable saves at 10): the restart
    resumes at 14 from the local tier; with the local tier wiped (a new node) at 10 from the
    durable one. Either way the run ends bitwise equal to the uninterrupted one."""
    w, local = tmp_path / "w", tmp_path / "local"
    killed = Run(w, corpus, jax_cache, *_tiers(local), kill_after_local=14)
    assert killed.wait() == -signal.SIGKILL, killed.output[-3000:]
    assert [n for n in killed.checkpoints() if n.isdigit()] == ["10"]
    assert _local_steps(local) == [2, 4, 6, 8, 12, 14]
    if new_node:
        shutil.rmtree(local)
    again = finished(Run(w, corpus, jax_cache, *_tiers(local)))
    resumed = 10 if new_node else 14
    where = f"{w / 'checkpoints'} (durable tier)" if new_node else f"{local} (local tier)"
    assert f"checkpoint: resumed from step {resumed} in {where}" in again.output
    assert again.batches() == reference.batches()[resumed:]
    assert {s: v for s, v in again.losses().items() if s > resumed} == {
        s: v for s, v in reference.losses().items() if s > resumed}
    assert_same_state(again.state(20), reference.state(20))
    assert _local_steps(local) == ([12, 14, 16, 18] if new_node else [2, 4, 6, 8, 12, 14, 16, 18])
