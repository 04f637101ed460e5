"""Loader throughput per backend, side by side with torchvision, and the host stages against raw decoding.

Per backend: pre-training batches/s as images/s (2 global views, `--local-crops` more); host
CPU-seconds per image (this process's CPU time, all its threads, plus its worker processes',
over the timed batches: what a node must provision per GPU); aten ops and sync-prone ops of one
steady-state batch (`bench.dispatch.OpCounter`; eager views only, as dynamo refuses dispatch
modes: on CUDA pass `--eager-views` to count); for DALI the operators per iteration of its CUDA pipeline on each device
(`loaders.dali_backend.operator_counts`).

`--host` also times the host stages alone, on the same files and threads: raw libjpeg-turbo
decoding (FFCV's `imdecode`, every image once), ffcv's host stage (decode once + every view's
crop, no colour ops; and with `data.device_crops`, decode once, the views cut on the device) and
torchvision's (PIL decode + a RandomResizedCrop per view). `--device-crops` / `--host-crops` choose
the ffcv backend's way for the end-to-end rows (default: `data.device_crops: null`).

`--data` is a converted dataset (DIR/NAME). `--prepare imagenet|cifar10` builds one from
../shared/data first (the ImageNet sample replicated to `--replicate`×1000 images, or CIFAR-10)
under `--cache`, reusing it when it is already there.
"""
import argparse
import io
import itertools
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import psutil
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF

