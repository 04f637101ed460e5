"""What a CPU can count of a GPU path: the aten ops it dispatches and the ones that would make
the host wait for a GPU.

`OpCounter` is a `TorchDispatchMode`: every aten op run under it is counted. Ops are
*sync-prone* when, on CUDA tensors, they block the host until the device catches up:

- a device value read on the host: `_local_scalar_dense` (`.item()`, `float(t)`, `bool(t)`,
  `if t:`) and `Tensor.tolist()` (which dispatches no aten op on CPU, so it is patched);
- output sizes that depend on data: `nonzero` (and boolean-mask indexing, which calls it),
  `masked_select`, `unique`, `repeat_interleave` without `output_size`;
- host data turned into a tensor (`lift_fresh`: `torch.tensor(list)`, `torch.as_tensor`,
  `torch.from_numpy`): on CUDA, a copy from pageable host memory, which synchronises;
- copies between devices that are not `non_blocking` (seen only when a GPU is used).

Counting on CPU is how the tests and `bench.py` hold the GPU paths to "no host sync" without a
GPU; on a GPU, `torch.cuda.set_sync_debug_mode` checks the same promise for real.
"""
from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

SYNC_PRONE = frozenset({
    "aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten._unique", "aten._unique2",
    "aten.unique_consecutive", "aten.unique_dim", "aten.lift_fresh",
})


def _name(func: Any) -> str:
    """`aten.add.Tensor` -> `aten.add` (overloads are one op for counting)."""
    return f"{func.namespace}.{func.__name__.split('.')[0]}"


def _devices(tree: Any) -> set[torch.device]:
    tensors = tree if isinstance(tree, (list, tuple)) else [tree]
    return {t.device for t in tensors if isinstance(t, torch.Tensor)}


class OpCounter(TorchDispatchMode):
    """Counts the aten ops run inside `with OpCounter() as counter:` (`counter.ops`), and the
    sync-prone ones among them (`counter.sync_prone`), by op name."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.sync_prone: Counter[str] = Counter()
        self._tolist = torch.Tensor.tolist

    def __enter__(self) -> OpCounter:
        counter, tolist = self, self._tolist

        def counted_tolist(tensor: torch.Tensor) -> Any:
            counter.sync_prone["Tensor.tolist"] += 1
            return tolist(tensor)

        torch.Tensor.tolist = counted_tolist
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = _name(func)
        self.ops[name] += 1
        if name in SYNC_PRONE or self._blocking_copy(name, args, kwargs) or self._data_dependent(name, args, kwargs):
            self.sync_prone[name] += 1
        return func(*args, **kwargs)

    @staticmethod
    def _data_dependent(name: str, args: tuple, kwargs: dict) -> bool:
        """Boolean-mask indexing and `repeat_interleave(repeats)` without `output_size`: the output's
        size is read from the device."""
        if name == "aten.index":
            return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1])
        return name == "aten.repeat_interleave" and len(args) == 1 and kwargs.get("output_size") is None

    @staticmethod
    def _blocking_copy(name: str, args: tuple, kwargs: dict) -> bool:
        """A copy between a CPU and a CUDA tensor that the host must wait for."""
        if name == "aten._to_copy":
            target = kwargs.get("device")
            source = args[0].device
            return (target is not None and torch.device(target).type != source.type
                    and not kwargs.get("non_blocking", False))
        if name == "aten.copy_":
            devices = _devices(args[:2])
            return len({d.type for d in devices}) > 1 and not (args[2] if len(args) > 2 else kwargs.get("non_blocking"))
        return False

    @property
    def total(self) -> int:
        return sum(self.ops.values())

    @property
    def total_sync_prone(self) -> int:
        return sum(self.sync_prone.values())

    def summary(self) -> dict[str, Any]:
        """JSON-ready counts: totals and the sync-prone ops by name."""
        return {"aten_ops": self.total, "sync_prone_ops": self.total_sync_prone,
                "sync_prone_by_op": dict(self.sync_prone)}
