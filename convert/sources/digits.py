"""`digits`: scikit-learn's bundled 8x8 handwritten digits, as 32x32 RGB (offline; the demo dataset)."""
from __future__ import annotations

import numpy as np
from PIL import Image

from convert.sources.base import Sample, Source

# sklearn's digits are 8x8 with values 0-16; stored as 32x32 RGB so that CIFAR-sized models and crops apply.
DIGITS_SIZE = 32


def read_digits() -> Source:
    """scikit-learn's bundled 1,797 handwritten digits, upscaled to 32x32 RGB, split 80/20 stratified by
    class with a fixed seed (1,437 train, 360 val)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    grey = np.rint(digits.images * (255 / 16)).astype(np.uint8)
    images = np.stack([np.asarray(Image.fromarray(g).resize((DIGITS_SIZE, DIGITS_SIZE), Image.Resampling.BICUBIC)
                                  .convert("RGB")) for g in grey])
    train, val = train_test_split(np.arange(len(images)), test_size=0.2, stratify=digits.target, random_state=0)
    splits = {split: [Sample(f"digits[{i}]", int(digits.target[i]), images[i]) for i in sorted(indices)]
              for split, indices in (("train", train), ("val", val))}
    return Source([str(d) for d in range(10)], splits, None)