import convert_datasets
from bench.dispatch import OpCounter
from bench.harness import endless, measure, report
from configs.schema import DataConfig
from loaders.builder import LoaderSettings, build_loader, resolve_device_crops
from loaders.device import compile_setting
from loaders.shards import ShardSamples, open_converted

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
PREPARED = {"imagenet": "imagenet-sample.tar", "cifar10": "cifar10-jpeg.tar"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", help="a converted dataset folder (DIR/NAME holding manifest.json)")
    parser.add_argument("--prepare", choices=sorted(PREPARED), help="build --data from ../shared/data first")
    parser.add_argument("--replicate", type=int, default=4, help="copies of the ImageNet sample (--prepare imagenet)")
    parser.add_argument("--cache", default="bench-results/data", help="where --prepare puts datasets")
    parser.add_argument("--backends", default="torchvision,ffcv,dali,memory")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--scale", type=float, nargs=2, default=(0.35, 1.0), help="global crop scale")
    parser.add_argument("--local-crops", type=int, default=0, help="96-px local crops per sample (ImageNet: 8)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batches", type=int, default=20, help="timed batches per backend")
    parser.add_argument("--warmup", type=int, default=10, help="untimed batches first (workers start, compilation, "
                        "and the allocator's first large blocks make the first few batches slow)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    views = parser.add_mutually_exclusive_group()
    views.add_argument("--compile-views", action="store_true", help="torch.compile the views on CPU too")
    views.add_argument("--eager-views", action="store_true", help="eager views on CUDA too (to count their ops)")
    crops = parser.add_mutually_exclusive_group()
    crops.add_argument("--device-crops", action="store_true", help="ffcv cuts the views on the device on CPU too")
    crops.add_argument("--host-crops", action="store_true", help="ffcv cuts the views on the host on CUDA too")
    parser.add_argument("--host", action="store_true", help="also time the host stages against raw decoding")
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


def cpu_seconds(process: psutil.Process) -> dict[int, float]:
    """CPU seconds so far of `process` (all its threads) and of each of its live child processes."""
    times = {process.pid: sum(process.cpu_times()[:2])}
    for child in process.children(recursive=True):
        try:
            times[child.pid] = sum(child.cpu_times()[:2])
        except psutil.NoSuchProcess:
            continue
    return times


def timed(next_batch, batches: int, images_per_batch: int, device: str, warmup: int) -> dict:
    """images/s and host CPU-seconds per image over `batches` calls of `next_batch`, after `warmup` untimed."""
    process = psutil.Process()
    for _ in range(warmup):
        next_batch()
    before = cpu_seconds(process)
    timing = measure(next_batch, warmup=0, repeats=batches, device=device)
    after = cpu_seconds(process)
    cpu = sum(seconds - before.get(pid, 0.0) for pid, seconds in after.items())
    images = images_per_batch * batches
    return {"images_per_s": images / timing["total_s"], "cpu_s_per_image": cpu / images,
            "median_batch_ms": 1e3 * timing["median_s"]}


def dali_operators(data: DataConfig, batch: int) -> dict[str, int]:
    """DALI's operators per iteration of the CUDA pipeline by device."""
    from loaders.dali_backend import operator_counts

    return operator_counts(LoaderSettings(data=replace(data, backend="dali"), split="train", train=True,
                                          batch_size=batch, device=torch.device("cuda"), dtype=torch.bfloat16))


def backend_row(data: DataConfig, backend: str, args: argparse.Namespace, dtype: torch.dtype) -> dict:
    """One backend's figures (or why it could not run)."""
    try:
        loader = build_loader(replace(data, backend=backend), split="train", train=True, batch_size=args.batch,
                              device=args.device, dtype=dtype)
    except (ImportError, ValueError) as error:  # a library missing, or the data unfit (memory: many sizes)
        return {"backend": backend, "images_per_s": None, "note": f"unavailable: {error}"}
    batches = endless(loader)
    row = {"backend": backend, **timed(lambda: next(batches), args.batches, args.batch, args.device, args.warmup)}
    if not compile_setting(torch.device(args.device), data.compile_views):  # dynamo refuses dispatch modes
        with OpCounter() as counter:
            next(batches)
        row.update(aten_ops_per_batch=counter.total, sync_prone_per_batch=counter.total_sync_prone,
                   sync_prone_by_op=dict(counter.sync_prone))
    if backend == "dali":
        row["dali_operators"] = dali_operators(data, args.batch)
    del batches, loader
    return row


def run(args: argparse.Namespace) -> dict:
    if not (args.data or args.prepare):
        raise SystemExit("bench.py loader: pass --data DIR/NAME (a converted dataset) or --prepare cifar10|imagenet")
    root = prepare(args.prepare, Path(args.cache), args.replicate) if args.prepare else Path(args.data)
    data = DataConfig(root=str(root), workers=args.workers, image_size=args.size, global_scale=tuple(args.scale),
                      local_crops=args.local_crops,
                      compile_views=True if args.compile_views else False if args.eager_views else None,
                      device_crops=True if args.device_crops else False if args.host_crops else None)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    results = [backend_row(data, backend, args, dtype) for backend in args.backends.split(",")]
    baseline = next((r["images_per_s"] for r in results if r["backend"] == "torchvision"), None)
    for r in results:
        r["vs_torchvision"] = r["images_per_s"] / baseline if baseline and r["images_per_s"] else None
    if args.host:
        results += host_stages(data, args)
    settings = {"data": str(root), "size": args.size, "local_crops": args.local_crops, "batch": args.batch,
                "workers": args.workers, "warmup": args.warmup, "batches": args.batches, "device": args.device,
                "dtype": str(dtype), "compile_views": compile_setting(torch.device(args.device), data.compile_views),
                "device_crops": resolve_device_crops(data, torch.device(args.device)),
                "threads": torch.get_num_threads()}
    record = report("loader", settings, results, ["backend", "images_per_s", "vs_torchvision", "cpu_s_per_image",
                                                  "aten_ops_per_batch", "sync_prone_per_batch", "median_batch_ms"],
                    args.json)
    if args.plot:
        views = f"2 views + {args.local_crops} local" if args.local_crops else "2 views"
        made = "compiled" if settings["compile_views"] else "eager"
        plot(record["results"], f"{root.name}, {args.size}px, {views} ({made}), {args.workers} workers, {args.device}",
             args.plot)
    return record


def host_stages(data: DataConfig, args: argparse.Namespace) -> list[dict]:
    """Raw libjpeg-turbo decoding vs ffcv's and torchvision's host stages, same files, `--workers` threads."""
    from loaders.ffcv_backend import FfcvLoader

    samples = ShardSamples(open_converted(data.root), "train")
    count = min(len(samples), args.batch * args.batches)
    encoded = [samples.read(i)[0] for i in range(count)]
    settings = LoaderSettings(data=replace(data, backend="ffcv"), split="train", train=True, batch_size=args.batch)
    rows = [{"backend": "raw decode (libjpeg-turbo)", **raw_decode(encoded, args.workers)}]
    for device_crops, name in ((False, "ffcv host stage"), (True, "ffcv host stage, data.device_crops")):
        loader = FfcvLoader(replace(settings, data=replace(settings.data, device_crops=device_crops)))
        host = endless(loader, batches=FfcvLoader.host_batches)
        rows.append({"backend": name, **timed(lambda: next(host), args.batches, args.batch, "cpu", args.warmup)})
        del host, loader
    rows.append({"backend": "torchvision host stage", **torchvision_host(samples, settings.views(), args)})
    for row in rows:
        row["vs_raw_decode"] = row["images_per_s"] / rows[0]["images_per_s"]
        row["vs_torchvision_host"] = row["images_per_s"] / rows[-1]["images_per_s"]
    return rows


def raw_decode(encoded: list[bytes], workers: int) -> dict:
    """Every image decoded once to RGB by libjpeg-turbo (FFCV's `imdecode`), in `workers` threads."""
    from ffcv.libffcv import imdecode
    from PIL import Image

    sizes = [Image.open(io.BytesIO(data)).size for data in encoded]  # headers, not timed

    def decode(i: int) -> None:
        width, height = sizes[i]
        out = np.empty((height, width, 3), dtype=np.uint8)
        imdecode(np.frombuffer(encoded[i], np.uint8), out, height, width, height, width, 0, 0, 1, 1, False, False)

    with ThreadPoolExecutor(workers) as pool:
        def run_all() -> None:
            list(pool.map(decode, range(len(encoded))))

        return timed(run_all, 1, len(encoded), "cpu", warmup=1)


class _DecodeAndCrop(torch.utils.data.Dataset):
    """torchvision's host stage: PIL decode, then each view's RandomResizedCrop (bicubic), as uint8."""

    def __init__(self, samples: ShardSamples, specs: list) -> None:
        self.samples = samples
        self.crops = [T.RandomResizedCrop(spec.size, spec.scale, spec.ratio, T.InterpolationMode.BICUBIC)
                      for spec in specs]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> list[torch.Tensor]:
        image, _ = self.samples.decode(index)
        return [TF.pil_to_tensor(crop(image)) for crop in self.crops]


def torchvision_host(samples: ShardSamples, specs: list, args: argparse.Namespace) -> dict:
    loader = torch.utils.data.DataLoader(_DecodeAndCrop(samples, specs), batch_size=args.batch, shuffle=True,
                                         drop_last=True, num_workers=args.workers, persistent_workers=True)
    batches = itertools.chain.from_iterable(itertools.repeat(loader))
    result = timed(lambda: next(batches), args.batches, args.batch, "cpu", args.warmup)
    del batches, loader
    return result


def plot(results: list[dict], title: str, path: str) -> None:
    """Bar chart of images/s by backend (and host stage)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [r for r in results if r.get("images_per_s")]
    fig, ax = plt.subplots(figsize=(7, 3.8))
    bars = ax.barh([r["backend"] for r in measured], [r["images_per_s"] for r in measured], color="#4C72B0")
    ax.bar_label(bars, labels=[f"{r['images_per_s']:.0f}" for r in measured], padding=3)
    ax.set_xlabel("images / s")
    ax.invert_yaxis()
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")
