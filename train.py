"""PatchMix pre-training (docs/method.md §3–5): one process per device, launched by torchrun.

    torchrun --nproc_per_node 8 train.py --config configs/vitb_imagenet.yaml [key=value ...]
    python train.py --config configs/smoke.yaml data.root=DIR/digits        # one process, CPU or GPU

Restarting the same command resumes from OUTPUT_DIR/last.pt, bit for bit. SIGTERM/SIGINT write
`last.pt` after the current step and exit.
"""
import argparse
import json
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from configs.schema import Config, ConfigError, as_dict, load_config, to_yaml
from loaders.builder import build_loader
from loaders.manifest import DatasetNotFoundError
from loaders.shards import open_converted
from model.batchnorm import convert_to_global
from model.framework import PatchMixFramework
from model.vit import create_vit
from trainer import checkpoint
from trainer.distributed import Process, gather_keys, init_process, mean_across_ranks
from evaluation.knn import extract_features, knn_classify
from trainer.monitor import Monitor, count_flops, peak_flops, peak_memory_gb
from trainer.schedules import cosine_schedule, linear_warmup
from trainer.step import param_groups, set_schedule, train_step

# Keys that may change when resuming a run; any other difference is an incompatible config.
RESUMABLE_CHANGES = ("data.root", "data.backend", "data.workers", "compile", "log_every", "knn_every",
                     "max_steps", "checkpoint.", "output_dir")


class TrainingError(RuntimeError):
    """A run that cannot go on; the message says why and what to do."""


def build_model(config: Config, process: Process) -> PatchMixFramework:
    """Encoder + heads + optional momentum encoder (docs/method.md §4), heads' BN global across ranks."""
    encoder = create_vit(config.model.arch, config.data.image_size, config.model.patch_size, config.model.drop_path)
    model = PatchMixFramework(encoder, dim=config.model.dim, mlp_dim=config.model.mlp_dim,
                              momentum_encoder=config.model.momentum_encoder, num_mix=config.model.num_mix,
                              smoothing=config.model.smoothing)
    return convert_to_global(model).to(process.device)


def flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        out.update(flatten(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


def check_compatible(saved: dict, config: Config, path: Path) -> None:
    """Refuse to resume a run whose config differs in anything but the RESUMABLE_CHANGES keys."""
    old, new = flatten(saved), flatten(as_dict(config))
    changed = [k for k in sorted(old.keys() | new.keys())
               if old.get(k) != new.get(k) and not k.startswith(RESUMABLE_CHANGES)]
    if changed:
        details = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed)
        raise TrainingError(f"{path} was trained with a different config ({details}); use another output_dir "
                            f"or restore those values")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="a YAML file in configs/")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    args = parser.parse_args(argv)
    try:
        return train(load_config(args.config, args.overrides))
    except (ConfigError, TrainingError, DatasetNotFoundError) as error:
        print(f"train.py: error: {error}", file=sys.stderr)
        return 1


