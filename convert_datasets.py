#!/usr/bin/env python3
"""Convert ImageNet, CIFAR-10/100, any image folder or scikit-learn's digits into FFCV and DALI formats.

    python convert_datasets.py {imagenet,cifar10,cifar100,imagefolder,digits} --out DIR [--source DIR] ...

Writes DIR/NAME/ffcv/{train,val}.beton, DIR/NAME/dali/{train,val}/shard-NNNNN.{tar,idx} and, last,
DIR/NAME/manifest.json. The code is the `convert` package; user guide: docs/converting.md.
"""
import sys

from convert.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
