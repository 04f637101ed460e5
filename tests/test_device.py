"""`loaders.device` on CPU: host tensors stay put, the prefetcher is a pass-through that keeps the
Loader interface (the CUDA side-stream path runs in `bench/gpu_check.py`)."""
import pytest
import torch

from loaders.builder import Batch
from loaders.device import (Prefetcher, compile_setting, explicit_device, prefetched, tf32_matmuls, to_device,
                            view_function)
from trainer.step import set_step_precision


class _Counting:
    """A tiny Loader: batch `b` of epoch `e` holds the value `10·e + b`."""

    def __init__(self) -> None:
        self.epoch, self.start_batch = 0, 0

    def __len__(self) -> int:
        return 4

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self):
        for b in range(self.start_batch, 4):
            value = torch.tensor([10 * self.epoch + b])
            yield Batch([value.float()], value, value)


def test_to_device_on_cpu_is_the_tensor_itself():
    host = torch.arange(5)
    assert to_device(host, torch.device("cpu")) is host


def test_prefetched_is_the_loader_itself_on_cpu():
    loader = _Counting()
    assert prefetched(loader, torch.device("cpu")) is loader


def test_prefetcher_on_cpu_passes_batches_and_set_epoch_through():
    wrapped = Prefetcher(_Counting(), torch.device("cpu"))
    wrapped.set_epoch(2, start_batch=1)
    assert len(wrapped) == 4
    assert [b.labels.item() for b in wrapped] == [21, 22, 23]


def test_views_are_compiled_on_cuda_by_default_only():
    """`data.compile_views`: None means on for CUDA only; a value wins."""
    assert compile_setting(torch.device("cuda"), None) and not compile_setting(torch.device("cpu"), None)
    assert compile_setting(torch.device("cpu"), True) and not compile_setting(torch.device("cuda"), False)


def test_explicit_device_names_the_current_cuda_index(monkeypatch: pytest.MonkeyPatch):
    """`torch.Generator("cuda").device` has no index, a CUDA tensor's device does: the per-device
    constants are keyed by `explicit_device`, or a compiled view would miss them and recompile."""
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)
    assert explicit_device(torch.device("cuda")) == torch.device("cuda", 2)
    assert explicit_device(torch.device("cuda", 1)) == torch.device("cuda", 1)
    assert explicit_device(torch.device("cpu")) == torch.device("cpu")


def test_views_are_made_with_tf32_matmuls_and_the_step_without():
    """`view_function`'s views use TF32 matmuls whoever calls them (the crops' resampling); the
    setting is restored after, so the step's fp32 matmuls (the loss's logits) stay IEEE fp32."""
    set_step_precision()
    seen = []
    make = view_function(lambda x: seen.append(torch.backends.cuda.matmul.allow_tf32) or x, torch.device("cpu"), False)
    assert make(1) == 1 and seen == [True]
    assert not torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32


@pytest.mark.parametrize("before", [False, True])
def test_tf32_only_inside_the_block(before: bool):
    torch.backends.cuda.matmul.allow_tf32 = before
    try:
        with tf32_matmuls():
            assert torch.backends.cuda.matmul.allow_tf32
        assert torch.backends.cuda.matmul.allow_tf32 is before
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False
