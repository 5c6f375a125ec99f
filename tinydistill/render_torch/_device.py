"""Host -> device: every host array reaches a device through :func:`upload`, which counts it.

On CUDA a plain ``tensor.to(device)`` from pageable memory makes the host wait for the stream,
so the GPU idles while the host builds the next table. :func:`upload` instead packs the arrays
of one step into one host buffer (pinned on CUDA) and moves them in one asynchronous copy;
torch's pinned-memory allocator keeps the buffer until that copy is done, so nothing waits.
Constants (grey weights, divisors, tap offsets, normalisation) are made once per device
(:func:`constant`). ``UPLOADS`` counts the copies, so tests can hold the counts on the CPU.
"""

from __future__ import annotations

import collections
import threading

import numpy as np
import torch

_NP_DTYPES = {torch.float32: np.float32, torch.float64: np.float64, torch.int64: np.int64, torch.int32: np.int32,
              torch.bool: np.bool_}

# upload()'s copies host -> device: "copies", "bytes", and "copies@THREAD" per thread's name
UPLOADS: collections.Counter = collections.Counter()
_CONSTANTS: dict = {}
_LOCK = threading.Lock()
_ALIGN = 16  # every packed array starts on a 16-byte boundary (any dtype can view it)


def upload(*arrays, device, wait: bool = False) -> list[torch.Tensor]:
    """Host arrays (numpy, or CPU tensors) on ``device``, in ONE copy: packed into one uint8
    buffer (pinned on CUDA), moved with ``non_blocking`` (``wait``: a blocking copy, done when
    this returns, so any stream may read the result), viewed back as each array's dtype and
    shape. Counted in ``UPLOADS`` (one copy per call, whatever the number of arrays)."""
    device = torch.device(device)
    arrs = [np.ascontiguousarray(a.numpy() if torch.is_tensor(a) else a) for a in arrays]
    offs, n = [], 0
    for a in arrs:
        offs.append(n)
        n += -(-a.nbytes // _ALIGN) * _ALIGN
    buf = torch.empty(max(n, 1), dtype=torch.uint8, pin_memory=device.type == "cuda")
    host = buf.numpy()
    for a, o in zip(arrs, offs):
        host[o:o + a.nbytes] = a.reshape(-1).view(np.uint8)
    dev = buf.to(device, non_blocking=not wait)
    with _LOCK:
        UPLOADS["copies"] += 1
        UPLOADS["bytes"] += n
        UPLOADS[f"copies@{threading.current_thread().name}"] += 1  # e.g. copies@MainThread
    return [dev[o:o + a.nbytes].view(torch.from_numpy(a[:0].reshape(-1)).dtype).view(a.shape)
            for a, o in zip(arrs, offs)]


def _dev(a: np.ndarray, device) -> torch.Tensor:
    """One host array on ``device`` (:func:`upload`)."""
    return upload(a, device=device)[0]


def constant(values, device, dtype=torch.float32) -> torch.Tensor:
    """``values`` (a number, or nested sequences of numbers) as a tensor on ``device``, made
    once per device and dtype and kept: no copy per call. Callers must not write into it.
    Made with a blocking copy (once), so every thread's stream can use it."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    a = np.asarray(values, _NP_DTYPES[dtype])
    key = (str(device), dtype, a.shape, a.tobytes())
    t = _CONSTANTS.get(key)
    if t is None:
        t = upload(a, device=device, wait=True)[0]
        with _LOCK:
            t = _CONSTANTS.setdefault(key, t)
    return t


def _const(v: float, device, dtype=torch.float32) -> torch.Tensor:
    """A 0-dim tensor on ``device`` (cached: :func:`constant`). Divide by this, never by a
    Python scalar: on CUDA ``x / c`` with a scalar ``c`` (or a CPU scalar tensor) is computed as
    ``x * (1 / c)``, one rounding more than a true division (wrong for 126 of 256 grey levels
    at c = 255), so the CPU and GPU would disagree."""
    return constant(v, device, dtype)


def _col(values, device, dtype=torch.float32) -> torch.Tensor:
    """Per-sample scalars as an [n, 1, 1, 1] tensor: built in numpy, moved in one copy."""
    return _dev(np.asarray(values, _NP_DTYPES[dtype]).reshape(-1, 1, 1, 1), device)


def _rows(idx, device) -> torch.Tensor:
    """Batch positions ``idx`` as an int64 index tensor on ``device``."""
    return _dev(np.array(idx, np.int64), device)


def _update_rows(out: torch.Tensor, idx, fn, src: torch.Tensor | None = None, t: torch.Tensor | None = None) -> torch.Tensor:
    """``out[idx] = fn(src[idx])`` (``src`` defaults to ``out``): one index copy (none when the
    index tensor ``t`` came with other tables), one ``index_select``, ``fn``, one
    ``index_copy_``. Returns ``out``, updated in place."""
    if t is None:
        t = _rows(idx, out.device)
    out.index_copy_(0, t, fn((out if src is None else src).index_select(0, t)))
    return out
