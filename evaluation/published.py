"""The paper's top-1 results (docs/method.md §8), written once: `eval.py report` sets ours next to them.

Keyed by `(dataset, arch, patch_size)`, the dataset being the converted folder's name (as
`eval_results.jsonl` rows and training configs' `data.root` give it).
"""
from pathlib import Path

PROTOCOLS = ("knn", "linear", "finetune")
RESULTS_FILE = "eval_results.jsonl"  # eval.py's result rows, next to the weights (in the run folder)

# (dataset, arch, patch) -> pre-training epochs and top-1 % per protocol.
PUBLISHED: dict[tuple[str, str, int], dict[str, float]] = {
    ("imagenet", "vit_small", 16): {"pretrain_epochs": 300, "finetune": 82.8, "linear": 77.4, "knn": 73.3},
    ("imagenet", "vit_base", 16): {"pretrain_epochs": 300, "finetune": 84.1, "linear": 80.2, "knn": 76.2},
    ("cifar10", "vit_tiny", 2): {"pretrain_epochs": 800, "finetune": 97.5, "linear": 94.4, "knn": 92.9},
    ("cifar10", "vit_small", 2): {"pretrain_epochs": 800, "finetune": 98.1, "linear": 96.0, "knn": 94.6},
    ("cifar10", "vit_base", 2): {"pretrain_epochs": 800, "finetune": 98.3, "linear": 96.6, "knn": 95.8},
    ("cifar100", "vit_tiny", 2): {"pretrain_epochs": 800, "finetune": 84.9, "linear": 74.7, "knn": 68.8},
    ("cifar100", "vit_small", 2): {"pretrain_epochs": 800, "finetune": 86.0, "linear": 78.7, "knn": 75.4},
    ("cifar100", "vit_base", 2): {"pretrain_epochs": 800, "finetune": 86.0, "linear": 79.7, "knn": 75.7},
}


def published(dataset: str, arch: str, patch_size: int, protocol: str) -> float | None:
    """The paper's top-1 for this model, dataset and protocol (or its pre-training epochs for
    `protocol="pretrain_epochs"`), or None when it publishes none."""
    return PUBLISHED.get((dataset, arch, patch_size), {}).get(protocol)


def dataset_key(root: str | Path) -> str:
    """The dataset a converted folder (`data.root`) holds, as results and `PUBLISHED` name it: its name."""
    return Path(root).name
