"""Stop signals: the watch, the loop's save-and-stop, and the agreement of several processes on
the same stop step."""

import os
import signal
import socket
import subprocess
import sys
import time

import jax
import pytest
from test_checkpoint import DP8, make_cfg

from jaxscale.errors import Preempted
from jaxscale.run.loop import train
from jaxscale.run.preemption import StopSignal


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_becomes_a_stop_at_the_next_step_boundary(signum):
    before = signal.getsignal(signum)
    watch = StopSignal()
    try:
        assert not watch.should_stop(1)
        os.kill(os.getpid(), signum)
        assert watch.should_stop(2) and watch.should_stop(3)
        assert watch.signal_name == signal.Signals(signum).name
    finally:
        watch.close()
    assert signal.getsignal(signum) is before


def test_a_second_sigint_interrupts_at_once():
    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's usual handler
    try:
        watch = StopSignal()
        os.kill(os.getpid(), signal.SIGINT)
        assert watch.should_stop(1)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs here at the latest
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back
    finally:
        watch.close()
        signal.signal(signal.SIGINT, before)


class SignalAt:
    """A loop hook that sends this process SIGTERM after step `step` (as a scheduler would)."""

    def __init__(self, step: int):
        self.step = step

    def when(self, step: int) -> bool:
        return step == self.step

    def __call__(self, ctx) -> None:
        os.kill(os.getpid(), signal.SIGTERM)


def test_save_on_stop_commits_then_raises_preempted(tmp_path):
    cfg = make_cfg(tmp_path, *DP8, "checkpoint.every=100")
    with pytest.raises(Preempted) as e:
        train(cfg, hooks=[SignalAt(4)])
    # Raised only after the step committed: it is on disk now, not in a temporary folder.
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["4"]
    assert str(e.value) == (f"stopped on SIGTERM after step 4; checkpoint saved in "
                            f"{tmp_path / 'checkpoints'}. Run the same command again to resume")


def test_a_stop_at_a_local_save_step_also_saves_durably(tmp_path):
    """A stop signal may mean the node is going away: the stop step goes to the durable tier
    even when the interval had just saved it to the local one."""
    cfg = make_cfg(tmp_path, *DP8, "checkpoint.every=100", f"checkpoint.local_dir={tmp_path}/l",
                   "checkpoint.local_every=2")
    with pytest.raises(Preempted):
        train(cfg, hooks=[SignalAt(4)])
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["4"]
    assert sorted(p.name for p in (tmp_path / "l").iterdir()) == ["2", "4"]


def test_a_stop_at_the_last_step_just_finishes(tmp_path):
    cfg = make_cfg(tmp_path, *DP8, "steps=10")
    state = train(cfg, hooks=[SignalAt(10)])  # no Preempted: the run is complete
    assert int(state.step) == 10
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["10"]


WORKER = """
import os, sys, time
import jax
port, index, progress = sys.argv[1], int(sys.argv[2]), sys.argv[3]
jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=index)
from jaxscale.run.loop import train
from jaxscale.run.preemption import StopSignal
watch = StopSignal(sync_every=5)
for step in range(1, 100_000):
    time.sleep(0.01 * (index + 1))  # process 1 is the slower one
    with open(progress + ".tmp", "w") as f:
        f.write(str(step))
    os.replace(progress + ".tmp", progress)
    if watch.should_stop(step):
        print(f"stop {step} {watch.signal_name}", flush=True)
        break
watch.close()
jax.distributed.shutdown()
"""


@pytest.mark.multiprocess
def test_processes_agree_on_the_stop_step_when_only_one_is_signalled(tmp_path):
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu"}
    progress = [tmp_path / f"progress{i}" for i in range(2)]
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(port), str(i), str(progress[i])],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for i in range(2)]
    try:
        deadline = time.monotonic() + 120
        while not all(p.exists() and int(p.read_text() or 0) >= 12 for p in progress):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
            time.sleep(0.05)
        procs[1].send_signal(signal.SIGTERM)  # process 0 gets no signal
        signalled_at = int(progress[1].read_text())
        outputs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], outputs
    lines = [out.strip().splitlines()[-1].split(" ", 2) for out, _ in outputs]
    (_, step0, why0), (_, step1, why1) = lines
    assert step0 == step1 and int(step0) % 5 == 0 and int(step0) >= signalled_at
    assert why1 == "SIGTERM" and why0 == "SIGTERM on another process"
    assert jax.process_count() == 1  # this test process is not part of it
