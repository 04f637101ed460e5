"""Checkpoints written atomically (temporary file + rename), `last.pt` plus numbered ones, pruned."""
import random
import subprocess
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from atomic_write import atomic_path, is_temporary
from configs.schema import as_dict
from trainer import TrainingError

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
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load(path: Path) -> dict:
    """Load a checkpoint with `weights_only=True` (checkpoints may come from untrusted places)."""
    return torch.load(path, map_location="cpu", weights_only=True)


class CheckpointError(TrainingError):
    """No usable checkpoint where one was expected; the message says what to do."""


REQUIRED = ("model", "optimizer", "step", "rng", "config")


def load_training_state(path: Path) -> dict:
    """A pre-training checkpoint, checked to hold what resuming needs; CheckpointError naming
    the problem for a truncated, corrupt or foreign file."""
    try:
        state = load(path)
    except Exception as error:  # torch.load raises many types for damaged files (zip, pickle, EOF, ...)
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CheckpointError(f"{path} is unreadable, truncated or corrupt ({reason})") from None
    missing = [key for key in REQUIRED if not isinstance(state, dict) or key not in state]
    if missing:
        raise CheckpointError(f"{path} is not a pre-training checkpoint (it lacks {', '.join(missing)})")
    return state


def newest_loadable(output_dir: Path) -> tuple[Path, dict, list[str]] | None:
    """The checkpoint to resume from: `last.pt`, else the numbered ones newest first; with a note
    for each file passed over. None when the folder holds no checkpoint at all; CheckpointError
    when it holds some but none loads."""
    candidates = [output_dir / LAST, *sorted(output_dir.glob("checkpoint-*.pt"), reverse=True)]
    notes = []
    for path in (p for p in candidates if p.is_file()):
        try:
            return path, load_training_state(path), notes
        except CheckpointError as error:
            notes.append(str(error))
    if notes:
        raise CheckpointError(f"no checkpoint in {output_dir} can be resumed from: {'; '.join(notes)}. Move "
                              f"them away to start from scratch, or use another output_dir")
    return None


def prune(directory: Path, keep: int) -> None:
    """Delete all but the newest `keep` numbered checkpoints (`checkpoint-EPOCH.pt`)."""
    numbered = sorted(directory.glob("checkpoint-*.pt"))
    for old in numbered[: max(0, len(numbered) - keep)]:
        old.unlink()


class Checkpointer:
    """The run's checkpoints in `output_dir`: `last.pt` every `every_minutes` and at every epoch's
    end, `checkpoint-EPOCH.pt` every `keep_every_epochs` epochs and at the last, the newest
    `keep_last` numbered ones kept.

    A checkpoint is taken in two moves. `snapshot(step)` copies the state to host memory (every
    rank contributes its RNG states; rank 0 keeps the copy); `commit()` writes it, and the loop
    calls it only once the *next* step's loss was found finite on every rank: a finite loss at
    step N does not prove that update N left usable weights, the loss of step N+1 does. So a run
    that diverges never overwrites its last good checkpoint. The final and the stop checkpoints
    are committed at once."""

    def __init__(self, output_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer, config: Any,
                 rank: int, world_size: int, steps_per_epoch: int, dataset: dict,
                 resumed: tuple[Path, int] | None = None) -> None:
        self.output_dir, self.model, self.optimizer, self.config = output_dir, model, optimizer, config
        self.rank, self.world_size, self.steps_per_epoch = rank, world_size, steps_per_epoch
        self.dataset = dataset  # the training data's fingerprint (trainer.resume.dataset_fingerprint)
        self.last_saved = time.monotonic()
        self.pending: dict | None = None  # rank 0's host copy
        self.snapshot_step: int | None = None  # on every rank: a snapshot awaits its commit
        self.good = resumed  # (path, step) of the newest checkpoint known to be good
        if rank == 0:  # a write killed mid-way (kill -9, preemption) leaves a temporary file, gigabytes large
            for stale in [*output_dir.glob(f"{LAST}.*"), *output_dir.glob("checkpoint-*.pt.*")]:
                if is_temporary(stale):
                    stale.unlink(missing_ok=True)

    @property
    def last(self) -> Path:
        return self.output_dir / LAST

    def due(self) -> bool:
        """This rank's timer says `last.pt` should be refreshed (agreed over ranks by the caller)."""
        return time.monotonic() - self.last_saved > 60 * self.config.checkpoint.every_minutes

    def snapshot(self, step: int) -> None:
        """Copy the state after `step` to host memory, to be written by `commit`."""
        rng = [rng_state()]
        if self.world_size > 1:
            rng = [None] * self.world_size
            dist.all_gather_object(rng, rng_state())
        self.last_saved = time.monotonic()
        self.snapshot_step = step
        if self.rank == 0:
            state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}
            self.pending = {**_host_copy(state), "step": step, "epoch": step / self.steps_per_epoch, "rng": rng,
                            "config": as_dict(self.config), "dataset": self.dataset, "code_version": code_version()}

    def commit(self) -> None:
        """Write the snapshot: `last.pt`, and the numbered checkpoint when it ends a kept epoch."""
        state, self.pending, self.snapshot_step = self.pending, None, None
        if state is None:
            return
        epoch, within = divmod(state["step"], self.steps_per_epoch)
        every = self.config.checkpoint.keep_every_epochs  # 0: only the final epoch's
        if not within and epoch and ((every and epoch % every == 0) or epoch == self.config.epochs):
            save_atomic(state, self.output_dir / f"checkpoint-{epoch:04d}.pt")
            prune(self.output_dir, self.config.checkpoint.keep_last)
        save_atomic(state, self.last)
        self.good = (self.last, state["step"])

    def describe_last(self) -> str:
        """Where a run that stops now can resume from, for its error message."""
        if self.good is None:
            return "no checkpoint was written before it"
        return f"{self.good[0]} (step {self.good[1]}) is kept"


def _host_copy(tree: Any) -> Any:
    """`tree` with every tensor copied to host memory (a copy even of CPU tensors: training goes on
    updating the originals in place)."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().to("cpu", copy=True)
    if isinstance(tree, dict):
        return {key: _host_copy(value) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_host_copy(value) for value in tree)
    return tree
