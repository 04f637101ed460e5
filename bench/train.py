"""End-to-end: the real train.py loop for N steps per loader backend, images/s and where the time goes.

Runs `train.py` in a subprocess (one process) on a converted dataset and reads its log:
images/s, the share of wall time spent waiting for the loader (which includes the
host-to-device copy, done inside the loaders) and the rest (forward, backward, optimizer).
The torchvision backend is the baseline.
"""
import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.harness import report

REPO = Path(__file__).resolve().parents[1]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="a converted dataset folder")
    parser.add_argument("--config", default="configs/smoke.yaml")
    parser.add_argument("--backends", default="torchvision,memory")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides for train.py")


def run(args: argparse.Namespace) -> dict:
    results = []
    for backend in args.backends.split(","):
        with tempfile.TemporaryDirectory() as out:
            command = [sys.executable, str(REPO / "train.py"), "--config", args.config, f"data.root={args.data}",
                       f"data.backend={backend}", f"output_dir={out}", f"max_steps={args.steps}",
                       f"log_every={max(1, args.steps // 3)}", *args.overrides]
            done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
            if done.returncode != 0:
                results.append({"backend": backend, "note": done.stderr.strip().splitlines()[-1]})
                continue
            records = [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()][1:]
        data_wait = sum(r["data_wait"] for r in records) / len(records)
        results.append({"backend": backend, "images_per_s": sum(r["images_per_s"] for r in records) / len(records),
                        "data_wait_share": data_wait, "compute_share": 1 - data_wait,
                        "mfu": records[-1]["mfu"], "peak_memory_gb": records[-1]["peak_memory_gb"]})
    baseline = next((r.get("images_per_s") for r in results if r["backend"] == "torchvision"), None)
    for r in results:
        r["vs_torchvision"] = r["images_per_s"] / baseline if baseline and r.get("images_per_s") else None
    settings = {"data": args.data, "config": args.config, "steps": args.steps, "overrides": args.overrides,
                "note": "the first logged window (warm-up) is excluded"}
    return report("train", settings, results, ["backend", "images_per_s", "vs_torchvision", "data_wait_share",
                                               "compute_share", "mfu", "peak_memory_gb"], args.json)
