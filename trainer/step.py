"""One PatchMix optimisation step (docs/method.md §3, §5), shared by train.py and `bench.py step`."""
from collections.abc import Callable

import torch
from torch import nn

from model.framework import PatchMixFramework


def set_step_precision() -> None:
    """The process-wide precision the step is built for: fp32 matmuls stay IEEE fp32 (the step's
    only ones are the loss's logits, kept fp32 on purpose; everything else runs under bf16
    autocast), convolutions may use TF32. The loaders' views switch TF32 matmuls on for
    themselves (`loaders.device.view_function`)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = True


def set_schedule(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float) -> None:
    """Apply this step's lr to every group and its weight decay to the decayed group only."""
    for group in optimizer.param_groups:
        group["lr"] = lr
        if group["decay"]:
            group["weight_decay"] = weight_decay


def param_groups(model: nn.Module) -> list[dict]:
    """Weight decay on weights only: never on biases or 1-D parameters (norms, scales)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if name.endswith(".bias") or param.ndim <= 1 else decay).append(param)
    return [{"params": decay, "decay": True}, {"params": no_decay, "decay": False, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, lr: float) -> torch.optim.AdamW:
    """AdamW over `param_groups(model)`, fused on every device: one kernel for all parameters, and
    the step count stays a device tensor (the unfused versions read it on the host per parameter)."""
    return torch.optim.AdamW(param_groups(model), lr=lr, fused=True)


def train_step(step_model: nn.Module, model: PatchMixFramework, optimizer: torch.optim.Optimizer,
               views: list[torch.Tensor], *, temperature: float, momentum: float, clip_grad: float = 0.0,
               bf16: bool = False, gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
               rank: int = 0) -> dict[str, torch.Tensor]:
    """Forward the loss through `step_model` (the compiled/DDP-wrapped `model`), step AdamW, then
    the momentum encoder's EMA. Returns the loss terms (not synchronised with the host)."""
    with torch.autocast(views[0].device.type, torch.bfloat16, enabled=bf16):
        kwargs = {"gather": gather} if gather is not None else {}
        terms = step_model(views, temperature=temperature, rank=rank, **kwargs)
    optimizer.zero_grad(set_to_none=True)
    terms["loss"].backward()
    if clip_grad > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    optimizer.step()
    model.update_momentum(momentum)
    return terms
