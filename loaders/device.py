"""Moving batches onto the training device without making the host wait, and making the next
batch while the current one trains.

- `to_device`: host tensor -> device. On CUDA the data goes through a fresh pinned (page-locked)
  block and a `non_blocking` copy, so the host never waits for the GPU; PyTorch's pinned-memory
  cache keeps the staging block alive until the copy has run, so the source may be overwritten at
  once (FFCV's pinned buffers are). On CPU it is the tensor itself.
- `Prefetcher`: wraps a loader; on CUDA each batch is made on a side stream one batch ahead
  (batch N+1's crops and augmentations run while step N runs on the training stream), and the
  training stream waits for that side stream before it uses a batch (`wait_stream`, and
  `record_stream` so the allocator does not hand the batch's memory to the side stream too
  early). On CPU there is one stream, so it is a pass-through.
- `compile_setting`, `view_function`: whether the views are made by a `torch.compile`d graph (CUDA)
  or eagerly, and the function that makes them, with TF32 matmuls (`tf32_matmuls`).
- `explicit_device`: a device with its index, as a tensor names it; `channel_constant`: a
  per-channel constant made once per device (keyed by it).
- `reuse_host_memory`: on CPU, glibc's allocator tuned for the eager augmentations' churn.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from loaders.builder import Batch, Loader


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`host` (a CPU tensor) on `device`, copied without a host sync, after which the caller may
    overwrite `host` at once.

    On CUDA the data is first copied into a fresh pinned block, even when `host` is pinned already:
    FFCV allocates its reused batch buffers pinned, and `pin_memory()` of a pinned tensor is the
    tensor itself, so a `non_blocking` copy straight from it would race with FFCV's next write into
    that buffer. PyTorch's caching host allocator keeps the fresh block until the copy has run."""
    if device.type == "cpu":
        return host
    if device.type == "cuda":
        host = torch.empty(host.shape, dtype=host.dtype, pin_memory=True).copy_(host)
    return host.to(device, non_blocking=True)


def explicit_device(device: torch.device) -> torch.device:
    """`device` with its index: `torch.device("cuda")` (and a generator made on it) names none,
    while every CUDA tensor's `.device` does, so keys made from both would differ."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


_CONSTANTS: dict[tuple[tuple[float, ...], torch.device], torch.Tensor] = {}


def channel_constant(values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """`values`, one per channel, as a `(C, 1, 1)` tensor on `device`, made once per device: a batch
    then builds no tensor from host data (on CUDA, a copy the host waits for), and a compiled graph
    reads it as an input. Make it eagerly before a compiled function first reads it."""
    key = (values, explicit_device(device))
    constant = _CONSTANTS.get(key)
    if constant is None:
        constant = _CONSTANTS[key] = torch.tensor(values, device=key[1]).view(-1, 1, 1)
    return constant


@contextmanager
def tf32_matmuls() -> Iterator[None]:
    """fp32 matmuls in TF32 inside the block (the setting restored after): where the views are
    made, whose crops and blurs are two matmuls each (the crops' ~0.3 TFLOP per 10-view ImageNet
    batch of 128).
    TF32 rounds their inputs to a 10-bit mantissa, errors up to ~5e-4 of the [0, 1] range, a
    quarter of the uint8 rounding step the published PIL pipeline applies after every op. Outside,
    the training step's fp32 matmuls (the loss's logits, kNN's similarities) stay IEEE fp32."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def compile_setting(device: torch.device, compile_views: bool | None) -> bool:
    """`compile_views` when given, else on for CUDA and off elsewhere: on a CPU, compiling every
    view shape costs more than the eager ops it saves in short runs and tests."""
    return device.type == "cuda" if compile_views is None else compile_views


def view_function(fn: Callable, device: torch.device, compile_views: bool | None) -> Callable:
    """`fn` (a view's crop and/or augmentations), compiled as one graph per view shape when
    `compile_setting` says so, and always called with TF32 matmuls (`tf32_matmuls`): the views'
    precision then does not depend on the caller, nor does dynamo's guard on that global setting
    (a call in the other state would compile the graph again)."""
    make = fn
    if compile_setting(device, compile_views):
        make = torch.compile(fn, fullgraph=True, dynamic=False)

    @functools.wraps(fn)
    def in_tf32(*args):
        with tf32_matmuls():
            return make(*args)

    return in_tf32


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters


@functools.cache
def reuse_host_memory() -> None:
    """Make glibc keep freed blocks of up to 32 MiB in its heap (and up to 256 MiB of free heap
    before returning it to the OS), for the rest of the process.

    Eager augmentations on a CPU allocate and free dozens of multi-MB temporaries per batch.
    With glibc's defaults each may be a fresh `mmap` (zeroed pages, one fault per 4 KiB) and a
    `munmap`; how often depends on what the process did before, so a batch took 30 ms or 1.5 s.
    Measured on the CIFAR memory backend (2 views, batch 256, 2 cores): ~30 ms steady, from the
    first batch on. No-op where the C library has no `mallopt` (not glibc)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    if hasattr(libc, "mallopt"):
        libc.mallopt(M_MMAP_THRESHOLD, 32 * 2**20)
        libc.mallopt(M_TRIM_THRESHOLD, 256 * 2**20)


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
    """`loader` behind a `Prefetcher` on CUDA; on CPU `loader` itself, with `reuse_host_memory`."""
    if device.type == "cuda":
        return Prefetcher(loader, device)
    reuse_host_memory()
    return loader
