"""Loader throughput: two-view pre-training batches per backend, side by side with torchvision.

`--data` is a converted dataset (DIR/NAME). `--prepare imagenet|cifar10` builds one from
../shared/data first (the ImageNet sample replicated to `--replicate`×1000 images, or CIFAR-10)
under `--cache`, reusing it when it is already there.
"""
import argparse
import itertools
import tarfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import torch

import convert_datasets
from bench.harness import measure, report
from configs.schema import DataConfig
from loaders.builder import build_loader

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
PREPARED = {"imagenet": "imagenet-sample.tar", "cifar10": "cifar10-jpeg.tar"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", help="a converted dataset folder (DIR/NAME holding manifest.json)")
    parser.add_argument("--prepare", choices=sorted(PREPARED), help="build --data from ../shared/data first")
    parser.add_argument("--replicate", type=int, default=4, help="copies of the ImageNet sample (--prepare imagenet)")
    parser.add_argument("--cache", default="bench-results/data", help="where --prepare puts datasets")
    parser.add_argument("--backends", default="torchvision,ffcv,dali,memory")
    parser.add_argument("--views", type=int, default=2, choices=[2], help="global views per sample (the recipe's 2)")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--scale", type=float, nargs=2, default=(0.35, 1.0), help="global crop scale")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batches", type=int, default=20, help="timed batches per backend")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--plot", help="also write a bar chart (PNG) of images/s by backend")


def prepare(kind: str, cache: Path, replicate: int) -> Path:
    """Convert the shared ImageNet sample (`replicate` copies in train, every 20th image also in val) or CIFAR-10."""
    name = f"imagenet-x{replicate}" if kind == "imagenet" else "cifar10"
    root = cache / name
    if (root / "manifest.json").is_file():
        return root
    folder = cache / f"{name}-source"
    with tarfile.open(SHARED_DATA / PREPARED[kind]) as tar:
        members = [m for m in tar if m.isfile()]
        for number, member in enumerate(members):
            data = tar.extractfile(member).read()
            split, cls, filename = Path(member.name).parts[-3:]
            targets = [(split, copy) for copy in (range(replicate) if kind == "imagenet" else [0])]
            if kind == "imagenet" and number % 20 == 0:
                targets.append(("val", 0))  # a small held-out split (the sample has train/ only)
            for target_split, copy in targets:
                path = folder / target_split / cls / f"{copy}_{filename}"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
    if convert_datasets.main(["imagefolder", "--source", str(folder), "--out", str(cache), "--name", name]) != 0:
        raise SystemExit(f"converting {folder} failed")
    return root


def endless(loader) -> Iterator:
    for epoch in itertools.count():
        loader.set_epoch(epoch)
        yield from loader


def run(args: argparse.Namespace) -> dict:
    root = prepare(args.prepare, Path(args.cache), args.replicate) if args.prepare else Path(args.data)
    data = DataConfig(root=str(root), workers=args.workers, image_size=args.size, global_scale=tuple(args.scale))
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    results = []
    for backend in args.backends.split(","):
        try:
            loader = build_loader(replace(data, backend=backend), split="train", train=True, batch_size=args.batch,
                                  device=args.device, dtype=dtype)
        except ImportError as error:
            results.append({"backend": backend, "images_per_s": None, "note": f"unavailable: {error}"})
            continue
        batches = endless(loader)
        timing = measure(lambda: next(batches), warmup=3, repeats=args.batches, device=args.device)
        results.append({"backend": backend, "images_per_s": args.batch * args.batches / timing["total_s"],
                        "median_batch_ms": 1e3 * timing["median_s"]})
        del batches, loader
    baseline = next((r["images_per_s"] for r in results if r["backend"] == "torchvision"), None)
    for r in results:
        r["vs_torchvision"] = r["images_per_s"] / baseline if baseline and r["images_per_s"] else None
    settings = {"data": str(root), "views": args.views, "size": args.size, "batch": args.batch,
                "workers": args.workers, "device": args.device, "dtype": str(dtype), "batches": args.batches}
    record = report("loader", settings, results, ["backend", "images_per_s", "vs_torchvision", "median_batch_ms"],
                    args.json)
    if args.plot:
        plot(results, f"{root.name}, {args.size}px, 2 views, {args.workers} workers", args.plot)
    return record


def plot(results: list[dict], title: str, path: str) -> None:
    """Bar chart of two-view images/s by backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [r for r in results if r["images_per_s"]]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bars = ax.bar([r["backend"] for r in measured], [r["images_per_s"] for r in measured], color="#4C72B0")
    ax.bar_label(bars, labels=[f"{r['images_per_s']:.0f}" for r in measured])
    ax.set_ylabel("two-view images / s")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")
