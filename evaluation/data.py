"""The linear-probe and fine-tuning data pipelines (docs/method.md §7): PIL transforms in DataLoader workers.

- linear train: RandomResizedCrop (bicubic) + horizontal flip + ImageNet normalisation;
- fine-tune train: timm's `create_transform` (RandAugment, random erasing, bicubic crops), plus
  repeated augmentation (`repeated_indices`);
- evaluation: `eval_view` (resize to size·256/224, centre crop), or `stored_view` (the stored image,
  only normalised: the published fine-tuning evaluation of 32-px CIFAR), every sample exactly once
  over ranks.

Each sample's augmentation is seeded by `(seed, epoch, rank, position)`, so a batch does not
depend on which worker made it, and a resumed run sees the same images as an uninterrupted one.
"""
from collections.abc import Callable, Iterator
from functools import partial

import torch
import torchvision.transforms as T
from PIL import Image, ImageOps
from timm.data import auto_augment, create_transform
from timm.data.transforms import RandomResizedCropAndInterpolation

from loaders.eval_view import IMAGENET_MEAN, IMAGENET_STD, eval_view, to_tensor
from loaders.sampling import epoch_indices, num_batches
from loaders.seeded_workers import SeededWorkers
from loaders.seeding import derive_seed
from loaders.shards import ShardSamples

Transform = Callable[[Image.Image], torch.Tensor]


def linear_train_transform(size: int) -> Transform:
    """The linear probe's training view (docs/method.md §7, the published `main_linear.py`)."""
    return T.Compose([T.RandomResizedCrop(size, interpolation=T.InterpolationMode.BICUBIC),
                      T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def _posterize(image: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """timm's RandAugment posterize with old Pillow's meaning of 0 bits (a black image): timm 1.0.31
    asks for 0 bits at magnitude 10 (m9 + noise reaches it), which Pillow 13 rejects with a ValueError."""
    if bits_to_keep >= 8:
        return image
    return ImageOps.posterize(image, bits_to_keep) if bits_to_keep > 0 else image.point(lambda _: 0)


def finetune_train_transform(size: int, randaugment: str, re_prob: float, crop_padding: int = 0) -> Transform:
    """timm's training transform: bicubic random resized crop, flip, RandAugment, normalise, random
    erasing (per-pixel noise). `crop_padding > 0` swaps the crop for `RandomCrop(size, padding)`,
    as the published code does for 32-px inputs."""
    transform = create_transform(size, is_training=True, auto_augment=randaugment, interpolation="bicubic",
                                 re_prob=re_prob, re_mode="pixel", re_count=1, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    for op in (op for t in transform.transforms for op in getattr(t, "ops", ())):
        if op.aug_fn is auto_augment.posterize:
            op.aug_fn = _posterize
    if crop_padding:
        assert isinstance(transform.transforms[0], RandomResizedCropAndInterpolation), transform
        transform.transforms[0] = T.RandomCrop(size, padding=crop_padding)
    return transform


def stored_view(image: Image.Image, size: int) -> torch.Tensor:
    """The stored image, only normalised: no resize, no crop (docs/method.md §7, fine-tuning on CIFAR)."""
    if image.size != (size, size):
        raise ValueError(f"eval_resize_crop=false validates the stored images as they are, but one is "
                         f"{image.width}x{image.height}, not {size}x{size}: set eval_resize_crop=true")
    return to_tensor(image)


def eval_transform(size: int, resize_crop: bool = True) -> Transform:
    """The validation view: `eval_view` (shared with kNN and the loaders) or, with `resize_crop=False`,
    `stored_view` (docs/method.md §7)."""
    return partial(eval_view if resize_crop else stored_view, size=size)


def repeated_indices(num_samples: int, batch_size: int, *, repeats: int, seed: int = 0, epoch: int = 0,
                     rank: int = 0, world_size: int = 1) -> torch.Tensor:
    """Repeated augmentation (DeiT's idea): this rank's dataset indices for `epoch`.

    The epoch's shuffled order (`epoch_indices` with the global batch, so the tail is dropped as in
    plain training) has each entry repeated `repeats` times in a row and is cut back to its own
    length; rank `r` takes positions `r, r + W, …`. The epoch therefore has as many steps as
    without repetition, consecutive copies of a sample land on different ranks (when
    `world_size >= repeats`), and each copy gets its own augmentation.
    `batch_size` is the per-rank batch.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}); got {rank}")
    order = epoch_indices(num_samples, batch_size * world_size, train=True, seed=seed, epoch=epoch)
    return order.repeat_interleave(repeats)[: len(order)][rank::world_size]


def _transformed(image: Image.Image, label: int, index: int, transform: Transform) -> tuple[torch.Tensor, int]:
    return transform(image), label


class ImageLoader:
    """`(images, labels)` batches of one split for this rank, on `device`, made in `workers` processes
    (`loaders.seeded_workers`).

    Training (`train=True`): shuffled per `(seed, epoch)`, full batches only, the same number of
    batches on every rank, optionally with `repeats`-fold repeated augmentation. Evaluation: the
    split in order, each sample exactly once over all ranks (the last batch may be partial).
    `batch_size` is the per-rank batch.
    """

    def __init__(self, samples: ShardSamples, transform: Transform, *, batch_size: int, train: bool,
                 workers: int, device: torch.device, seed: int = 0, rank: int = 0, world_size: int = 1,
                 repeats: int = 1) -> None:
        if repeats > 1 and not train:
            raise ValueError("repeated augmentation is for training only")
        self.num_samples, self.batch_size, self.train, self.repeats = len(samples), batch_size, train, repeats
        self.seed, self.rank, self.world_size, self.epoch, self.device = seed, rank, world_size, 0, device
        self.workers = SeededWorkers(samples, partial(_transformed, transform=transform), batch_size=batch_size,
                                     workers=workers, device=device)
        self._length = num_batches(len(samples), batch_size, train=train, rank=rank, world_size=world_size)

    def __len__(self) -> int:
        return self._length

    def set_epoch(self, epoch: int) -> None:
        """Order and augmentations both follow `(seed, epoch)`."""
        self.epoch = epoch

    def indices(self) -> torch.Tensor:
        """This rank's dataset indices of the current epoch, in visiting order."""
        sharding = dict(seed=self.seed, epoch=self.epoch, rank=self.rank, world_size=self.world_size)
        if self.repeats > 1:
            return repeated_indices(self.num_samples, self.batch_size, repeats=self.repeats, **sharding)
        return epoch_indices(self.num_samples, self.batch_size, train=self.train, **sharding)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # seeded by position, not index: repeated augmentation visits an index several times
        pairs = [(index, derive_seed(self.seed, self.epoch, self.rank, position))
                 for position, index in enumerate(self.indices().tolist())]
        for images, labels in self.workers.batches(pairs):
            yield images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
