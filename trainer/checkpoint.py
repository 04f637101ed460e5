"""Checkpoints written atomically (temporary file + rename), `last.pt` plus numbered ones, pruned."""
import os
import random
import subprocess
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from configs.schema import as_dict

LAST = "last.pt"


def code_version() -> str:
    """`git describe` of the code that wrote a checkpoint ("unknown" outside a git checkout)."""
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def rng_state() -> dict:
    """Every RNG the step draws from: Python's, torch's CPU generator and each CUDA device's."""
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


def save_atomic(state: dict, path: Path) -> None:
    """Write `state` to `path` so that a crash at any moment leaves either the old file or the new one."""
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load(path: Path) -> dict:
    """Load a checkpoint with `weights_only=True` (checkpoints may come from untrusted places)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def prune(directory: Path, keep: int) -> None:
    """Delete all but the newest `keep` numbered checkpoints (`checkpoint-EPOCH.pt`)."""
    numbered = sorted(directory.glob("checkpoint-*.pt"))
    for old in numbered[: max(0, len(numbered) - keep)]:
        old.unlink()


class Checkpointer:
    """The run's checkpoints in `output_dir`: `last.pt` every `every_minutes` and at every epoch's
    end, `checkpoint-EPOCH.pt` every `keep_every_epochs` epochs and at the last, the newest
    `keep_last` numbered ones kept. Every rank calls `save` (each contributes its RNG states);
    rank 0 writes."""

    def __init__(self, output_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer, config: Any,
                 rank: int, world_size: int, steps_per_epoch: int) -> None:
        self.output_dir, self.model, self.optimizer, self.config = output_dir, model, optimizer, config
        self.rank, self.world_size, self.steps_per_epoch = rank, world_size, steps_per_epoch
        self.last_saved = time.monotonic()

    @property
    def last(self) -> Path:
        return self.output_dir / LAST

    def due(self) -> bool:
        """This rank's timer says `last.pt` should be refreshed (agreed over ranks by the caller)."""
        return time.monotonic() - self.last_saved > 60 * self.config.checkpoint.every_minutes

    def save(self, step: int) -> None:
        """Write `last.pt` at `step`, and the numbered checkpoint when `step` ends a kept epoch."""
        rng = [rng_state()]
        if self.world_size > 1:
            rng = [None] * self.world_size
            dist.all_gather_object(rng, rng_state())
        self.last_saved = time.monotonic()
        if self.rank != 0:
            return
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "step": step,
                 "epoch": step / self.steps_per_epoch, "rng": rng, "config": as_dict(self.config),
                 "code_version": code_version()}
        epoch, within = divmod(step, self.steps_per_epoch)
        if not within and epoch and (epoch % self.config.checkpoint.keep_every_epochs == 0
                                     or epoch == self.config.epochs):
            save_atomic(state, self.output_dir / f"checkpoint-{epoch:04d}.pt")
            prune(self.output_dir, self.config.checkpoint.keep_last)
        save_atomic(state, self.last)
