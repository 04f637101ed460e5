"""The training step's host-device contract, counted on CPU: in steady state neither the step nor
the per-step bookkeeping dispatches an op that would make the host wait for a GPU."""
import pytest
import torch

from bench.dispatch import OpCounter
from model.batchnorm import convert_to_global
from model.framework import PatchMixFramework
from model.vit import ViT
from trainer.agreement import StopAgreement
from trainer.step import build_optimizer, train_step


@pytest.mark.parametrize("momentum_encoder", [True, False])
def test_steady_state_step_has_no_sync_prone_op(momentum_encoder: bool) -> None:
    torch.manual_seed(0)
    encoder = ViT(img_size=16, patch_size=4, num_classes=0, embed_dim=32, depth=2, num_heads=2, drop_path_rate=0.1)
    model = convert_to_global(PatchMixFramework(encoder, dim=16, mlp_dim=32, momentum_encoder=momentum_encoder))
    optimizer = build_optimizer(model, lr=1e-3)
    views = [torch.randn(4, 3, 16, 16) for _ in range(2)] + [torch.randn(4, 3, 8, 8) for _ in range(2)]
    agreement = StopAgreement(torch.device("cpu"))

    def step(number: int) -> None:
        terms = train_step(model, model, optimizer, views, temperature=0.2, momentum=0.99, clip_grad=1.0)
        agreement.submit(number, terms, stop=False, save=number == 2)

    step(1)  # the first step creates the optimizer's state
    with OpCounter() as counter:
        step(2)
    assert counter.total > 1000  # the whole step was seen
    assert counter.sync_prone == {}, counter.sync_prone
    assert agreement.settled(everything=True).save  # the flags went through
