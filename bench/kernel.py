"""patchmix vs the multi-pass reference (and a plain copy on GPU): GB/s and speed-ups."""
import argparse

import torch

from bench.harness import measure, report
from kernels.patchmix import patchmix
from kernels.reference import patchmix_reference

# name -> (batch on CPU, batch on GPU, channels, size, patch)
WORKLOADS = {
    "imagenet": (64, 256, 3, 224, 16),
    "cifar": (256, 1024, 3, 32, 2),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workloads", default="imagenet,cifar", help=f"comma list of {sorted(WORKLOADS)}")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--num-mix", type=int, default=2)
    parser.add_argument("--batch", type=int, default=None, help="override the workload's batch size")
    parser.add_argument("--repeats", type=int, default=10)


def run(args: argparse.Namespace) -> dict:
    device = args.device
    backends = ["triton", "torch"] if device.startswith("cuda") else ["torch"]
    results = []
    for name in args.workloads.split(","):
        cpu_batch, gpu_batch, channels, size, patch = WORKLOADS[name]
        batch = args.batch or (gpu_batch if device.startswith("cuda") else cpu_batch)
        for dtype_name in args.dtypes.split(","):
            images = torch.randn(batch, channels, size, size, device=device).to(getattr(torch, dtype_name))
            num_patches = (size // patch) ** 2
            perm = torch.randperm(num_patches, device=device)
            moved_gb = 2 * images.numel() * images.element_size() / 1e9  # each element read once, written once
            timings = {"reference": measure(lambda: patchmix_reference(images, patch, args.num_mix, perm),
                                            repeats=args.repeats, device=device)}
            if device.startswith("cuda"):
                out = torch.empty_like(images)
                timings["copy"] = measure(lambda: out.copy_(images), repeats=args.repeats, device=device)
            generator = torch.Generator(device).manual_seed(0)
            for backend in backends:  # as the training step calls it: no `perm=`, whose check reads the device
                timings[backend] = measure(lambda: patchmix(images, patch, args.num_mix, generator=generator,
                                                            backend=backend), repeats=args.repeats, device=device)
            ref_s = timings["reference"]["median_s"]
            copy_s = timings.get("copy", {}).get("median_s")
            for impl, t in timings.items():
                results.append({
                    "workload": name, "shape": f"{batch}x{channels}x{size}x{size}/p{patch}", "dtype": dtype_name,
                    "impl": impl, "median_ms": 1e3 * t["median_s"], "GB_per_s": moved_gb / t["median_s"],
                    "speedup_vs_reference": ref_s / t["median_s"],
                    "fraction_of_copy_bw": copy_s / t["median_s"] if copy_s else None,
                })
    settings = {"device": device, "num_mix": args.num_mix, "repeats": args.repeats,
                "threads": torch.get_num_threads()}
    return report("kernel", settings, results,
                  ["workload", "shape", "dtype", "impl", "median_ms", "GB_per_s", "speedup_vs_reference",
                   "fraction_of_copy_bw"], args.json)
