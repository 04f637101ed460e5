"""DALI backend: one DALI pipeline for the whole run decodes every sample once and cuts and
augments all its views inside DALI (docs/method.md §6), on the GPU when the training device is CUDA.

Feeding. A batch-mode, parallel `fn.external_source` (`BatchSource`, loaders/dali_params.py) runs in
`data.workers` DALI worker processes, off the training thread: it reads batch `i` of this rank's
`epoch_indices(seed, epoch, rank)` from the WebDataset shards (random access through the index
files) and draws every random parameter of the batch's views on the host, vectorised and seeded by
`(seed, epoch, rank, batch)`. So the epoch visits exactly the order every backend shares, in
exactly `num_batches` batches, and the graph has no random op and no per-sample arithmetic: its
CPU operators are only the source's outputs, and nothing comes back from the GPU
(`operator_counts`, `gpu_to_cpu_copies`). (`fn.readers.webdataset` is not used: it gives each rank
a contiguous range of samples, shuffles within a buffer and pads the last batch, so neither the
order nor the epoch's length would match the other backends'.)

Decoding. `fn.decoders.image` once per sample, on `"mixed"` (nvJPEG on the GPU) for a CUDA device,
else on the CPU; every view is resampled from that one decode.

Training views, each from its host-drawn parameters:
- crop: torchvision's `RandomResizedCrop` window as the ROI of one `fn.resize` to `S×S`, bicubic
  and antialiased (PIL's filter: within 1/255 of torchvision's `resized_crop` away from the crop's
  edge; DALI also reads the pixels just outside the crop, so pixels on the edge differ by up to a
  few levels); the flip is the same ROI with its x ends swapped;
- colour jitter (p = 0.8) and grayscale (p = 0.2) as one affine colour map (`colour_maps`): a
  `fn.coord_transform` plus the contrast's grey offset from the view's mean, on the device;
- Gaussian blur, sigma ~ U(0.1, 2), window `2·ceil(3σ) + 1` (`fn.gaussian_blur`, whose border is
  a reflection where PIL repeats the edge pixel);
- solarize (view 2): `x xor 255` where `x >= 128`, as PIL's `ImageOps.solarize(img, 128)`;
- ImageNet normalisation by `fn.crop_mirror_normalize` (CHW, the settings' dtype).
`Batch.params` (every decision and the crop's area) is filled only by a loader made with
`with_decisions=True` (the tests): the host draws them anyway, the trainer does not need them.

Evaluation: the torchvision transform (short side to `S·256/224`, bicubic, centre crop) as one
`fn.resize` of the centre window's ROI (`eval_window`, on the host), then normalisation.

Running. One pipeline, built at the first iteration and kept for the run; `set_epoch(epoch,
start_batch)` writes the epoch and its first batch into the state file the workers read, so a
resumed epoch starts at batch `start_batch` without producing the batches before it. The
executor is asynchronous and pipelined (`prefetch_queue_depth` batches ahead), and on CUDA
`run()` returns outputs ordered on the training stream; they reach torch through DLPack with no
copy (the dynamic executor gives each output its own memory, freed with the torch tensor).
"""
import weakref
from collections.abc import Iterator

import torch
from nvidia.dali import fn, types
from nvidia.dali.data_node import DataNode
from nvidia.dali.pipeline import Pipeline

from loaders.augment import SOLARIZE_THRESHOLD, ViewSpec
from loaders.builder import Batch, EpochLoader, LoaderSettings, worker_threads
from loaders.dali_params import DECISIONS, BatchSource, EpochState, colours, view_inputs
from loaders.device import to_device
from loaders.eval_view import IMAGENET_MEAN, IMAGENET_STD
from loaders.shards import ShardSamples, open_converted

DALI_DTYPES = {torch.float32: types.FLOAT, torch.float16: types.FLOAT16}  # others: float32, then cast
MEAN_255 = [255 * m for m in IMAGENET_MEAN]
STD_255 = [255 * s for s in IMAGENET_STD]
PREFETCH = 2  # batches the executor (and the source's workers) run ahead of the consumer


