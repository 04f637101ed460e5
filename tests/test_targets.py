"""`patchmix_targets` against hand-worked tables (docs/method.md §2)."""
import pytest
import torch

from kernels.patchmix import patchmix_targets


def as_lists(pair):
    index, weight = pair
    return index.tolist(), weight.tolist()


def test_four_images_two_mixes_on_rank_one():
    t = patchmix_targets(4, 2, rank=1)  # offset B·rank = 4
    assert as_lists(t.source) == ([[4], [5], [6], [7]], [[1.0]] * 4)
    assert as_lists(t.mix) == ([[4, 5], [5, 6], [6, 7], [7, 4]], [[0.5, 0.5]] * 4)
    # mix-mix: (g − 1 + i) mod 4 for i = 0..2, weights (1, 2, 1)/4
    assert as_lists(t.mix_mix) == ([[7, 4, 5], [4, 5, 6], [5, 6, 7], [6, 7, 4]], [[0.25, 0.5, 0.25]] * 4)


def test_three_mixes_rank_zero():
    t = patchmix_targets(6, 3)
    index, weight = t.mix
    assert index[5].tolist() == [5, 0, 1]
    assert torch.allclose(weight, torch.full((6, 3), 1 / 3))
    index, weight = t.mix_mix
    assert index[0].tolist() == [4, 5, 0, 1, 2]
    assert torch.allclose(weight[0], torch.tensor([1, 2, 3, 2, 1]) / 9)


def test_repeated_indices_add_their_weights():
    # B = 2, m = 2: mix-mix row 0 targets (−1, 0, 1) mod 2 = (1, 0, 1): weights 1/4 + 1/4 on index 1.
    t = patchmix_targets(2, 2, rank=3)
    index, weight = t.mix_mix
    assert index.tolist() == [[7, 6, 7], [6, 7, 6]]
    assert weight.tolist() == [[0.5, 0.5, 0.0], [0.5, 0.5, 0.0]]
    # B = 1: every target is the image itself with the whole weight.
    t = patchmix_targets(1, 2)
    assert as_lists(t.mix) == ([[0, 0]], [[1.0, 0.0]])
    assert as_lists(t.mix_mix) == ([[0, 0, 0]], [[1.0, 0.0, 0.0]])


@pytest.mark.parametrize("batch, num_mix", [(1, 1), (3, 2), (8, 2), (5, 4), (64, 3)])
def test_shapes_and_weights_sum_to_one(batch, num_mix):
    t = patchmix_targets(batch, num_mix, rank=2)
    for (index, weight), k in zip((t.source, t.mix, t.mix_mix), (1, num_mix, 2 * num_mix - 1)):
        assert index.shape == weight.shape == (batch, k)
        assert index.dtype == torch.int64 and weight.dtype == torch.float32
        assert torch.allclose(weight.sum(1), torch.ones(batch))
        assert index.min() >= 2 * batch and index.max() < 3 * batch


def test_bad_arguments():
    with pytest.raises(ValueError, match="batch_size >= 1"):
        patchmix_targets(0, 2)
