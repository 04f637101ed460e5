"""torchrun conventions: read RANK / LOCAL_RANK / WORLD_SIZE, NCCL on GPU and gloo on CPU."""
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Process:
    """This process's place in the job and its device."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_process() -> Process:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1, once per process); plain
    `python` is one process."""
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None)
    return Process(rank, local_rank, world_size, device)


def gather_keys(keys: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's keys in rank order (no gradient: keys are detached, docs/method.md §3)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return keys
    keys = keys.detach().contiguous()
    out = keys.new_empty((dist.get_world_size() * keys.shape[0], *keys.shape[1:]))
    dist.all_gather_into_tensor(out, keys)
    return out


def mean_across_ranks(values: torch.Tensor) -> torch.Tensor:
    """The average of `values` over all ranks (for logging)."""
    if dist.is_available() and dist.is_initialized():
        values = values.clone()
        dist.all_reduce(values)
        values /= dist.get_world_size()
    return values
