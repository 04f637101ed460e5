"""BatchNorm over the global batch of all ranks, on any device.

The published code converts the heads' BatchNorm to SyncBatchNorm under DDP; torch's
SyncBatchNorm runs only on GPUs, so this one-piece version (sums all-reduced with autograd)
serves CPU (gloo) and GPU alike. On one process it is plain BatchNorm1d.
"""
import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import nn


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d whose training statistics are those of the batch concatenated over ranks."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        count = torch.full((1,), float(x.shape[0]), device=x.device, dtype=torch.float32)
        stats = dist_fn.all_reduce(torch.cat([x.float().sum(0), x.float().square().sum(0), count]))
        total, squares, n = stats[: x.shape[1]], stats[x.shape[1]: -1], stats[-1]
        mean = total / n
        var = squares / n - mean.square()
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                self.running_mean.lerp_(mean, self.momentum)
                self.running_var.lerp_(var * n / (n - 1), self.momentum)
        out = (x.float() - mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            out = out * self.weight + self.bias
        return out.to(x.dtype)


def convert_to_global(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm1d in `module` by a GlobalBatchNorm1d with the same state."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm1d:
            replacement = GlobalBatchNorm1d(child.num_features, child.eps, child.momentum, child.affine,
                                            child.track_running_stats, device=child.running_mean.device)
            replacement.load_state_dict(child.state_dict())
            for new, old in zip(replacement.parameters(), child.parameters()):
                new.requires_grad_(old.requires_grad)  # the momentum encoder's stay frozen
            setattr(module, name, replacement)
        else:
            convert_to_global(child)
    return module