def train(config: Config) -> int:
    process = init_process()
    device, main_rank = process.device, process.is_main
    if config.batch_size % process.world_size:
        raise TrainingError(f"batch_size={config.batch_size} is not divisible by the world size "
                            f"{process.world_size}: pick a multiple of {process.world_size}")
    batch_size = config.batch_size // process.world_size
    torch.manual_seed(config.seed + process.rank)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    use_bf16 = device.type == "cuda"
    dataset = open_converted(config.data.root)  # a missing dataset says which command converts it

    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if main_rank:
        print(to_yaml(config))
        (output_dir / "config.yaml").write_text(to_yaml(config))

    loader = build_loader(config.data, split=config.data.train_split, train=True, batch_size=batch_size,
                          seed=config.seed, rank=process.rank, world_size=process.world_size, device=device,
                          dtype=torch.bfloat16 if use_bf16 else torch.float32)
    steps_per_epoch = len(loader)
    total_steps = config.epochs * steps_per_epoch
    if config.max_steps:
        total_steps = min(total_steps, config.max_steps)
    optim = config.optim
    lr = optim.lr * config.batch_size / 256  # linear scaling rule
    lr_schedule = cosine_schedule(lr, optim.min_lr, config.epochs, steps_per_epoch, optim.warmup_epochs)
    wd_schedule = cosine_schedule(optim.weight_decay, optim.weight_decay_end, config.epochs, steps_per_epoch)
    momentum_schedule = cosine_schedule(optim.momentum, 1.0, config.epochs, steps_per_epoch)
    temperature_schedule = linear_warmup(optim.temperature, optim.warmup_temperature, config.epochs,
                                         steps_per_epoch, optim.temperature_warmup_epochs)

    model = build_model(config, process)
    optimizer = torch.optim.AdamW(param_groups(model), lr=lr, fused=device.type == "cuda")
    step = 0
    last_path = output_dir / checkpoint.LAST
    if last_path.is_file():
        state = checkpoint.load(last_path)
        check_compatible(state["config"], config, last_path)
        if len(state["rng"]) != process.world_size:
            raise TrainingError(f"{last_path} was written by {len(state['rng'])} processes; resume it with the "
                                f"same number (got {process.world_size}) to continue bit for bit")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        checkpoint.set_rng_state(state["rng"][process.rank])
        step = state["step"]
        if main_rank:
            print(f"resuming from {last_path} at step {step} (epoch {step // steps_per_epoch})")

    flops_per_image = None
    peak = peak_flops(device)
    if peak and step == 0:  # FLOPs of the full step, counted once on two images in eager mode
        probe = [v[:2] for v in next(iter(loader)).views]
        flops_per_image = count_flops(lambda: model(probe, temperature=0.2)["loss"].backward()) / 2
        model.zero_grad(set_to_none=True)
    step_model = model
    if config.compile if config.compile is not None else device.type == "cuda":
        step_model = torch.compile(step_model)
    if process.world_size > 1:
        step_model = DistributedDataParallel(step_model, device_ids=[device.index] if device.type == "cuda" else None)

    stop_signal = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop_signal.append(signum))

    def save(path: Path) -> None:
        rng = [None] * process.world_size
        if process.world_size > 1:
            dist.all_gather_object(rng, checkpoint.rng_state())
        else:
            rng = [checkpoint.rng_state()]
        if main_rank:
            checkpoint.save_atomic({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                                    "epoch": step / steps_per_epoch, "rng": rng, "config": as_dict(config),
                                    "code_version": checkpoint.code_version()}, path)

    def agreed(*flags: bool) -> list[bool]:
        """Flags OR-ed over ranks, so that every rank saves and stops at the same step."""
        if process.world_size == 1:
            return list(flags)
        values = torch.tensor(flags, dtype=torch.float32, device=device)
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
        return values.bool().tolist()

    monitor = Monitor(output_dir, total_steps, step) if main_rank else None
    last_save = time.monotonic()
    window = {"steps": 0, "data": 0.0, "start": time.perf_counter()}
    pending_check = None
    stopping = False
    epoch = step // steps_per_epoch
    while step < total_steps and not stopping:
        loader.set_epoch(epoch)
        batches = iter(loader)
        for _ in range(step - epoch * steps_per_epoch):  # mid-epoch resume: skip what was already trained on
            next(batches)
        while not stopping:
            wait_start = time.perf_counter()
            batch = next(batches, None)
            window["data"] += time.perf_counter() - wait_start
            if batch is None:
                break
            set_schedule(optimizer, float(lr_schedule[step]), float(wd_schedule[step]))
            terms = train_step(step_model, model, optimizer, batch.views, temperature=float(temperature_schedule[step]),
                               momentum=float(momentum_schedule[step]), clip_grad=optim.clip_grad, bf16=use_bf16,
                               gather=gather_keys, rank=process.rank)
            # Non-finite check one step late, so that the host never waits for the device.
            values = torch.stack([t.detach().float() for t in terms.values()])
            if pending_check is not None:
                check_finite(*pending_check)
            pending_check = (step, list(terms), values.to("cpu", non_blocking=True))
            step += 1
            window["steps"] += 1
            if monitor:
                monitor.advance(1)
            if step % config.log_every == 0 or step == total_steps:
                check_finite(*pending_check)
                report(monitor, step, total_steps, terms, values, window, lr_schedule, wd_schedule,
                       momentum_schedule, config.batch_size, flops_per_image, peak, device)
            if process.world_size == 1 or step % config.log_every == 0:
                save_due = time.monotonic() - last_save > 60 * config.checkpoint.every_minutes
                stopping, save_due = agreed(bool(stop_signal), save_due)
                if save_due and not stopping:
                    save(last_path)
                    last_save = time.monotonic()
        check_finite(*pending_check)
        if batch is None:  # the epoch is complete
            epoch += 1
            if config.knn_every and epoch % config.knn_every == 0:
                knn_monitor(model, config, process, dataset, batch_size, monitor, step)
            if epoch % config.checkpoint.keep_every_epochs == 0 or epoch == config.epochs:
                save(output_dir / f"checkpoint-{epoch:04d}.pt")
                if main_rank:
                    checkpoint.prune(output_dir, config.checkpoint.keep_last)
            stopping = stopping or agreed(bool(stop_signal))[0]
        save(last_path)
        last_save = time.monotonic()
    if monitor:
        monitor.close()
        seen = [json.loads(line) for line in (output_dir / "log.jsonl").read_text().splitlines()]
        if seen:
            rate = sum(r["images_per_s"] for r in seen) / len(seen)
            print(f"trained to step {step}/{total_steps}; throughput {rate:.1f} images/s (mean over logged windows)")
    if stopping and main_rank:
        print(f"stopped by signal at step {step}; {last_path} written, rerun the same command to resume")
    if process.world_size > 1:
        dist.destroy_process_group()
    return 0


