"""What every rank must decide together after each step, agreed one step late without a host sync.

After step N each rank submits three flags: its loss was not finite, it received a stop signal
(SIGTERM/SIGINT), a checkpoint is due by its clock. They are OR-ed over ranks by an all-reduce
launched asynchronously right after the step, and copied to pinned host memory behind a CUDA
event. The host reads them while step N+1 runs on the device (`resolve`, called after step N+1
was launched), so the device never waits for the host and every rank acts on the same step:
stop, checkpoint, or fail with the non-finite loss named.
"""
import math
from collections import deque
from dataclasses import dataclass

import torch
import torch.distributed as dist

from model.collectives import world_size
from trainer import TrainingError

NONFINITE, STOP, SAVE = range(3)


@dataclass(frozen=True)
class Agreement:
    """The agreed decision after `step` (its 1-based count of steps done)."""

    step: int
    nonfinite: bool  # some rank's loss terms were not all finite
    stop: bool  # some rank was asked to stop
    save: bool  # some rank's checkpoint timer fired
    terms: dict[str, float]  # this rank's loss terms of that step (for the error message)


class StopAgreement:
    """Submit each step's flags with `submit`; `settled` returns what was agreed up to the previous step."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.on_gpu = device.type == "cuda"
        # Two host buffers for the signal/timer flags, alternately written: buffer k was last read by
        # the copy submitted two steps ago, which `resolve` has waited for since.
        self._host = [torch.zeros(2, pin_memory=self.on_gpu) for _ in range(2)]
        self._pending: deque = deque()
        self._count = 0

    def submit(self, step: int, terms: dict[str, torch.Tensor], stop: bool, save: bool) -> None:
        """Queue step `step`'s flags; nothing here waits for the device."""
        values = torch.stack([t.detach().float() for t in terms.values()])
        host = self._host[self._count % 2]
        self._count += 1
        host[0].fill_(float(stop))  # fill_ takes a Python number: no host tensor is made
        host[1].fill_(float(save))
        flags = torch.cat([(~torch.isfinite(values)).any().float()[None],
                           host.to(self.device, non_blocking=True)])
        work = dist.all_reduce(flags, op=dist.ReduceOp.MAX, async_op=True) if world_size() > 1 else None
        event = None
        if self.on_gpu:
            if work is not None:
                work.wait()  # NCCL: orders the copy after the all-reduce on the stream; the host goes on
                work = None
            flags, values = flags.to("cpu", non_blocking=True), values.to("cpu", non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        self._pending.append((step, list(terms), flags, values, work, event))

    def settled(self, everything: bool = False) -> Agreement:
        """The agreement over every queued step but the newest (one step late: the device is still
        busy with the newest), or over all of them when `everything` (waits for the device: at
        logging and before checkpoints). Raises `NonFiniteLoss` if a step's loss was not finite."""
        decided = [self._resolve() for _ in range(len(self._pending) - (0 if everything else 1))]
        for agreement in decided:
            if agreement.nonfinite:
                raise NonFiniteLoss(agreement)
        return Agreement(max((a.step for a in decided), default=0), False, any(a.stop for a in decided),
                         any(a.save for a in decided), {})

    def _resolve(self) -> Agreement:
        """The oldest queued step's agreement, waiting for it if needed."""
        step, names, flags, values, work, event = self._pending.popleft()
        if work is not None:
            work.wait()
        if event is not None:
            event.synchronize()
        nonfinite, stop, save = (bool(flag) for flag in flags.tolist())
        return Agreement(step, nonfinite, stop, save, dict(zip(names, values.tolist())))


class NonFiniteLoss(TrainingError):
    """Some rank's loss was not finite at a step: names the step and this rank's non-finite terms."""

    def __init__(self, agreement: Agreement) -> None:
        bad = [f"{name}={value:.4g}" for name, value in agreement.terms.items() if not math.isfinite(value)]
        super().__init__(f"non-finite loss at step {agreement.step}: {', '.join(bad) or 'on another rank'}")
        self.step = agreement.step
