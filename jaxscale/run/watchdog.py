"""The hang watchdog: a stuck step (a collective waiting on a dead peer) ends the run, loudly.

The loop `pet`s the watchdog with each step it dispatches and an array that step produces. A
waiter thread blocks on those arrays in turn and records when each step finished, so the watchdog
knows true step times even though the loop runs ahead of the device. A monitor thread looks every
`poll_seconds`: if the step in flight has run longer than ``max(min_seconds, factor x median
step time)``, or no step has been dispatched for that long while none is in flight (a hung
evaluation, save or input pipeline, or a dispatch that runs the step synchronously), it writes
every thread's stack and the step to stderr and to ``<workdir>/watchdog.process<i>.txt``, waits
`timeout` more seconds for the step to finish, and then exits the process with `EXIT_CODE` (5)
instead of hanging forever. A step that finishes within the timeout re-arms the watchdog.

The median is over the last `window` finished steps; until one has finished, the limit is
`min_seconds`. The watchdog also stops by itself once the function that started it (the training
loop's frame) is no longer running, so a loop that ends by an exception never leaves it armed.
"""

from __future__ import annotations

import collections
import os
import pathlib
import statistics
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

from jaxscale.config import WatchdogConfig

# The exit status of a run the watchdog ended (cli.EXIT_WATCHDOG, documented in docs/cli.md).
EXIT_CODE = 5


def thread_stacks() -> str:
    """Every thread's Python stack, named, like faulthandler's dump but with thread names."""
    names = {t.ident: t.name for t in threading.enumerate()}
    parts = []
    for ident, frame in sys._current_frames().items():
        parts.append(f'Thread "{names.get(ident, "?")}" ({ident}), most recent call last:\n')
        parts.extend(traceback.format_stack(frame))
    return "".join(parts)


def _block(x: Any) -> None:
    import jax

    jax.block_until_ready(x)


