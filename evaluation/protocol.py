"""The epoch driver both supervised protocols (linear probe, fine-tuning) share.

A protocol module builds a `Run` (its modules, optimizer, schedule, loaders and step) from the
`Setup` that `prepare` makes, hands it to `fit`, and reports `summary(history)`.

`fit`: torchrun DDP (gloo on CPU), validation on the held-out split after every epoch,
`OUTPUT/last.pt` written atomically after every epoch and resumed by rerunning the same command
(a kill loses at most the current epoch), per-epoch records in `OUTPUT/log.jsonl`. Every RNG is
reseeded from `(seed, epoch, rank)` at the start of each epoch, so a resumed run reproduces an
uninterrupted one. Raising `epochs` continues a finished run on the longer schedule.
"""
import json
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from configs.schema import as_dict, to_yaml
from evaluation.data import ImageLoader, Transform, eval_transform
from evaluation.protocol_config import FinetuneConfig, LinearConfig, check_protocol_config
from evaluation.weights import EncoderSpec, load_encoder
from loaders.seeding import derive_seed, seed_global_rngs
from loaders.shards import ShardSamples, open_converted
from model.vit import ViT
from trainer import checkpoint
from trainer.distributed import Process, init_process, mean_across_ranks

ProtocolConfig = LinearConfig | FinetuneConfig
# Keys that may change when resuming; any other difference means another run's output_dir.
RESUMABLE = ("output_dir", "epochs", "data.root", "data.workers")


class ProtocolError(RuntimeError):
    """A protocol run that cannot go on; the message says why and what to do."""


@dataclass(kw_only=True)
class Setup:
    """What both protocols prepare the same way: the process, the encoder and the dataset."""

    process: Process
    encoder: ViT
    spec: EncoderSpec
    image_size: int
    num_classes: int
    batch_size: int  # per rank
    train_samples: ShardSamples
    val_samples: ShardSamples

    @property
    def bf16(self) -> bool:
        return self.process.device.type == "cuda"

    def loaders(self, config: ProtocolConfig, train_transform: Transform, repeats: int = 1,
                eval_resize_crop: bool = True) -> tuple[ImageLoader, ImageLoader]:
        """The training loader (augmented, shuffled per epoch) and the validation loader (`eval_transform`)."""
        common = dict(batch_size=self.batch_size, workers=config.data.workers, device=self.process.device,
                      seed=config.seed, rank=self.process.rank, world_size=self.process.world_size)
        return (ImageLoader(self.train_samples, train_transform, train=True, repeats=repeats, **common),
                ImageLoader(self.val_samples, eval_transform(self.image_size, eval_resize_crop), train=False, **common))


@contextmanager
def protocol_process() -> Iterator[Process]:
    """This process's place in a torchrun job, with the process group torn down at the end."""
    process = init_process()
    try:
        yield process
    finally:
        if process.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def prepare(config: ProtocolConfig, weights: str, random_init: bool, process: Process) -> Setup:
    """Check the config against the weights and the dataset, load the encoder (CPU) and the splits."""
    check_protocol_config(config)
    if config.batch_size % process.world_size:
        raise ProtocolError(f"batch_size={config.batch_size} is not divisible by the world size "
                            f"{process.world_size}: pick a multiple of {process.world_size}")
    torch.manual_seed(config.seed)  # the same random init (and new head) on every rank
    encoder, spec, _ = load_encoder(weights, random_init=random_init)
    for key, expected, found in (("arch", config.arch, spec.arch), ("patch_size", config.patch_size, spec.patch_size)):
        if expected is not None and expected != found:
            raise ProtocolError(f"the config expects {key}={expected!r} but {weights} holds a {spec.arch} with patch "
                                f"size {spec.patch_size}: use the matching configs/eval YAML or pass {key}={found}")
    image_size = config.data.image_size or spec.img_size
    if image_size % spec.patch_size:
        raise ProtocolError(f"data.image_size={image_size} is not a multiple of the patch size {spec.patch_size}")
    dataset = open_converted(config.data.root, config.data.train_split, config.data.val_split)
    return Setup(process=process, encoder=encoder, spec=spec, image_size=image_size, num_classes=len(dataset.classes),
                 batch_size=config.batch_size // process.world_size,
                 train_samples=ShardSamples(dataset, config.data.train_split),
                 val_samples=ShardSamples(dataset, config.data.val_split))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """This step's lr on every group, times the group's `lr_scale` (timm's layer-wise decay) if any."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


@torch.no_grad()
def evaluate(classifier: nn.Module, loader: ImageLoader, bf16: bool) -> tuple[float, float]:
    """Top-1 and top-5 accuracy (%) over the whole split: counts summed over ranks, each sample once."""
    was_training = classifier.training
    classifier.eval()
    counts = torch.zeros(3, dtype=torch.float64, device=loader.device)  # top-1 hits, top-5 hits, samples
    for images, labels in loader:
        with torch.autocast(images.device.type, torch.bfloat16, enabled=bf16):
            logits = classifier(images)
        hits = logits.topk(min(5, logits.shape[1]), dim=1).indices == labels[:, None]
        counts += torch.stack([hits[:, 0].sum(), hits.any(dim=1).sum(), labels.new_tensor(len(labels))])
    classifier.train(was_training)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(counts)
    return (100 * counts[0] / counts[2]).item(), (100 * counts[1] / counts[2]).item()


@dataclass(kw_only=True)
class Run:
    """One protocol's moving parts; `fit` drives them epoch by epoch."""

    name: str  # "linear" | "finetune"
    config: ProtocolConfig
    setup: Setup
    identity: dict  # what a resumed run must share with the one that wrote last.pt
    modules: dict[str, nn.Module]  # checkpointed along with the optimizer
    optimizer: torch.optim.Optimizer
    lr_schedule: np.ndarray  # per iteration
    train_loader: ImageLoader
    val_loader: ImageLoader
    step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # one optimisation step -> detached loss
    classifiers: dict[str, nn.Module]  # result-key prefix -> model validated every epoch


