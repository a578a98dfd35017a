"""Processes: one code path for a plain run (a world of one) and torchrun on one node or many.

Every process drives one GPU (NCCL) or one CPU worker (gloo). A script starts the group once and ends it once:

    with processes.started(timeout_minutes=5) as procs:     # procs.rank, procs.world_size, procs.device
        ...
"""
import contextlib
import gc
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Processes:
    """This process's place in the run: its rank of world_size, and the device it drives."""
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self):
        """Rank 0: the process that writes files and logs."""
        return self.rank == 0

    def say(self, *args, **kwargs):
        """print, on rank 0 alone."""
        if self.main:
            print(*args, **kwargs)


@contextlib.contextmanager
def started(timeout_minutes=5.0):
    """The script's processes: joins torchrun's group on entry (if any), leaves it on exit, on errors too.

    timeout_minutes: how long a collective waits for a lost peer before it fails and the job ends."""
    cuda = torch.cuda.is_available()
    joined = "RANK" in os.environ and not dist.is_initialized()
    if joined:
        timeout = timedelta(minutes=timeout_minutes)
        store, rank, world_size = next(dist.rendezvous("env://", timeout=timeout))
        # torchrun --max-restarts keeps its store across restarts: each attempt's keys get their own prefix,
        # or a restarted process may read a dead peer's address and fail to connect.
        store = dist.PrefixStore(f"attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', 0)}", store)
        dist.init_process_group("nccl" if cuda else "gloo", store=store, rank=rank, world_size=world_size,
                                timeout=timeout)
    rank = dist.get_rank() if dist.is_initialized() else 0
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    # LOCAL_RANK, not the global rank, picks the GPU: on a second node rank 8 drives cuda:0.
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    try:
        yield Processes(rank, world_size, device)
    finally:
        if joined:
            dist.destroy_process_group()
            # Garbage left in reference cycles can hold gloo's work objects; freed at interpreter exit, they
            # abort the process now and then ("terminate called without an active exception"). Free it now.
            gc.collect()


@contextlib.contextmanager
def rank0_first(procs):
    """Rank 0 runs the block first (it fills a download cache), then the others: none waits on an error."""
    if procs.rank > 0:
        dist.barrier()
    try:
        yield
    finally:
        if procs.main and procs.world_size > 1:
            dist.barrier()


# ----- Collectives -----
def all_reduce_mean(values, procs):
    """The mean over processes of a 1D tensor (itself in a world of one)."""
    if procs.world_size == 1:
        return values
    values = values.clone()
    dist.all_reduce(values)
    return values / procs.world_size


def gather_objects(obj, procs):
    """[obj of rank 0, obj of rank 1, ...] on every process."""
    objects = [obj] * procs.world_size
    if procs.world_size > 1:
        dist.all_gather_object(objects, obj)
    return objects


def gather_to_rank0(obj, procs):
    """[obj of rank 0, obj of rank 1, ...] on rank 0, None elsewhere: only rank 0 holds them all (images)."""
    if procs.world_size == 1:
        return [obj]
    objects = [None] * procs.world_size if procs.main else None
    dist.gather_object(obj, objects, dst=0)
    return objects


def first_failure(failure, procs):
    """Every process calls it (a barrier too): the first process's failure message, or None if none failed."""
    return next((message for message in gather_objects(failure, procs) if message), None)
