"""Stop requests from signals, so a command keeps its work and says what it kept.

Clusters preempt with SIGTERM, then SIGKILL after a grace period (SLURM: ``--signal``). Python's
default for SIGTERM is to die on the spot. Two ways to stop cleanly instead:

- :func:`stop_on` (gen-logits): the signal raises :class:`Terminated`, a KeyboardInterrupt, in
  the main thread, so the code that already cleans up after Ctrl-C cleans up after a
  preemption notice too (whole units are written, the rest dropped).
- :func:`stop_on_signals` (train-student): SIGTERM and the first Ctrl-C set a
  :class:`StopRequest` that the loop reads between steps, so it can checkpoint at the step; a
  second Ctrl-C interrupts at once.

Either ends in :class:`~tinydistill.errors.Stopped`, which the CLI turns into one line and
exit status 128 + the signal's number. Library calls keep Python's default handlers.
"""

from __future__ import annotations

import contextlib
import signal
import threading

from .errors import Stopped  # noqa: F401  (re-exported: the exception every stopped command raises)


class Terminated(KeyboardInterrupt):
    """A stop signal other than SIGINT (SIGTERM, SIGUSR1 ...) arrived; ``signum`` says which."""

    def __init__(self, signum: int):
        super().__init__(name(signum))
        self.signum = signum


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
        return name(self.signum) if self.signum else ""


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
    """A DataLoader ``worker_init_fn``: workers ignore SIGINT and SIGTERM (a terminal or SLURM
    signals the whole process group) and leave stopping to the main process, which shuts them
    down; they still exit on their own when the main process dies."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
