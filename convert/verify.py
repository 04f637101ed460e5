"""--verify: every output file against its SHA-256, then each format read back with its own reader
(FFCV's Loader; DALI's webdataset reader and image decoder): counts and labels of all samples, and the
pixels of evenly spaced samples against the source, decoded here by a path independent of the
converter's (numpy maths on the source's raw values, not `encode.to_rgb`)."""
from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from PIL import Image

from convert import ConvertError
from convert.encode import BACKGROUND, WIDE_INTEGER_MAX, encode, open_image, shrink
from convert.sources import Sample, Source
from convert.writers import file_sha256
from loaders.manifest import SPLITS, ConvertedDataset

# --verify compares this many evenly spaced samples per split with the source, pixel by pixel.
VERIFY_SAMPLES = 32
# Different JPEG decoders (PIL, FFCV's libjpeg-turbo with fast DCT, DALI) may differ by a few grey levels
# on the same file; a wrong or misplaced image differs by tens (mean absolute difference, 0-255 scale).
JPEG_DECODE_TOLERANCE = 3.0
# Lossless images: the reference maths here and PIL's may round a value differently by one level.
LOSSLESS_TOLERANCE = 0.5
# How many problems the one-line report lists before "and N more".
REPORTED_PROBLEMS = 5


def reference_rgb(image: Image.Image) -> np.ndarray:
    """`image` as 8-bit RGB (H, W, 3), computed with numpy from the values of its own mode; the same
    conventions as `encode.to_rgb` (16-bit and float greyscale scaled, transparency over white), derived
    independently of it. Modes not listed here (LAB, HSV, ...) are left to PIL."""
    values = np.asarray(image)
    mode = image.mode
    alpha = None
    if mode in ("1", "L", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"):
        grey = values.astype(np.float64)
        if mode == "1":
            grey = grey * 255
        elif mode.startswith("I"):
            grey = np.clip(grey, 0, WIDE_INTEGER_MAX) * (255 / WIDE_INTEGER_MAX)
        elif mode == "F":
            grey = np.clip(grey, 0, 1) * 255
        rgb = np.repeat(grey[..., None], 3, axis=2)
        if mode == "L" and "transparency" in image.info:
            alpha = np.where(values == image.info["transparency"], 0, 255)
    elif mode in ("LA", "PA", "P"):
        colours = values[..., 0] if mode != "P" else values
        palette = np.zeros((256, 4))
        if mode == "LA":
            palette[:, :3] = np.arange(256)[:, None]
        else:
            entries = np.asarray(image.getpalette("RGB"), np.float64).reshape(-1, 3)
            palette[:len(entries), :3] = entries
        palette[:, 3] = 255
        transparency = image.info.get("transparency") if mode == "P" else None
        if isinstance(transparency, int):
            palette[transparency, 3] = 0
        elif isinstance(transparency, bytes):
            palette[:len(transparency), 3] = np.frombuffer(transparency, np.uint8)
        rgba = palette[colours]
        rgb = rgba[..., :3]
        alpha = values[..., 1] if mode != "P" else rgba[..., 3]
    elif mode in ("RGB", "RGBA", "RGBX"):
        rgb = values[..., :3].astype(np.float64)
        if mode == "RGBA":
            alpha = values[..., 3]
        elif "transparency" in image.info:
            alpha = np.where((values == image.info["transparency"]).all(axis=2), 0, 255)
    elif mode == "CMYK":
        cmy, k = values[..., :3].astype(np.float64), values[..., 3:].astype(np.float64)
        rgb = (255 - cmy) * (255 - k) / 255
    elif mode == "YCbCr":  # JPEG's (JFIF) conversion
        y, cb, cr = (values[..., c].astype(np.float64) for c in range(3))
        rgb = np.stack([y + 1.402 * (cr - 128), y - 0.344136 * (cb - 128) - 0.714136 * (cr - 128),
                        y + 1.772 * (cb - 128)], axis=2)
    else:
        return np.asarray(image.convert("RGB"))
    if alpha is not None:
        opacity = np.asarray(alpha, np.float64)[..., None] / 255
        rgb = rgb * opacity + np.asarray(BACKGROUND[:3], np.float64) * (1 - opacity)
    return np.clip(np.floor(rgb + 0.5), 0, 255).astype(np.uint8)


def expected_pixels(sample: Sample, root: Path | None, options: dict) -> tuple[str, np.ndarray]:
    """(extension, pixels) the stored image of `sample` should decode to: the source decoded by
    `reference_rgb`, shrunk and encoded with the converter's options."""
    image, target = open_image(sample, root, options["max_resolution"])
    with image:
        image.load()
        rgb = Image.fromarray(reference_rgb(image))
    ext, payload = encode(shrink(rgb, target), options["jpeg_quality"])
    with Image.open(io.BytesIO(payload)) as stored:
        return ext, np.asarray(stored.convert("RGB"))


def read_ffcv(path: Path, picks: Iterable[int], workers: int = 1) -> tuple[list[int], dict[int, np.ndarray]]:
    """All labels, and the decoded images of samples `picks`, read with FFCV's Loader."""
    from ffcv.fields.decoders import IntDecoder, SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.pipeline.allocation_query import AllocationQuery

    class AnySizeRGBDecoder(SimpleRGBImageDecoder):
        """FFCV's plain decoder, allowing images of different sizes: each is decoded into the start of
        a buffer of the largest size (as FFCV's cropping decoders do) and cut out afterwards."""

        def declare_state_and_memory(self, previous_state: Any) -> tuple[Any, Any]:
            shape = (int(self.metadata["height"].max()), int(self.metadata["width"].max()), 3)
            return (replace(previous_state, jit_mode=True, shape=shape, dtype=np.dtype("<u1")),
                    AllocationQuery(shape, np.dtype("<u1")))

    def loader(pipelines: dict, indices: list[int] | None = None) -> Any:
        return Loader(str(path), batch_size=64, num_workers=workers, order=OrderOption.SEQUENTIAL,
                      drop_last=False, indices=indices, pipelines=pipelines)

    labels = [int(y) for (batch,) in loader({"image": None, "label": [IntDecoder()]}) for y in batch.ravel()]
    picks = sorted(picks)
    images = {}
    if picks:
        read = loader({"image": [AnySizeRGBDecoder()], "label": None}, picks)
        sizes = read.reader.metadata[f"f{read.reader.field_names.index('image')}"]
        buffers = (image for (batch,) in read for image in batch)
        for i, buffer in zip(picks, buffers):
            height, width = int(sizes[i]["height"]), int(sizes[i]["width"])
            images[i] = buffer.reshape(-1)[:height * width * 3].reshape(height, width, 3).copy()
    return labels, images


def read_dali(reader_args: dict, picks: Iterable[int], workers: int = 1) -> tuple[list[int], dict[int, np.ndarray]]:
    """All labels, and the decoded images of samples `picks`, read with DALI's webdataset reader (every
    sample, in order) and its image decoder (the picked ones only), on the CPU."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=64, num_threads=workers, device_id=None)
    def read_all() -> Any:
        return tuple(fn.readers.webdataset(**reader_args, missing_component_behavior="error", name="reader"))

    pipe = read_all()
    pipe.build()
    count = pipe.epoch_size("reader")
    picks = set(picks)
    labels, encoded = [], {}
    while len(labels) < count:
        images, label_batch = pipe.run()
        for j in range(min(len(label_batch), count - len(labels))):
            if len(labels) in picks:
                encoded[len(labels)] = np.array(images.at(j))
            labels.append(int(np.array(label_batch.at(j)).tobytes()))
    if not encoded:
        return labels, {}
    order = sorted(encoded)

    @pipeline_def(batch_size=len(order), num_threads=workers, device_id=None)
    def decode() -> Any:
        return fn.decoders.image(fn.external_source(source=lambda: [encoded[i] for i in order]),
                                 device="cpu", output_type=types.RGB)

    pipe = decode()
    pipe.build()
    (decoded,) = pipe.run()
    return labels, {i: np.array(decoded.at(j)) for j, i in enumerate(order)}


def compare_pixels(ext: str, expected: np.ndarray, actual: np.ndarray) -> str | None:
    """Why `actual` does not match: PNG (lossless) within rounding, JPEG within decoder differences."""
    if actual.shape != expected.shape:
        return f"shape {actual.shape}, expected {expected.shape}"
    difference = np.abs(actual.astype(np.int16) - expected).mean()
    limit = JPEG_DECODE_TOLERANCE if ext == "jpg" else LOSSLESS_TOLERANCE
    return f"mean pixel difference {difference:.2f} > {limit}" if difference > limit else None


def damaged_files(dataset: ConvertedDataset) -> dict[Path, str]:
    """The files that are missing, or whose SHA-256 differs from the manifest's, with the problem."""
    hashes = dataset.manifest.get("sha256")
    if hashes is None:
        return {dataset.layout.manifest: f"{dataset.layout.manifest} lists no SHA-256 (written by an older "
                                         f"converter); convert again with --overwrite"}
    damaged = {}
    for path in dataset.files():
        try:
            actual = file_sha256(path)
        except OSError as error:
            damaged[path] = f"{path}: cannot be read ({error.strerror})"
            continue
        if actual != hashes.get(str(path.relative_to(dataset.layout.root))):
            damaged[path] = f"{path}: SHA-256 differs from the manifest's (the file was changed or damaged)"
    return damaged


def check_format(dataset: ConvertedDataset, fmt: str, split: str, kept: list[Sample], picks: list[int],
                 expected: dict[int, tuple[str, np.ndarray]], workers: int) -> list[str]:
    """The problems of one split of one format: counts, every label, the pixels of `picks`."""
    where = f"{fmt} {split}"
    try:
        if fmt == "ffcv":
            labels, images = read_ffcv(dataset.ffcv_file(split), picks, workers)
        else:
            labels, images = read_dali(dataset.dali_reader_args(split), picks, workers)
    except Exception as error:  # a reader fails in its own ways on a damaged file
        return [f"{where}: cannot be read ({type(error).__name__}: {error})"]
    count = dataset.count(split)
    if len(labels) != count or len(labels) != len(kept):
        return [f"{where}: {len(labels)} samples, manifest says {count}, source has {len(kept)} decodable"]
    problems = []
    wrong = [i for i, (label, sample) in enumerate(zip(labels, kept)) if label != sample.label]
    if wrong:
        problems.append(f"{where}: {len(wrong)} labels differ from the source, first sample {wrong[0]} "
                        f"({kept[wrong[0]].name}): {labels[wrong[0]]}, expected {kept[wrong[0]].label}")
    problems += [f"{where}: sample {i} ({kept[i].name}): {why}" for i in picks
                 if (why := compare_pixels(*expected[i], images[i])) is not None]
    return problems


def verify(dataset: ConvertedDataset, source: Source, workers: int) -> None:
    """Check every file's SHA-256, then each intact format against the source; ConvertError with a
    one-line "verification failed: ..." listing the problems."""
    damaged = damaged_files(dataset)
    problems = list(damaged.values())
    options = dataset.manifest["options"]
    for split in SPLITS:
        skipped = {s["path"] for s in dataset.split(split)["skipped"]}
        kept = [s for s in source.splits[split] if s.name not in skipped]
        picks = sorted(set(np.linspace(0, len(kept) - 1, min(VERIFY_SAMPLES, len(kept))).round().astype(int)))
        expected = {}
        for i in picks:
            try:
                expected[i] = expected_pixels(kept[i], source.root, options)
            except Exception as error:  # PIL raises many types for corrupt data
                problems.append(f"source sample {kept[i].name} cannot be decoded any more ({error})")
        picks = sorted(expected)
        for fmt in options["formats"]:
            if any(path in damaged for path in dataset.format_files(split, fmt)):
                continue  # reported above; its reader could fail in any way
            problems += check_format(dataset, fmt, split, kept, picks, expected, workers)
    if problems:
        more = f"; and {len(problems) - REPORTED_PROBLEMS} more" if len(problems) > REPORTED_PROBLEMS else ""
        raise ConvertError("verification failed: " + "; ".join(problems[:REPORTED_PROBLEMS]) + more)
    print(f"verified {dataset.layout.root}: SHA-256 of every file; {', '.join(options['formats'])}: counts, "
          f"labels and {VERIFY_SAMPLES} images per split match the source")
