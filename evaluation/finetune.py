"""End-to-end fine-tuning (docs/method.md §7) with timm's components.

    torchrun --nproc_per_node 8 eval.py finetune --config configs/eval/finetune_vit_small_imagenet.yaml --weights CKPT

The encoder is rebuilt with drop path 0.1 and a linear classifier on the class token, then
trained with AdamW (`timm.optim.create_optimizer_v2`: weight decay 0.05 on weights only and
layer-wise lr decay 0.75 through the ViT's `group_matcher`), lr `base × batch/256` (base 1e-3
for ViT-T, 5e-4 for ViT-S/B) warmed up from 1e-6 over 10 epochs then cosine to 1e-5 per
iteration, timm's RandAugment and random erasing (`evaluation.data`), no repeated augmentation
(as published; `repeated_aug` turns it on), `timm.data.Mixup` (mixup 0.8, cutmix 1.0, label
smoothing 0.1) with `SoftTargetCrossEntropy`, and a `ModelEmaV3` (decay 0.99996) updated every
step. Both the model and its EMA are validated every epoch; the reported `top1` is the model's,
as published (the EMA's is `ema_top1`). Checkpoints, resume and DDP are
`evaluation.protocol.fit`'s.
"""
import torch
from timm.data import Mixup
from timm.data.mixup import mixup_target
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.utils import ModelEmaV3
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from evaluation.data import finetune_train_transform, stored_view
from evaluation.protocol import ProtocolError, Run, fit, prepare, protocol_process, run_identity, summary
from evaluation.protocol_config import FinetuneConfig, base_lr
from evaluation.weights import EncoderSpec
from model.vit import ViT, create_vit
from trainer.schedules import cosine_schedule


def build_classifier(encoder: ViT, spec: EncoderSpec, num_classes: int, drop_path: float) -> ViT:
    """`encoder`'s weights in a ViT built with `drop_path` (stochastic depth rising linearly over the
    blocks) and a new linear classifier on the class token."""
    model = create_vit(spec.arch, spec.img_size, spec.patch_size, drop_path_rate=drop_path)
    model.load_state_dict(encoder.state_dict(), strict=True)
    model.reset_classifier(num_classes)
    return model


def build_optimizer(model: ViT, config: FinetuneConfig, lr: float) -> torch.optim.Optimizer:
    """timm's AdamW with layer-wise lr decay, as the published code (timm 0.6) has it: group
    `lr_scale = layer_decay^(depth + 1 - layer_id)` with layer 0 the embeddings, `i + 1` block `i`
    (the final norm shares the last block's, per the ViT's `group_matcher`) and `depth + 1` the
    classifier; no weight decay on 1-D parameters, the class token and the position embeddings."""
    return create_optimizer_v2(model, "adamw", lr=lr, weight_decay=config.weight_decay, layer_decay=config.layer_decay)


def finetune_step(step_model: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor,
                  targets: torch.Tensor, bf16: bool) -> torch.Tensor:
    """One AdamW step on soft (mixed, smoothed) targets; `step_model` may be DDP-wrapped."""
    with torch.autocast(images.device.type, torch.bfloat16, enabled=bf16):
        loss = SoftTargetCrossEntropy()(step_model(images), targets)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def run_finetune(config: FinetuneConfig, weights: str, random_init: bool = False) -> dict:
    """Fine-tune the encoder stored at `weights` and validate it after every epoch (docs/method.md §7).

    Returns `protocol`, `top1`, `top5`, `best_top1`, `best_epoch`, `epochs` for the model and the
    same with an `ema_` prefix for its EMA (accuracies in % on `data.val_split`), and `history`.
    """
    with protocol_process() as process:
        setup = prepare(config, weights, random_init, process)
        mixing = config.mixup > 0 or config.cutmix > 0
        if mixing and setup.batch_size % 2:
            raise ProtocolError(f"mixup/cutmix pair each sample with another: the per-rank batch "
                                f"{setup.batch_size} must be even")
        if not config.eval_resize_crop:  # found now rather than at the end of the first epoch
            try:
                stored_view(setup.val_samples.decode(0)[0], setup.image_size)
            except ValueError as error:
                raise ProtocolError(str(error)) from None
        model = build_classifier(setup.encoder, setup.spec, setup.num_classes, config.drop_path).to(process.device)
        ema = ModelEmaV3(model, decay=config.ema_decay)
        step_model = DistributedDataParallel(model) if process.world_size > 1 else model
        lr = base_lr(config, setup.spec.arch) * config.batch_size / 256
        optimizer = build_optimizer(model, config, lr)
        mix = Mixup(mixup_alpha=config.mixup, cutmix_alpha=config.cutmix, label_smoothing=config.smoothing,
                    num_classes=setup.num_classes) if mixing else None
        train_loader, val_loader = setup.loaders(
            config, finetune_train_transform(setup.image_size, config.auto_augment, config.re_prob,
                                             config.crop_padding), repeats=config.repeated_aug,
            eval_resize_crop=config.eval_resize_crop)

        def step(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            if mix is not None:
                images, targets = mix(images, labels)
            else:
                targets = mixup_target(labels, setup.num_classes, smoothing=config.smoothing)
            loss = finetune_step(step_model, optimizer, images, targets, setup.bf16)
            ema.update(model)
            return loss

        schedule = cosine_schedule(lr, config.min_lr, config.epochs, len(train_loader), config.warmup_epochs,
                                   config.warmup_lr)
        history = fit(Run(name="finetune", config=config, setup=setup,
                          identity=run_identity(config, weights, random_init), modules={"model": model, "ema": ema},
                          optimizer=optimizer, lr_schedule=schedule, train_loader=train_loader,
                          val_loader=val_loader, step=step, classifiers={"": model, "ema_": ema.module}))
        return summary("finetune", history, prefixes=("", "ema_"))
