"""The full PatchMix training step vs a step written like the published code: images/s, MFU, what
torch.compile makes of it (graphs and graph breaks on 1 and 2 processes) and its host syncs.

Ours is `trainer.step.train_step` (bf16 autocast on GPU, torch.compile, one-pass mixing op,
sparse targets, fp32 loss, fused AdamW, one-pass EMA). The baseline is written the way the
published code is: fp16 autocast + GradScaler, eager mode, the multi-pass mixing reference, dense
target matrices, the default AdamW and a Python loop for the momentum update. Both run the same
model on the same synthetic views (the ImageNet recipe's 2 global + 8 local views for the ViT-S/B
rows) in the same process.

Also reported, per implementation:
- aten ops and sync-prone ops per steady-state step (`bench.dispatch.OpCounter`, eager);
- on a CPU: dynamo graphs and graph breaks of our step compiled on 1 process and, under DDP, on 2
  gloo processes (counted with dynamo's `eager` backend: the graphs are dynamo's, whatever compiles
  them, and the same on a GPU, where the benchmark skips this CPU-bound count to spend its time on
  the compiled step);
- on a GPU: MFU, and host syncs per step counted by `torch.cuda.set_sync_debug_mode("warn")`; and
  a row of our step run eagerly, measured (and written to `--json`) before the compile, so that a
  run whose compile is cut short by a time limit still reports a lower bound of our MFU.
"""
import argparse
import os
import socket
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.dispatch import OpCounter
from bench.harness import make_record, measure, report, save_record
from kernels.patchmix import patchmix_targets
from kernels.reference import patchmix_reference
from model.batchnorm import convert_to_global
from model.collectives import gather_keys
from model.framework import PatchMixFramework
from model.vit import create_vit
from trainer.monitor import peak_flops, step_flops_per_image
from trainer.step import build_optimizer, param_groups, set_step_precision, train_step


@dataclass(frozen=True)
class BenchModel:
    arch: str
    size: int
    patch: int
    local_crops: int  # 96-px local crops of the ImageNet recipe (docs/method.md §5)
    gpu_batch: int  # per GPU
    cpu_batch: int
    hidden: int  # projector/predictor hidden width

    def view_shapes(self, batch: int) -> list[tuple[int, int, int, int]]:
        return [(batch, 3, self.size, self.size)] * 2 + [(batch, 3, 96, 96)] * self.local_crops