def _jitter(x: DataNode, matrix: DataNode, grey: DataNode) -> DataNode:
    """The colour map of `colour_maps` on a uint8 HWC view: `A·x + (g·x̄)·1`, clipped and
    rounded to uint8 once. `matrix` (`A`) is a CPU argument; the grey offset is computed where
    the view is, so nothing leaves the GPU."""
    means = fn.reductions.mean(x, axes=[0, 1], dtype=types.FLOAT)
    offset = fn.reductions.sum(means * grey)
    return fn.cast(fn.coord_transform(x, M=matrix, dtype=types.FLOAT) + offset, dtype=types.UINT8)


def _resize(images: DataNode, start: DataNode, end: DataNode, size: int) -> DataNode:
    """The ROI `[start, end)` (`(y, x)` pixels) of each image, resampled to `size × size` with an
    antialiased bicubic filter, as PIL resizes; a reversed ROI is mirrored."""
    return fn.resize(images, roi_start=start, roi_end=end, size=[size, size], interp_type=types.INTERP_CUBIC,
                     antialias=True)


def _normalise(x: DataNode, dtype: types.DALIDataType) -> DataNode:
    """ImageNet normalisation to CHW `dtype`."""
    return fn.crop_mirror_normalize(x, mean=MEAN_255, std=STD_255, output_layout="CHW", dtype=dtype)


def _train_view(images: DataNode, inputs: dict[str, DataNode], grey: DataNode, invert: DataNode,
                spec: ViewSpec, dtype: types.DALIDataType) -> DataNode:
    """One augmented view of every image from its host-drawn `inputs` (`view_inputs(spec)`),
    `grey` (`(3,)` per sample) and `invert` (uint8 scalar per sample). Ops whose probability is 0
    in the spec are left out of the graph."""
    x = _resize(images, inputs["roi_start"], inputs["roi_end"], spec.size)
    if colours(spec):
        x = _jitter(x, inputs["matrix"], grey)
    if spec.blur_prob > 0:
        x = fn.gaussian_blur(x, sigma=inputs["sigma"], window_size=inputs["window"])
    if spec.solarize_prob > 0:
        x = x ^ ((x >= round(SOLARIZE_THRESHOLD * 255)) * invert)  # uint8 throughout: 255 - x where set
    return _normalise(x, dtype)


def _cuda_index(device: torch.device) -> int:
    return torch.cuda.current_device() if device.index is None else device.index


