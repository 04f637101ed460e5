"""Soft-target contrastive loss with sparse targets (docs/method.md §2–3)."""
import torch
import torch.nn.functional as F


def soft_target_contrastive(q: torch.Tensor, k_all: torch.Tensor, index: torch.Tensor, weight: torch.Tensor,
                            temperature: float, smoothing: float = 0.0) -> torch.Tensor:
    """Mean over rows of `-Σ_n target_n · log_softmax(q̂·k̂ᵀ/τ)_n` for the dense target
    `ε/N + (1−ε)·Σ_k weight_k·onehot(index_k)`, without ever building that `B × N` target.

    Since `Σ_n target_n = ε + (1−ε)·Σ_k weight_k`, each row's loss is
    `logsumexp(logits)·Σ target − ε·mean(logits) − (1−ε)·Σ_k weight_k·logits[index_k]`.
    `k_all` is the already-gathered `(N, D)` keys; gradients flow to `q` only.

    Computed in float32 at least, with autocast off: under bf16 autocast the logits matmul would
    otherwise run in bf16 (8 bits of mantissa on logits up to 1/τ = 5), and the softmax over
    `N` classes with it. The inputs may stay bf16 up to here (keys are gathered in bf16); the
    `B × D × N` matmul in float32 is a negligible share of a step.
    """
    dtype = torch.promote_types(q.dtype, torch.float32)  # fp32 at least, float64 kept for tests
    with torch.autocast(q.device.type, enabled=False):
        q = F.normalize(q.to(dtype), dim=1)
        k = F.normalize(k_all.detach().to(dtype), dim=1)
        logits = q @ k.T / temperature
        weight = weight.to(dtype)
        total_mass = smoothing + (1.0 - smoothing) * weight.sum(dim=1)
        picked = (weight * logits.gather(1, index)).sum(dim=1)
        rows = torch.logsumexp(logits, dim=1) * total_mass - (1.0 - smoothing) * picked
        if smoothing:
            rows = rows - smoothing * logits.mean(dim=1)
        return rows.mean()
