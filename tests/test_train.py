"""train.py on CPU: configs, a smoke run, DDP with gloo, kill-and-resume, SIGTERM, errors."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from configs.schema import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
TINY = ["model.arch=vit_mini", "model.patch_size=8", "model.mlp_dim=64", "model.dim=32", "data.image_size=32",
        "data.backend=memory", "data.workers=1", "log_every=1", "optim.warmup_epochs=1"]

# docs/method.md §5, one row per published config
PUBLISHED = {
    "vits_imagenet": ("vit_small", 16, 224, 1024, 300, 10, 5e-4, 0.04, 0.4, True, (0.35, 1.0), 8),
    "vitb_imagenet": ("vit_base", 16, 224, 1024, 300, 10, 7.5e-4, 0.04, 0.4, True, (0.35, 1.0), 8),
    **{f"vitt_{d}": ("vit_tiny", 2, 32, 512, 800, 100, 2e-3, 0.02, 0.2, False, (0.1, 1.0), 0) for d in ("cifar10", "cifar100")},
    **{f"vits_{d}": ("vit_small", 2, 32, 512, 800, 100, 5e-4, 0.04, 0.4, True, (0.1, 1.0), 0) for d in ("cifar10", "cifar100")},
    **{f"vitb_{d}": ("vit_base", 2, 32, 512, 800, 100, 7.5e-4, 0.04, 0.4, True, (0.1, 1.0), 0) for d in ("cifar10", "cifar100")},
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_configs_equal_the_recipe(name):
    c = load_config(REPO / "configs" / f"{name}.yaml")
    arch, patch, size, batch, epochs, warmup, lr, wd, wd_end, momentum, scale, local = PUBLISHED[name]
    assert (c.model.arch, c.model.patch_size, c.data.image_size, c.batch_size, c.epochs) == (arch, patch, size, batch, epochs)
    assert (c.optim.warmup_epochs, c.optim.lr, c.optim.min_lr) == (warmup, lr, 1e-6)
    assert (c.optim.weight_decay, c.optim.weight_decay_end) == (wd, wd_end)
    assert c.model.momentum_encoder is momentum and c.optim.momentum == 0.996
    assert (c.optim.temperature, c.model.drop_path, c.model.num_mix) == (0.2, 0.1, 2)
    assert (c.model.smoothing_source, c.model.smoothing_mix) == (0.1, 0.0)  # as trained, docs/method.md §2
    assert c.data.global_scale == scale and c.data.local_crops == local
    if local:
        assert (c.data.local_size, c.data.local_scale) == (96, (0.05, 0.35))
    assert c.data.root.endswith(name.split("_")[1])


def test_misspelt_and_mistyped_keys_are_named():
    with pytest.raises(ConfigError, match=r"Key 'lrr' not in 'OptimConfig'. Did you mean: 'lr'\?"):
        load_config(REPO / "configs" / "smoke.yaml", ["optim.lrr=0.1"])
    with pytest.raises(ConfigError, match=r"could not be converted to Integer \(key: epochs\)"):
        load_config(REPO / "configs" / "smoke.yaml", ["epochs=many"])
    with pytest.raises(ConfigError, match="data.backend must be one of"):
        load_config(REPO / "configs" / "smoke.yaml", ["data.backend=pil"])
    with pytest.raises(ConfigError, match=r"ddp.bucket_cap_mb must be at least 1 .*; got 0.5"):
        load_config(REPO / "configs" / "smoke.yaml", ["ddp.bucket_cap_mb=0.5"])


def train_command(root: str, output: Path, *overrides: str, launcher: tuple[str, ...] = ()) -> list[str]:
    launch = list(launcher) or [sys.executable]
    return [*launch, str(REPO / "train.py"), "--config", str(REPO / "configs" / "smoke.yaml"), f"data.root={root}",
            f"output_dir={output}", *TINY, *overrides]


def run_train(root: str, output: Path, *overrides: str, launcher: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return subprocess.run(train_command(root, output, *overrides, launcher=launcher), capture_output=True, text=True,
                          cwd=REPO, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})


def log_records(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()]


def weights(output: Path) -> dict[str, torch.Tensor]:
    return torch.load(output / "last.pt", weights_only=True)["model"]


@pytest.mark.slow
def test_smoke_run_loss_goes_down(cifar_root, tmp_path):
    result = run_train(cifar_root, tmp_path, "epochs=12", "batch_size=64", "optim.lr=2e-3")
    assert result.returncode == 0, result.stderr
    losses = [r["loss"] for r in log_records(tmp_path)]
    assert len(losses) == 12 * (300 // 64)
    assert sum(losses[-8:]) / 8 < sum(losses[:8]) / 8 - 0.1, losses
    assert (tmp_path / "config.yaml").is_file() and (tmp_path / "tb").is_dir()
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*.pt")) == ["checkpoint-0008.pt", "checkpoint-0010.pt",
                                                            "checkpoint-0012.pt"]


@pytest.mark.slow
def test_two_process_gloo_first_step_equals_one_process(cifar_root, tmp_path):
    # Mixing off (m = 1), no drop path and per-sample seeded augmentations (torchvision backend):
    # the two ranks' batches together are the single process's batch, up to the order of rows.
    common = ("model.num_mix=1", "model.drop_path=0.0", "data.backend=torchvision", "epochs=1", "batch_size=32")
    single = run_train(cifar_root, tmp_path / "one", *common)
    assert single.returncode == 0, single.stderr
    double = run_train(cifar_root, tmp_path / "two", *common,
                       launcher=(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                                 "--master_port", "29531"))
    assert double.returncode == 0, double.stderr
    one, two = log_records(tmp_path / "one")[0], log_records(tmp_path / "two")[0]
    for term in ("loss/source", "loss/mix", "loss/mix_mix", "loss"):
        assert one[term] == pytest.approx(two[term], rel=1e-5), term


def test_a_checkpoint_write_killed_mid_way_leaves_no_file_behind_for_the_next_run(tmp_path):
    """`kill -9` during `torch.save` leaves its temporary file (`atomic_write`); the next run's
    Checkpointer (rank 0) deletes such leftovers of checkpoints, and nothing else."""
    from trainer.checkpoint import Checkpointer

    leftovers = ["last.pt.41-0a1b2c3d.tmp", "checkpoint-0003.pt.41-4e5f6a7b.tmp"]
    kept = ["last.pt", "checkpoint-0003.pt", "features.pt.41-8c9d0e1f.tmp", "notes.tmp"]
    for name in leftovers + kept:
        (tmp_path / name).write_bytes(b"x")
    Checkpointer(tmp_path, model=None, optimizer=None, config=None, rank=1, world_size=2, steps_per_epoch=1,
                 dataset={})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(leftovers + kept)  # only rank 0 deletes
    Checkpointer(tmp_path, model=None, optimizer=None, config=None, rank=0, world_size=2, steps_per_epoch=1,
                 dataset={})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)


@pytest.mark.slow
def test_kill_and_resume_gives_identical_weights(cifar_root, tmp_path):
    args = ("epochs=3", "batch_size=64", "checkpoint.keep_every_epochs=1")
    straight = run_train(cifar_root, tmp_path / "straight", *args)
    assert straight.returncode == 0, straight.stderr
    interrupted = tmp_path / "interrupted"
    process = subprocess.Popen(train_command(cifar_root, interrupted, *args), cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    log = interrupted / "log.jsonl"
    deadline = time.monotonic() + 300
    while not (log.is_file() and len(log.read_text().splitlines()) >= 6):  # mid-way through epoch 2
        assert time.monotonic() < deadline and process.poll() is None
        time.sleep(0.05)
    logged = len(log.read_text().splitlines())  # steps done (log_every=1) when the signal is sent
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    assert "stopped by signal" in out
    stopped_at = torch.load(interrupted / "last.pt", weights_only=True)["step"]
    # the step running when the signal came, and at most two more while the flag is agreed one step late
    assert logged <= stopped_at <= logged + 3 and stopped_at < 12
    resumed = run_train(cifar_root, interrupted, *args)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from {interrupted / 'last.pt'} at step {stopped_at}" in resumed.stdout
    a, b = weights(tmp_path / "straight"), weights(interrupted)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]


def one_line_error(result: subprocess.CompletedProcess) -> str:
    """The run failed with exit status 1 and one `train.py: error:` line (after any progress bar)."""
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1].split("\r")[-1]
    assert last.startswith("train.py: error: "), result.stderr
    return last


@pytest.mark.parametrize("case", ["missing config", "unknown arch", "unwritable output_dir", "missing dataset",
                                  "batch larger than the split (memory)", "batch larger than the split (ffcv)"])
def test_setup_errors_are_one_line_and_write_nothing(case, cifar_root, tmp_path):
    output = tmp_path / "out"
    command = {
        "missing config": [sys.executable, str(REPO / "train.py"), "--config", str(tmp_path / "nope.yaml")],
        "unknown arch": train_command(cifar_root, output, "model.arch=vit_smal"),
        "unwritable output_dir": train_command(cifar_root, tmp_path / "a-file" / "out"),  # root ignores chmod
        "missing dataset": train_command(str(tmp_path / "nowhere" / "cifar10"), output),
        "batch larger than the split (memory)": train_command(cifar_root, output, "batch_size=512"),
        "batch larger than the split (ffcv)": train_command(cifar_root, output, "batch_size=512", "data.backend=ffcv"),
    }[case]
    (tmp_path / "a-file").write_text("")
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    message = one_line_error(result)
    expected = {"missing config": "nope.yaml not found", "unknown arch": "model.arch must be one of",
                "unwritable output_dir": "cannot write to output_dir", "missing dataset": "python convert_datasets.py",
                "batch larger than the split (memory)": "has 300 images, fewer than one global batch of 512",
                "batch larger than the split (ffcv)": "has 300 images, fewer than one global batch of 512"}[case]
    assert expected in message
    assert not output.exists()  # nothing is written before the config and the set-up are valid


@pytest.fixture(scope="module")
def digits_root(converted) -> str:
    """scikit-learn's digits converted (the session's conversion): a second, different dataset."""
    return str(converted("digits"))


@pytest.fixture(scope="module")
def trained_run(cifar_root, tmp_path_factory) -> Path:
    """The first 2 of 3 epochs (8 steps) of the tiny model with a numbered checkpoint after each
    epoch (read-only by convention: tests copy it)."""
    output = tmp_path_factory.mktemp("trained") / "run"
    result = run_train(cifar_root, output, "epochs=3", "max_steps=8", "batch_size=64", "checkpoint.keep_every_epochs=1")
    assert result.returncode == 0, result.stderr
    return output


def copy_run(trained_run: Path, tmp_path: Path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(trained_run, target)
    return target


@pytest.mark.slow
def test_diverging_run_keeps_its_good_checkpoint_and_the_advice_works(cifar_root, trained_run, tmp_path):
    output = copy_run(trained_run, tmp_path)
    good = (output / "last.pt").read_bytes()
    exploding = run_train(cifar_root, output, "epochs=3", "batch_size=64", "checkpoint.keep_every_epochs=1",
                          "optim.lr=1e12", "checkpoint.every_minutes=0.00001")
    message = one_line_error(exploding)
    assert "non-finite loss at step" in message and f"{output / 'last.pt'} (step 8) is kept" in message
    assert (output / "last.pt").read_bytes() == good  # not even overwritten by an identical state
    assert all(torch.isfinite(v).all() for v in weights(output).values() if v.is_floating_point())
    # the advice: rerun with another lr; it resumes from the good step and says what changed
    resumed = run_train(cifar_root, output, "epochs=3", "batch_size=64", "checkpoint.keep_every_epochs=1",
                        "optim.lr=1e-3")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from {output / 'last.pt'} at step 8 (epoch 2)\n" in resumed.stdout  # the lr it was trained with
    changed = run_train(cifar_root, copy_run(trained_run, tmp_path / "again"), "epochs=3", "batch_size=64",
                        "checkpoint.keep_every_epochs=1", "optim.lr=5e-4")
    assert changed.returncode == 0, changed.stderr
    assert "with changed settings: optim.lr: 0.001 -> 0.0005" in changed.stdout


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_damaged_last_checkpoint_falls_back_to_the_newest_numbered_one(cifar_root, trained_run, tmp_path, damage):
    output = copy_run(trained_run, tmp_path)
    last = output / "last.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2] if damage == "truncated" else b"")
    resumed = run_train(cifar_root, output, "epochs=3", "batch_size=64", "checkpoint.keep_every_epochs=1")
    assert resumed.returncode == 0, resumed.stderr
    assert f"skipping a damaged checkpoint: {last} is unreadable, truncated or corrupt" in resumed.stdout
    assert f"resuming from {output / 'checkpoint-0002.pt'} at step 8 (epoch 2)" in resumed.stdout
    assert torch.load(last, weights_only=True)["step"] == 12


@pytest.mark.slow
def test_all_checkpoints_damaged_is_an_error(cifar_root, trained_run, tmp_path):
    output = copy_run(trained_run, tmp_path)
    for path in output.glob("*.pt"):
        path.write_bytes(b"not a checkpoint")
    message = one_line_error(run_train(cifar_root, output, "epochs=3", "batch_size=64"))
    assert f"no checkpoint in {output} can be resumed from" in message and "Move them away" in message


@pytest.mark.slow
def test_resume_refuses_another_dataset_but_follows_a_moved_one(cifar_root, trained_run, digits_root, tmp_path):
    output = copy_run(trained_run, tmp_path)
    other = one_line_error(run_train(digits_root, output, "epochs=3", "batch_size=64"))
    assert "was trained on a different dataset (300 images" in other and "(1437 images" in other
    moved = tmp_path / "moved" / "cifar10"
    shutil.copytree(cifar_root, moved)
    resumed = run_train(str(moved), output, "epochs=3", "batch_size=64", "checkpoint.keep_every_epochs=1")
    assert resumed.returncode == 0, resumed.stderr
    assert "at step 8 (epoch 2)" in resumed.stdout


@pytest.mark.slow
def test_incompatible_config_is_refused_naming_the_keys(cifar_root, trained_run, tmp_path):
    output = copy_run(trained_run, tmp_path)
    config = (output / "config.yaml").read_text()
    message = one_line_error(run_train(cifar_root, output, "epochs=3", "batch_size=64", "model.dim=16"))
    assert "model.dim: 32 -> 16" in message
    assert (output / "config.yaml").read_text() == config  # the run's own config is not overwritten


@pytest.mark.slow
def test_max_steps_stops_mid_epoch(cifar_root, tmp_path):
    result = run_train(cifar_root, tmp_path, "epochs=3", "batch_size=64", "max_steps=6",
                       "checkpoint.keep_every_epochs=0")
    assert result.returncode == 0, result.stderr
    assert "trained to step 6/6" in result.stdout
    assert [r["step"] for r in log_records(tmp_path)] == [1, 2, 3, 4, 5, 6]
    assert torch.load(tmp_path / "last.pt", weights_only=True)["step"] == 6
    assert not list(tmp_path.glob("checkpoint-*.pt"))  # keep_every_epochs=0: numbered ones only at the end


@pytest.mark.slow
def test_knn_monitor_runs_and_the_run_ends_cleanly(cifar_root, tmp_path):
    result = run_train(cifar_root, tmp_path, "epochs=2", "batch_size=64", "knn_every=1", "log_every=3")
    assert result.returncode == 0, result.stderr
    knn = [r for r in log_records(tmp_path) if "knn_top1" in r]
    assert [r["step"] for r in knn] == [4, 8] and all(0 <= r["knn_top1"] <= 100 for r in knn)
    assert "trained to step 8/8; throughput" in result.stdout


@pytest.mark.slow
def test_world_size_must_divide_the_batch(cifar_root, tmp_path):
    odd = run_train(cifar_root, tmp_path / "c", "batch_size=33",
                    launcher=(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                              "--master_port", "29532"))
    assert odd.returncode != 0
    assert "batch_size=33 is not divisible by the world size 2" in odd.stderr
    assert odd.stderr.count("train.py: error:") == 1  # said once, by rank 0


def worker_pids(launcher_pid: int) -> list[int]:
    """The train.py processes a torchrun launcher started (its children running train.py)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            if ppid == launcher_pid and b"train.py" in (stat.parent / "cmdline").read_bytes():
                pids.append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    return sorted(pids)


@pytest.mark.slow
def test_sigterm_to_one_rank_stops_every_rank_at_the_next_steps(cifar_root, tmp_path):
    """log_every is far away: the stop is agreed every step, not when the ranks next log."""
    command = train_command(cifar_root, tmp_path, "epochs=50", "batch_size=32", "log_every=1000",
                            "checkpoint.every_minutes=0.00001",
                            launcher=(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                                      "--master_port", "29533"))
    launcher = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 300
    while not (tmp_path / "last.pt").is_file():  # a few steps are done
        assert time.monotonic() < deadline and launcher.poll() is None
        time.sleep(0.05)
    workers = worker_pids(launcher.pid)
    assert len(workers) == 2
    os.kill(workers[1], signal.SIGTERM)
    out, err = launcher.communicate(timeout=300)
    assert launcher.returncode == 0, err
    stopped_at = torch.load(tmp_path / "last.pt", weights_only=True)["step"]
    assert f"stopped by signal at step {stopped_at};" in out
    assert stopped_at < 50 * (300 // 32)  # long before the end (and before any log at step 1000)