def check_finite(step: int, names: list[str], values: torch.Tensor) -> None:
    """Stop on a non-finite loss term, naming the step and the term (the last checkpoint stays good)."""
    finite = torch.isfinite(values)
    if not finite.all():
        bad = [f"{name}={value:.4g}" for name, value, ok in zip(names, values.tolist(), finite.tolist()) if not ok]
        raise TrainingError(f"non-finite loss at step {step}: {', '.join(bad)}; the last checkpoint is kept — "
                            f"lower optim.lr or enable optim.clip_grad, then rerun to resume")


def report(monitor: Monitor | None, step: int, total_steps: int, terms: dict, values: torch.Tensor, window: dict,
           lr_schedule, wd_schedule, momentum_schedule, global_batch: int, flops_per_image: float | None,
           peak: float | None, device: torch.device) -> None:
    """Average the loss terms over ranks and log throughput, data-wait share, memory, MFU and ETA."""
    values = mean_across_ranks(values.to(device)).tolist()
    if monitor is None:
        return
    elapsed = time.perf_counter() - window["start"]
    step_time = elapsed / window["steps"]
    images_per_s = global_batch * window["steps"] / elapsed
    record = {**dict(zip(terms, values)), "lr": float(lr_schedule[step - 1]), "wd": float(wd_schedule[step - 1]),
              "momentum": float(momentum_schedule[step - 1]), "images_per_s": images_per_s,
              "data_wait": window["data"] / elapsed, "step_time_s": step_time,
              "peak_memory_gb": peak_memory_gb(device), "eta_min": (total_steps - step) * step_time / 60,
              "mfu": flops_per_image * images_per_s / (peak * dist.get_world_size() if dist.is_initialized() else peak)
              if flops_per_image and peak else None}
    monitor.log(step, record)
    window.update(steps=0, data=0.0, start=time.perf_counter())


def knn_monitor(model: PatchMixFramework, config: Config, process: Process, dataset, batch_size: int,
                monitor: Monitor | None, step: int) -> None:
    """Online kNN top-1 (k=20) of the key encoder on the held-out split."""
    def features(split: str):
        loader = build_loader(config.data, split=split, train=False, batch_size=batch_size, rank=process.rank,
                              world_size=process.world_size, device=process.device)
        return extract_features(model.key_encoder, loader, process.device, dataset.count(split))

    train_features, train_labels = features(config.data.train_split)
    val_features, val_labels = features(config.data.val_split)
    top1, _ = knn_classify(train_features, train_labels, val_features, val_labels, len(dataset.classes), ks=(20,))[20]
    if monitor:
        monitor.log(step, {"knn_top1": top1})
        print(f"step {step}: kNN top-1 (k=20) {top1:.2f}%")


if __name__ == "__main__":
    sys.exit(main())
