"""The multi-host code path, run as several JAX processes on this machine (CPU devices, gloo
collectives): two processes of 4 devices train exactly like one process of 8, each loads only its
half of every global batch, and a checkpoint written by either layout resumes in the other on the
same sample stream."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from jaxscale import cli
from jaxscale.analysis.metrics import read_jsonl

pytestmark = pytest.mark.multiprocess

SMALL = ["model.num_layers=2", "model.d_model=32", "model.num_heads=4", "model.num_kv_heads=2",
         "model.d_ff=64", "seq_len=16", "batch_size=16", "eval_batches=1", "progress=false",
         "optim.warmup_steps=2"]
# Six steps of the tiny preset with FSDP over all 8 devices, checkpoints at steps 3 and 6, every
# process logging the rows it loads.
RUN = [*SMALL, "steps=6", "log_every=1", "eval_every=0", "mesh.fsdp=-1", "sharding.rules=fsdp",
       "checkpoint.every=3", "data.log_rows=true"]
GLOBAL_DEVICES = 8
TIMEOUT_S = 480


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def launch(processes: int, workdir: pathlib.Path, corpus: str, *overrides: str) -> list[str]:
    """`jaxscale train` in `processes` processes of 8/processes CPU devices; returns their logs."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    workdir.mkdir(parents=True, exist_ok=True)
    logs = [workdir / f"process{i}.log" for i in range(processes)]
    procs = []
    for i in range(processes):
        cmd = [sys.executable, "-m", "jaxscale.cli", "train", "--config", "tiny",
               "--cpu-devices", str(GLOBAL_DEVICES // processes),
               "--coordinator", f"localhost:{port}", "--num-processes", str(processes),
               "--process-id", str(i), *RUN, f"workdir={workdir}", f"data.path={corpus}",
               *overrides]
        with open(logs[i], "w") as log:
            procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env))
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while any(p.poll() is None for p in procs):
            failed = [p for p in procs if p.returncode not in (None, 0)]
            if failed or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    texts = [log.read_text() for log in logs]
    for i, p in enumerate(procs):
        assert p.returncode == 0, f"process {i} exited {p.returncode}:\n{texts[i][-4000:]}"
    return texts


def in_process(workdir: pathlib.Path, corpus: str, *overrides: str) -> None:
    """The same run in this test process (8 simulated devices, one process)."""
    argv = ["train", "--config", "tiny", *RUN, f"workdir={workdir}", f"data.path={corpus}",
            *overrides]
    assert cli.main(argv) == 0


def losses(workdir: pathlib.Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_jsonl(workdir / "metrics.jsonl")}


def eval_loss(workdir: pathlib.Path) -> float:
    return json.loads((workdir / "summary.json").read_text())["final_eval_loss"]


def row_logs(workdir: pathlib.Path) -> list[dict[int, dict]]:
    """Per process: step -> what it loaded at that step (the last line for the step wins)."""
    out = []
    for path in sorted((workdir / "data_rows").glob("process-*.jsonl")):
        out.append({r["step"]: r for r in read_jsonl(path)})
    return out


