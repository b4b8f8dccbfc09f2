"""Data parallelism across processes started by a launcher (`accelerate launch`, `torchrun`): several GPUs of one
machine (or several CPU processes) train one centralized selector, or run phase 2 (generation and DPO), together.

Every process holds the whole model and the same data, draws the same batches, and computes its share of each
one (rows rank, rank + world, ...); the adapter's gradients are summed across processes before every optimizer
step, so the adapter stays identical everywhere and equals what one process would train on the whole batch.
Accelerate starts the processes and joins them (gloo on CPUs, NCCL on GPUs); its ``Accelerator.prepare`` is not
used because DDP syncs gradients from hooks on the wrapped module's forward, and the cached selector path runs
the decoder in pieces that bypass it. Summing the adapter's few megabytes of gradients by hand works on both
paths.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def launched() -> bool:
    """Whether a launcher started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def join() -> None:
    """Join the launcher's process group (once); a no-op in a single process."""
    if launched() and not (dist.is_available() and dist.is_initialized()):
        from accelerate import PartialState

        PartialState()  # reads the launcher's environment, picks gloo or NCCL, sets this process's GPU


def world() -> tuple[int, int]:
    """(this process's rank, the number of processes); (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return world()[0] == 0


def sum_gradients(params: list[torch.nn.Parameter]) -> None:
    """Sum every parameter's gradient across processes (a missing one counts as zeros), in one flat buffer."""
    if world()[1] == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat)
    offset = 0
    for p in params:
        n = p.grad.numel()
        p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
        offset += n


def sum_scalars(*values: float) -> list[float]:
    """Python numbers summed across processes."""
    if world()[1] == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return t.cpu().tolist()


def all_gather_objects(obj) -> list:
    """Every process's ``obj`` (picklable), in rank order; ``[obj]`` in a single process."""
    if world()[1] == 1:
        return [obj]
    out = [None] * world()[1]
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj):
    """Rank 0's ``obj`` on every process: one version of a result that floating-point nondeterminism could make
    differ between GPUs (the selectors' labels), so that every process trains on the same pairs."""
    if world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
