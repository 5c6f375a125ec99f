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

import numpy as np
import torch

from .cuda import SideStream
from .errors import TinydistillError

RENDER_UNIT = 1024  # views rendered together: >= 1,024 keeps host dispatch per view small

# encoded fields with one entry per row (concatenated when batches merge)
ROW_FIELDS = ("row", "seed", "label", "partner", "partner_label", "lam", "valid")
# fields a rendered batch passes through from its encoded batch
PASS_FIELDS = ("logp", "index", "worker", "busy_s")


class RenderError(TinydistillError):
    """Rendering a unit of views failed for a reason other than an unreadable image."""


def merge_encoded(parts: list[dict]) -> dict:
    """Several encoded batches (of any epochs) as one: per-row fields concatenated, image slots
    renumbered, pixel buffers and erase plans joined. ``epoch`` becomes a per-row array."""
    if len(parts) == 1 and np.ndim(parts[0]["epoch"]) == 1:
        return parts[0]
    out: dict = {k: np.concatenate([np.asarray(p[k]) for p in parts]) for k in ROW_FIELDS}
    out["epoch"] = np.concatenate([np.broadcast_to(np.asarray(p["epoch"], np.int64), (len(p["row"]),))
                                   for p in parts])
    slot, pslot, pix_off, erase_slot = [], [], [], []
    n_slots = n_pix = 0
    for p in parts:
        s, ps = np.asarray(p["slot"]), np.asarray(p["pslot"])
        slot.append(np.where(s >= 0, s + n_slots, -1))
        pslot.append(np.where(ps >= 0, ps + n_slots, -1))
        off = np.asarray(p["pix_off"])
        pix_off.append(np.where(off >= 0, off + n_pix, -1))
        erase_slot.append(np.asarray(p["erase_slot"]) + n_slots)
        n_slots += len(p["params"])
        n_pix += len(p["pixels"])
    out["slot"], out["pslot"] = np.concatenate(slot), np.concatenate(pslot)
    out["pix_off"], out["erase_slot"] = np.concatenate(pix_off), np.concatenate(erase_slot)
    tail = max((q.src_size[0] for p in parts for q in p["params"]), default=0)  # see views._tail
    out["pixels"] = np.concatenate([np.asarray(p["pixels"]) for p in parts] + [np.zeros(tail, np.uint8)])
    out["erase_idx"] = np.concatenate([np.asarray(p["erase_idx"]) for p in parts])
    out["erase_val"] = np.concatenate([np.asarray(p["erase_val"]) for p in parts])
    for k in ("jpeg", "params", "keys"):
        out[k] = [x for p in parts for x in p[k]]
    return out


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

    def __call__(self, loader) -> Iterator[dict]:
        streams = SideStream(self.device)
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
                    rows += len(raw["row"])
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
            thread.join(timeout=30)

    def _render_unit(self, parts: list[dict], streams: SideStream):
        t0 = time.perf_counter()
        raw = merge_encoded(parts)
        streams.before_unit()
        try:
            with streams.rendering():
                out = self.core.render_encoded(raw, self.device)
                ready = streams.done()
        except TinydistillError:
            raise
        except Exception as e:
            ep, rows = np.asarray(raw["epoch"]), np.asarray(raw["row"])
            msg = str(e).splitlines()[0] if str(e) else ""
            raise RenderError(f"{self.core.source.name}: rendering views of epoch(s) {sorted(set(ep.tolist()))} "
                              f"rows {rows.min()}..{rows.max()} on {self.device} failed "
                              f"({type(e).__name__}: {msg})") from e
        batches, lo = [], 0
        for p in parts:
            n = len(p["row"])
            b = {k: v[lo:lo + n] for k, v in out.items()}
            for k in PASS_FIELDS:
                if k in p:
                    b[k] = p[k]
            batches.append(b)
            lo += n
        self.busy += time.perf_counter() - t0
        self.units += 1
        return batches, ready
