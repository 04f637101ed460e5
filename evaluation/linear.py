"""Linear probe (docs/method.md §7): the protocol-specific part; `evaluation.protocol` drives it.

    torchrun --nproc_per_node 8 eval.py linear --config configs/eval/linear_vit_small_imagenet.yaml --weights CKPT

The backbone (the checkpoint's momentum encoder) stays frozen in eval mode: no gradient, no
drop path. A linear classifier on its class token is trained with SGD (momentum 0.9, Nesterov,
no weight decay) and a per-iteration cosine schedule from `lr × batch/256` to 0, the published
`main_linear.py`'s setting: a plain `nn.Linear`, without the BatchNorm that MAE/MoCo v3 put
before it. After training the backbone is compared with the weights it was loaded with; any
difference is an error.
"""
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from evaluation.data import linear_train_transform
from evaluation.protocol import ProtocolError, Run, fit, prepare, protocol_process, run_identity, summary
from evaluation.protocol_config import LinearConfig, base_lr
from model.vit import ViT
from trainer.schedules import cosine_schedule


class LinearProbe(nn.Module):
    """A frozen backbone (always in eval mode, no gradient) and a linear classifier on its class token."""

    def __init__(self, backbone: ViT, head: nn.Linear, bf16: bool) -> None:
        super().__init__()
        self.backbone, self.head, self.bf16 = backbone.requires_grad_(False), head, bf16
        self.backbone.eval()

    def train(self, mode: bool = True) -> "LinearProbe":
        super().train(mode)
        self.backbone.eval()
        return self

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The backbone's class-token feature (float32)."""
        with torch.autocast(images.device.type, torch.bfloat16, enabled=self.bf16):
            return self.backbone.forward_head(self.backbone.forward_features(images), pre_logits=True).float()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def linear_step(probe: LinearProbe, head: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor,
                labels: torch.Tensor) -> torch.Tensor:
    """One SGD step of the classifier (`head`: the probe's head, DDP-wrapped under torchrun)."""
    loss = F.cross_entropy(head(probe.features(images)), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def build_linear_optimizer(head: nn.Module, config: LinearConfig, lr: float) -> torch.optim.SGD:
    """SGD on the classifier with the config's momentum, Nesterov flag and weight decay (docs/method.md §7)."""
    return torch.optim.SGD(head.parameters(), lr=lr, momentum=config.momentum, nesterov=config.nesterov,
                           weight_decay=config.weight_decay)


def changed_tensors(module: nn.Module, reference: dict[str, torch.Tensor]) -> list[str]:
    """Names of `module`'s state entries that differ from `reference` (bit for bit)."""
    state = module.state_dict()
    return sorted(k for k in state.keys() | reference.keys()
                  if k not in state or k not in reference or not torch.equal(state[k], reference[k]))


def run_linear(config: LinearConfig, weights: str, random_init: bool = False) -> dict:
    """Train and validate a linear probe on the frozen encoder stored at `weights` (docs/method.md §7).

    Returns `protocol`, `top1`, `top5`, `best_top1`, `best_epoch`, `epochs` (accuracies in % on
    the `data.val_split` split), `backbone_unchanged` and the per-epoch `history`.
    """
    with protocol_process() as process:
        setup = prepare(config, weights, random_init, process)
        device = process.device
        backbone = setup.encoder.to(device)
        reference = {k: v.detach().clone() for k, v in backbone.state_dict().items()}
        head = nn.Linear(backbone.num_features, setup.num_classes).to(device)
        probe = LinearProbe(backbone, head, setup.bf16)
        step_head = DistributedDataParallel(head) if process.world_size > 1 else head
        lr = base_lr(config, setup.spec.arch) * config.batch_size / 256
        optimizer = build_linear_optimizer(head, config, lr)
        train_loader, val_loader = setup.loaders(config, linear_train_transform(setup.image_size))
        history = fit(Run(
            name="linear", config=config, setup=setup, identity=run_identity(config, weights, random_init),
            modules={"head": head}, optimizer=optimizer,
            lr_schedule=cosine_schedule(lr, 0.0, config.epochs, len(train_loader)),
            train_loader=train_loader, val_loader=val_loader,
            step=lambda images, labels: linear_step(probe, step_head, optimizer, images, labels),
            classifiers={"": probe}))
        changed = changed_tensors(backbone, reference)
        if changed:
            raise ProtocolError(f"the frozen backbone changed during the linear probe ({len(changed)} tensors, e.g. "
                                f"{', '.join(changed[:3])}): the result is not a linear probe of {weights}")
        return {**summary("linear", history), "backbone_unchanged": True}
