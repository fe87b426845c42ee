"""Data-parallel training over processes started by ``torchrun`` (gloo on CPU, nccl on CUDA).

Gradients are averaged with one all-reduce per parameter after the backward pass (the semantics
of DistributedDataParallel, without its hooks, which do not support the double backward of the
Neumann log-det gradient). Rank 0's parameters and buffers (ActNorm statistics, spectral-norm
``u``/``v``) are broadcast after initialisation and after every optimizer step, so the
spectral-norm state stays identical on every rank.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn


def local_device(device: torch.device) -> torch.device:
    """Under torchrun, a CUDA device without an index becomes this process's GPU (``LOCAL_RANK``)."""
    if device.type == "cuda" and device.index is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return device


def init(device: torch.device) -> tuple[int, int]:
    """Join the process group when launched by torchrun (``WORLD_SIZE > 1``); ``(rank, world_size)``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def active() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def is_main() -> bool:
    return not active() or dist.get_rank() == 0


def barrier() -> None:
    if active():
        dist.barrier()


@torch.no_grad()
def broadcast_state(module: nn.Module) -> None:
    """Copy rank 0's parameters and floating buffers to every rank."""
    if not active():
        return
    for t in list(module.parameters()) + [b for b in module.buffers() if b.is_floating_point()]:
        dist.broadcast(t.data, src=0)


def average_gradients(module: nn.Module) -> None:
    """All-reduce and average every gradient (call after ``backward``, before ``step``)."""
    if not active():
        return
    world = dist.get_world_size()
    for p in module.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(world)


def all_ranks(flag: bool) -> bool:
    """True when ``flag`` holds on every rank (so that all ranks take the same branch)."""
    if not active():
        return flag
    t = torch.tensor([int(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def gather_objects(obj: object) -> list:
    """``obj`` of every rank, in rank order (a one-element list in a single process)."""
    if not active():
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def parameters_agree(module: nn.Module) -> bool:
    """Whether every rank holds bit-identical parameters and buffers (a checksum per rank)."""
    total = sum(float(t.detach().double().sum()) for t in list(module.parameters()) + list(module.buffers())
                if t.is_floating_point())
    return len(set(gather_objects(total))) == 1