MODELS = {
    "vit_small": BenchModel("vit_small", 224, 16, 8, 128, 4, 4096),
    "vit_base": BenchModel("vit_base", 224, 16, 8, 128, 2, 4096),
    "vit_mini": BenchModel("vit_mini", 32, 4, 0, 512, 64, 512),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    on_gpu = torch.cuda.is_available()
    parser.add_argument("--models", default="vit_small,vit_base" if on_gpu else "vit_mini",
                        help=f"comma list of {sorted(MODELS)}")
    parser.add_argument("--batch", type=int, help="override the per-model batch size")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--no-compile", action="store_true", help="run our step eagerly on a GPU too")
    parser.add_argument("--no-world2", action="store_true", help="skip counting graphs on 2 processes")


def dense_soft_ce(q: torch.Tensor, k: torch.Tensor, target: torch.Tensor, temperature: float) -> torch.Tensor:
    """The published loss: a dense target matrix against log_softmax of the logits."""
    logits = F.normalize(q, dim=1) @ F.normalize(k.detach(), dim=1).T / temperature
    return -(target * F.log_softmax(logits, dim=1)).sum(1).mean()


def dense(pair: tuple[torch.Tensor, torch.Tensor], n: int, smoothing: float = 0.0) -> torch.Tensor:
    index, weight = pair
    target = torch.zeros(index.shape[0], n, device=index.device).scatter_add_(1, index, weight)
    return smoothing / n + (1 - smoothing) * target


def published_step(model: PatchMixFramework, optimizer, scaler, views, temperature: float, momentum: float) -> None:
    """One step as the published code writes it (fp16 + GradScaler, eager, multi-pass mix, dense targets)."""
    v1, v2, *crops = views
    device = v1.device

    def mix(x: torch.Tensor) -> torch.Tensor:
        perm = torch.randperm((x.shape[-1] // model.patch_size) ** 2, device=device)
        return patchmix_reference(x, model.patch_size, model.num_mix, perm)

    with torch.autocast(device.type, torch.float16, enabled=device.type == "cuda"):
        mixed_v1, mixed_v2 = mix(v1), mix(v2)
        q1 = model.predictor(model.base(v1))
        mq2 = model.predictor(model.base(mixed_v2))
        with torch.no_grad():
            k1, k2, mk1 = (model.momentum(x) for x in (v1, v2, mixed_v1))
        targets = patchmix_targets(v1.shape[0], model.num_mix, device=device)
        n = v1.shape[0]
        source = dense(targets.source, n, model.smoothing_source)
        loss = (dense_soft_ce(q1, k2, source, temperature)
                + dense_soft_ce(mq2, k1, dense(targets.mix, n), temperature) / 2
                + dense_soft_ce(mq2, mk1, dense(targets.mix_mix, n), temperature) / 2)
        if crops:
            for batch, target in ((crops, source), ([mix(c) for c in crops], dense(targets.mix, n))):
                queries = model.predictor(model.base(torch.cat(batch))).chunk(len(batch))
                loss = loss + sum(dense_soft_ce(q, k, target, temperature) for q in queries for k in (k1, k2)) / len(crops)
    optimizer.zero_grad()
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    with torch.no_grad():
        for base, ema in zip(model.base.parameters(), model.momentum.parameters()):
            ema.data = ema.data * momentum + base.data * (1 - momentum)


def build_framework(spec: BenchModel) -> PatchMixFramework:
    encoder = create_vit(spec.arch, spec.size, spec.patch, drop_path_rate=0.1)
    return PatchMixFramework(encoder, mlp_dim=spec.hidden, smoothing_source=0.1)


def build_model(spec: BenchModel, device: torch.device | str) -> PatchMixFramework:
    torch.manual_seed(0)
    return convert_to_global(build_framework(spec)).to(device)


def ops_per_step(step) -> dict:
    """aten ops and sync-prone ops of one steady-state call of `step()` (after two warm-up calls)."""
    step()
    step()
    with OpCounter() as counter:
        step()
    return counter.summary()


def syncs_per_step(step, steps: int = 10) -> float:
    """Host-device synchronisations per call of `step()` on a GPU, counted by the sync debug mode."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(steps):
                step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught) / steps


def count_graphs(spec: BenchModel, batch: int, rank: int = 0, world_size: int = 1) -> dict:
    """Dynamo graphs and graph breaks of our compiled step (under DDP when `world_size > 1`)."""
    from torch._dynamo.utils import counters

    from trainer.distributed import Process, wrap_ddp

    torch._dynamo.reset()
    counters.clear()
    model = build_model(spec, "cpu")
    step_model = torch.compile(model, backend="eager")
    if world_size > 1:
        step_model = wrap_ddp(step_model, Process(rank, rank, world_size, torch.device("cpu")))
    views = [torch.randn(shape) for shape in spec.view_shapes(batch)]
    step_model(views, temperature=0.2, gather=gather_keys, rank=rank)["loss"].backward()
    return {"graphs": counters["stats"]["unique_graphs"],
            "graph_breaks": sum(counters["graph_break"].values()) + sum(counters["unimplemented"].values())}


def _count_graphs_rank(rank: int, spec: BenchModel, batch: int, port: int, out: str) -> None:
    import json

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        result = count_graphs(spec, batch, rank, 2)
    finally:
        dist.destroy_process_group()
    if rank == 0:
        Path(out).write_text(json.dumps(result))


def count_graphs_two_processes(spec: BenchModel, batch: int) -> dict:
    """`count_graphs` under DDP on 2 gloo processes (rank 0's counts)."""
    import json

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "graphs.json")
        mp.spawn(_count_graphs_rank, args=(spec, batch, port, out), nprocs=2, join=True)
        return json.loads(Path(out).read_text())


def run(args: argparse.Namespace) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.type == "cuda"
    set_step_precision()  # as train.py
    peak = peak_flops(device)
    settings = {"device": str(device), "compile": on_gpu and not args.no_compile, "repeats": args.repeats,
                "precision": "bf16 (ours) / fp16+GradScaler (baseline)" if on_gpu else "fp32 (both)",
                "graphs_counted_with": "dynamo, backend='eager'"}
    columns = ["model", "batch", "impl", "step_ms", "images_per_s", "speedup", "mfu", "aten_ops", "sync_prone_ops",
               "syncs_per_step", "world1_graphs", "world1_graph_breaks", "world2_graphs", "world2_graph_breaks"]
    results = []

    def save_so_far() -> None:
        """Write the rows measured so far: a run stopped by a time limit keeps them (our step's MFU)."""
        if args.json:
            save_record(make_record("step", settings, results), args.json)

    for name in args.models.split(","):
        spec = MODELS[name]
        batch = args.batch or (spec.gpu_batch if on_gpu else spec.cpu_batch)
        views = [torch.randn(shape, device=device) for shape in spec.view_shapes(batch)]
        flops_per_image = step_flops_per_image(lambda: build_framework(spec), spec.view_shapes(2))

        def row(impl: str, timing: dict, ops: dict, syncs: int | None) -> dict:
            images_per_s = batch / timing["median_s"]
            return {"model": f"{spec.arch}/{spec.patch}@{spec.size}+{spec.local_crops}x96", "batch": batch,
                    "impl": impl, "step_ms": 1e3 * timing["median_s"], "images_per_s": images_per_s, "speedup": None,
                    "mfu": flops_per_image * images_per_s / peak if peak else None,
                    "aten_ops": ops["aten_ops"], "sync_prone_ops": ops["sync_prone_ops"],
                    "sync_prone_by_op": ops["sync_prone_by_op"], "syncs_per_step": syncs}

        model = build_model(spec, device)
        optimizer = build_optimizer(model, lr=1e-4)
        step_model = model if args.no_compile or not on_gpu else torch.compile(model)

        def ours() -> None:
            train_step(step_model, model, optimizer, views, temperature=0.2, momentum=0.996, bf16=on_gpu)

        def ours_eager() -> None:
            train_step(model, model, optimizer, views, temperature=0.2, momentum=0.996, bf16=on_gpu)

        ours_ops = ops_per_step(ours_eager)
        if step_model is not model:  # an eager row first: an MFU that survives a compile cut short by a time limit
            results.append(row("patchmix-trainer, eager", measure(ours_eager, warmup=1, repeats=args.repeats,
                                                                  device=str(device)), ours_ops, None))
            save_so_far()
        ours_time = measure(ours, warmup=3, repeats=args.repeats, device=str(device))
        ours_row = row("patchmix-trainer", ours_time, ours_ops, syncs_per_step(ours) if on_gpu else None)
        results.append(ours_row)
        save_so_far()  # before the baseline
        del model, optimizer, step_model

        model = build_model(spec, device)
        optimizer = torch.optim.AdamW(param_groups(model), lr=1e-4)  # the default implementation, as published
        scaler = torch.amp.GradScaler(device.type, enabled=on_gpu)

        def published() -> None:
            published_step(model, optimizer, scaler, views, 0.2, 0.996)

        published_ops = ops_per_step(published)
        published_time = measure(published, warmup=3, repeats=args.repeats, device=str(device))
        results.append(row("published-style", published_time, published_ops,
                           syncs_per_step(published) if on_gpu else None))
        ours_row["speedup"] = published_time["median_s"] / ours_time["median_s"]
        results[-1]["speedup"] = 1.0
        del model, optimizer

        if not on_gpu:  # dynamo's graphs are the same on every device: counted on CPU runs only
            ours_row.update({f"world1_{key}": value for key, value in count_graphs(spec, 2).items()})
            if not args.no_world2:
                ours_row.update({f"world2_{key}": value for key, value in count_graphs_two_processes(spec, 2).items()})
    return report("step", settings, results, columns, args.json)
