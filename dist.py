"""Several GPUs (or CPU processes) through torchrun and DistributedDataParallel.

    torchrun --nproc_per_node 2 train.py --arch qwen --data beauty

Every rank builds the same data, SID table and model from the same seeds; DDP broadcasts rank 0's
weights once and averages the gradients during backward. An optimiser step takes `world * accum`
consecutive batches of the epoch's shuffled list (the same list on every rank): rank r trains on
batches r, r + world, ... of them, so the ranks see disjoint samples that together cover the epoch,
and a checkpoint's place in the list means the same thing on any number of ranks. Evaluation
splits the users the same way and sums the metrics' totals, so every user counts once. Only rank 0
prints and writes files. Launched without torchrun, everything here is a no-op (world size 1).
"""
import os

import torch
import torch.distributed as D
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel


def init():
    """(rank, world size). Starts the process group when torchrun launched several processes: NCCL
    on GPUs (one per process, by LOCAL_RANK), gloo on the CPU."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return 0, 1
    if not D.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        D.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return D.get_rank(), D.get_world_size()


def rank_world():
    return (D.get_rank(), D.get_world_size()) if D.is_available() and D.is_initialized() else (0, 1)


class Loss(nn.Module):
    """DDP synchronises the gradients of what its forward() computes, so the loss goes through it."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch):
        return self.model.loss(batch)


def wrap(model):
    """The loss function a training step calls: model.loss, or under torchrun the same loss through
    DDP (whose no_sync() skips the all-reduce on the micro-batches before the last one)."""
    if rank_world()[1] == 1:
        return model.loss
    device = next(model.parameters()).device
    # Gradients as views of DDP's communication buckets: no copy into the buckets before each
    # all-reduce. Qwen 0.5B shape on 2 H200s: 1.75x -> 1.85x one GPU's samples/s (README).
    return DistributedDataParallel(Loss(model), device_ids=[device.index] if device.type == "cuda" else None,
                                   gradient_as_bucket_view=True)


def my_batches(epoch, start, accum):
    """This rank's micro-batches of the optimiser step that begins at batch `start` of the epoch list."""
    rank, world = rank_world()
    return epoch[start + rank:start + world * accum:world]


def shard(n):
    """This rank's share of n evaluation users."""
    rank, world = rank_world()
    return slice(rank, n, world)


def mean_over_ranks(means, n):
    """Per-rank means over n users each -> the means over all users (sums and counts all-reduced)."""
    if rank_world()[1] == 1:
        return means
    device = "cuda" if D.get_backend() == "nccl" else "cpu"
    t = torch.tensor([v * n if n else 0.0 for v in means.values()] + [n], dtype=torch.float64, device=device)
    D.all_reduce(t)
    return {k: (t[i] / t[-1]).item() for i, k in enumerate(means)}


def say(*args, **kwargs):
    """print, on rank 0 only."""
    if rank_world()[0] == 0:
        print(*args, **kwargs)


def barrier():
    if rank_world()[1] > 1:
        D.barrier()


def close(together=True):
    """Leave the process group, after a barrier when all ranks got here: a rank that tears gloo down
    while its peer is still in its last collective can abort the peer ("terminate called without an
    active exception", seen once in the CPU test of two ranks). After an error, leave at once: the
    other ranks may never come."""
    if D.is_available() and D.is_initialized():
        if together:
            D.barrier()
        D.destroy_process_group()
