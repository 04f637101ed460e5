"""PatchMix pre-training (docs/method.md §3–5): one process per device, launched by torchrun.

    torchrun --nproc_per_node 8 train.py --config configs/vitb_imagenet.yaml [key=value ...]
    python train.py --config configs/smoke.yaml data.root=DIR/digits        # one process, CPU or GPU

Restarting the same command resumes from OUTPUT_DIR/last.pt (bit for bit on a CPU; on CUDA up to
the rounding of kernels that accumulate in no fixed order: docs/training.md). SIGTERM/SIGINT write
`last.pt` after the current step and exit.
"""
import argparse
import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from atomic_write import write_atomic
from configs.schema import Config, ConfigError, load_config, to_yaml
from evaluation.knn import extract_features, knn_classify
from loaders.builder import build_loader
from loaders.manifest import ConvertedDataset, DatasetNotFoundError
from loaders.shards import open_converted
from model.batchnorm import convert_to_global
from model.collectives import gather_keys
from model.framework import PatchMixFramework
from model.vit import ARCHS, create_vit
from trainer import TrainingError
from trainer.agreement import NonFiniteLoss, StopAgreement
from trainer.checkpoint import Checkpointer
from trainer.distributed import Process, agreed, init_process, mean_across_ranks, wrap_ddp
from trainer.monitor import Monitor, Throughput, peak_flops, peak_memory_gb, step_flops_per_image
from trainer.resume import checked_resume, dataset_fingerprint, restore
from trainer.schedules import Schedules
from trainer.step import build_optimizer, set_schedule, set_step_precision, train_step


def build_framework(config: Config) -> PatchMixFramework:
    """Encoder + heads + optional momentum encoder (docs/method.md §4), on the current default device."""
    encoder = create_vit(config.model.arch, config.data.image_size, config.model.patch_size, config.model.drop_path)
    return PatchMixFramework(encoder, dim=config.model.dim, mlp_dim=config.model.mlp_dim,
                             momentum_encoder=config.model.momentum_encoder, num_mix=config.model.num_mix,
                             smoothing_source=config.model.smoothing_source, smoothing_mix=config.model.smoothing_mix)


def build_model(config: Config, process: Process) -> PatchMixFramework:
    """The framework on the process's device, its heads' BatchNorm global across ranks."""
    return convert_to_global(build_framework(config)).to(process.device)


def check_setup(config: Config, process: Process) -> ConvertedDataset:
    """Everything that can be wrong before a run starts, checked before anything is written."""
    if config.model.arch not in ARCHS:
        raise ConfigError(f"model.arch must be one of {sorted(ARCHS)}; got {config.model.arch!r}")
    if config.batch_size % process.world_size:
        raise TrainingError(f"batch_size={config.batch_size} is not divisible by the world size "
                            f"{process.world_size}: pick a multiple of {process.world_size}")
    # a missing dataset says which command converts it, a missing split which key to set
    dataset = open_converted(config.data.root, config.data.train_split,
                             *([config.data.val_split] if config.knn_every else []))
    count = dataset.count(config.data.train_split)
    if count < config.batch_size:
        raise TrainingError(f"the {config.data.train_split} split of {config.data.root} has {count} images, fewer "
                            f"than one global batch of {config.batch_size}: lower batch_size")
    return dataset


