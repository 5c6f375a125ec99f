"""Per-view seeds and the generators they give.

A view (epoch e, row r) is identified by its encoded seed, the counter ``e * N + r``: the
store keeps it, and a counter compresses to almost nothing. Its randomness comes from its own
PCG64 streams, ``PCG64(SeedSequence([base_seed, seed, stream]))``, so a different base seed
gives different views and no two views share a stream. Nothing of a view's comes from a global
RNG (see :mod:`tinydistill.params`).
"""

from __future__ import annotations

import numpy as np


def encode_seed(epoch: int, row, num_rows: int):
    """The encoded seed of view (epoch, row): a counter (works on ints and numpy arrays)."""
    return np.uint64(epoch) * np.uint64(num_rows) + np.asarray(row, dtype=np.uint64)


def view_generator(base_seed: int, seed: int, stream: int = 0) -> np.random.Generator:
    """The PCG64 generator of one view. ``stream`` separates independent uses (transform, mix)."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(base_seed), int(seed), stream])))


def group_generator(base_seed: int, epoch: int, group: int) -> np.random.Generator:
    """Generator for what belongs to a group of rows rather than one view (mix pairing)."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(base_seed), 0x6D6978, int(epoch), int(group)])))
