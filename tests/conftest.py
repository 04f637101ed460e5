"""Shared test fixtures: the real images in ../shared/data (tests that need them are skipped, with the
reason, when the folder is absent), small extracted subsets of them, and their conversions, each made
once per session (`converted`)."""
from __future__ import annotations

import hashlib
import tarfile
from pathlib import Path
from typing import Callable

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# CI clones the repository next to shared/, so the data is found relative to the repository root.
SHARED_DATA = REPO.parent / "shared" / "data"
# torch's thread count before any test module imports FFCV, which sets it to 1 on import (and to its
# workers' count per Loader): every test starts from this one.
TORCH_THREADS = torch.get_num_threads()


@pytest.fixture(autouse=True)
def torch_threads() -> None:
    torch.set_num_threads(TORCH_THREADS)


def shared_file(name: str) -> Path:
    """A file of the shared test data; skips the test when it is not there."""
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.skip(f"{path} not found: this test needs the shared test data (shared/data/{name}, "
                    f"see shared/data/README.md) in a folder next to the repository")
    return path


def extract(tar_path: Path, dest: Path, keep: Callable[[str], bool]) -> list[Path]:
    """Extract the regular files of `tar_path` whose member names `keep` accepts into `dest`."""
    written = []
    with tarfile.open(tar_path) as tar:
        for member in tar:
            if member.isfile() and keep(member.name):
                path = dest / member.name
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(tar.extractfile(member).read())
                written.append(path)
    return written


@pytest.fixture(scope="session")
def file_hashes() -> Callable[[Path], dict[str, str]]:
    """Every file under a folder with its content hash: to assert two outputs are identical, or that
    a refused command lost, changed and left nothing."""
    def hashes(folder: Path) -> dict[str, str]:
        return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(folder.rglob("*")) if p.is_file()}
    return hashes


@pytest.fixture(scope="session")
def cifar10_tar() -> Path:
    """shared/data/cifar10-jpeg.tar: 32x32 CIFAR-10 JPEGs as train/<class>/NNNN.jpg and test/<class>/NNNN.jpg."""
    return shared_file("cifar10-jpeg.tar")


@pytest.fixture(scope="session")
def imagenet_tar() -> Path:
    """shared/data/imagenet-sample.tar: 1,000 full-size ImageNet JPEGs as train/<wnid>/<wnid>_<name>.JPEG."""
    return shared_file("imagenet-sample.tar")


@pytest.fixture(scope="session")
def cifar_folder(cifar10_tar: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small CIFAR-10 image folder (read-only by convention): train/<class>/ with the first 30 JPEGs of
    each class and test/<class>/ with the first 5 (300 + 50 images)."""
    root = tmp_path_factory.mktemp("cifar-folder")
    per_split = {"train": 30, "test": 5}
    extract(cifar10_tar, root, lambda name: int(Path(name).stem) < per_split[name.split("/")[0]])
    return root


@pytest.fixture(scope="session")
def imagenet_sample(imagenet_tar: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The whole ImageNet sample extracted (read-only by convention): train/<wnid>/*.JPEG, one per class."""
    root = tmp_path_factory.mktemp("imagenet-sample")
    extract(imagenet_tar, root, lambda name: True)
    return root


# What `converted` converts: the subcommand and, per kind, the session fixture holding its source folder.
CONVERTIBLE = {"cifar": ("imagefolder", "cifar_folder"), "digits": ("digits", None)}


@pytest.fixture(scope="session")
def converted(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """A factory: `converted(kind, **options)` is OUT/NAME of `kind` ("cifar": `cifar_folder` as an image
    folder, NAME cifar10; "digits") converted with these command-line options (`shard_size=64` is
    `--shard-size 64`), once per session for each kind and options; the output does not depend on
    --workers, so every conversion uses 2. Read-only by convention: copy it to change it."""
    from convert.cli import main

    made: dict[tuple, Path] = {}

    def convert(kind: str, **options: object) -> Path:
        key = (kind, tuple(sorted(options.items())))
        if key not in made:
            command, source_fixture = CONVERTIBLE[kind]
            out = tmp_path_factory.mktemp(f"converted-{kind}")
            name = "cifar10" if kind == "cifar" else kind
            argv = [command, "--out", str(out), "--name", name, "--workers", "2"]
            argv += ["--source", str(request.getfixturevalue(source_fixture))] if source_fixture else []
            argv += [arg for option, value in options.items() for arg in (f"--{option.replace('_', '-')}", str(value))]
            assert main(argv) == 0, f"conversion failed: {argv}"
            made[key] = out / name
        return made[key]

    return convert


@pytest.fixture(scope="session")
def cifar_root(converted: Callable[..., Path]) -> str:
    """`cifar_folder` converted to both formats in shards of 64 (read-only by convention): DIR/cifar10."""
    return str(converted("cifar", shard_size=64))


@pytest.fixture(scope="session")
def imagenet_folder(imagenet_sample: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[[int, int], Path]:
    """A factory of image folders (symlinks into `imagenet_sample`): the first `train` classes'
    images in train/<wnid>/ and the first `val` classes' images in val/<wnid>/."""
    def make(train: int, val: int) -> Path:
        folder = tmp_path_factory.mktemp("imagenet-folder")
        classes = sorted((imagenet_sample / "train").iterdir())
        for split, count in (("train", train), ("val", val)):
            for class_dir in classes[:count]:
                (folder / split / class_dir.name).mkdir(parents=True)
                for image in class_dir.iterdir():
                    (folder / split / class_dir.name / image.name).symlink_to(image)
        return folder

    return make
