"""Per-view seeds, and running code under a view's own randomness.

A view (epoch e, row r) is identified by its encoded seed, the counter ``e * N + r``: the
store keeps it, and a counter compresses to almost nothing. Its randomness comes from one
PCG64 stream, ``PCG64(SeedSequence([base_seed, seed]))``, so a different base seed gives
different views and no two views share a stream.

timm's transforms draw from Python's ``random``, numpy's global generator and torch's default
generator. :func:`isolated_rng` seeds all three from the view's stream for the duration of a
block and restores them afterwards, so a view is the same whatever ran before it, and running
it changes nothing for code that runs after.
"""

from __future__ import annotations

import contextlib
import random

import numpy as np
import torch


def encode_seed(epoch: int, row, num_rows: int):
    """The encoded seed of view (epoch, row): a counter (works on ints and numpy arrays)."""
    return np.uint64(epoch) * np.uint64(num_rows) + np.asarray(row, dtype=np.uint64)


def view_generator(base_seed: int, seed: int, stream: int = 0) -> np.random.Generator:
    """The PCG64 generator of one view. ``stream`` separates independent uses (transform, mix)."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(base_seed), int(seed), stream])))


def group_generator(base_seed: int, epoch: int, group: int) -> np.random.Generator:
    """Generator for what belongs to a group of rows rather than one view (mix pairing)."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(base_seed), 0x6D6978, int(epoch), int(group)])))


@contextlib.contextmanager
def isolated_rng(gen: np.random.Generator):
    """Seed Python, numpy and torch global RNGs from ``gen``; restore their states on exit.

    Inside a DataLoader worker nothing but views uses the global RNGs, and every view seeds
    them afresh, so the save/restore (~65 us, mostly numpy's state) is skipped there.
    """
    from torch.utils.data import get_worker_info

    restore = get_worker_info() is None
    if restore:
        py_state, np_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    s = gen.integers(0, 2**63, size=3)
    random.seed(int(s[0]))
    np.random.seed(int(s[1]) % 2**32)
    torch.default_generator.manual_seed(int(s[2]))  # ~1 us, unlike torch.manual_seed on CUDA builds
    try:
        yield
    finally:
        if restore:
            random.setstate(py_state)
            np.random.set_state(np_state)
            torch.set_rng_state(torch_state)
