"""The training step under DDP on 2 gloo processes: global BatchNorm equals BatchNorm on the
concatenated batch; the compiled step is one graph (no graph break) with the eager step's loss and
gradients, also split at DDP's buckets and compiled by inductor; bf16 gradient compression; ranks
agree on stopping and on non-finite losses."""
import gc
import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

WORLD = 2
BATCH = 4  # per rank


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(fn, tmp_path: Path, *args) -> list[dict]:
    """`fn(rank, out_dir, *args)` on 2 gloo processes; each rank's JSON-able result."""
    mp.spawn(_rank_main, args=(fn, free_port(), str(tmp_path), args), nprocs=WORLD, join=True)
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]


def _rank_main(rank: int, fn, port: int, out: str, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        result = fn(rank, *args)
    finally:
        gc.collect()  # the rank's dropped DDP models (and their reducers) go before the group they use
        dist.destroy_process_group()
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(result))


# --------------------------------------------------------------------------------------------
# Global BatchNorm
# --------------------------------------------------------------------------------------------
def _batchnorm(rank: int) -> dict:
    from model.batchnorm import convert_to_global

    torch.manual_seed(0)
    full = torch.randn(WORLD * BATCH, 6, dtype=torch.float64)
    reference = nn.Sequential(nn.BatchNorm1d(6)).double()
    with torch.no_grad():
        reference[0].weight.uniform_(0.5, 1.5)
        reference[0].bias.uniform_(-1, 1)
    ours = convert_to_global(nn.Sequential(nn.BatchNorm1d(6)).double())
    ours.load_state_dict(reference.state_dict())

    x_ref = full.clone().requires_grad_()
    (reference(x_ref) * torch.arange(6)).sum().backward()  # a loss that weights the features differently
    x = full[rank * BATCH:(rank + 1) * BATCH].clone().requires_grad_()
    (ours(x) * torch.arange(6)).sum().backward()
    for param in ours.parameters():  # per-rank parameter gradients add up to the full batch's (DDP averages)
        dist.all_reduce(param.grad)
    expected_x_grad = x_ref.grad[rank * BATCH:(rank + 1) * BATCH]
    return {"x_grad": torch.allclose(x.grad, expected_x_grad, rtol=1e-12, atol=1e-12),
            "param_grads": all(torch.allclose(a.grad, b.grad, rtol=1e-12, atol=1e-12)
                               for a, b in zip(ours.parameters(), reference.parameters())),
            "running": all(torch.allclose(a, b, rtol=1e-12, atol=1e-12)
                           for a, b in zip(ours[0].buffers(), reference[0].buffers()))}


def test_global_batchnorm_equals_batchnorm_of_the_concatenated_batch(tmp_path: Path) -> None:
    for result in run_ranks(_batchnorm, tmp_path):
        assert result == {"x_grad": True, "param_grads": True, "running": True}


# --------------------------------------------------------------------------------------------
# Compiled step under DDP
# --------------------------------------------------------------------------------------------
def _tiny_model(momentum_encoder: bool, width: int = 32, depth: int = 2):
    from model.batchnorm import convert_to_global
    from model.framework import PatchMixFramework
    from model.vit import ViT

    torch.manual_seed(0)
    encoder = ViT(img_size=16, patch_size=4, num_classes=0, embed_dim=width, depth=depth, num_heads=2,
                  drop_path_rate=0.1)
    return convert_to_global(PatchMixFramework(encoder, dim=16, mlp_dim=width, momentum_encoder=momentum_encoder,
                                               smoothing_source=0.1))


def _step(model, step_model, rank: int, seed: int) -> tuple[dict, list[torch.Tensor]]:
    from model.collectives import gather_keys

    torch.manual_seed(100 + rank)
    views = [torch.randn(BATCH, 3, 16, 16) for _ in range(2)] + [torch.randn(BATCH, 3, 8, 8) for _ in range(2)]
    torch.manual_seed(seed)  # the mixes and drop path draw from here
    terms = step_model(views, temperature=0.2, gather=gather_keys, rank=rank)
    terms["loss"].backward()
    return ({k: v.item() for k, v in terms.items()},
            [p.grad.clone() for p in model.parameters() if p.requires_grad])


SPLIT = {"width": 128, "depth": 4}  # ~3.5 MB of gradients: several buckets of 1 MiB


