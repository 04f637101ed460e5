"""Collectives that torch.compile traces: functional all-reduce and all-gather over the default group.

c10d's in-place collectives (`dist.all_reduce`, `dist.all_gather_into_tensor`) make dynamo give up
on the frame around them. The functional ones (`torch.ops._c10d_functional.*` followed by
`wait_tensor`) are ordinary graph nodes for dynamo and inductor, so a step that gathers keys and
normalises over the global batch stays one compiled graph. Each function is the identity on one
process, so single-process code pays nothing.
"""
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol


def world_size() -> int:
    """Processes in the default group (1 when none is initialised)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of `x` over ranks (no autograd: see `model.batchnorm` for that)."""
    if world_size() == 1:
        return x
    group = dist.group.WORLD.group_name
    return funcol.wait_tensor(torch.ops._c10d_functional.all_reduce(x.contiguous(), "sum", group))


def gather_keys(keys: torch.Tensor) -> torch.Tensor:
    """Every rank's keys concatenated in rank order along dim 0, detached (keys get no gradient,
    docs/method.md §3)."""
    size = world_size()
    if size == 1:
        return keys
    group = dist.group.WORLD.group_name
    gathered = torch.ops._c10d_functional.all_gather_into_tensor(keys.detach().contiguous(), size, group)
    return funcol.wait_tensor(gathered)
