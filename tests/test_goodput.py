"""jaxscale.run.goodput: the ledger on a fake clock, its files across a kill, the accounting of
segments, `jaxscale goodput`, and a real run killed with SIGKILL and resumed."""

import json
import os
import pathlib
import signal
import statistics
import subprocess
import sys
import threading
import time

import pytest

from jaxscale import cli
from jaxscale.analysis.metrics import read_jsonl
from jaxscale.run import goodput

# Two segments: A is killed at step 10 after saving 4 and 8; B restores 8, 5 s later.
A = {"segment": "a", "status": "killed", "start": 1000.0, "end": 1030.0, "start_step": 0,
     "last_step": 10, "startup_s": 10.0, "productive_s": 15.0, "evaluation_s": 2.0,
     "checkpoint_s": 2.0, "data_wait_s": 1.0, "median_step_s": 1.5,
     "marks": {"0": 0.0, "4": 6.0, "8": 12.0}}
B = {"segment": "b", "status": "done", "start": 1035.0, "end": 1060.0, "start_step": 8,
     "last_step": 20, "startup_s": 8.0, "productive_s": 14.0, "evaluation_s": 1.0,
     "checkpoint_s": 1.5, "data_wait_s": 0.5, "median_step_s": 1.0,
     "marks": {"8": 0.0, "12": 4.0, "16": 8.0, "20": 12.0}}


def test_account_moves_recomputed_steps_to_lost_and_adds_the_restart_gap():
    acc = goodput.account([A, B])
    a, b = acc["segments"]
    assert a["lost"] == 3.0 and a["productive"] == 12.0  # steps 9, 10: 15 - mark(8) = 3 s
    assert a["restart_gap"] == 0.0 and b["restart_gap"] == 5.0 and b["lost"] == 0.0
    assert a["total_s"] == 30.0 and b["total_s"] == 30.0  # 25 s of B, and the 5 s before it
    assert acc["total"] == {"startup": 18.0, "productive": 26.0, "evaluation": 3.0,
                            "checkpoint": 3.5, "data_wait": 1.5, "lost": 3.0,
                            "restart_gap": 5.0, "total_s": 60.0, "fraction": 26.0 / 60.0,
                            "segments": 2}
    assert goodput.headline(acc) == "goodput 43.3% (largest loss: startup/compile 18.0 s)"


def test_lost_work_without_a_mark_is_estimated_at_the_median_step_time():
    restored_at_6 = {**B, "start_step": 6}
    assert goodput.account([A, restored_at_6])["segments"][0]["lost"] == 4 * 1.5
    # Never more than the segment's productive time.
    assert goodput.lost_seconds({**A, "median_step_s": 100.0}, 6) == 15.0


def test_a_later_restore_to_an_earlier_step_loses_work_of_every_segment_after_it():
    # C restores step 4 (say 8 turned out corrupt): A keeps 0-4, B (8-20) keeps nothing.
    c = {**B, "segment": "c", "start": 1070.0, "end": 1080.0, "start_step": 4,
         "last_step": 20, "marks": {}}
    a, b, _ = goodput.account([A, {**B, "status": "killed"}, c])["segments"]
    assert a["lost"] == 15.0 - 6.0 and b["lost"] == 14.0 and b["productive"] == 0.0


def test_no_restart_gap_after_a_run_that_finished():
    # A finished run extended later (steps= raised) waited for its user, not for a restart.
    acc = goodput.account([{**A, "status": "done", "last_step": 8}, B])
    assert [r["restart_gap"] for r in acc["segments"]] == [0.0, 0.0]
    assert acc["total"]["lost"] == 0.0


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


@pytest.fixture()
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(goodput, "_now", fake)
    monkeypatch.setattr(goodput, "process_start", lambda since: (5000.0 + 90.0, 90.0))
    monkeypatch.setattr(goodput, "HEARTBEAT_S", 3600.0)  # the timer stays out of the way
    return fake


def test_ledger_buckets_sum_to_the_segment_age(tmp_path, clock):
    ledger = goodput.Ledger(tmp_path)
    with ledger.span("checkpoint"):  # a restore
        clock.now += 2.0
    ledger.open(8)
    with ledger.span("data_wait"):  # the first batch
        clock.now += 0.5
    clock.now += 4.0  # compile
    ledger.begin_steps()
    for step in range(9, 13):
        clock.now += 0.25
        ledger.step(step)
    ledger.mark(12)
    with ledger.span("evaluation"):
        clock.now += 1.0
    assert ledger.buckets() == {"startup": 10.0 + 4.0, "productive": 1.0, "evaluation": 1.0,
                                "checkpoint": 2.0, "data_wait": 0.5}
    assert sum(ledger.buckets().values()) == clock.now - 90.0
    record = ledger.record()
    assert (record["start"], record["end"], record["start_step"], record["last_step"]) == (
        5090.0, 5108.5, 8, 12)
    assert record["median_step_s"] == 0.25 and record["marks"] == {"8": 0.0, "12": 1.0}
    # The heartbeat file held the state of the mark (the last write).
    beat = json.loads((tmp_path / "goodput.segment.json").read_text())
    assert beat["status"] == "running" and beat["productive_s"] == 1.0
    acc = ledger.finish("done")
    assert not (tmp_path / "goodput.segment.json").exists()
    assert [r["status"] for r in read_jsonl(tmp_path / "goodput.jsonl")] == ["done"]
    assert acc["total"]["total_s"] == 18.5 and acc["total"]["productive"] == 1.0