def write_config(output_dir: Path, config: Config) -> None:
    """Create output_dir and save the resolved config in it (rank 0), or say why it cannot be written."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(output_dir / "config.yaml", to_yaml(config))
    except OSError as error:
        raise TrainingError(f"cannot write to output_dir {output_dir} ({error.strerror}): choose a writable "
                            f"folder with output_dir=...") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="a YAML file in configs/")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    args = parser.parse_args(argv)
    try:
        return train(load_config(args.config, args.overrides))
    except (ConfigError, TrainingError, DatasetNotFoundError) as error:
        if int(os.environ.get("RANK", 0)) == 0:  # every rank raises it (trainer.distributed.agreed): say it once
            print(f"train.py: error: {error}", file=sys.stderr)
        return 1


def train(config: Config) -> int:
    process = init_process()
    device, main_rank = process.device, process.is_main
    dataset = agreed(process, lambda: check_setup(config, process))
    fingerprint = dataset_fingerprint(dataset, config.data.train_split)
    output_dir = Path(config.output_dir)
    resumed = checked_resume(config, process, fingerprint)
    agreed(process, lambda: write_config(output_dir, config) if main_rank else None)
    if main_rank:
        print(to_yaml(config))

    batch_size = config.batch_size // process.world_size
    torch.manual_seed(config.seed + process.rank)
    set_step_precision()  # IEEE fp32 for the loss's logits; the loaders' views use TF32
    use_bf16 = device.type == "cuda"
    loader = build_loader(config.data, split=config.data.train_split, train=True, batch_size=batch_size,
                          seed=config.seed, rank=process.rank, world_size=process.world_size, device=device,
                          dtype=torch.bfloat16 if use_bf16 else torch.float32)
    steps_per_epoch = len(loader)
    total_steps = config.epochs * steps_per_epoch
    if config.max_steps:
        total_steps = min(total_steps, config.max_steps)
    schedules = Schedules.build(config.optim, config.epochs, steps_per_epoch, config.batch_size)

    model = build_model(config, process)
    optimizer = build_optimizer(model, float(schedules.lr[0]))
    step = restore(resumed, model, optimizer, process, steps_per_epoch) if resumed else 0

    # MFU on GPUs: FLOPs of the full step, counted once on shapes alone (no memory, RNG or collective).
    peak = peak_flops(device)
    views = [config.data.image_size] * 2 + [config.data.local_size] * config.data.local_crops
    flops_per_image = step_flops_per_image(lambda: build_framework(config), [(2, 3, s, s) for s in views]) \
        if peak else None
    step_model = compiled_for_training(model, config, process)
    stop_signal = stop_requests()
    checkpointer = Checkpointer(output_dir, model, optimizer, config, process.rank, process.world_size,
                                steps_per_epoch, fingerprint, resumed=(resumed.path, step) if resumed else None)
    monitor = Monitor(output_dir, total_steps, step) if main_rank else None
    throughput = Throughput(config.batch_size)
    agreement = StopAgreement(device)
    stopping = False
    try:
        while step < total_steps and not stopping:
            epoch = step // steps_per_epoch
            # A resumed epoch starts at its next batch; the batches before it are never made.
            loader.set_epoch(epoch, start_batch=step - epoch * steps_per_epoch)
            for batch in throughput.timed(loader):
                now = schedules.at(step)
                set_schedule(optimizer, now["lr"], now["wd"])
                terms = train_step(step_model, model, optimizer, batch.views, temperature=now["temperature"],
                                   momentum=now["momentum"], clip_grad=config.optim.clip_grad, bf16=use_bf16,
                                   gather=gather_keys, rank=process.rank)
                step += 1
                if monitor:
                    monitor.advance(1)
                # Flags agreed over ranks one step late: the host reads step N-1's while step N runs.
                agreement.submit(step, terms, stop=bool(stop_signal), save=checkpointer.due())
                logging = step % config.log_every == 0 or step == total_steps
                decided = agreement.settled(everything=logging or checkpointer.snapshot_step is not None)
                checkpointer.commit()  # this step's finite loss proved the snapshot's weights
                stopping = stopping or decided.stop
                if logging:
                    log_step(monitor, step, total_steps, terms, throughput, schedules, flops_per_image, peak, device)
                epoch_done = step % steps_per_epoch == 0
                if epoch_done and config.knn_every and (step // steps_per_epoch) % config.knn_every == 0:
                    knn_monitor(model, config, process, dataset, batch_size, monitor, step)
                if epoch_done or decided.save or stopping or step == total_steps:
                    agreement.settled(everything=True)
                    checkpointer.snapshot(step)
                if stopping or step == total_steps:
                    checkpointer.commit()
                    break
    except NonFiniteLoss as error:
        raise TrainingError(f"{error}; {checkpointer.describe_last()} — lower optim.lr or enable optim.clip_grad "
                            f"(both may change on resume), then rerun the same command to resume") from None
    finally:
        if monitor:
            monitor.close()  # the progress bar ends before any error is printed
    if main_rank:
        print(f"trained to step {step}/{total_steps}; throughput {throughput.run_rate():.1f} images/s in this run")
    if stopping and main_rank:
        print(f"stopped by signal at step {step}; {checkpointer.last} written, rerun the same command to resume")
    if process.world_size > 1:
        dist.destroy_process_group()
    return 0


def compiled_for_training(model: PatchMixFramework, config: Config, process: Process) -> torch.nn.Module:
    """The module the step calls: compiled (default on CUDA), then wrapped in DDP when distributed —
    in that order, see trainer.distributed.wrap_ddp for why."""
    compile_it = config.compile if config.compile is not None else process.device.type == "cuda"
    step_model = torch.compile(model) if compile_it else model
    if process.world_size > 1:
        step_model = wrap_ddp(step_model, process, config.ddp.bucket_cap_mb, config.ddp.compress)
    return step_model


def stop_requests() -> list[int]:
    """A list that SIGTERM/SIGINT append to: the loop stops after the step during which one arrived."""
    received: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: received.append(signum))
    return received


def log_step(monitor: Monitor | None, step: int, total_steps: int, terms: dict[str, torch.Tensor],
             throughput: Throughput, schedules: Schedules, flops_per_image: float | None, peak: float | None,
             device: torch.device) -> None:
    """Average the loss terms over ranks and log them (the total as `loss`, each term as `loss/NAME`, which
    TensorBoard groups) with throughput, data-wait share, memory, MFU and ETA."""
    values = mean_across_ranks(torch.stack([t.detach().float() for t in terms.values()])).tolist()
    if monitor is None:
        return
    window = throughput.window()
    world = dist.get_world_size() if dist.is_initialized() else 1
    applied = schedules.at(step - 1)
    logged = {name if name == "loss" else f"loss/{name}": value for name, value in zip(terms, values)}
    record = {**logged, "lr": applied["lr"], "wd": applied["wd"], "momentum": applied["momentum"],
              **window, "peak_memory_gb": peak_memory_gb(device),
              "eta_min": (total_steps - step) * window["step_time_s"] / 60,
              "mfu": flops_per_image * window["images_per_s"] / (peak * world) if flops_per_image and peak else None}
    monitor.log(step, record)


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
