"""What a restarted run resumes from, decided once for all ranks and checked before anything runs.

Rank 0 picks the checkpoint (`last.pt`, else the newest numbered one that loads) and every rank
loads that very file, so a multi-node run whose output_dir is not on shared storage fails with an
error that says so instead of hanging. The checkpoint must come from the same config (except the
keys in `RESUMABLE_CHANGES`, and the optimisation settings in `ADJUSTABLE`, whose change is
reported), the same dataset (its manifest's fingerprint) and the same number of processes.
"""
import hashlib
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import nn

from configs.schema import Config, as_dict
from loaders.manifest import ConvertedDataset
from trainer import TrainingError, checkpoint
from trainer.checkpoint import CheckpointError, load_training_state, newest_loadable
from trainer.distributed import Process, agreed

# Keys that may change when resuming: where things are, how fast and how often to log and save.
RESUMABLE_CHANGES = ("data.root", "data.backend", "data.workers", "data.compile_views", "data.device_crops", "compile",
                     "log_every", "knn_every", "max_steps", "checkpoint.", "output_dir", "ddp.")
# Optimisation settings a user may change to get past a diverged run (the printed advice); reported.
ADJUSTABLE = ("optim.lr", "optim.min_lr", "optim.clip_grad")


def flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        out.update(flatten(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


def config_changes(saved: dict, config: Config, path: Path) -> list[str]:
    """The adjustable settings that differ from the checkpoint's, as `key: old -> new`; a
    TrainingError naming every other differing key that is not in RESUMABLE_CHANGES."""
    old, new = flatten(saved), flatten(as_dict(config))
    changed = [k for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)]
    details = {k: f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed}
    refused = [details[k] for k in changed if not k.startswith(RESUMABLE_CHANGES) and k not in ADJUSTABLE]
    if refused:
        raise TrainingError(f"{path} was trained with a different config ({', '.join(refused)}); use another "
                            f"output_dir or restore those values")
    return [details[k] for k in changed if k in ADJUSTABLE]


def dataset_fingerprint(dataset: ConvertedDataset, split: str) -> dict[str, Any]:
    """What identifies the training data: the manifest's SHA-256 and the split's sample count."""
    return {"manifest_sha256": hashlib.sha256(dataset.layout.manifest.read_bytes()).hexdigest(),
            "count": dataset.count(split)}


def check_dataset(saved: dict | None, current: dict, path: Path, root: str) -> None:
    """Refuse to resume onto another dataset (checkpoints written before fingerprints pass)."""
    if saved is not None and saved != current:
        raise TrainingError(
            f"{path} was trained on a different dataset ({saved['count']} images, manifest sha256 "
            f"{saved['manifest_sha256'][:12]}…) than data.root={root} ({current['count']} images, manifest sha256 "
            f"{current['manifest_sha256'][:12]}…); point data.root at the original dataset or use another output_dir")


def resume_state(output_dir: Path, process: Process) -> tuple[Path, dict, list[str]] | None:
    """`(path, state, notes)` of the checkpoint every rank resumes from, None for a fresh start.
    `notes` say which damaged files were passed over (rank 0's view)."""
    found = agreed(process, lambda: newest_loadable(output_dir) if process.is_main else None)
    choice = [(found[0].name, found[2]) if found else None]  # each rank looks in its own view of output_dir
    if process.world_size > 1:
        dist.broadcast_object_list(choice, src=0)

    def load_the_same() -> dict | None:
        if choice[0] is None:
            if any(output_dir.glob("*.pt")):
                raise CheckpointError(f"this rank sees checkpoints in {output_dir} that rank 0 does not: output_dir "
                                      f"must be on storage shared by all nodes")
            return None
        path = output_dir / choice[0][0]
        if found:
            return found[1]
        if not path.is_file():
            raise CheckpointError(f"{path}, which rank 0 resumes from, does not exist on this node: output_dir must "
                                  f"be on storage shared by all nodes")
        return load_training_state(path)

    state = agreed(process, load_the_same)
    return None if state is None else (output_dir / choice[0][0], state, choice[0][1])


class Resume(NamedTuple):
    """The checkpoint a restarted run continues from, already checked against this run."""
    path: Path
    state: dict
    notes: list[str]  # damaged checkpoints passed over
    changes: list[str]  # adjustable settings that differ from the checkpoint's


def checked_resume(config: Config, process: Process, fingerprint: dict) -> Resume | None:
    """The checkpoint in output_dir every rank resumes from (None: a fresh start), refused with a
    one-line error when it was trained with another config, dataset or number of processes."""
    found = resume_state(Path(config.output_dir), process)
    if not found:
        return None
    path, state, notes = found
    changes = config_changes(state["config"], config, path)
    check_dataset(state.get("dataset"), fingerprint, path, config.data.root)
    if len(state["rng"]) != process.world_size:
        raise TrainingError(f"{path} was written by {len(state['rng'])} processes; resume it with the "
                            f"same number (got {process.world_size}) to continue bit for bit")
    return Resume(path, state, notes, changes)


def restore(resumed: Resume, model: nn.Module, optimizer: torch.optim.Optimizer, process: Process,
            steps_per_epoch: int) -> int:
    """Load weights, optimizer and this rank's RNG state; the step to continue from."""
    model.load_state_dict(resumed.state["model"])
    optimizer.load_state_dict(resumed.state["optimizer"])
    checkpoint.set_rng_state(resumed.state["rng"][process.rank])
    step = resumed.state["step"]
    if process.is_main:
        for note in resumed.notes:
            print(f"skipping a damaged checkpoint: {note}")
        print(f"resuming from {resumed.path} at step {step} (epoch {step // steps_per_epoch})"
              + (f" with changed settings: {', '.join(resumed.changes)}" if resumed.changes else ""))
    return step