def global_hashes(workdir: pathlib.Path) -> dict[int, list[str]]:
    """step -> the hash of every row of the global batch, assembled from all processes' logs."""
    logs = row_logs(workdir)
    steps = set.intersection(*(set(log) for log in logs))
    out = {}
    for step in sorted(steps):
        parts = sorted((log[step]["rows"], log[step]["hashes"]) for log in logs)
        assert [p[0] for p in parts] == [[i * 16 // len(logs), (i + 1) * 16 // len(logs)]
                                         for i in range(len(logs))]
        out[step] = sum((p[1] for p in parts), [])
    return out


def keep_checkpoint(source: pathlib.Path, dest: pathlib.Path, step: int) -> None:
    """A new workdir holding only checkpoint `step` of another run."""
    shutil.copytree(source / "checkpoints", dest / "checkpoints")
    for other in (dest / "checkpoints").iterdir():
        if other.is_dir() and other.name.isdigit() and int(other.name) != step:
            shutil.rmtree(other)


@contextlib.contextmanager
def _lock(path: pathlib.Path):
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def shared(tmp_path_factory, name: str, build) -> pathlib.Path:
    """A directory built once per test session, also across pytest-xdist workers (they share the
    parent of their temporary roots), so the expensive runs are not repeated per worker."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    path = root / f"multiprocess-{name}"
    with _lock(root / f"multiprocess-{name}.lock"):
        if not (path / ".complete").exists():
            shutil.rmtree(path, ignore_errors=True)
            path.mkdir(parents=True)
            build(path)
            (path / ".complete").write_text("")
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    def build(root):
        package = pathlib.Path(cli.__file__).parent
        for i, path in enumerate(sorted(package.rglob("*.py"))):
            (root / f"doc{i:03d}.txt").write_text(path.read_text())

    return str(shared(tmp_path_factory, "corpus", build))


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, corpus) -> pathlib.Path:
    return shared(tmp_path_factory, "one-process", lambda w: in_process(w, corpus))


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, corpus) -> tuple[pathlib.Path, list[str]]:
    workdir = shared(tmp_path_factory, "two-processes", lambda w: launch(2, w, corpus))
    return workdir, [(workdir / f"process{i}.log").read_text() for i in range(2)]


def test_two_processes_train_like_one(one_process, two_processes):
    workdir, logs = two_processes
    np.testing.assert_allclose(list(losses(workdir).values()),
                               list(losses(one_process).values()), rtol=1e-5)
    assert sorted(losses(workdir)) == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose(eval_loss(workdir), eval_loss(one_process), rtol=1e-5)
    # Both processes saw all 8 devices; only process 0 wrote the metrics and the log lines.
    assert "on 8 devices" in logs[0] and "done: 6 steps" in logs[0]
    assert "done:" not in logs[1] and "jaxscale:" not in logs[1]
    assert len(read_jsonl(workdir / "metrics.jsonl")) == 6


def test_hybrid_mesh_spans_the_processes(tmp_path, corpus, one_process):
    """mesh.dcn_data=2: the data axis crosses the processes (the data-centre network) and fsdp
    stays within each (hsdp: parameters replicated across processes, sharded within one); the
    same losses as one process of 8 devices with plain FSDP."""
    workdir = tmp_path / "hybrid"
    launch(2, workdir, corpus, "mesh.fsdp=4", "mesh.dcn_data=2", "sharding.rules=hsdp")
    assert sorted(losses(workdir)) == sorted(losses(one_process)) == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose(list(losses(workdir).values()),
                               list(losses(one_process).values()), rtol=1e-5)
    assert "'data': 2, 'stage': 1, 'fsdp': 4" in (workdir / "process0.log").read_text()


def test_each_process_loads_only_its_half(one_process, two_processes):
    workdir, _ = two_processes
    first, second = row_logs(workdir)
    assert sorted(first) == sorted(second) == list(range(6))
    for step in range(6):
        # Process 0's devices hold global rows 0-7, process 1's rows 8-15: each read only those
        # records of the stream (step * 16 + row) and no other.
        assert first[step]["rows"] == [0, 8] and second[step]["rows"] == [8, 16]
        assert first[step]["records"] == [16 * step, 16 * step + 8]
        assert second[step]["records"] == [16 * step + 8, 16 * step + 16]
        assert len(first[step]["hashes"]) == len(second[step]["hashes"]) == 8
    # Together they are exactly the global batches the single process loaded.
    assert global_hashes(workdir) == global_hashes(one_process)


def test_checkpoint_of_two_processes_resumes_in_one(tmp_path, corpus, two_processes):
    workdir, _ = two_processes
    resumed = tmp_path / "resumed"
    keep_checkpoint(workdir, resumed, 3)
    in_process(resumed, corpus)
    assert sorted(losses(resumed)) == [4, 5, 6]
    np.testing.assert_allclose([losses(resumed)[s] for s in (4, 5, 6)],
                               [losses(workdir)[s] for s in (4, 5, 6)], rtol=1e-5)
    np.testing.assert_allclose(eval_loss(resumed), eval_loss(workdir), rtol=1e-5)
    # The same sample stream from step 3 on, now loaded by one process.
    hashes = global_hashes(resumed)
    assert sorted(hashes) == [3, 4, 5]
    assert hashes == {s: h for s, h in global_hashes(workdir).items() if s >= 3}


def test_checkpoint_of_one_process_resumes_in_two(tmp_path, corpus, one_process):
    resumed = tmp_path / "resumed"
    keep_checkpoint(one_process, resumed, 3)
    logs = launch(2, resumed, corpus)
    assert "resumed from step 3" in logs[0]
    assert sorted(losses(resumed)) == [4, 5, 6]
    np.testing.assert_allclose([losses(resumed)[s] for s in (4, 5, 6)],
                               [losses(one_process)[s] for s in (4, 5, 6)], rtol=1e-5)
    np.testing.assert_allclose(eval_loss(resumed), eval_loss(one_process), rtol=1e-5)
    hashes = global_hashes(resumed)  # also checks each process loaded its own half
    assert sorted(hashes) == [3, 4, 5]
    assert hashes == {s: h for s, h in global_hashes(one_process).items() if s >= 3}


@pytest.mark.parametrize("change, message", [
    (["data.pack=false"], "data.source, data.path, data.tokenizer, data.pack, data.shuffle or "
                          "seq_len changed, so the sample stream cannot continue exactly"),
    (["batch_size=32"], "batch_size"),
])
def test_resume_refuses_a_stream_it_cannot_continue(tmp_path, corpus, one_process, capsys,
                                                    change, message):
    """Other data or another global batch: one clear line and no training, never a silent
    restart of the stream."""
    resumed = tmp_path / "resumed"
    keep_checkpoint(one_process, resumed, 3)
    argv = ["train", "--config", "tiny", *RUN, f"workdir={resumed}", f"data.path={corpus}",
            *change]
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code != 0 and message in err and "Traceback" not in err
    assert err.count("\n") == 1
    assert not (resumed / "metrics.jsonl").exists()


def test_two_processes_resume_at_the_newest_local_step_both_hold(tmp_path, corpus):
    """The local tier (every 2 steps, each process its own shards) of a two-process run that
    died after step 6 (its durable end-of-run step 8 gone) where process 1's local step 6 was
    lost: both processes agree on step 4, the newest local step each holds, resume from it and
    end bitwise equal to the uninterrupted run."""
    import resume_harness

    local = tmp_path / "local"
    tiers = ["steps=8", "checkpoint.every=100", f"checkpoint.local_dir={local}",
             "checkpoint.local_every=2", "checkpoint.local_keep=5"]
    full = tmp_path / "full"
    launch(2, full, corpus, *tiers)
    assert [p.name for p in sorted((full / "checkpoints").iterdir()) if p.name.isdigit()] == ["8"]
    for i in range(2):
        assert sorted(int(p.parent.name) for p in local.glob(f"*/process_{i}")) == [2, 4, 6]
    reference = resume_harness.read_state(full / "checkpoints" / "8")

    crashed = tmp_path / "crashed"
    crashed.mkdir()
    shutil.rmtree(local / "6" / "process_1")  # process 1's node lost its newest local step
    logs = launch(2, crashed, corpus, *tiers)
    assert f"checkpoint: resumed from step 4 in {local} (local tier)" in logs[0]
    assert sorted(losses(crashed)) == [5, 6, 7, 8]
    assert losses(crashed) == {s: v for s, v in losses(full).items() if s > 4}
    resumed = resume_harness.read_state(crashed / "checkpoints" / "8")
    assert resumed.keys() == reference.keys()
    for key in reference:
        np.testing.assert_array_equal(resumed[key], reference[key], err_msg=key, strict=True)
