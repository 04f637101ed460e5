"""torchrun conventions (RANK / LOCAL_RANK / WORLD_SIZE, NCCL on GPU and gloo on CPU) and the DDP wrapper."""
import os
from collections.abc import Callable
from dataclasses import dataclass
from inspect import signature
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from trainer import TrainingError

T = TypeVar("T")


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


def mean_across_ranks(values: torch.Tensor) -> torch.Tensor:
    """The average of `values` over all ranks (for logging)."""
    if dist.is_available() and dist.is_initialized():
        values = values.clone()
        dist.all_reduce(values)
        values /= dist.get_world_size()
    return values


def wrap_ddp(model: nn.Module, process: Process, bucket_cap_mb: float = 25.0, compress: str = "none") -> nn.Module:
    """`model` (compiled or not) in DistributedDataParallel, set up for throughput.

    - Compile first, then wrap (as nanoGPT does): dynamo traces only the model's forward, never
      DDP's Python wrapper (which it cannot trace without graph breaks), and because DDP marks
      itself active around that call, dynamo's DDPOptimizer splits the compiled graph at the
      gradient-bucket boundaries, so each bucket's all-reduce overlaps the rest of the backward.
    - `gradient_as_bucket_view`: gradients live in the all-reduce buckets (no copy, less memory).
    - No buffer broadcast before each forward: the only buffers are the heads' BatchNorm
      statistics, already computed over the global batch on every rank (`model.batchnorm`), and
      the momentum encoder's, an EMA of identical weights.
    - `compress="bf16"`: all-reduce gradients in bf16 (PyTorch's `bf16_compress_hook`), halving
      the traffic between nodes; gradients are averaged in bf16, so keep it for multi-node runs.
    """
    options = dict(device_ids=[process.device.index] if process.device.type == "cuda" else None,
                   gradient_as_bucket_view=True, bucket_cap_mb=bucket_cap_mb)
    # torch >= 2.14 renames broadcast_buffers; its forward_sync_buffers=False still syncs once at init, as we want.
    sync_option = "forward_sync_buffers" if "forward_sync_buffers" in signature(DistributedDataParallel).parameters \
        else "broadcast_buffers"
    ddp = DistributedDataParallel(model, **options, **{sync_option: False})
    if compress == "bf16":
        ddp.register_comm_hook(None, default_hooks.bf16_compress_hook)
    return ddp


def agreed(process: Process, check: Callable[[], T]) -> T:
    """`check()` on every rank; if it raises a `TrainingError` (or a config/dataset error) on any
    rank, every rank raises it, so that no rank is left waiting in a collective for one that quit
    (a dataset missing on one node, a checkpoint another node cannot see)."""
    from configs.schema import ConfigError
    from loaders.manifest import DatasetNotFoundError

    error, result = None, None
    try:
        result = check()
    except (TrainingError, ConfigError, DatasetNotFoundError) as raised:
        error = str(raised)
    errors = [error]
    if process.world_size > 1:
        errors = [None] * process.world_size
        dist.all_gather_object(errors, error)
    failed = next(((rank, message) for rank, message in enumerate(errors) if message), None)
    if failed:
        rank, message = failed
        raise TrainingError(message if process.world_size == 1 else f"on rank {rank}: {message}")
    return result
