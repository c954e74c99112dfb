"""jaxscale.run.watchdog: a step that runs far past the median step time dumps every thread's stack
and ends the process with exit code 5; a slow step that finishes in time does not; a hung step
in a real training run (an injected host callback that never returns) ends the run."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from jaxscale import cli
from jaxscale import config as config_lib
from jaxscale.config import ConfigError, WatchdogConfig
from jaxscale.run.watchdog import EXIT_CODE, Watchdog, start_watchdog, thread_stacks


class FakeSteps:
    """Steps whose completion the test controls: `wait` blocks on the step's Event."""

    def __init__(self):
        self.exits: list[int] = []
        self.exited = threading.Event()

    def wait(self, event: threading.Event) -> None:
        event.wait()

    def exit(self, code: int) -> None:
        self.exits.append(code)
        self.exited.set()

    def watchdog(self, tmp_path, **kw) -> Watchdog:
        args = dict(factor=5.0, min_seconds=0.3, timeout=0.5, poll_seconds=0.02,
                    dump_path=tmp_path / "dump.txt") | kw
        return Watchdog(wait=self.wait, exit=self.exit, **args)


def _run_steps(dog: Watchdog, first: int, count: int, seconds: float) -> None:
    for step in range(first, first + count):
        done = threading.Event()
        dog.pet(step, done)
        time.sleep(seconds)
        done.set()
    time.sleep(0.05)


def test_hung_step_dumps_stacks_and_exits_with_code_5(tmp_path, capsys):
    fake = FakeSteps()
    dog = fake.watchdog(tmp_path).start()
    hung = threading.Event()
    try:
        _run_steps(dog, 1, 5, 0.01)
        assert dog.median() is not None and dog.median() < 0.1
        assert dog.limit() == pytest.approx(0.3)  # min_seconds dominates 5 x median
        start = time.monotonic()
        dog.pet(6, hung)  # never set: the step hangs
        assert fake.exited.wait(10)
        elapsed = time.monotonic() - start
    finally:
        hung.set()
        dog.stop()
    assert fake.exits == [EXIT_CODE] == [5]
    assert 0.3 + 0.5 <= elapsed < 5  # past the limit, then the timeout
    (report,) = dog.fired
    assert "step 6 has run for" in report and "over the limit of 0.3s" in report
    assert "Stacks of all threads" in report
    assert 'Thread "watchdog-waiter"' in report and "in wait" in report  # blocked on step 6
    assert 'Thread "MainThread"' in report
    err = capsys.readouterr().err
    assert report in err and "still stuck after 0.5s; exiting with code 5" in err
    assert report in (tmp_path / "dump.txt").read_text()


def test_slow_step_that_finishes_within_the_timeout_is_forgiven(tmp_path, capsys):
    fake = FakeSteps()
    dog = fake.watchdog(tmp_path, timeout=3.0).start()
    try:
        _run_steps(dog, 1, 3, 0.01)
        slow = threading.Event()
        dog.pet(4, slow)
        deadline = time.monotonic() + 10
        while not dog.fired and time.monotonic() < deadline:
            time.sleep(0.02)
        assert dog.fired  # reported ...
        slow.set()  # ... but it finishes before the timeout
        _run_steps(dog, 5, 3, 0.01)
        time.sleep(0.3)
    finally:
        dog.stop()
    assert fake.exits == []
    assert "step 4 finished within the timeout; watching on" in capsys.readouterr().err


def test_limit_follows_the_median_step_time(tmp_path):
    fake = FakeSteps()
    dog = fake.watchdog(tmp_path, factor=4.0, min_seconds=0.0).start()
    try:
        _run_steps(dog, 1, 5, 0.1)
    finally:
        dog.stop()
    assert 0.09 <= dog.median() < 0.3
    assert dog.limit() == pytest.approx(4 * dog.median())


def test_idle_loop_counts_as_a_hang(tmp_path):
    """No step in flight and none dispatched for too long (a hung evaluation or input)."""
    fake = FakeSteps()
    dog = fake.watchdog(tmp_path, timeout=0.2).start()
    try:
        _run_steps(dog, 1, 3, 0.01)
        assert fake.exited.wait(10)
    finally:
        dog.stop()
    assert "no step after step 3 was dispatched" in dog.fired[0]


def test_disarms_when_its_owner_returns(tmp_path):
    fake = FakeSteps()

    def loop():
        dog = Watchdog(factor=5.0, min_seconds=0.2, timeout=0.1, poll_seconds=0.02,
                       wait=fake.wait, exit=fake.exit, owner=sys._getframe()).start()
        _run_steps(dog, 1, 2, 0.01)
        raise RuntimeError("the loop failed")  # leaves without calling stop()

    with pytest.raises(RuntimeError):
        loop()
    time.sleep(1.0)
    assert fake.exits == []


