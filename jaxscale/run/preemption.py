"""Stop requests: SIGTERM or SIGINT become a step at which every process stops, the same for all.

A signal handler only sets a flag. The training loop asks `should_stop(step)` at every step
boundary. With one process the answer is the flag itself. With several, a signal may reach only
some of them, at different times, so the processes agree through the JAX distributed runtime's
key-value store at every `sync_every`-th step ("check steps"): a process that has seen a signal
writes ``jaxscale/stop/<watch>/<step>/<process>`` *before* it enters the barrier of that check
step, and every process reads the ``jaxscale/stop/<watch>/<step>/`` directory *after* the
barrier. A key under that directory can only have been written before its writer reached the
barrier, so every process reads the same set and stops at the same step. The cost is one barrier
round trip every `sync_every` steps, on the host only: nothing is added to the device program.

A second signal while a stop is pending restores the previous handlers and re-delivers the signal
(so a second Ctrl-C interrupts at once).
"""

from __future__ import annotations

import itertools
import signal
import threading
from collections.abc import Sequence

import jax

# How long a process waits at a check step for the others (they all run the same loop, so they
# arrive within a step time of each other; a much longer wait means a process is gone).
BARRIER_TIMEOUT_MS = 10 * 60 * 1000


def _client():
    """The JAX distributed runtime client (set by `jax.distributed.initialize`)."""
    from jax._src import distributed

    client = distributed.global_state.client
    if client is None:
        raise RuntimeError(
            "several JAX processes but no distributed client: call jax.distributed.initialize() "
            "before training"
        )
    return client


class StopSignal:
    """Watches for a request to stop (SIGTERM, SIGINT or `request`) and turns it into one stop
    step that every process agrees on (`should_stop`).

    Args:
      signals: the signals that request a stop.
      sync_every: with several processes, agree every this many steps (a stop lands on the first
        multiple of it at or after the signal). One process checks every step.
    """

    # Every process creates its watches in the same order, so the n-th watch has the same
    # number everywhere: it keeps the barrier names of one run apart from the next's.
    _count = itertools.count()

    def __init__(
        self, signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT), *, sync_every: int = 10
    ):
        self._id = next(self._count)
        self._requested = threading.Event()
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}
        self.sync_every = 1 if jax.process_count() == 1 else max(1, sync_every)
        # Python delivers signals to the main thread only; elsewhere the watch just never fires.
        if threading.current_thread() is threading.main_thread():
            for signum in signals:
                self._previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame) -> None:
        if self._requested.is_set():
            self.close()
            signal.raise_signal(signum)
            return
        self.signal_name = signal.Signals(signum).name
        self._requested.set()

    def request(self, name: str = "request") -> None:
        """Ask for a stop as a signal would (for callers with their own reasons to stop)."""
        self.signal_name = self.signal_name or name
        self._requested.set()

    def should_stop(self, step: int) -> bool:
        """True if the run should save and stop after `step`; every process gets the same answer.

        Call it on every process at every step boundary, with increasing steps.
        """
        if self.sync_every == 1 and jax.process_count() == 1:
            return self._requested.is_set()
        if step % self.sync_every:
            return False
        client = _client()
        prefix = f"jaxscale/stop/{self._id}/{step}/"
        if self._requested.is_set():
            client.key_value_set(prefix + str(jax.process_index()), self.signal_name or "stop")
        client.wait_at_barrier(f"jaxscale_stop_{self._id}_{step}", BARRIER_TIMEOUT_MS)
        seen = client.key_value_dir_get(prefix)
        if seen and self.signal_name is None:
            self.signal_name = f"{seen[0][1]} on another process"
        return bool(seen)

    def close(self) -> None:
        """Put the previous signal handlers back."""
        previous, self._previous = self._previous, {}
        for signum, handler in previous.items():
            signal.signal(signum, handler)