def _compiled_ddp(rank: int, backend: str, momentum_encoder: bool, split: bool = False) -> dict:
    """The eager and the compiled DDP step of the tiny model (`split`: a wider one in 1 MiB buckets)."""
    import torch._inductor.config as inductor_config
    from torch._dynamo.utils import counters

    from trainer.distributed import Process, wrap_ddp

    inductor_config.fallback_random = True  # compiled random ops draw what eager ones draw
    process = Process(rank, rank, WORLD, torch.device("cpu"))
    size, bucket_cap_mb = (SPLIT, 1.0) if split else ({}, 25.0)
    eager_model = _tiny_model(momentum_encoder, **size)
    eager_terms, eager_grads = _step(eager_model, wrap_ddp(eager_model, process, bucket_cap_mb), rank, seed=7)

    compiled_model = _tiny_model(momentum_encoder, **size)
    counters.clear()
    step_model = wrap_ddp(torch.compile(compiled_model, backend=backend), process, bucket_cap_mb)
    terms, grads = _step(compiled_model, step_model, rank, seed=7)
    return {
        "pieces": counters["aot_autograd"]["total"],  # the graph's pieces compiled (DDPOptimizer's split)
        "graph_breaks": sum(counters["graph_break"].values()),
        "unimplemented": sum(counters["unimplemented"].values()),
        "frames": dict(counters["frames"]),
        "graphs": counters["stats"]["unique_graphs"],
        "terms": terms, "eager_terms": eager_terms,
        # equal to float rounding: each tensor's largest difference within 1e-5 of its largest value
        # (+1e-6 for gradients that are zero up to rounding, such as the unused final-norm bias's)
        "grads_equal": all((a - b).abs().max() <= 1e-5 * b.abs().max() + 1e-6 for a, b in zip(grads, eager_grads)),
        "grads_nonzero": all(g.abs().sum() > 0 for g in grads),
    }


@pytest.mark.slow
@pytest.mark.parametrize("momentum_encoder", [True, False])
def test_compiled_ddp_step_is_one_graph_and_equals_eager(tmp_path: Path, momentum_encoder: bool) -> None:
    """2 gloo processes, torch.compile wrapped in DDP (train.py's order): dynamo compiles the whole
    forward (keys gathered and BatchNorm statistics summed by functional collectives) as one graph
    without a graph break, and the loss terms and every gradient equal the eager DDP step's.

    The backend is aot_eager: graph breaks are dynamo's (the same for every backend) and aot_eager
    runs AOTAutograd's traced forward and backward with the collectives in them; inductor would add
    minutes of C++ compilation on a CPU. `bench.py step` counts the graphs with inductor."""
    for result in run_ranks(_compiled_ddp, tmp_path, "aot_eager", momentum_encoder):
        assert result["graph_breaks"] == 0 and result["unimplemented"] == 0, result
        assert result["frames"]["total"] == result["frames"]["ok"] == 1, result
        assert result["graphs"] == result["pieces"] == 1, result  # one DDP bucket for this tiny model: no split
        for name, value in result["eager_terms"].items():
            assert result["terms"][name] == pytest.approx(value, rel=1e-5), name
        assert result["grads_equal"] and result["grads_nonzero"], result


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_ddp_step_split_at_buckets_equals_eager(tmp_path: Path, backend: str) -> None:
    """A model whose gradients fill several 1 MiB buckets: dynamo's DDPOptimizer splits the compiled
    graph at the bucket boundaries (so each bucket's all-reduce overlaps the rest of the backward)
    and compiles each piece; the pieces hold the global BatchNorm's `autograd.Function` and the
    functional collectives. Checked: more than two pieces, one dynamo graph without a break, and
    the eager step's loss and gradients; with inductor too, the compiler train.py uses (C++
    kernels here, ~2 minutes cold)."""
    for result in run_ranks(_compiled_ddp, tmp_path, backend, True, True):
        assert result["pieces"] > 2, result
        assert result["graph_breaks"] == 0 and result["unimplemented"] == 0 and result["graphs"] == 1, result
        for name, value in result["eager_terms"].items():
            assert result["terms"][name] == pytest.approx(value, rel=1e-5), name
        assert result["grads_equal"] and result["grads_nonzero"], result


