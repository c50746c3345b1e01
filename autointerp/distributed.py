"""torch.distributed helpers shared by `sae train` and `collect` under torchrun.

The documents are split between the ranks by batch: batch b (of `batch_size` documents, in
corpus order) is run through the language model by rank b % world, so each rank's forward pass
sees about 1/world of the tokens, and every batch holds the same documents as in a
single-process run (hence the same activations).
"""

from __future__ import annotations

import os
import sys
from typing import Any, Iterator

import torch
import torch.distributed as dist


def rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env() -> tuple[int, int]:
    """Join the process group torchrun describes (WORLD_SIZE > 1): NCCL with GPUs, else gloo."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            dist.init_process_group("nccl")
        else:
            dist.init_process_group("gloo")
    return rank_world()


def leave(code: int = 0) -> None:
    """End a torchrun rank once its work is written: wait for the other ranks, then exit without
    destroying the process group or finalising the interpreter. gloo's worker threads can abort
    either (SIGABRT, "terminate called without an active exception"; seen on CI, cf.
    pytorch/pytorch#179291), which would turn a finished run into a failed one."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def comm_device() -> torch.device:
    """Where collective tensors must live: the rank's GPU for NCCL, the CPU for gloo."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_rows(t: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's [n_r, ...] tensor (n_r may differ), in rank order, on every rank."""
    rank, world = rank_world()
    if world == 1:
        return [t]
    device = comm_device()
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([t.shape[0]], dtype=torch.long, device=device))
    sizes = [int(s.item()) for s in sizes]
    padded = torch.zeros((max(sizes), *t.shape[1:]), dtype=t.dtype, device=device)
    padded[:t.shape[0]] = t.to(device)
    out = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(out, padded)
    return [o[:n].to(t.device) for o, n in zip(out, sizes)]


def gather_to_first(obj: Any) -> list[Any] | None:
    """Every rank's picklable object on rank 0 (in rank order); None on the other ranks."""
    rank, world = rank_world()
    if world == 1:
        return [obj]
    out = [None] * world if rank == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast_from_first(obj: Any) -> Any:
    """Rank 0's picklable object, on every rank."""
    if rank_world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gathered_rounds(local: Iterator[torch.Tensor]) -> Iterator[torch.Tensor]:
    """The whole stream on every rank, in single-process order, from each rank's share of it.

    `local` yields this rank's chunks of the rounds it takes part in: round r holds batches
    r*world .. r*world + world-1, rank k holds batch r*world + k. Every rank yields batch 0, 1,
    2, ... (an empty chunk where a rank had no batch left); the ranks stop together.
    """
    rank, world = rank_world()
    if world == 1:
        yield from local
        return
    device = comm_device()
    local = iter(local)
    while True:
        chunk = next(local, None)
        flag = torch.tensor([chunk is not None], dtype=torch.long, device=device)
        flags = [torch.zeros_like(flag) for _ in range(world)]
        dist.all_gather(flags, flag)
        if not any(int(f.item()) for f in flags):
            return
        if chunk is None:  # this rank is out of batches in the last round: an empty [0, d] chunk
            width = torch.zeros(1, dtype=torch.long, device=device)
            dist.all_reduce(width, op=dist.ReduceOp.MAX)
            chunk = torch.zeros((0, int(width.item())))
        else:
            width = torch.tensor([chunk.shape[1]], dtype=torch.long, device=device)
            dist.all_reduce(width, op=dist.ReduceOp.MAX)
        for part, present in zip(all_gather_rows(chunk), flags):
            if int(present.item()):
                yield part
