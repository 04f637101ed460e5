"""`imagefolder`: train/<class>/* and val/<class>/* (or test/<class>/*); the class-folder helpers ImageNet shares."""
from __future__ import annotations

import os
from pathlib import Path

from convert import ConvertError
from convert.sources.base import Sample, Source


def require_dir(path: Path, what: str) -> None:
    if not path.is_dir():
        raise ConvertError(f"{what} {path} does not exist or is not a folder")


def list_files(folder: Path, root: Path) -> list[str]:
    """Every file below `folder` (recursively, hidden ones excluded), sorted, relative to `root`.
    Nothing is filtered by extension: a file that is not an image is reported as skipped, not silently lost."""
    names = []
    for directory, subdirs, files in os.walk(folder, followlinks=True):
        subdirs[:] = [d for d in subdirs if not d.startswith(".")]
        names += [os.path.relpath(os.path.join(directory, f), root) for f in files if not f.startswith(".")]
    return sorted(names)


def visible_entries(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def class_folder_samples(split_dir: Path, root: Path, classes: list[str] | None) -> tuple[list[str], list[Sample]]:
    """Samples of `split_dir/<class>/...`. The train split defines the classes (sorted folder names);
    later splits pass them in and may use a subset."""
    entries = visible_entries(split_dir)
    stray = [p.name for p in entries if not p.is_dir()]
    if stray or not entries:
        found = f"files {', '.join(stray[:5])}" if stray else "nothing"
        raise ConvertError(f"{split_dir} should contain class folders (<class>/<image>), but has {found}")
    names = [p.name for p in entries]
    classes = names if classes is None else classes
    unknown = sorted(set(names) - set(classes))
    if unknown:
        raise ConvertError(f"{split_dir} has classes that the train split lacks: {', '.join(unknown[:5])}")
    label = {c: i for i, c in enumerate(classes)}
    samples = []
    for folder in entries:
        files = list_files(folder, root)
        if not files:
            raise ConvertError(f"class folder {folder} is empty; every class folder needs at least one image")
        samples += [Sample(f, label[folder.name]) for f in files]
    return classes, samples


def read_imagefolder(source: Path) -> Source:
    """`train/<class>/*` and `val/<class>/*` (or `test/<class>/*`)."""
    require_dir(source, "source folder")
    held_out = [source / n for n in ("val", "test") if (source / n).is_dir()]
    if not (source / "train").is_dir() or len(held_out) != 1:
        found = ", ".join(p.name + ("/" if p.is_dir() else "") for p in visible_entries(source)[:8]) or "nothing"
        raise ConvertError(f"{source} should contain train/<class>/<image> and either val/<class>/<image> or "
                           f"test/<class>/<image>; it has {found}")
    classes, train = class_folder_samples(source / "train", source, None)
    _, val = class_folder_samples(held_out[0], source, classes)
    return Source(classes, {"train": train, "val": val}, source)
