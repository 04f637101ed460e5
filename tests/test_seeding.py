"""The one seed function: the same value in Python and under numba (FFCV's compiled stage), and
`seeded` leaves the global RNGs as it found them."""
import random

import numba
import numpy as np
import pytest
import torch

from loaders.seeding import derive_seed, seeded


@pytest.mark.parametrize("keys", [(0,), (0, 0, 0), (1, 2, 3), (7, 0, 1, 4095), (2**31 - 1, 99, 1_281_166), (123, 2**32 - 1)])
def test_derive_seed_is_the_same_under_numba(keys: tuple[int, ...]) -> None:
    compiled = numba.njit(derive_seed)
    assert compiled(*keys) == derive_seed(*keys)
    assert 0 <= derive_seed(*keys) < 2**32


def test_derive_seed_depends_on_every_key_and_its_position() -> None:
    seeds = {derive_seed(seed, epoch, rank, batch)
             for seed in range(2) for epoch in range(3) for rank in range(4) for batch in range(50)}
    assert len(seeds) == 2 * 3 * 4 * 50
    assert derive_seed(1, 2) != derive_seed(2, 1)


def test_seeded_draws_the_same_and_restores_the_global_state() -> None:
    torch.manual_seed(5), random.seed(5), np.random.seed(5)
    after = torch.rand(1), random.random(), np.random.rand()
    torch.manual_seed(5), random.seed(5), np.random.seed(5)
    with seeded(11):
        first = torch.rand(1), random.random(), np.random.rand()
    with seeded(11):
        assert (torch.rand(1), random.random(), np.random.rand()) == first
    assert (torch.rand(1), random.random(), np.random.rand()) == after
