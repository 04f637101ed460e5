"""Checkpoints written atomically (temporary file + rename), `last.pt` plus numbered ones, pruned."""
import os
import random
import subprocess
from pathlib import Path

import torch

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
