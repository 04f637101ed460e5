"""`imagenet`: ILSVRC2012 as image-net.org or Kaggle distribute it."""
from __future__ import annotations

import csv
import io
import tarfile
from pathlib import Path
from typing import Callable

from convert import ConvertError
from convert.sources.base import Sample, Source
from convert.sources.folder import class_folder_samples, list_files, require_dir, visible_entries

IMAGENET_LOC_CSV = "LOC_val_solution.csv"  # Kaggle's ImageNet Object Localization Challenge
IMAGENET_DEVKIT = "ILSVRC2012_devkit_t12"  # image-net.org's devkit, as a folder or .tar.gz
IMAGENET_KAGGLE_ROOT = Path("ILSVRC/Data/CLS-LOC")


def read_imagenet(source: Path) -> Source:
    """ILSVRC2012: train/<wnid>/*.JPEG; val/ either as val/<wnid>/*.JPEG or flat with a ground-truth file
    (see `imagenet_val_truth`). Kaggle's ILSVRC/Data/CLS-LOC/{train,val} is accepted as well."""
    require_dir(source, "source folder")
    root = source / IMAGENET_KAGGLE_ROOT if (source / IMAGENET_KAGGLE_ROOT).is_dir() else source
    if not (root / "train").is_dir() or not (root / "val").is_dir():
        raise ConvertError(f"{source} should contain train/<wnid>/*.JPEG and val/ (ILSVRC2012 layout, or Kaggle's "
                           f"{IMAGENET_KAGGLE_ROOT}/train and val)")
    classes, train = class_folder_samples(root / "train", root, None)
    val_dir = root / "val"
    val_entries = visible_entries(val_dir)
    if not val_entries:
        raise ConvertError(f"{val_dir} is empty")
    if any(p.is_dir() for p in val_entries):
        _, val = class_folder_samples(val_dir, root, classes)
    else:
        truth, truth_file = imagenet_val_truth([source, root, val_dir])
        val = flat_val_samples(val_dir, root, classes, truth, truth_file)
    return Source(classes, {"train": train, "val": val}, root)


def flat_val_samples(val_dir: Path, root: Path, classes: list[str], truth: dict[str, str], truth_file: Path
                     ) -> list[Sample]:
    """Samples of a flat val/, labelled by the ground truth (image name without extension -> wnid)."""
    files = list_files(val_dir, root)
    unlabelled = [f for f in files if Path(f).stem not in truth]
    if unlabelled:
        raise ConvertError(f"{truth_file} has no label for {len(unlabelled)} images of {val_dir}, "
                           f"e.g. {', '.join(unlabelled[:3])}")
    unknown = sorted({truth[Path(f).stem] for f in files} - set(classes))
    if unknown:
        raise ConvertError(f"{truth_file} labels images of {val_dir} with classes that train/ lacks: "
                           f"{', '.join(unknown[:5])}")
    label = {c: i for i, c in enumerate(classes)}
    return [Sample(f, label[truth[Path(f).stem]]) for f in files]


def imagenet_val_truth(folders: list[Path]) -> tuple[dict[str, str], Path]:
    """Image name (without extension) -> wnid for a flat val/, from the first ground-truth file found in
    `folders`: Kaggle's LOC_val_solution.csv, or the ILSVRC2012 devkit (folder or .tar.gz) whose
    data/ILSVRC2012_validation_ground_truth.txt gives the class number of image k on line k and whose
    data/meta.mat maps class numbers to wnids."""
    for folder in folders:
        if (folder / IMAGENET_LOC_CSV).is_file():
            with open(folder / IMAGENET_LOC_CSV, newline="") as f:
                return {row["ImageId"]: row["PredictionString"].split()[0] for row in csv.DictReader(f)}, \
                    folder / IMAGENET_LOC_CSV
        if (folder / IMAGENET_DEVKIT).is_dir():
            return read_devkit(lambda name: (folder / IMAGENET_DEVKIT / name).read_bytes()), folder / IMAGENET_DEVKIT
        archive = folder / f"{IMAGENET_DEVKIT}.tar.gz"
        if archive.is_file():
            with tarfile.open(archive) as tar:
                return read_devkit(lambda name: tar.extractfile(f"{IMAGENET_DEVKIT}/{name}").read()), archive
    raise ConvertError(
        f"val/ is flat (no class folders) but no ground truth was found in {', '.join(map(str, folders))}: "
        f"expected {IMAGENET_LOC_CSV} (Kaggle) or {IMAGENET_DEVKIT}/ or {IMAGENET_DEVKIT}.tar.gz (image-net.org) "
        f"next to train/ and val/; or sort val/ into val/<wnid>/ folders")


def read_devkit(read: Callable[[str], bytes]) -> dict[str, str]:
    """Validation labels from the ILSVRC2012 devkit; `read` returns a file of the devkit by relative name."""
    from scipy.io import loadmat  # scipy comes with scikit-learn; only this layout needs it

    synsets = loadmat(io.BytesIO(read("data/meta.mat")), squeeze_me=True)["synsets"]
    wnids = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets if int(s["num_children"]) == 0}
    numbers = read("data/ILSVRC2012_validation_ground_truth.txt").split()
    return {f"ILSVRC2012_val_{k:08d}": wnids[int(n)] for k, n in enumerate(numbers, start=1)}
