"""`soft_target_contrastive` against a dense float64 reference: values and gradients."""
import pytest
import torch
import torch.nn.functional as F

from kernels.patchmix import patchmix_targets
from model.loss import soft_target_contrastive


def dense_reference(q, k_all, index, weight, temperature, smoothing):
    """Recipe §3 literally: dense target row ε/N + (1−ε)·Σ weight·onehot(index), then soft CE."""
    n = k_all.shape[0]
    target = torch.full((q.shape[0], n), smoothing / n, dtype=torch.float64)
    for row in range(q.shape[0]):
        for i, w in zip(index[row].tolist(), weight[row].tolist()):
            target[row, i] += (1 - smoothing) * w
    logits = F.normalize(q, dim=1) @ F.normalize(k_all, dim=1).T / temperature
    return -(target * torch.log_softmax(logits, dim=1)).sum(1).mean()


@pytest.mark.parametrize("contrast", ["source", "mix", "mix_mix"])
@pytest.mark.parametrize("batch, num_mix, rank, world, smoothing", [
    (8, 2, 0, 1, 0.0), (8, 2, 1, 3, 0.1), (2, 2, 1, 2, 0.2), (5, 3, 2, 4, 0.0),
])
def test_matches_dense_reference(contrast, batch, num_mix, rank, world, smoothing):
    gen = torch.Generator().manual_seed(batch * 31 + rank)
    q = torch.randn(batch, 16, dtype=torch.float64, generator=gen, requires_grad=True)
    k_all = torch.randn(batch * world, 16, dtype=torch.float64, generator=gen, requires_grad=True)
    index, weight = getattr(patchmix_targets(batch, num_mix, rank), contrast)
    loss = soft_target_contrastive(q, k_all, index, weight.double(), 0.2, smoothing)
    q_ref = q.detach().clone().requires_grad_()
    expected = dense_reference(q_ref, k_all.detach(), index, weight, 0.2, smoothing)
    assert torch.allclose(loss, expected, rtol=1e-12, atol=1e-12)
    loss.backward()
    expected.backward()
    assert torch.allclose(q.grad, q_ref.grad, rtol=1e-10, atol=1e-12)
    assert k_all.grad is None  # keys are detached: no gradient through the key branch


def test_float32_inputs_and_scale_invariance():
    q, k = torch.randn(4, 8), torch.randn(4, 8)
    index, weight = patchmix_targets(4, 2).mix
    a = soft_target_contrastive(q, k, index, weight, 0.2)
    b = soft_target_contrastive(3 * q, 0.5 * k, index, weight, 0.2)
    assert a.dtype == torch.float32 and torch.allclose(a, b)


def test_perfect_match_at_low_temperature_tends_to_zero():
    keys = torch.eye(6)
    index, weight = patchmix_targets(6, 2).source
    assert soft_target_contrastive(keys, keys, index, weight, 0.01) < 1e-6


def test_logits_and_softmax_in_float32_under_bf16_autocast():
    """bf16 inputs under bf16 autocast give exactly the float32 computation from the same inputs
    (autocast would otherwise run the logits matmul in bf16)."""
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(8, 16, generator=gen).bfloat16(), torch.randn(16, 16, generator=gen).bfloat16()
    index, weight = patchmix_targets(8, 2, rank=1).mix_mix
    with torch.autocast("cpu", torch.bfloat16):
        loss = soft_target_contrastive(q, k, index, weight, 0.2, smoothing=0.1)
    expected = soft_target_contrastive(q.float(), k.float(), index, weight, 0.2, smoothing=0.1)
    assert loss.dtype == torch.float32 and torch.equal(loss, expected)