def test_a_killed_segments_heartbeat_is_appended_once_by_the_next_start(tmp_path, clock):
    log = tmp_path / "goodput.jsonl"
    log.write_text(json.dumps({**A, "status": "done"}) + "\n" + '{"segment": "cut sh')
    first = goodput.Ledger(tmp_path)
    first.open(0)
    first.begin_steps()
    clock.now += 3.0
    first.step(5, heartbeat=True)  # ... then kill -9: no finish
    killed = json.loads((tmp_path / "goodput.segment.json").read_text())
    assert [r["segment"] for r in goodput.read_segments(tmp_path)] == ["a", first.id]

    second = goodput.Ledger(tmp_path)
    second.open(4)
    assert read_jsonl(log) == [{**A, "status": "done"}, {**killed, "status": "killed"}]
    # A start that died between its append and its first heartbeat leaves the old heartbeat:
    # the one after it does not append that segment twice.
    (tmp_path / "goodput.segment.json").write_text(json.dumps(killed))
    goodput.Ledger(tmp_path).open(4)
    assert [r["segment"] for r in read_jsonl(log)] == ["a", first.id]
    assert log.read_text().count("\n") == 3  # the cut line ended before the next record


TABLE = """\
segment   status  steps  startup  productive  eval  ckpt  data  lost   gap   total
      0   killed   0-10     10.0        12.0   2.0   2.0   1.0   3.0   0.0    30.0
      1  running   8-20      8.0        14.0   1.0   1.5   0.5   0.0   5.0    30.0
  total                     18.0        26.0   3.0   3.5   1.5   3.0   5.0    60.0
  share                    30.0%       43.3%  5.0%  5.8%  2.5%  5.0%  8.3%  100.0%
goodput 43.3% (largest loss: startup/compile 18.0 s)"""


