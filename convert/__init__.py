"""The dataset converter behind `convert_datasets.py`: sources -> encode -> writers, driven by pipeline.

    sources/   what to convert, per dataset (image folder, ImageNet, CIFAR, digits), in a fixed order
    encode     decode once, to 8-bit RGB, shrink, encode as JPEG or PNG (runs in the worker processes)
    writers    WebDataset shards, the FFCV file, SHA-256 of every output file (all atomic)
    lock       one conversion at a time per output folder
    pipeline   the conversion: workers, shards in order, resume, the manifest
    verify     read the output back with FFCV's and DALI's readers and check it against the source
    cli        the command line

User guide: docs/converting.md.
"""


class ConvertError(Exception):
    """A problem with the input or the existing output: reported as one message, without a traceback."""
