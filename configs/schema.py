"""The one typed schema every YAML in `configs/` is validated against (OmegaConf structured config).

`load_config(path, overrides)` merges schema defaults ← YAML ← `key.sub=value` overrides; an
unknown or misspelt key, or a value of the wrong type, is a `ConfigError` that names the key
(and the closest valid one).
"""
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

MISSING = "???"  # OmegaConf's marker of a required value; omegaconf itself is imported where it is used, so
# the dataclasses work on machines that have only torch (the GPU check).

BACKENDS = ("auto", "ffcv", "dali", "memory", "torchvision")
DDP_COMPRESSION = ("none", "bf16")
DDP_FIRST_BUCKET_MB = 1.0  # torch.distributed._DEFAULT_FIRST_BUCKET_BYTES, in MiB


@dataclass
class DataConfig:
    """Where the converted dataset is and how views are made (docs/method.md §5–6)."""

    root: str = MISSING  # a converted dataset folder (holds manifest.json), e.g. DIR/cifar10
    backend: str = "auto"  # auto | ffcv | dali | memory | torchvision
    workers: int = 0  # decoding threads/processes per rank; 0: this node's cores / its ranks (LOCAL_WORLD_SIZE)
    compile_views: bool | None = None  # torch.compile the views' crop + augmentations (memory, ffcv); None: on CUDA
    # ffcv: ship whole decoded images and cut the views on the device; None: for images of at most
    # 1,024 px, in training on CUDA and in evaluation everywhere (loaders.builder.resolve_device_crops)
    device_crops: bool | None = None
    image_size: int = 224  # global views (and evaluation) size
    global_scale: tuple[float, float] = (0.35, 1.0)
    local_crops: int = 0
    local_size: int = 96
    local_scale: tuple[float, float] = (0.05, 0.35)
    train_split: str = "train"
    val_split: str = "val"


@dataclass
class ModelConfig:
    """Encoder and heads (docs/method.md §4)."""

    arch: str = "vit_small"  # vit_tiny | vit_small | vit_base (| vit_mini for CPU smoke runs)
    patch_size: int = 16
    drop_path: float = 0.1
    momentum_encoder: bool = True
    mlp_dim: int = 4096
    dim: int = 256
    num_mix: int = 2
    # Label smoothing of the source and local-crop-vs-original contrasts, and of the mixed ones
    # (docs/method.md §2): 0.1 and 0 are what the published models were trained with.
    smoothing_source: float = 0.1
    smoothing_mix: float = 0.0


@dataclass
class OptimConfig:
    """AdamW and the per-iteration schedules (docs/method.md §5). `lr` is per 256 images: the applied
    peak lr is `lr × batch_size / 256`."""

    lr: float = 5e-4
    min_lr: float = 1e-6
    warmup_epochs: int = 10
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    momentum: float = 0.996  # momentum-encoder EMA, cosine to 1.0
    temperature: float = 0.2
    temperature_warmup_epochs: int = 0  # linear warmup from warmup_temperature (0 = off)
    warmup_temperature: float = 0.2
    clip_grad: float = 0.0  # max gradient norm (0 = off)


@dataclass
class CheckpointConfig:
    """When `last` and numbered checkpoints are written, and how many numbered ones are kept."""

    every_minutes: float = 30.0
    keep_every_epochs: int = 50
    keep_last: int = 3


@dataclass
class DdpConfig:
    """DistributedDataParallel's gradient all-reduce (docs/training.md)."""

    bucket_cap_mb: float = 25.0  # gradient bucket size (MiB, >= 1); dynamo splits the compiled graph at its boundaries
    compress: str = "none"  # none | bf16: all-reduce gradients in bf16 (halves the traffic, for multi-node)


@dataclass
class Config:
    """A whole pre-training run. `batch_size` is the global batch over all ranks."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    ddp: DdpConfig = field(default_factory=DdpConfig)
    epochs: int = 300
    batch_size: int = 1024
    output_dir: str = "runs/default"
    seed: int = 0
    compile: bool | None = None  # None: on for GPU, off for CPU
    log_every: int = 20
    knn_every: int = 0  # epochs between online kNN monitors (0 = off)
    max_steps: int = 0  # stop after this many steps (0 = train all epochs); schedules still span `epochs`


class ConfigError(ValueError):
    """A config that does not fit the schema."""


def load_config(path: str | Path | None = None, overrides: Sequence[str] = (), schema: type = Config) -> Any:
    """`schema`'s defaults (a dataclass; the pre-training `Config` by default), then the YAML at
    `path`, then `key.sub=value` overrides, validated."""
    from omegaconf import OmegaConf
    from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

    if path is not None and not Path(path).is_file():
        raise ConfigError(f"config file {path} not found: pass --config with a YAML file, e.g. one in configs/")
    try:
        merged = OmegaConf.structured(schema)
        if path is not None:
            merged = OmegaConf.merge(merged, OmegaConf.load(path))
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
        config = OmegaConf.to_object(merged)
    except MissingMandatoryValue as error:
        raise ConfigError(f"{error.full_key} is required: set it in the YAML or pass {error.full_key}=VALUE") from None
    except OmegaConfBaseException as error:
        where = f" in {path}" if path else ""
        raise ConfigError(f"invalid config{where}: {str(error).splitlines()[0]} (key: {error.full_key})") from None
    if isinstance(config, Config):
        _check(config)
    return config


def _check(config: Config) -> None:
    if config.data.backend not in BACKENDS:
        raise ConfigError(f"data.backend must be one of {BACKENDS}; got {config.data.backend!r}")
    for name in ("global_scale", "local_scale"):
        low, high = getattr(config.data, name)
        if not 0 < low <= high <= 1:
            raise ConfigError(f"data.{name} must be (low, high) with 0 < low <= high <= 1; got {(low, high)}")
    if config.data.image_size % config.model.patch_size or (
            config.data.local_crops and config.data.local_size % config.model.patch_size):
        raise ConfigError(f"data.image_size and data.local_size must be multiples of model.patch_size="
                          f"{config.model.patch_size}")
    if config.ddp.compress not in DDP_COMPRESSION:
        raise ConfigError(f"ddp.compress must be one of {DDP_COMPRESSION}; got {config.ddp.compress!r}")
    if config.ddp.bucket_cap_mb < DDP_FIRST_BUCKET_MB:
        raise ConfigError(f"ddp.bucket_cap_mb must be at least {DDP_FIRST_BUCKET_MB:g} (DDP's first gradient bucket is "
                          f"1 MiB, and torch.compile's DDPOptimizer refuses smaller buckets); got "
                          f"{config.ddp.bucket_cap_mb:g}")
    for name in ("smoothing_source", "smoothing_mix"):
        if not 0 <= getattr(config.model, name) < 1:
            raise ConfigError(f"model.{name} must be in [0, 1); got {getattr(config.model, name)}")
    if config.batch_size < 1 or config.epochs < 1:
        raise ConfigError("batch_size and epochs must be positive")


def to_yaml(config: Any) -> str:
    """The fully resolved config as YAML (printed at start, saved next to the checkpoints)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(config))


def as_dict(config: Any) -> dict[str, Any]:
    """Plain nested dict (for checkpoints and JSON)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.structured(config))
