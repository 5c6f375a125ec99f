"""Counting top-level aten ops: the host dispatch cost of a torch function.

On a GPU every top-level aten op (one the caller dispatches, as opposed to the aten ops it
calls internally) costs roughly 10-13 us of host time whatever its size, so the number of
them is what a batched renderer's host cost scales with. On a CPU the same count can be read
with ``torch.profiler``; this module does that::

    from tinydistill.opcount import count_aten_ops
    n, out = count_aten_ops(render_torch.render_base, frames, params, 224)

An op is *top-level* when its name starts with ``aten::`` and none of its ancestors in the
profiler's event tree (``cpu_parent`` links) is an ``aten::`` op: ``x.add_(1)`` is one,
``torch.cat`` is one however many copies it runs inside, ``x.to("cuda")`` is one
(``aten::to``, whose ``aten::_to_copy`` / ``aten::copy_`` are children).
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Callable


def _top_level(events) -> list:
    out = []
    for e in events:
        if not e.name.startswith("aten::"):
            continue
        p = e.cpu_parent
        while p is not None and not p.name.startswith("aten::"):
            p = p.cpu_parent
        if p is None:
            out.append(e)
    return out


def profile_aten_ops(fn: Callable, *args, **kwargs) -> tuple[Counter, Any]:
    """Run ``fn(*args, **kwargs)`` once under ``torch.profiler`` (CPU activity only) and
    return (a Counter of top-level aten op names, fn's result)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        result = fn(*args, **kwargs)
    return Counter(e.name for e in _top_level(prof.events())), result


def time_outside_aten_ops(fn: Callable, *args, **kwargs) -> tuple[float, int, Any]:
    """Run ``fn(*args, **kwargs)`` once under ``torch.profiler`` and return (seconds of its
    wall time spent outside top-level aten ops, the number of those ops, fn's result).

    The time outside the ops is what the caller's own Python and numpy work costs: on a GPU,
    where the ops' compute runs on the device, the host pays that plus the ops' dispatch
    (~10-13 us each). The profiler's own bookkeeping (a few us per op) is partly included."""
    import time

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        result = fn(*args, **kwargs)
        wall = time.perf_counter() - t0
    top = _top_level(prof.events())
    inside = sum(e.time_range.elapsed_us() for e in top) * 1e-6
    return max(0.0, wall - inside), len(top), result


def count_aten_ops(fn: Callable, *args, **kwargs) -> tuple[int, Any]:
    """Run ``fn(*args, **kwargs)`` once under ``torch.profiler`` (CPU activity only) and
    return (the number of top-level aten ops it dispatched, fn's result)."""
    names, result = profile_aten_ops(fn, *args, **kwargs)
    return sum(names.values()), result