def run_identity(config: ProtocolConfig, weights: str, random_init: bool) -> dict:
    """The config (without the RESUMABLE keys) and the evaluated weights."""
    identity = as_dict(config)
    for key in RESUMABLE:
        *parents, leaf = key.split(".")
        node = identity
        for parent in parents:
            node = node[parent]
        del node[leaf]
    return {**identity, "weights": str(Path(weights).resolve()), "random_init": random_init}


def fit(run: Run) -> list[dict]:
    """Train and validate every remaining epoch, resuming from `last.pt`; the per-epoch records."""
    config, process = run.config, run.setup.process
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    last_path = output_dir / checkpoint.LAST
    history: list[dict] = []
    if last_path.is_file():
        state = checkpoint.load(last_path)
        changed = sorted(k for k in state["identity"].keys() | run.identity.keys()
                         if state["identity"].get(k) != run.identity.get(k))
        if state["protocol"] != run.name or changed:
            raise ProtocolError(f"{last_path} belongs to another {state['protocol']} run (differs in: "
                                f"{', '.join(changed) or 'protocol'}); use another output_dir or restore those values")
        for name, module in run.modules.items():
            module.load_state_dict(state["modules"][name])
        run.optimizer.load_state_dict(state["optimizer"])
        history = state["history"]
        if process.is_main:
            print(f"resuming {run.name} from {last_path} after epoch {len(history)} of {config.epochs}")
    if process.is_main:
        (output_dir / "config.yaml").write_text(to_yaml(config))

    steps_per_epoch = len(run.train_loader)
    for epoch in range(len(history), config.epochs):
        seed_global_rngs(derive_seed(config.seed, epoch, process.rank))
        run.train_loader.set_epoch(epoch)
        loss_sum = torch.zeros((), device=process.device)
        bar = tqdm(run.train_loader, desc=f"{run.name} epoch {epoch + 1}/{config.epochs}", leave=False,
                   disable=not process.is_main)
        for i, (images, labels) in enumerate(bar):
            lr = float(run.lr_schedule[epoch * steps_per_epoch + i])
            set_lr(run.optimizer, lr)
            loss = run.step(images, labels)
            loss_sum += loss
            if i % 20 == 0 and process.is_main:
                bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.3g}")
        mean_loss = mean_across_ranks(loss_sum / steps_per_epoch).item()
        if not math.isfinite(mean_loss):
            raise ProtocolError(f"non-finite training loss in epoch {epoch + 1}; {last_path} holds the last good "
                                f"epoch — lower lr and rerun with another output_dir")
        record = {"epoch": epoch + 1, "loss": mean_loss, "lr": lr}
        for prefix, classifier in run.classifiers.items():
            record[f"{prefix}top1"], record[f"{prefix}top5"] = evaluate(classifier, run.val_loader, run.setup.bf16)
        history.append(record)
        if process.is_main:
            checkpoint.save_atomic({"protocol": run.name, "identity": run.identity, "history": history,
                                    "modules": {name: m.state_dict() for name, m in run.modules.items()},
                                    "optimizer": run.optimizer.state_dict(), "config": as_dict(config),
                                    "code_version": checkpoint.code_version()}, last_path)
            with open(output_dir / "log.jsonl", "a") as log:
                log.write(json.dumps(record) + "\n")
            print(f"{run.name} epoch {epoch + 1}/{config.epochs}: " +
                  ", ".join(f"{k} {v:.4g}" for k, v in record.items() if k != "epoch"))
    if not history:
        raise ProtocolError("no epoch was run: epochs must be positive")
    return history


def summary(name: str, history: list[dict], prefixes: tuple[str, ...] = ("",)) -> dict:
    """The result eval.py reports: last and best top-1 (and top-5) per validated model, in %."""
    last = history[-1]
    result = {"protocol": name, "epochs": last["epoch"]}
    for prefix in prefixes:
        best = max(history, key=lambda record: record[f"{prefix}top1"])
        result.update({f"{prefix}top1": last[f"{prefix}top1"], f"{prefix}top5": last[f"{prefix}top5"],
                       f"{prefix}best_top1": best[f"{prefix}top1"], f"{prefix}best_epoch": best["epoch"]})
    return {**result, "history": history}
