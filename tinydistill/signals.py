"""Stop requests as exceptions, so every command's clean-up runs and it can say what it kept.

Clusters preempt with SIGTERM, then SIGKILL after a grace period (SLURM: ``--signal``, 30-60 s
by default). Python's default for SIGTERM is to die on the spot; within :func:`stop_on` the
signal instead raises :class:`Terminated`, a KeyboardInterrupt, so the code that already
cleans up after Ctrl-C cleans up after a preemption notice too.
"""

from __future__ import annotations

import contextlib
import signal
import threading

from .errors import TinydistillError


class Terminated(KeyboardInterrupt):
    """A stop signal other than SIGINT (SIGTERM, SIGUSR1 ...) arrived; ``signum`` says which."""

    def __init__(self, signum: int):
        super().__init__(name(signum))
        self.signum = signum


class Stopped(TinydistillError):
    """A command stopped by a signal, after keeping what it could; the CLI exits 128 + signum."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


def name(signum: int) -> str:
    return signal.Signals(signum).name


def signum_of(exc: BaseException) -> int:
    """The signal behind a KeyboardInterrupt: SIGINT unless it is a :class:`Terminated`."""
    return getattr(exc, "signum", signal.SIGINT)


@contextlib.contextmanager
def stop_on(*signums: int):
    """Within the block each of ``signums`` (default SIGTERM) raises :class:`Terminated` in the
    main thread, once: later ones are ignored, so the clean-up it starts can finish (SIGKILL
    stays the backstop). Outside the main thread (a notebook's worker thread) it does nothing."""
    signums = signums or (signal.SIGTERM,)
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        for s in signums:
            signal.signal(s, signal.SIG_IGN)
        raise Terminated(signum)

    before = {s: signal.signal(s, handler) for s in signums}
    try:
        yield
    finally:
        for s, h in before.items():
            signal.signal(s, h)


def ignore_in_worker(worker_id: int = 0) -> None:
    """A DataLoader ``worker_init_fn``: workers ignore SIGINT and SIGTERM (a terminal or SLURM
    signals the whole process group) and leave stopping to the main process, which shuts them
    down; they still exit on their own when the main process dies."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
