"""What rank 0 reports every N steps: a progress bar, a JSONL file and TensorBoard; throughput and MFU."""
import json
import resource
import time
from pathlib import Path

from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
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


def step_flops_per_image(build: Callable[[], nn.Module], view_shapes: list[tuple[int, ...]]) -> float:
    """FLOPs per image of one training step (forward and backward) of the model `build()` makes,
    on views of `view_shapes` (each `(B, C, H, W)`, the same `B`).

    Counted on a shape-only copy (built on the meta device, then given fake tensors), so it costs
    no memory, draws no random number, runs no collective and leaves the real model untouched:
    every rank can call it at any start, resumed or not.
    """
    with torch.device("meta"):
        model = build()
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = model.to_empty(device="cpu")
        views = [torch.empty(shape) for shape in view_shapes]
        flops = count_flops(lambda: model(views, temperature=1.0)["loss"].backward())
    return flops / view_shapes[0][0]


def peak_memory_gb(device: torch.device) -> float:
    """Peak GPU memory allocated, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


class Throughput:
    """Images/s, step time and the share of time spent waiting for data, over the steps since the
    last `window()` and over the whole run (this process's, not earlier runs' in the same folder)."""

    def __init__(self, global_batch: int) -> None:
        self.global_batch = global_batch
        self.run_start = self.start = time.perf_counter()
        self.steps = self.run_steps = 0
        self.waiting = 0.0

    def timed(self, batches: Iterable) -> Iterator:
        """`batches`, counting each one taken as a step and the time spent waiting for it."""
        batches = iter(batches)
        while True:
            start = time.perf_counter()
            batch = next(batches, None)
            self.waiting += time.perf_counter() - start
            if batch is None:
                return
            self.steps += 1
            self.run_steps += 1
            yield batch

    def window(self) -> dict[str, float]:
        """The window's figures; starts the next window."""
        now = time.perf_counter()
        elapsed = now - self.start
        record = {"images_per_s": self.global_batch * self.steps / elapsed, "data_wait": self.waiting / elapsed,
                  "step_time_s": elapsed / max(self.steps, 1)}
        self.start, self.steps, self.waiting = now, 0, 0.0
        return record

    def run_rate(self) -> float:
        """Images/s over this run so far."""
        return self.global_batch * self.run_steps / (time.perf_counter() - self.run_start)


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
