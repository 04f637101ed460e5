"""patchmix vs the multi-pass reference (and a plain copy on GPU): GB/s and speed-ups.

Two timings per implementation. `median_ms`: one call as the training step makes it (`patchmix`
drawing its permutation, then the mix), synchronised, host overhead included. On a GPU also
`device_ms`: the device time of the mixing work alone (permutation given), from CUDA-graph
replays of many calls (`triton.testing.do_bench_cudagraph`), so Python and launch overheads
drop out. The bandwidth goal is about that device time: a ~6 MB CIFAR batch moves in a few
microseconds on an H200, far less than the host work of one eager call.
"""
import argparse
from collections.abc import Callable

import torch

from bench.harness import measure, report
from kernels.patchmix import group_of_positions, patchmix
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
            mixing = {"reference": lambda: patchmix_reference(images, patch, args.num_mix, perm)}
            if device.startswith("cuda"):
                out = torch.empty_like(images)
                mixing["copy"] = lambda: out.copy_(images)
            timings = {impl: measure(fn, repeats=args.repeats, device=device) for impl, fn in mixing.items()}
            generator = torch.Generator(device).manual_seed(0)
            for backend in backends:  # as the training step calls it: no `perm=`, whose check reads the device
                timings[backend] = measure(lambda: patchmix(images, patch, args.num_mix, generator=generator,
                                                            backend=backend), repeats=args.repeats, device=device)
                mixing[backend] = _mix_with(images, perm, patch, args.num_mix, backend)
            device_ms = {impl: _device_ms(fn) for impl, fn in mixing.items()} if device.startswith("cuda") else {}
            ref_s = timings["reference"]["median_s"]
            for impl, t in timings.items():
                row = {"workload": name, "shape": f"{batch}x{channels}x{size}x{size}/p{patch}", "dtype": dtype_name,
                       "impl": impl, "median_ms": 1e3 * t["median_s"], "GB_per_s": moved_gb / t["median_s"],
                       "speedup_vs_reference": ref_s / t["median_s"]}
                row.update(_device_columns(device_ms, impl, moved_gb))
                results.append(row)
    settings = {"device": device, "num_mix": args.num_mix, "repeats": args.repeats,
                "threads": torch.get_num_threads()}
    return report("kernel", settings, results,
                  ["workload", "shape", "dtype", "impl", "median_ms", "GB_per_s", "speedup_vs_reference",
                   "device_ms", "device_GB_per_s", "device_speedup_vs_reference", "fraction_of_copy_bw"], args.json)


def _mix_with(images: torch.Tensor, perm: torch.Tensor, patch: int, num_mix: int, backend: str) -> Callable:
    """The mixing work of `patchmix(..., perm=perm)` without its eager check of `perm`, which reads
    the device and so cannot run inside a CUDA graph: the groups, then the mixing op."""
    return lambda: torch.ops.patchmix.mix(images, group_of_positions(perm, num_mix), patch, backend)


def _device_ms(fn: Callable) -> float | str:
    """Milliseconds of device time per call of `fn` (median of CUDA-graph replays), or why not."""
    try:
        import triton.testing

        return triton.testing.do_bench_cudagraph(fn, rep=10, return_mode="median")
    except Exception as error:  # no Triton, or a capture failure: this figure is lost, not the benchmark
        return f"unavailable: {type(error).__name__}: {error}"


def _device_columns(device_ms: dict, impl: str, moved_gb: float) -> dict:
    """`device_ms` of `impl`, its GB/s, its speed-up on the reference and its fraction of the copy's
    bandwidth (None where not measured; the reason in `device_ms` where it failed)."""
    ms = device_ms.get(impl)
    if not isinstance(ms, float):
        return {"device_ms": ms, "device_GB_per_s": None, "device_speedup_vs_reference": None,
                "fraction_of_copy_bw": None}
    reference, copy = device_ms.get("reference"), device_ms.get("copy")
    return {"device_ms": ms, "device_GB_per_s": moved_gb / (ms / 1e3),
            "device_speedup_vs_reference": reference / ms if isinstance(reference, float) else None,
            "fraction_of_copy_bw": copy / ms if isinstance(copy, float) else None}
