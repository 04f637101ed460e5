"""The one timing harness every benchmark uses: warm-up, repeats, medians, environment capture,
a printed table and one JSON schema (`{"benchmark", "date", "environment", "settings", "results"}`)."""
from __future__ import annotations

import datetime
import importlib.metadata
import itertools
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from atomic_write import write_json


def synchronize(device: str | None = None) -> None:
    """Wait for queued GPU work so that wall-clock times are honest (no-op on CPU)."""
    import torch

    if device is not None and str(device).startswith("cuda") and torch.cuda.is_available():
        torch.cuda.synchronize()


def endless(loader, first_epoch: int = 0, batches: Callable[[Any], Iterable] = iter) -> Iterator:
    """`batches(loader)` epoch after epoch from `first_epoch` on, each after `loader.set_epoch(epoch)`
    (a benchmark's steady state: batches never run out)."""
    for epoch in itertools.count(first_epoch):
        loader.set_epoch(epoch)
        yield from batches(loader)


def measure(fn: Callable[[], Any], *, warmup: int = 2, repeats: int = 10, device: str | None = None) -> dict:
    """Run `fn` `warmup` times untimed, then `repeats` times timed; return median/min/max/total seconds."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "total_s": sum(times),
            "repeats": repeats}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment() -> dict:
    """Hardware and library versions, so that every JSON result says what produced it."""
    import torch

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": _cpu_name(),
        "cpu_cores": os.cpu_count(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    # Versions from the installed distributions' metadata, not by importing them: importing FFCV sets
    # torch's thread count to 1 for the rest of the process, which would slow every later benchmark.
    installed = {dist.metadata["Name"].lower(): dist.version for dist in importlib.metadata.distributions()}
    for module, name in (("triton", "triton"), ("timm", "timm"), ("ffcv", "ffcv"), ("nvidia.dali", "nvidia-dali")):
        env[module] = next((version for dist, version in sorted(installed.items()) if dist.startswith(name)), None)
    return env


def print_table(rows: Sequence[dict], columns: Sequence[str]) -> None:
    """Print `rows` as an aligned text table with the given columns."""
    def fmt(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return "-" if value is None else str(value)

    cells = [[fmt(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for r in cells:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)))


def report(benchmark: str, settings: dict, results: list[dict], columns: Sequence[str],
           json_path: str | None = None) -> dict:
    """Print the results table and, when asked, write the JSON record atomically."""
    made = make_record(benchmark, settings, results)
    print_table(results, columns)
    if json_path:
        save_record(made, json_path)
    return made


def make_record(benchmark: str, settings: dict, results: list[dict]) -> dict:
    """The JSON record of a benchmark run: what ran, when, where, with which settings, and its results."""
    return {
        "benchmark": benchmark,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "environment": environment(),
        "settings": settings,
        "results": results,
    }


def save_record(record: dict, json_path: str) -> None:
    """Write `record` to `json_path` (`atomic_write.write_json`) and say where."""
    write_json(json_path, record)
    print(f"wrote {json_path}")