class DaliLoader(EpochLoader):
    """Batches from one DALI pipeline for the whole run; see the module's docstring."""

    def __init__(self, settings: LoaderSettings, with_decisions: bool = False) -> None:
        samples = ShardSamples(open_converted(settings.data.root), settings.split)
        super().__init__(settings, len(samples))
        self.specs = settings.views()
        with_decisions = with_decisions and settings.train  # evaluation has none
        self.state = EpochState()
        weakref.finalize(self, self.state.close)
        self.source = BatchSource(samples, self.state.path, settings, self.specs, with_decisions)
        self.with_decisions = with_decisions
        self._pipeline: Pipeline | None = None
        self._running = False  # an epoch's batches are being produced

    def __iter__(self) -> Iterator[Batch]:
        if self._running:
            raise RuntimeError("a DALI loader runs one iteration at a time: finish or close the previous one")
        if self.start_batch == len(self):
            return
        pipeline = self.pipeline()
        self.state.set(self.epoch, self.start_batch, len(self))
        self._running = True
        stream = torch.cuda.current_stream(self.settings.device) if self.settings.device.type == "cuda" else None
        try:
            while True:
                try:
                    outputs = pipeline.run(stream.cuda_stream) if stream is not None else pipeline.run()
                except StopIteration:
                    break
                yield self._batch([torch.from_dlpack(output.as_tensor()) for output in outputs])
        finally:
            self._end_epoch(pipeline)

    def _end_epoch(self, pipeline: Pipeline) -> None:
        """Make the source stop, drop what the pipeline produced ahead (an iteration left early)
        and rewind it for the next epoch."""
        self.state.set(self.epoch, self.start_batch, -1)
        try:
            while True:
                pipeline.run()
        except StopIteration:
            pipeline.reset()
        finally:
            self._running = False

    def pipeline(self) -> Pipeline:
        """The run's pipeline, built at the first call."""
        if self._pipeline is None:
            self._pipeline, outputs = self._define(self.settings.device)
            self._pipeline.set_outputs(*outputs)
            self._pipeline.build()
        return self._pipeline

    def _define(self, device: torch.device) -> tuple[Pipeline, list[DataNode]]:
        """A pipeline for `device` and its graph's outputs (not yet set): labels, indices, then the
        eval view, or the training views and, with decisions, their `(B, V, 6)` decisions."""
        s = self.settings
        on_gpu = device.type == "cuda"
        workers = worker_threads(s.data.workers)
        # Source workers are spawned: forking a process that already runs threads (CUDA, FFCV's
        # decoders, OpenMP) can deadlock the child on a lock some thread held.
        pipeline = Pipeline(batch_size=s.batch_size, num_threads=workers,
                            device_id=_cuda_index(device) if on_gpu else None, prefetch_queue_depth=PREFETCH,
                            py_num_workers=workers, py_start_method="spawn")
        dtype = DALI_DTYPES.get(s.dtype, types.FLOAT)
        with pipeline:
            nodes = iter(fn.external_source(self.source, num_outputs=self.source.num_outputs(), batch=True,
                                            parallel=True))
            encoded, labels, indices = next(nodes), next(nodes), next(nodes)
            images = fn.decoders.image(encoded, device="mixed" if on_gpu else "cpu", output_type=types.RGB,
                                       adjust_orientation=False)  # PIL's size and pixels: no EXIF rotation
            if not s.train:
                return pipeline, [labels, indices, _normalise(_resize(images, next(nodes), next(nodes),
                                                                      s.data.image_size), dtype)]
            grey, invert = (next(nodes).gpu() if on_gpu else next(nodes) for _ in range(2))
            decisions = [next(nodes)] if self.with_decisions else []
            views = []
            for v, spec in enumerate(self.specs):
                inputs = {name: next(nodes) for name in view_inputs(spec)}
                views.append(_train_view(images, inputs, grey[v], invert[v], spec, dtype))
        return pipeline, [labels, indices, *views, *decisions]

    def _batch(self, outputs: list[torch.Tensor]) -> Batch:
        """A `Batch` on the training device from the pipeline's outputs (views already there)."""
        s = self.settings
        # CPU outputs (labels, indices) go through `to_device` like every host-to-device copy: a DLPack
        # tensor's memory returns to DALI when it is freed, maybe before a non_blocking copy from it ran.
        labels, indices, *views = (to_device(output, s.device) if output.device.type == "cpu" else output
                                   for output in outputs)
        params = []
        if self.with_decisions:
            decisions = views.pop()
            params = [{name: column if name == "area" else column.bool()
                       for name, column in zip(DECISIONS, view.unbind(dim=1))} for view in decisions.unbind(dim=1)]
        return Batch([view.to(s.dtype) for view in views], labels, indices, params)


def _cuda_graph(settings: LoaderSettings) -> tuple[list, list[DataNode]]:
    """The operators and outputs of the CUDA pipeline for `settings`, from its graph definition:
    nothing is built or run, so no GPU is needed."""
    _, outputs = DaliLoader(settings)._define(torch.device("cuda", 0))
    ops, stack = {}, [node.source for node in outputs]
    while stack:
        op = stack.pop()
        if id(op) not in ops:
            ops[id(op)] = op
            stack += [edge.source for edge in op.inputs]
    return list(ops.values()), outputs


def _device(op) -> str:
    return op._op.device  # an operator instance's device is its operator's: "cpu", "mixed" or "gpu"


def operator_counts(settings: LoaderSettings) -> dict[str, int]:
    """How many operators the CUDA pipeline for `settings` (`"mixed"` decoding, GPU views) runs
    per iteration on each device (`cpu`, `mixed`, `gpu`); DALI runs the CPU ones one after
    another, so their number bounds the host's cost per batch."""
    counts = {"cpu": 0, "mixed": 0, "gpu": 0}
    for op in _cuda_graph(settings)[0]:
        counts[_device(op)] += 1
    return counts


def gpu_to_cpu_copies(settings: LoaderSettings) -> int:
    """How many edges of the CUDA pipeline for `settings` copy data from the GPU back to the host
    (an operator's CPU input, or a CPU output, made on the GPU)."""
    ops, outputs = _cuda_graph(settings)
    edges = [edge for op in ops for edge in op.inputs] + outputs
    return sum(edge.device == "cpu" and _device(edge.source) != "cpu" for edge in edges)


def make_loader(settings: LoaderSettings) -> DaliLoader:
    return DaliLoader(settings)
