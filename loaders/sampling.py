"""Which samples each rank sees in an epoch: deterministic in `(seed, epoch)`, disjoint across ranks.

Training shuffles the whole split with one generator seeded by `(seed, epoch)`, drops the tail
that does not fill a global batch (`batch_size × world_size`), and gives rank `r` every
`world_size`-th sample starting at `r`: every rank gets the same number of full batches.
Evaluation keeps the split's order and drops nothing: rank `r` gets samples `r, r + W, …`, so
the ranks' sizes differ by at most one and together cover every sample exactly once.
"""
import torch

from loaders.seeding import derive_seed


def epoch_indices(num_samples: int, batch_size: int, *, train: bool, seed: int = 0, epoch: int = 0,
                  rank: int = 0, world_size: int = 1) -> torch.Tensor:
    """The dataset indices rank `rank` visits in `epoch`, in visiting order (int64, on CPU).

    `batch_size` is the per-rank batch.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}); got {rank}")
    if train:
        generator = torch.Generator().manual_seed(derive_seed(seed, epoch))
        order = torch.randperm(num_samples, generator=generator)
        global_batch = batch_size * world_size
        if num_samples < global_batch:
            raise ValueError(f"the split has {num_samples} samples, fewer than one global batch "
                             f"({batch_size} per rank × {world_size} ranks): lower batch_size")
        order = order[: num_samples - num_samples % global_batch]
    else:
        order = torch.arange(num_samples)
    return order[rank::world_size]


def num_batches(num_samples: int, batch_size: int, *, train: bool, rank: int = 0, world_size: int = 1) -> int:
    """How many batches `epoch_indices` yields for this rank (the loaders' `len()`)."""
    if train:
        return num_samples // (batch_size * world_size)
    local = len(range(rank, num_samples, world_size))
    return -(-local // batch_size)

