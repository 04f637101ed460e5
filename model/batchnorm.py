"""BatchNorm over the global batch of all ranks, traceable by torch.compile, on any device.

The published code converts the heads' BatchNorm to `nn.SyncBatchNorm` under DDP. That module
runs on GPUs only, and its autograd function calls c10d's in-place collectives
(`dist.all_gather_single`, `dist.all_reduce`), which dynamo does not trace. Here the statistics
are summed with *functional* collectives (`_c10d_functional.all_reduce` + `wait_tensor`, which
dynamo and inductor trace into the graph) inside an `autograd.Function` whose backward is the same
all-reduce. So one compiled graph holds the whole forward under DDP (tests/test_ddp_compile.py
counts no graph break with 2 gloo processes), on CPU (gloo) and GPU (NCCL) alike. On one process
it is plain BatchNorm1d.
"""
import torch
from torch import nn

from model.collectives import all_reduce_sum, world_size


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks, differentiable: the gradient of a sum-all-reduce is the sum-all-reduce of
    the gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return all_reduce_sum(grad.contiguous())


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics are those of the batch concatenated over ranks."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and world_size() > 1):
            return super().forward(x)
        dtype = torch.promote_types(x.dtype, torch.float32)  # statistics in fp32 at least, also under bf16
        count = torch.full((1,), float(x.shape[0]), device=x.device, dtype=dtype)
        local = x.to(dtype)
        stats = _AllReduceSum.apply(torch.cat([local.sum(0), local.square().sum(0), count]))
        total, squares, n = stats[: x.shape[1]], stats[x.shape[1]: -1], stats[-1]
        mean = total / n
        var = squares / n - mean.square()
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                self.running_mean.lerp_(mean, self.momentum)
                self.running_var.lerp_(var * n / (n - 1), self.momentum)
        out = (local - mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            out = out * self.weight + self.bias
        return out.to(x.dtype)


def convert_to_global(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm1d in `module` by a GlobalBatchNorm1d with the same state."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm1d:
            replacement = GlobalBatchNorm1d(child.num_features, child.eps, child.momentum, child.affine,
                                            child.track_running_stats, device=child.running_mean.device,
                                            dtype=child.running_mean.dtype)
            replacement.load_state_dict(child.state_dict())
            for new, old in zip(replacement.parameters(), child.parameters()):
                new.requires_grad_(old.requires_grad)  # the momentum encoder's stay frozen
            setattr(module, name, replacement)
        else:
            convert_to_global(child)
    return module

