"""Stop requests from signals: SIGTERM (a cluster's preemption or time limit) and SIGINT
(Ctrl-C) set a flag that a run checks between steps, so it can keep its work and exit cleanly
instead of dying in the middle of a write. A second SIGINT interrupts at once (KeyboardInterrupt).
Used by the CLI around a command; library calls keep Python's default handlers."""

from __future__ import annotations

import contextlib
import signal
import threading


class StopRequest:
    """Which signal asked the run to stop (``signum``), or None. ``is_set()`` is what the
    loops read: a plain attribute, no system call."""

    def __init__(self):
        self.signum: int | None = None

    def is_set(self) -> bool:
        return self.signum is not None

    def set(self, signum: int = signal.SIGTERM) -> None:
        if self.signum is None:
            self.signum = int(signum)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""


@contextlib.contextmanager
def stop_on_signals(signums=(signal.SIGTERM, signal.SIGINT)):
    """Within the block, the signals in ``signums`` set the yielded :class:`StopRequest`
    instead of ending the process; the old handlers come back after it. A second SIGINT
    raises KeyboardInterrupt (the user insists). Outside the main thread: no handlers."""
    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum, frame):
        if signum == signal.SIGINT and stop.signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop.set(signum)

    old = {s: signal.signal(s, handler) for s in signums}
    try:
        yield stop
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def ignore_in_worker(worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: workers ignore SIGTERM, so a signal sent to every process
    of a job (SLURM signals all of a step's processes) reaches the main process's handler
    instead of killing the workers under it; they still end with the main process."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
