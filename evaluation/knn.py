"""Weighted kNN classification (docs/method.md §7) and DDP-aware feature extraction.

Features are L2-normalised, similarity is the cosine, and each of the k nearest train
samples votes for its class with weight exp(sim / T). The test set is processed in chunks
sized by a memory budget, so any train/test size fits.
"""
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from configs.schema import DataConfig

KS = (10, 20, 100, 200)
TEMPERATURE = 0.07


@torch.no_grad()
def extract_features(encoder: nn.Module, loader, device: torch.device,
                     num_samples: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-token features and labels of every sample of an evaluation loader, in dataset order.

    Under DDP each rank extracts its shard and the shards are gathered, so every rank returns
    all `num_samples` rows (each sample exactly once).
    """
    was_training = encoder.training
    encoder.eval()
    features, labels, indices = [], [], []
    for batch in loader:
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            tokens = encoder.forward_features(batch.views[0])
            features.append(encoder.forward_head(tokens, pre_logits=True).float())
        labels.append(batch.labels)
        indices.append(batch.indices)
    encoder.train(was_training)
    parts = [(torch.cat(features).cpu(), torch.cat(labels).cpu(), torch.cat(indices).cpu())]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, (torch.cat(features).cpu(), torch.cat(labels).cpu(), torch.cat(indices).cpu()))
    feats, labs, idx = (torch.cat(column) for column in zip(*parts))
    total = num_samples if num_samples is not None else len(idx)
    if len(idx) != total or not torch.equal(torch.sort(idx).values, torch.arange(total)):
        raise RuntimeError(f"feature extraction saw {len(idx)} samples instead of each of the {total} exactly once")
    order = torch.argsort(idx)
    return feats[order].to(device), labs[order].to(device)


def chunk_rows(num_train: int, num_classes: int, max_k: int, memory_budget_gb: float) -> int:
    """How many test rows fit the budget: their similarity row, top-k and votes (float32)."""
    bytes_per_row = 4 * (num_train + 3 * max_k + 2 * num_classes)
    return max(1, int(memory_budget_gb * 2**30) // bytes_per_row)


@torch.no_grad()
def knn_classify(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                 test_labels: torch.Tensor, num_classes: int, ks: tuple[int, ...] = KS,
                 temperature: float = TEMPERATURE, memory_budget_gb: float = 1.0) -> dict[int, tuple[float, float]]:
    """Top-1 / top-5 accuracy (%) of the weighted kNN vote for each k (k capped at the train size).

    A prediction counts for top-5 when the true class is among the 5 most voted and got a vote.
    """
    train = F.normalize(train_features.float(), dim=1)
    test = F.normalize(test_features.float(), dim=1)
    max_k = min(max(ks), len(train))
    chunk = chunk_rows(len(train), num_classes, max_k, memory_budget_gb)
    correct = {k: torch.zeros(2, device=test.device) for k in ks}
    for start in range(0, len(test), chunk):
        similarity, neighbours = (test[start:start + chunk] @ train.T).topk(max_k, dim=1)
        weights = (similarity / temperature).exp()
        neighbour_labels = train_labels[neighbours]
        truth = test_labels[start:start + chunk, None]
        for k in ks:
            used = min(k, max_k)
            votes = torch.zeros(len(truth), num_classes, device=test.device)
            votes.scatter_add_(1, neighbour_labels[:, :used], weights[:, :used])
            ranked = votes.topk(min(5, num_classes), dim=1).indices
            voted = votes.gather(1, truth)[:, 0] > 0  # a class no neighbour voted for is never a hit
            top5 = (ranked == truth).any(1) & voted
            correct[k] += torch.stack([(ranked[:, 0] == truth[:, 0]).sum(), top5.sum()])
    return {k: tuple((100 * c / len(test)).tolist()) for k, c in correct.items()}


@dataclass
class KnnConfig:
    """`eval.py knn` settings (docs/method.md §7); `data` says which converted dataset and how to read it."""

    data: DataConfig = field(default_factory=DataConfig)
    batch_size: int = 256
    ks: list[int] = field(default_factory=lambda: list(KS))
    temperature: float = TEMPERATURE
    memory_budget_gb: float = 1.0
    cache_dir: str | None = None  # save/reuse extracted features here
