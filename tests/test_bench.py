"""The benchmark scripts run end to end at toy sizes: `bench.py all --json`, the loader benchmark's
columns, the kernel benchmark's device-time columns, the step benchmark's early record, and
`bench/gpu_check.py`'s CPU smoke mode."""
import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

import bench.kernel
import bench.loader

REPO = Path(__file__).resolve().parents[1]


def _bench_script():
    """bench.py (the script; `bench` is the package beside it)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_script", REPO / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Fake:
    """A benchmark module that records its arguments and reports one row."""
    __doc__ = "fake benchmark"

    def __init__(self) -> None:
        self.calls: list[argparse.Namespace] = []

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--data")
        parser.add_argument("--prepare")
        parser.add_argument("--size")

    def run(self, args: argparse.Namespace) -> dict:
        from bench.harness import report

        self.calls.append(args)
        return report("fake", {"data": args.data}, [{"value": len(self.calls)}], ["value"], args.json)


def test_all_writes_one_json_of_every_run(tmp_path, monkeypatch):
    script = _bench_script()
    monkeypatch.chdir(tmp_path)
    fakes = {name: _Fake() for name in ("kernel", "loader", "train")}
    monkeypatch.setattr(script, "ALL_RUNS", {"loader_x": ("loader", ["--prepare", "cifar10", "--size", "32"]),
                                             "train": ("train", ["--data", "{cifar10}"])})
    monkeypatch.setattr(sys, "argv", ["bench.py", "all", "--data", "DATA", "--json", "out/all.json"])
    for name, fake in fakes.items():
        monkeypatch.setitem(sys.modules, f"fake_{name}", fake)
    monkeypatch.setattr(script, "BENCHMARKS", {name: f"fake_{name}" for name in fakes})
    script.main()
    record = json.loads((tmp_path / "out/all.json").read_text())
    assert record["benchmark"] == "all" and set(record["runs"]) == {"loader_x", "train"}
    assert record["runs"]["train"]["settings"] == {"data": "DATA"}
    assert fakes["loader"].calls[0].data == "DATA" and fakes["loader"].calls[0].prepare is None


@pytest.mark.slow
def test_loader_benchmark_reports_rate_cpu_and_ops(cifar_root, tmp_path):
    parser = argparse.ArgumentParser()
    bench.loader.add_arguments(parser)
    parser.add_argument("--json")
    args = parser.parse_args(["--data", cifar_root, "--backends", "torchvision,memory,dali", "--size", "32",
                              "--scale", "0.1", "1.0", "--batch", "16", "--batches", "2", "--warmup", "1",
                              "--device", "cpu", "--host", "--workers", "1",
                              "--json", str(tmp_path / "loader.json")])
    rows = {row["backend"]: row for row in bench.loader.run(args)["results"]}
    host = ["raw decode (libjpeg-turbo)", "ffcv host stage", "ffcv host stage, data.device_crops",
            "torchvision host stage"]
    assert all(rows[name]["images_per_s"] > 0 for name in host)
    assert rows[host[0]]["vs_raw_decode"] == 1 and rows[host[-1]]["vs_torchvision_host"] == 1
    assert rows["torchvision"]["vs_torchvision"] == 1
    for backend in ("torchvision", "memory"):
        assert rows[backend]["images_per_s"] > 0 and rows[backend]["cpu_s_per_image"] > 0
    assert rows["memory"]["aten_ops_per_batch"] > 500 and rows["memory"]["sync_prone_per_batch"] == 0
    if rows["dali"]["images_per_s"] is not None:  # DALI installed: its operator counts
        counts = rows["dali"]["dali_operators"]
        assert set(counts) >= {"cpu", "gpu"}
    assert json.loads((tmp_path / "loader.json").read_text())["results"][0]["backend"] == "torchvision"


@pytest.mark.slow
def test_step_benchmark_keeps_our_figures_when_the_baseline_does_not_finish(tmp_path, monkeypatch):
    """On a GPU a time limit may stop the benchmark during the published-style baseline: our step's
    row (images/s, MFU) is in the JSON as soon as it is measured."""
    import bench.step

    def cut_short(*args, **kwargs):
        raise TimeoutError("stopped by a time limit")

    parser = argparse.ArgumentParser()
    bench.step.add_arguments(parser)
    parser.add_argument("--json")
    args = parser.parse_args(["--models", "vit_mini", "--batch", "8", "--repeats", "1", "--no-world2",
                              "--json", str(tmp_path / "step.json")])
    monkeypatch.setattr(bench.step, "published_step", cut_short)
    with pytest.raises(TimeoutError):
        bench.step.run(args)
    (row,) = json.loads((tmp_path / "step.json").read_text())["results"]
    assert row["impl"] == "patchmix-trainer" and row["images_per_s"] > 0 and row["speedup"] is None


@pytest.mark.slow
def test_gpu_check_cpu_smoke_mode(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "bench/gpu_check.py"), "--device", "cpu", "--out", str(tmp_path),
                           "--checks", "augment_imagenet,step_syncs"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    checks = json.loads((tmp_path / "checks.json").read_text())["checks"]
    assert list(checks) == ["augment_imagenet", "step_syncs"]  # in the order asked (gpu_check.sh's priorities)
    assert all(check["ok"] for check in checks.values())


@pytest.mark.slow
def test_gpu_check_cpu_smoke_mode_every_check(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "bench/gpu_check.py"), "--device", "cpu", "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    checks = json.loads((tmp_path / "checks.json").read_text())["checks"]
    assert all(c["ok"] for c in checks.values())
    assert set(checks["loaders"]) >= {"memory", "torchvision"}


def test_environment_reads_versions_without_importing_ffcv(monkeypatch):
    """The versions come from package metadata: importing FFCV would set torch's thread count to 1
    for every later benchmark of the process."""
    import sys

    import torch

    from bench.harness import environment

    monkeypatch.delitem(sys.modules, "ffcv", raising=False)
    torch.set_num_threads(3)
    env = environment()
    assert "ffcv" not in sys.modules and torch.get_num_threads() == 3
    assert env["torch"] == torch.__version__ and set(env) >= {"triton", "timm", "ffcv", "nvidia.dali"}


def test_gpu_check_rejects_an_unknown_check(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "bench/gpu_check.py"), "--device", "cpu", "--out", str(tmp_path),
                           "--checks", "nope"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 1 and "unknown checks ['nope']" in done.stderr


def test_gpu_check_reports_the_augmentation_share_of_a_step_of_the_same_batch():
    from bench.gpu_check import _augment_share

    results = {"step_syncs": {"ok": True, "batch": 128, "ms_per_step": 200.0},
               "augment_imagenet": {"ok": True, "batch": 128, "ms_per_batch": 15.0}}
    _augment_share(results)
    assert results["augment_imagenet"]["share_of_vit_s_step"] == 0.075
    results["augment_imagenet"] = {"ok": True, "batch": 2, "ms_per_batch": 15.0}  # CPU smoke sizes differ
    _augment_share(results)
    assert "share_of_vit_s_step" not in results["augment_imagenet"]


def test_kernel_device_time_mixes_as_patchmix_and_derives_its_columns():
    """What `bench.py kernel` replays in CUDA graphs is `patchmix`'s mix for the given permutation; a
    failed capture (here: no CUDA) becomes a reason in the row, and the ratios come from device times."""
    import torch

    from kernels.patchmix import patchmix

    images, perm = torch.randn(4, 3, 8, 8), torch.randperm(16, generator=torch.Generator().manual_seed(0))
    mixed, _ = patchmix(images, 2, 2, perm=perm, backend="torch")
    assert torch.equal(bench.kernel._mix_with(images, perm, 2, 2, "torch")(), mixed)
    reason = bench.kernel._device_ms(lambda: images.clone())
    assert reason.startswith("unavailable: ")
    failed = bench.kernel._device_columns({"torch": reason}, "torch", 1.0)
    assert failed == {"device_ms": reason, "device_GB_per_s": None, "device_speedup_vs_reference": None,
                      "fraction_of_copy_bw": None}
    columns = bench.kernel._device_columns({"reference": 4.0, "copy": 0.5, "triton": 1.0}, "triton", 2.0)
    assert columns == {"device_ms": 1.0, "device_GB_per_s": 2000.0, "device_speedup_vs_reference": 4.0,
                       "fraction_of_copy_bw": 0.5}
