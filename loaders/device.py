"""Moving batches onto the training device without making the host wait, and making the next
batch while the current one trains.

- `to_device`: host tensor -> device. On CUDA the data goes through pinned (page-locked) memory
  and a `non_blocking` copy, so the host never waits for the GPU; PyTorch's pinned-memory cache
  keeps the staging block alive until the copy has run. On CPU it is the tensor itself.
- `Prefetcher`: wraps a loader; on CUDA each batch is made on a side stream one batch ahead
  (batch N+1's crops and augmentations run while step N runs on the training stream), and the
  training stream waits for that side stream before it uses a batch (`wait_stream`, and
  `record_stream` so the allocator does not hand the batch's memory to the side stream too
  early). On CPU there is one stream, so it is a pass-through.
- `compile_setting`: whether the views are made by a `torch.compile`d graph (CUDA) or eagerly.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from loaders.builder import Batch, Loader


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`host` (a CPU tensor) on `device`, copied without a host sync (pinned + non_blocking on CUDA)."""
    if device.type == "cpu":
        return host
    if device.type == "cuda":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


def compile_setting(device: torch.device, compile_views: bool | None) -> bool:
    """`compile_views` when given, else on for CUDA and off elsewhere: on a CPU, compiling every
    view shape costs more than the eager ops it saves in short runs and tests."""
    return device.type == "cuda" if compile_views is None else compile_views


def _batch_tensors(batch: Batch) -> Iterator[torch.Tensor]:
    yield from batch.views
    yield batch.labels
    yield batch.indices
    for params in batch.params:
        yield from params.values()


class Prefetcher:
    """A `Loader` whose batches are made one ahead on a side CUDA stream (see the module docstring)."""

    def __init__(self, loader: Loader, device: torch.device) -> None:
        self.loader, self.device = loader, device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.loader.set_epoch(epoch, start_batch)

    def __iter__(self) -> Iterator[Batch]:
        if self.stream is None:
            yield from self.loader
            return
        batches = iter(self.loader)
        try:
            upcoming = self._make(batches)
            while upcoming is not None:
                current, upcoming = upcoming, None
                training = torch.cuda.current_stream(self.device)
                training.wait_stream(self.stream)
                for tensor in _batch_tensors(current):
                    tensor.record_stream(training)
                upcoming = self._make(batches)  # queued on the side stream before step N is queued
                yield current
        finally:
            batches.close()  # e.g. FFCV's decoding thread ends with the epoch, also when abandoned

    def _make(self, batches: Iterator[Batch]) -> Batch | None:
        """The next batch, its device work queued on the side stream (None at the end)."""
        with torch.cuda.stream(self.stream):
            return next(batches, None)


def prefetched(loader: Loader, device: torch.device) -> Loader:
    """`loader` behind a `Prefetcher` on CUDA, `loader` itself elsewhere."""
    return Prefetcher(loader, device) if device.type == "cuda" else loader