def test_cli_prints_the_table_of_the_log_and_the_running_segment(tmp_path, capsys):
    (tmp_path / "goodput.jsonl").write_text(json.dumps(A) + "\n")
    (tmp_path / "goodput.segment.json").write_text(json.dumps({**B, "status": "running"}))
    assert cli.main(["goodput", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "\n".join(out[:-1]) == TABLE
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert out[-1] == "plot: skipped (pip install 'jaxscale[plot]' for matplotlib)"
    else:
        assert out[-1] == f"plot: {tmp_path / 'goodput.png'}"
        assert (tmp_path / "goodput.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_without_goodput_jsonl_is_one_line(tmp_path, capsys):
    assert cli.main(["goodput", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (
        f"jaxscale: error: {tmp_path} has no goodput.jsonl (jaxscale train writes it into its "
        "workdir)\n")


# -- a real run, killed once --------------------------------------------------------------------

STEP_S = 0.3  # each step sleeps this long (in the watchdog hook): recomputed time is measurable
WORKER = f"""
import sys, time
from jaxscale.run import hooks
pet = hooks.Watchdog.__call__
hooks.Watchdog.__call__ = lambda self, ctx: (time.sleep({STEP_S}), pet(self, ctx))[1]
from jaxscale import cli
sys.exit(cli.main(sys.argv[1:]))
"""
RUN = ["train", "--config", "tiny", "--cpu-devices", "1", "steps=12", "model.num_layers=1",
       "model.d_model=32", "seq_len=16", "batch_size=8", "data.source=synthetic",
       "progress=false", "log_every=1", "eval_every=0", "checkpoint.every=4"]


class Segment:
    """One `jaxscale train` in a subprocess, its output lines timestamped as they arrive."""

    def __init__(self, workdir: pathlib.Path):
        env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
        self.lines: list[tuple[float, str]] = []
        self.proc = subprocess.Popen([sys.executable, "-c", WORKER, *RUN, f"workdir={workdir}"],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**env, "PYTHONUNBUFFERED": "1"})
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append((time.time(), line.rstrip("\n")))

    def wait(self) -> int:
        code = self.proc.wait(timeout=600)
        self.reader.join(timeout=60)
        return code


@pytest.mark.slow
def test_a_killed_and_resumed_run_accounts_for_its_wall_time_and_lost_work(tmp_path):
    workdir = tmp_path / "run"
    started = time.time()
    first = Segment(workdir)
    deadline = time.monotonic() + 300
    # Step 10's record is written as step 11 is dispatched, after step 10's heartbeat.
    while not any(r["step"] >= 10 for r in _records(workdir)):
        assert first.proc.poll() is None and time.monotonic() < deadline, first.lines[-20:]
        time.sleep(0.02)
    first.proc.send_signal(signal.SIGKILL)
    assert first.wait() == -signal.SIGKILL
    timed = _records(workdir)  # the killed segment's records (the rerun drops those after 8)
    assert (workdir / "goodput.segment.json").exists()

    second = Segment(workdir)
    assert second.wait() == 0, second.lines[-20:]
    done_at, done = second.lines[[line for _, line in second.lines].index(
        next(line for _, line in second.lines if line.startswith("done: ")))]
    killed, finished = read_jsonl(workdir / "goodput.jsonl")
    assert (killed["status"], finished["status"]) == ("killed", "done")
    restored = finished["start_step"]  # 8: sealed (its manifest written) as soon as it commits
    assert f"checkpoint: resumed from step {restored}" in "\n".join(x for _, x in second.lines)
    assert restored == 8 and killed["last_step"] >= 10
    summary = json.loads((workdir / "summary.json").read_text())["goodput"]
    buckets = {k: summary[f"{k}_s"] for k in goodput.BUCKETS}
    # Every second from the first start to the closing line, within 1%.
    assert sum(buckets.values()) == pytest.approx(summary["total_s"])
    assert summary["total_s"] == pytest.approx(done_at - started, rel=0.01)
    # Lost work: the steps after the restored one up to the killed segment's last, at the
    # killed segment's median step time (one record can hold two steps' time: the checkpoint
    # hook reads a save step's metrics early). Steps run ahead of the host's clock by up to one
    # step (the last heartbeat came as step last_step was dispatched, the metrics of the one
    # before just read), so the recomputed steps are between last_step - 1 - restored and
    # last_step - restored of them, each within 10%.
    step_s = statistics.median(r["step_time_s"] for r in timed)
    recomputed = killed["last_step"] - restored
    assert 0.9 * (recomputed - 1) * step_s <= buckets["lost"] <= 1.1 * recomputed * step_s
    assert buckets["lost"] >= STEP_S
    assert buckets["restart_gap"] == pytest.approx(finished["start"] - killed["end"])
    assert done.endswith(" | " + goodput.headline(goodput.account([killed, finished])))
    assert not (workdir / "goodput.segment.json").exists()


def _records(workdir: pathlib.Path) -> list[dict]:
    path = workdir / "metrics.jsonl"
    return read_jsonl(path) if path.exists() else []


def test_a_segment_starts_at_the_process_start_then_at_each_train_call(monkeypatch):
    monkeypatch.setattr(goodput, "_first_segment", [True])
    wall, mono = goodput.process_start(since=time.perf_counter())
    # This pytest process started (imported jax, collected) well before this test.
    assert time.perf_counter() - mono > 0.5 and time.time() - wall > 0.5
    since = time.perf_counter() - 2.0
    wall, mono = goodput.process_start(since=since)  # a second train() in the process
    assert mono == since and time.time() - wall == pytest.approx(2.0, abs=0.05)


@pytest.mark.slow
def test_a_preempted_run_and_its_resume_lose_no_work(tmp_path):
    from test_checkpoint import DP8, make_cfg
    from test_checkpoint_preemption import SignalAt

    from jaxscale.errors import Preempted
    from jaxscale.run.loop import train

    cfg = make_cfg(tmp_path, *DP8, "checkpoint.every=100", "steps=6")
    with pytest.raises(Preempted):
        train(cfg, hooks=[SignalAt(4)])
    assert not (tmp_path / "goodput.segment.json").exists()
    (stopped,) = read_jsonl(tmp_path / "goodput.jsonl")
    assert (stopped["status"], stopped["start_step"], stopped["last_step"]) == ("preempted", 0, 4)
    assert stopped["checkpoint_s"] > 0 and list(stopped["marks"]) == ["0", "4"]
    train(cfg)
    records = read_jsonl(tmp_path / "goodput.jsonl")
    assert [(r["status"], r["start_step"], r["last_step"]) for r in records] == [
        ("preempted", 0, 4), ("done", 4, 6)]
    acc = goodput.account(records)
    assert acc["total"]["lost"] == 0.0
    assert acc["total"]["restart_gap"] == pytest.approx(records[1]["start"] - records[0]["end"])
    summary = json.loads((tmp_path / "summary.json").read_text())["goodput"]
    assert summary == goodput.summary(acc)
    # The buckets are timed on the monotonic clock, the records' start and end are wall-clock
    # times: the two agree to well within a millisecond over the run (here they differed by
    # 25 microseconds, above pytest's default relative 1e-6).
    assert summary["total_s"] == pytest.approx(records[1]["end"] - records[0]["start"], abs=1e-3)
