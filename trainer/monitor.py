"""What rank 0 reports every N steps: a progress bar, a JSONL file and TensorBoard; and MFU."""
import json
import resource
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

# Dense bf16 peak FLOP/s by device name, for MFU.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak, when known (MFU is reported on GPUs only)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


def count_flops(step) -> int:
    """FLOPs of one call of `step()` (forward and backward), counted by torch's FlopCounterMode."""
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def peak_memory_gb(device: torch.device) -> float:
    """Peak GPU memory allocated, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


class Monitor:
    """Rank 0's outputs: `log.jsonl`, TensorBoard events under `tb/`, and a tqdm bar."""

    def __init__(self, output_dir: Path, total_steps: int, start_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.jsonl = (output_dir / "log.jsonl").open("a")
        self.tensorboard = SummaryWriter(str(output_dir / "tb"))
        self.bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True, unit="step")

    def log(self, step: int, record: dict) -> None:
        self.jsonl.write(json.dumps({"step": step, **record}) + "\n")
        self.jsonl.flush()
        for key, value in record.items():
            if isinstance(value, (int, float)):
                self.tensorboard.add_scalar(key, value, step)
        shown = ("loss", "lr", "images_per_s", "data_wait", "mfu", "eta_min")
        self.bar.set_postfix({k: f"{record[k]:.4g}" for k in shown if record.get(k) is not None}, refresh=False)

    def advance(self, steps: int) -> None:
        self.bar.update(steps)

    def close(self) -> None:
        self.bar.close()
        self.jsonl.close()
        self.tensorboard.close()
