"""The full PatchMix training step vs a step written like the published code: images/s and MFU.

Ours is `trainer.step.train_step` (bf16 autocast on GPU, torch.compile, one-pass mixing op,
sparse targets, fused AdamW, foreach EMA). The baseline is written the way the published code
is: fp16 autocast + GradScaler, eager mode, the multi-pass mixing reference, dense one-hot
target matrices, and a Python loop for the momentum update. Both run the same model on the
same synthetic views in the same process.
"""
import argparse

import torch
import torch.nn.functional as F

from bench.harness import measure, report
from kernels.patchmix import patchmix_targets
from kernels.reference import patchmix_reference
from model.framework import PatchMixFramework
from model.vit import create_vit
from trainer.monitor import count_flops, peak_flops
from trainer.step import param_groups, train_step

# name -> (arch, image size, patch, GPU batch, CPU batch, projector hidden)
MODELS = {
    "vit_small": ("vit_small", 224, 16, 256, 8, 4096),
    "vit_base": ("vit_base", 224, 16, 128, 4, 4096),
    "vit_mini": ("vit_mini", 32, 4, 512, 64, 512),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    on_gpu = torch.cuda.is_available()
    parser.add_argument("--models", default="vit_small,vit_base" if on_gpu else "vit_mini",
                        help=f"comma list of {sorted(MODELS)}")
    parser.add_argument("--batch", type=int, help="override the per-model batch size")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--no-compile", action="store_true", help="run our step eagerly too")


def dense_soft_ce(q: torch.Tensor, k: torch.Tensor, target: torch.Tensor, temperature: float) -> torch.Tensor:
    """The published loss: a dense target matrix against log_softmax of the logits."""
    logits = F.normalize(q, dim=1) @ F.normalize(k.detach(), dim=1).T / temperature
    return -(target * F.log_softmax(logits, dim=1)).sum(1).mean()


def dense(pair: tuple[torch.Tensor, torch.Tensor], n: int) -> torch.Tensor:
    index, weight = pair
    return torch.zeros(index.shape[0], n, device=index.device).scatter_add_(1, index, weight)


def published_step(model: PatchMixFramework, optimizer, scaler, views, temperature: float, momentum: float) -> None:
    """One step as the published code writes it (fp16 + GradScaler, eager, multi-pass mix, dense targets)."""
    v1, v2 = views
    device = v1.device
    num_patches = (v1.shape[-1] // model.patch_size) ** 2
    with torch.autocast(device.type, torch.float16, enabled=device.type == "cuda"):
        mixed_v1 = patchmix_reference(v1, model.patch_size, model.num_mix, torch.randperm(num_patches, device=device))
        mixed_v2 = patchmix_reference(v2, model.patch_size, model.num_mix, torch.randperm(num_patches, device=device))
        q1 = model.predictor(model.base(v1))
        mq2 = model.predictor(model.base(mixed_v2))
        with torch.no_grad():
            k1, k2, mk1 = (model.momentum(x) for x in (v1, v2, mixed_v1))
        targets = patchmix_targets(v1.shape[0], model.num_mix, device=device)
        n = v1.shape[0]
        loss = (dense_soft_ce(q1, k2, dense(targets.source, n), temperature)
                + dense_soft_ce(mq2, k1, dense(targets.mix, n), temperature) / 2
                + dense_soft_ce(mq2, mk1, dense(targets.mix_mix, n), temperature) / 2)
    optimizer.zero_grad()
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    with torch.no_grad():
        for base, ema in zip(model.base.parameters(), model.momentum.parameters()):
            ema.data = ema.data * momentum + base.data * (1 - momentum)


def build(arch: str, size: int, patch: int, hidden: int, device: torch.device) -> tuple:
    model = PatchMixFramework(create_vit(arch, size, patch, drop_path_rate=0.1), mlp_dim=hidden).to(device)
    optimizer = torch.optim.AdamW(param_groups(model), lr=1e-4, fused=device.type == "cuda")
    return model, optimizer


def run(args: argparse.Namespace) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.type == "cuda"
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    peak = peak_flops(device)
    results = []
    for name in args.models.split(","):
        arch, size, patch, gpu_batch, cpu_batch, hidden = MODELS[name]
        batch = args.batch or (gpu_batch if on_gpu else cpu_batch)
        views = [torch.randn(batch, 3, size, size, device=device) for _ in range(2)]

        model, optimizer = build(arch, size, patch, hidden, device)
        flops = count_flops(lambda: model([v[:2] for v in views], temperature=0.2)["loss"].backward()) / 2 * batch
        step_model = model if args.no_compile or not on_gpu else torch.compile(model)
        ours = measure(lambda: train_step(step_model, model, optimizer, views, temperature=0.2, momentum=0.996,
                                          bf16=on_gpu), warmup=3, repeats=args.repeats, device=str(device))
        del model, optimizer, step_model

        model, optimizer = build(arch, size, patch, hidden, device)
        scaler = torch.amp.GradScaler(device.type, enabled=on_gpu)
        baseline = measure(lambda: published_step(model, optimizer, scaler, views, 0.2, 0.996), warmup=3,
                           repeats=args.repeats, device=str(device))
        del model, optimizer
        for impl, timing in (("patchmix-trainer", ours), ("published-style", baseline)):
            images_per_s = batch / timing["median_s"]
            results.append({"model": f"{arch}/{patch}@{size}", "batch": batch, "impl": impl,
                            "step_ms": 1e3 * timing["median_s"], "images_per_s": images_per_s,
                            "mfu": flops / timing["median_s"] / peak if peak else None,
                            "speedup": baseline["median_s"] / timing["median_s"]})
    settings = {"device": str(device), "compile": on_gpu and not args.no_compile, "repeats": args.repeats,
                "precision": "bf16 (ours) / fp16+GradScaler (baseline)" if on_gpu else "fp32 (both)"}
    return report("step", settings, results, ["model", "batch", "impl", "step_ms", "images_per_s", "mfu", "speedup"],
                  args.json)