def _compressed(rank: int) -> dict:
    from trainer.distributed import Process, wrap_ddp

    process = Process(rank, rank, WORLD, torch.device("cpu"))
    plain, compressed = _tiny_model(True), _tiny_model(True)
    _, expected = _step(plain, wrap_ddp(plain, process), rank, seed=7)
    _, grads = _step(compressed, wrap_ddp(compressed, process, compress="bf16"), rank, seed=7)
    # each rank rounds its gradient to bf16 (8 significant bits) before the sum: 2 roundings at most
    return {"within_bf16": all((a - b).abs().max() <= 2**-6 * b.abs().max() + 1e-6 for a, b in zip(grads, expected)),
            "rounded": any(not torch.equal(a, b) for a, b in zip(grads, expected))}


def test_bf16_gradient_compression(tmp_path: Path) -> None:
    """`ddp.compress: bf16` all-reduces in bf16: gradients within bf16's precision of the fp32
    all-reduce's, and not identical to them (the hook did run)."""
    for result in run_ranks(_compressed, tmp_path):
        assert result == {"within_bf16": True, "rounded": True}


# --------------------------------------------------------------------------------------------
# Agreement over ranks, one step late
# --------------------------------------------------------------------------------------------
def _agree(rank: int) -> dict:
    from trainer.agreement import NonFiniteLoss, StopAgreement

    agreement = StopAgreement(torch.device("cpu"))
    seen = []
    for step in range(1, 6):
        loss = torch.tensor(float("nan") if (rank, step) == (1, 4) else 1.0)
        agreement.submit(step, {"source": loss, "loss": loss}, stop=(rank, step) == (0, 2), save=(rank, step) == (1, 1))
        try:
            decided = agreement.settled()
        except NonFiniteLoss as error:
            return {"seen": seen, "error": str(error), "error_at": step}
        seen.append([step, decided.step, decided.stop, decided.save])
    return {"seen": seen}


def test_ranks_agree_one_step_late_on_stop_save_and_nonfinite(tmp_path: Path) -> None:
    """Rank 1 asks for a save after step 1, rank 0 for a stop after step 2, rank 1's loss is NaN at
    step 4: both ranks learn each while the next step runs, at the same loop iteration."""
    results = run_ranks(_agree, tmp_path)
    expected_seen = [[1, 0, False, False], [2, 1, False, True], [3, 2, True, False], [4, 3, False, False]]
    assert [r["seen"] for r in results] == [expected_seen, expected_seen]
    assert [r["error_at"] for r in results] == [5, 5]
    assert "non-finite loss at step 4: on another rank" in results[0]["error"]
    assert "non-finite loss at step 4: source=nan, loss=nan" in results[1]["error"]


# --------------------------------------------------------------------------------------------
# Resuming: rank 0 decides, every rank loads the same file
# --------------------------------------------------------------------------------------------
def _resume(rank: int, folders: list[str]) -> dict:
    from trainer import TrainingError
    from trainer.distributed import Process
    from trainer.resume import resume_state

    process = Process(rank, rank, WORLD, torch.device("cpu"))
    try:
        found = resume_state(Path(folders[rank]), process)
    except TrainingError as error:
        return {"error": str(error)}
    return {"path": str(found[0]), "step": found[1]["step"]} if found else {"path": None}


@pytest.mark.parametrize("who_sees", ["both", "rank 0 only", "rank 1 only", "neither"])
def test_every_rank_resumes_from_rank_0s_checkpoint_or_all_fail(tmp_path: Path, who_sees: str) -> None:
    """A folder per rank stands for each node's view of output_dir: the same folder when storage is
    shared; otherwise one rank sees checkpoints the other does not, and both fail saying so."""
    shared, local = tmp_path / "shared", tmp_path / "local"
    shared.mkdir()
    local.mkdir()
    torch.save({"model": {}, "optimizer": {}, "step": 12, "rng": [], "config": {}}, shared / "last.pt")
    empty = tmp_path / "empty"
    empty.mkdir()
    folders = {"both": [shared, shared], "rank 0 only": [shared, empty], "rank 1 only": [empty, shared],
               "neither": [empty, empty]}[who_sees]
    results = run_ranks(_resume, tmp_path, [str(f) for f in folders])
    if who_sees == "both":
        assert results == [{"path": str(shared / "last.pt"), "step": 12}] * 2
    elif who_sees == "neither":
        assert results == [{"path": None}] * 2
    else:
        assert all("output_dir must be on storage shared by all nodes" in r["error"] for r in results), results
        assert results[0] == results[1]  # the same message on every rank, naming the rank that failed
        assert "on rank 1:" in results[0]["error"]