def test_off_when_factor_is_zero(tmp_path):
    before = set(threading.enumerate())
    dog = start_watchdog(WatchdogConfig(factor=0), tmp_path)
    dog.pet(1, None)
    assert set(threading.enumerate()) == before
    dog.stop()


def test_thread_stacks_names_every_thread():
    ready, release = threading.Event(), threading.Event()

    def parked():
        ready.set()
        release.wait()

    t = threading.Thread(target=parked, name="parked-thread")
    t.start()
    ready.wait()
    try:
        text = thread_stacks()
    finally:
        release.set()
        t.join()
    assert 'Thread "parked-thread"' in text and "in parked" in text
    assert "in test_thread_stacks_names_every_thread" in text


def test_exit_code_is_the_cli_constant():
    assert cli.EXIT_WATCHDOG == EXIT_CODE == 5


@pytest.mark.parametrize("overrides, message", [
    (["watchdog.factor=1"], "watchdog.factor=1.0 must be above 1 (or 0 to turn it off)"),
    (["watchdog.factor=-2"], "watchdog.factor=-2.0 must be >= 0"),
    (["watchdog.min_seconds=-1"], "watchdog.min_seconds=-1.0 must be >= 0"),
    (["watchdog.timeout=-1"], "watchdog.timeout=-1.0 must be >= 0"),
    (["watchdog.poll_seconds=0"], "watchdog.poll_seconds=0.0 must be positive"),
    (["watchdog.factr=3"], "unknown config key 'watchdog.factr' (did you mean 'factor'?)"),
])
def test_bad_watchdog_settings_fail_with_one_line(overrides, message):
    with pytest.raises(ConfigError) as info:
        config_lib.load("tiny", overrides)
    assert message in str(info.value) and "\n" not in str(info.value)


# A training run whose 4th step never finishes: the model's forward pass calls back to the host,
# and the callback of the 4th training step sleeps forever (as a collective with a dead peer would).
HUNG_RUN = """
import sys, time
import jax
import jax.numpy as jnp
from jaxscale.models.linen import LinenAdapter
from jaxscale import cli

calls = [0]

def hang_forever():
    while True:
        time.sleep(1)

def maybe_hang(token):
    calls[0] += 1
    if calls[0] == 4:
        hang_forever()
    return jnp.zeros((), jnp.float32)

apply = LinenAdapter.apply

def apply_that_hangs(self, params, extra, inputs, *, rng, train):
    applied = apply(self, params, extra, inputs, rng=rng, train=train)
    if train:  # training steps only
        zero = jax.pure_callback(maybe_hang, jax.ShapeDtypeStruct((), jnp.float32),
                                 inputs["inputs"][0, 0])
        applied = applied._replace(outputs=applied.outputs + zero)
    return applied

LinenAdapter.apply = apply_that_hangs
sys.exit(cli.main(sys.argv[1:]))
"""


def test_hung_training_step_ends_the_run_with_stacks(tmp_path):
    script = tmp_path / "hung_run.py"
    script.write_text(textwrap.dedent(HUNG_RUN))
    workdir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    args = [sys.executable, str(script), "train", "--config", "tiny", "--cpu-devices", "1",
            "model.num_layers=1", "model.d_model=32", "model.num_heads=2", "model.num_kv_heads=1",
            "model.d_ff=64", "seq_len=16", "batch_size=4", "eval_batches=1", "progress=false",
            "steps=50", "eval_every=0", "data.source=synthetic", "model.vocab_size=64",
            f"workdir={workdir}", "watchdog.factor=3", "watchdog.min_seconds=2",
            "watchdog.timeout=2", "watchdog.poll_seconds=0.2"]
    start = time.monotonic()
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    elapsed = time.monotonic() - start
    assert proc.returncode == cli.EXIT_WATCHDOG, proc.stderr[-3000:]
    err = proc.stderr
    # The CPU client runs a step with host callbacks inside its dispatch call, so the loop never
    # returns from dispatching step 4 (on GPU/TPU dispatch returns and the step itself is timed).
    assert ("watchdog: process 0: no step after step 3 was dispatched (the loop is stuck "
            "dispatching step 4" in err) or "watchdog: process 0: step 4 has run for" in err
    assert "Stacks of all threads" in err and 'Thread "MainThread"' in err
    assert "in hang_forever" in err  # the stuck callback's own frame
    assert "still stuck after 2s; exiting with code 5" in err
    dump = (workdir / "watchdog.process0.txt").read_text()
    assert "step 4" in dump and "in hang_forever" in dump
    assert elapsed < 280
