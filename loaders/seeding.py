"""One way to derive a seed from integer keys, and one way to seed the global RNGs.

Every random choice in the project (epoch order, a batch's augmentations, a sample's crops, a
protocol epoch's mixup) is seeded by a key such as `(seed, epoch, rank, batch)` run through
`derive_seed`, so any batch of any epoch can be recomputed alone, on any worker. `derive_seed`
chains the integers through the lowbias32 hash in arithmetic that numba (wrapping int64) and
Python compute alike: FFCV's compiled decode stage calls the very same function.
"""
import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

MASK32 = 0xFFFFFFFF


def derive_seed(*keys: int) -> int:
    """A 32-bit seed from integer keys (order matters); the same in Python and under numba."""
    key = 0
    for value in keys:
        x = (key ^ value) & MASK32
        x = (x ^ (x >> 16)) * 0x7FEB352D & MASK32
        x = (x ^ (x >> 15)) * 0x846CA68B & MASK32
        key = x ^ (x >> 16)
    return key


def seed_global_rngs(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global RNGs (torchvision and timm transforms draw from all three)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """`seed_global_rngs(seed)` for the duration of the block, then the previous states restored."""
    saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
    seed_global_rngs(seed)
    try:
        yield
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.set_rng_state(saved[2])