class Watchdog:
    """Watches step times in background threads; see the module docstring.

    Args:
      factor: a step is hung past this many median step times.
      min_seconds: ...and never before this many seconds.
      timeout: seconds to wait after the report before exiting.
      poll_seconds: how often the monitor looks.
      dump_path: also write the report to this file.
      window: finished steps the median is taken over.
      wait: blocks until an array is computed (default `jax.block_until_ready`).
      exit: ends the process (default `os._exit`, which no exception handler can swallow).
      owner: a frame; the watchdog disarms once it is off its thread's stack (default: none).
    """

    def __init__(
        self,
        *,
        factor: float,
        min_seconds: float,
        timeout: float,
        poll_seconds: float = 1.0,
        dump_path: str | os.PathLike | None = None,
        window: int = 100,
        wait: Callable[[Any], None] = _block,
        exit: Callable[[int], None] = os._exit,
        owner: Any = None,
    ):
        self.factor, self.min_seconds, self.timeout = factor, min_seconds, timeout
        self.poll_seconds = poll_seconds
        self.dump_path = dump_path
        self._wait, self._exit = wait, exit
        self._owner, self._owner_thread = owner, threading.get_ident()
        self._durations: collections.deque[float] = collections.deque(maxlen=window)
        self._in_flight: collections.deque[tuple[int, float, Any]] = collections.deque()
        self._cond = threading.Condition()
        self._last_done = self._last_pet = time.monotonic()
        self._last_step = 0
        self._stopped = threading.Event()
        self.fired: list[str] = []  # the reports made, for tests and post-mortems
        self._threads = [
            threading.Thread(target=self._await_steps, name="watchdog-waiter", daemon=True),
            threading.Thread(target=self._monitor, name="watchdog-monitor", daemon=True),
        ]

    def start(self) -> Watchdog:
        self._last_done = self._last_pet = time.monotonic()
        for t in self._threads:
            t.start()
        return self

    def pet(self, step: int, output: Any) -> None:
        """Step `step` was dispatched; `output` is an array it computes (e.g. its loss)."""
        with self._cond:
            now = time.monotonic()
            self._last_pet = now
            self._in_flight.append((step, now, output))
            self._cond.notify()

    def stop(self) -> None:
        """Stop watching (idempotent); call when the loop ends, normally or not."""
        self._stopped.set()
        with self._cond:
            self._cond.notify_all()
        for t in self._threads:
            if t.is_alive() and t is not threading.current_thread():
                t.join(timeout=max(self.poll_seconds, 0.1) * 2)

    def __enter__(self) -> Watchdog:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- threads -------------------------------------------------------------------------------

    def median(self) -> float | None:
        return statistics.median(self._durations) if self._durations else None

    def limit(self) -> float:
        median = self.median()
        return self.min_seconds if median is None else max(self.min_seconds, self.factor * median)

    def _await_steps(self) -> None:
        while not self._stopped.is_set():
            with self._cond:
                while not self._in_flight and not self._stopped.is_set():
                    self._cond.wait()
                if self._stopped.is_set():
                    return
                step, dispatched, output = self._in_flight[0]
            try:
                self._wait(output)
            except Exception:  # a failed step raises in the loop too; keep timing the rest
                pass
            with self._cond:
                now = time.monotonic()
                self._durations.append(now - max(dispatched, self._last_done))
                self._last_done, self._last_step = now, step
                self._in_flight.popleft()
                self._cond.notify_all()

    def _stalled(self) -> tuple[str, float, Any] | None:
        """(what, seconds, token) of a stall past the limit; token tells when it is over."""
        with self._cond:
            now, limit = time.monotonic(), self.limit()
            if self._in_flight:
                step, dispatched, _ = self._in_flight[0]
                started = max(dispatched, self._last_done)
                if now - started > limit:
                    return f"step {step} has run for", now - started, ("step", step)
                return None
            since = now - max(self._last_pet, self._last_done)
            if since > limit:
                last = self._last_step
                return (f"no step after step {last} was dispatched (the loop is stuck dispatching "
                        f"step {last + 1}, evaluating, saving a checkpoint or reading input) for",
                        since, ("idle", self._last_pet))
            return None

    def _over(self, token: Any) -> bool:
        with self._cond:
            if token[0] == "step":
                return not self._in_flight or self._in_flight[0][0] != token[1]
            return self._last_pet != token[1]

    def _owner_running(self) -> bool:
        if self._owner is None:
            return True
        frame = sys._current_frames().get(self._owner_thread)
        while frame is not None:
            if frame is self._owner:
                return True
            frame = frame.f_back
        return False

    def _monitor(self) -> None:
        while not self._stopped.wait(self.poll_seconds):
            if not self._owner_running():
                self._stopped.set()
                with self._cond:
                    self._cond.notify_all()
                return
            stall = self._stalled()
            if stall is None:
                continue
            what, seconds, token = stall
            self._report(what, seconds)
            deadline = time.monotonic() + self.timeout
            while time.monotonic() < deadline and not self._stopped.is_set():
                if self._over(token):
                    break
                time.sleep(min(self.poll_seconds, 0.1))
            else:
                if not self._stopped.is_set():
                    self._report_exit()
                    self._exit(EXIT_CODE)
                    return
            if not self._stopped.is_set():
                moved = f"step {token[1]} finished" if token[0] == "step" else "the loop moved"
                self._emit(f"watchdog: {moved} within the timeout; watching on\n")

    # -- reporting -----------------------------------------------------------------------------

    def _process(self) -> int:
        if "jax" not in sys.modules:
            return 0
        import jax

        return jax.process_index()

    def _emit(self, text: str) -> None:
        sys.stderr.write(text)
        sys.stderr.flush()
        if self.dump_path is not None:
            try:
                with open(self.dump_path, "a") as f:
                    f.write(text)
            except OSError:
                pass

    def _report(self, what: str, seconds: float) -> None:
        median = self.median()
        basis = (f"{self.factor:g} x the median step time {median:.3f}s, at least "
                 f"{self.min_seconds:g}s" if median is not None else
                 f"watchdog.min_seconds={self.min_seconds:g}; no step finished yet")
        text = (
            f"watchdog: process {self._process()}: {what} {seconds:.1f}s, over the limit of "
            f"{self.limit():.1f}s ({basis}); a collective may be waiting on a dead or stuck "
            f"peer. Exiting with code {EXIT_CODE} in {self.timeout:g}s unless it moves. "
            "Stacks of all threads:\n" + thread_stacks()
        )
        self.fired.append(text)
        self._emit(text)

    def _report_exit(self) -> None:
        self._emit(f"watchdog: process {self._process()}: still stuck after {self.timeout:g}s; "
                   f"exiting with code {EXIT_CODE}\n")
        sys.stdout.flush()


class _Off:
    """The watchdog when watchdog.factor=0: does nothing."""

    def pet(self, step: int, output: Any) -> None:
        pass

    def stop(self) -> None:
        pass


def start_watchdog(cfg: WatchdogConfig, workdir: str | os.PathLike) -> Watchdog | _Off:
    """A started watchdog for the config (a do-nothing one when watchdog.factor=0).

    It watches for as long as the calling function runs (or until `stop`).
    """
    if cfg.factor == 0:
        return _Off()
    name = "watchdog.process{}.txt"
    dump = None
    if pathlib.Path(workdir).is_dir():
        import jax

        dump = pathlib.Path(workdir) / name.format(jax.process_index())
    return Watchdog(factor=cfg.factor, min_seconds=cfg.min_seconds, timeout=cfg.timeout,
                    poll_seconds=cfg.poll_seconds, dump_path=dump, owner=sys._getframe(1)).start()
