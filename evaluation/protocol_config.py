"""Typed schemas of the linear-probe and fine-tuning protocols (docs/method.md §7), for `configs/eval/*.yaml`.

Load them with `configs.schema.load_config(path, overrides, schema=LinearConfig)` (or
`FinetuneConfig`): an unknown key is an error naming the closest one. The defaults are the published
numbers for ImageNet; the CIFAR YAMLs change the batch size (and the fine-tuning crops).
`batch_size` is the global batch over all ranks and every `lr` is per 256 images: the applied
peak lr is `lr × batch_size / 256`. `lr: null` (the default) takes the published base lr of the
encoder's architecture (`base_lr`).
"""
from dataclasses import dataclass, field
from typing import Optional

from omegaconf import MISSING

from configs.schema import ConfigError
from model.vit import ARCHS

# Published base lr per 256 images, by architecture (docs/method.md §7).
LINEAR_LR = {"vit_tiny": 0.05, "vit_small": 0.02, "vit_base": 0.01}
FINETUNE_LR = {"vit_tiny": 1e-3, "vit_small": 5e-4, "vit_base": 5e-4}


@dataclass
class ProtocolDataConfig:
    """The converted dataset and how images are loaded."""

    root: str = MISSING  # a converted dataset folder (holds manifest.json), e.g. DIR/cifar10
    image_size: Optional[int] = None  # None: the encoder's pre-training input size
    workers: int = 8  # DataLoader decoding processes per rank
    train_split: str = "train"
    val_split: str = "val"


@dataclass
class LinearConfig:
    """Linear probe: frozen backbone, linear classifier on the class token, SGD with Nesterov momentum +
    cosine (docs/method.md §7)."""

    data: ProtocolDataConfig = field(default_factory=ProtocolDataConfig)
    arch: Optional[str] = None  # expected encoder (checked against the weights); None: whatever they hold
    patch_size: Optional[int] = None  # expected patch size, checked likewise
    epochs: int = 100
    batch_size: int = 1024  # ImageNet; 256 for CIFAR
    lr: Optional[float] = None  # per 256 images; None: LINEAR_LR of the encoder's arch
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 0.0
    seed: int = 0
    output_dir: str = "runs/eval/linear"


@dataclass
class FinetuneConfig:
    """End-to-end fine-tuning with timm's recipe components (docs/method.md §7)."""

    data: ProtocolDataConfig = field(default_factory=ProtocolDataConfig)
    arch: Optional[str] = None
    patch_size: Optional[int] = None
    epochs: int = 100
    # Not in docs/method.md §7: the published fine-tuning configs use 1024 on ImageNet (the MAE/DeiT
    # convention) and 256 on CIFAR.
    batch_size: int = 1024
    lr: Optional[float] = None  # per 256 images, AdamW; None: FINETUNE_LR of the encoder's arch
    warmup_epochs: int = 10
    warmup_lr: float = 1e-6  # the linear warm-up starts here
    min_lr: float = 1e-5
    weight_decay: float = 0.05  # weights only, never biases, norms, cls token or position embeddings
    layer_decay: float = 0.75  # lr of layer l scaled by layer_decay^(depth + 1 - l)
    drop_path: float = 0.1
    ema_decay: float = 0.99996  # model EMA, updated every step; validated, but `top1` is the model's
    auto_augment: str = "rand-m9-mstd0.5-inc1"  # timm RandAugment spec
    re_prob: float = 0.25  # random erasing (per-pixel noise)
    crop_padding: int = 0  # > 0: RandomCrop(size, padding) replaces RandomResizedCrop (published, 32-px inputs)
    # Validation view. True: resize to size·256/224 and centre crop. False: the stored image, only
    # normalised (published for 32-px CIFAR).
    eval_resize_crop: bool = True
    mixup: float = 0.8
    cutmix: float = 1.0
    smoothing: float = 0.1
    # Copies of each sample per epoch, spread over ranks (1 = off, as published: the released config
    # sets the flag but its code never reads it).
    repeated_aug: int = 1
    seed: int = 0
    output_dir: str = "runs/eval/finetune"


def check_protocol_config(config: LinearConfig | FinetuneConfig) -> None:
    """Value checks the schema's types cannot express; a `ConfigError` names the key."""
    if config.epochs < 1 or config.batch_size < 1:
        raise ConfigError("epochs and batch_size must be positive")
    if config.lr is not None and config.lr <= 0:
        raise ConfigError(f"lr must be positive (or null for the published one); got {config.lr}")
    if config.arch is not None and config.arch not in ARCHS:
        raise ConfigError(f"arch must be one of {sorted(ARCHS)} (or null); got {config.arch!r}")
    if config.data.image_size is not None and config.data.image_size < 1:
        raise ConfigError(f"data.image_size must be positive (or null); got {config.data.image_size}")
    if isinstance(config, FinetuneConfig):
        if config.repeated_aug < 1:
            raise ConfigError(f"repeated_aug must be >= 1 (1 = off); got {config.repeated_aug}")
        if not 0 <= config.drop_path < 1 or not 0 < config.layer_decay <= 1 or not 0 <= config.ema_decay < 1:
            raise ConfigError("drop_path must be in [0, 1), layer_decay in (0, 1] and ema_decay in [0, 1)")


def base_lr(config: LinearConfig | FinetuneConfig, arch: str) -> float:
    """The lr per 256 images: `config.lr`, or the published one for `arch` when it is null."""
    if config.lr is not None:
        return config.lr
    table = LINEAR_LR if isinstance(config, LinearConfig) else FINETUNE_LR
    if arch not in table:
        raise ConfigError(f"no published lr for {arch} (only {', '.join(table)}): pass lr=VALUE")
    return table[arch]
