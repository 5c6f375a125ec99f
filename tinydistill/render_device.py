"""Device rendering: encoded batches from DataLoader workers -> pixels, in a thread of the
main process, ahead of the model.

With the torch renderer, workers only read image bytes and draw parameter records
(:meth:`tinydistill.views.Views.encode`); the pixels are made here, on the run's device. The
same code runs on every device: on the CPU the thread renders with no CUDA stream, on a GPU it
renders on a side stream (:mod:`tinydistill.cuda` holds every CUDA-only line). Several batches are
rendered as one *render unit* of at least ``unit`` views, so the host's per-op dispatch cost
is shared by many views (a view's pixels do not depend on what it is rendered with).
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Iterator

import torch

from .batch import Batch, Encoded
from .cuda import SideStream
from .errors import TinydistillError, one_line

RENDER_UNIT = 1024  # views rendered together: >= 1,024 keeps host dispatch per view small

class RenderError(TinydistillError):
    """Rendering a unit of views failed for a reason other than an unreadable image."""


class DeviceRenderer:
    """Turns a stream's encoded batches into rendered batches on ``device``, in order.

    A thread pulls batches from the DataLoader until it holds ``unit`` views, renders them
    as one unit with :meth:`Views.render_encoded`, and queues the unit's batches (``depth``
    units at most), so the next unit is made while the model works on this one. An error in
    the thread ends the consuming loop with a one-line error naming the views; closing the
    generator (an exception or interrupt in the loop) stops the thread and the DataLoader's
    workers. ``busy`` holds the seconds the thread spent rendering.
    """

    def __init__(self, core, device, unit: int = RENDER_UNIT, depth: int = 2):
        self.core, self.device, self.unit, self.depth = core, torch.device(device), int(unit), depth
        self.busy = 0.0
        self.units = 0

    def __call__(self, loader) -> Iterator[Batch]:
        streams = SideStream.of(self.device)  # one per device for the run, not per epoch
        q: queue.Queue = queue.Queue(maxsize=self.depth)
        stop = threading.Event()
        end = object()
        source = iter(loader)

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def work():
            try:
                streams.bind_thread()
                pending, rows = [], 0
                for raw in source:
                    if stop.is_set():
                        return
                    pending.append(raw)
                    rows += len(raw)
                    if rows >= self.unit:
                        if not put(self._render_unit(pending, streams)):
                            return
                        pending, rows = [], 0
                if pending and not put(self._render_unit(pending, streams)):
                    return
                put(end)
            except BaseException as e:  # surfaced in the consuming thread
                put(e)

        thread = threading.Thread(target=work, name="tinydistill-render", daemon=True)
        self.thread = thread  # the last call's thread: closing the generator joins it
        thread.start()
        try:
            while True:
                item = q.get()
                if item is end:
                    return
                if isinstance(item, BaseException):
                    raise item
                batches, ready = item
                for b in batches:
                    streams.hand_over(b, ready)
                    yield b
        finally:
            stop.set()
            shutdown = getattr(source, "_shutdown_workers", None)
            if thread.is_alive() and shutdown is not None:
                shutdown()  # a thread waiting on a worker's batch gets an error and ends
            thread.join()  # it checks `stop` at least every 0.1 s; after this, it has ended

    def _render_unit(self, parts: list[Encoded], streams: SideStream):
        t0 = time.perf_counter()
        raw = Encoded.merge(parts)
        streams.before_unit()
        try:
            with streams.rendering():
                out = self.core.render_encoded(raw, self.device)
                ready = streams.done()
        except TinydistillError:
            raise
        except Exception as e:
            v = raw.views
            raise RenderError(f"{self.core.source.name}: rendering views of epoch(s) {sorted(set(v.epoch.tolist()))} "
                              f"rows {int(v.row.min())}..{int(v.row.max())} on {self.device} failed "
                              f"({one_line(e)})") from e
        batches, lo = [], 0
        for p in parts:
            b = out.slice(lo, lo + len(p))
            b.worker, b.busy_s = p.views.worker, p.views.busy_s
            batches.append(b)
            lo += len(p)
        self.busy += time.perf_counter() - t0
        self.units += 1
        return batches, ready
