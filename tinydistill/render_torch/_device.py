"""Host -> device: every per-sample number goes to the device as one numpy-built array per step."""

from __future__ import annotations

import numpy as np
import torch

_NP_DTYPES = {torch.float32: np.float32, torch.float64: np.float64, torch.int64: np.int64, torch.int32: np.int32,
              torch.bool: np.bool_}


def _dev(a: np.ndarray, device) -> torch.Tensor:
    """A host array on ``device``: one copy (``torch.from_numpy(a).to(device)``)."""
    return torch.from_numpy(np.ascontiguousarray(a)).to(device)


def _const(v: float, device, dtype=torch.float32) -> torch.Tensor:
    """A 0-dim tensor on ``device``. Divide by this, never by a Python scalar: on CUDA ``x / c``
    with a scalar ``c`` (or a CPU scalar tensor) is computed as ``x * (1 / c)``, one rounding
    more than a true division (wrong for 126 of 256 grey levels at c = 255), so the CPU and
    GPU would disagree."""
    return torch.full((), v, dtype=dtype, device=device)


def _col(values, device, dtype=torch.float32) -> torch.Tensor:
    """Per-sample scalars as an [n, 1, 1, 1] tensor: built in numpy, moved in one copy."""
    return _dev(np.asarray(values, _NP_DTYPES[dtype]).reshape(-1, 1, 1, 1), device)


def _rows(idx, device) -> torch.Tensor:
    """Batch positions ``idx`` as an int64 index tensor on ``device``."""
    return _dev(np.array(idx, np.int64), device)


def _update_rows(out: torch.Tensor, idx, fn, src: torch.Tensor | None = None) -> torch.Tensor:
    """``out[idx] = fn(src[idx])`` (``src`` defaults to ``out``): one index copy, one
    ``index_select``, ``fn``, one ``index_copy_``. Returns ``out``, updated in place."""
    t = _rows(idx, out.device)
    out.index_copy_(0, t, fn((out if src is None else src).index_select(0, t)))
    return out
