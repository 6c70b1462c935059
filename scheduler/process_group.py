"""How tensor-parallel ranks find each other: one process group for the forward's collectives, one for control."""
from datetime import timedelta

import torch
import torch.distributed as dist

STORE_HOST = "127.0.0.1"
# Collectives inside a forward: a peer that takes longer than this is treated as hung.
COLLECTIVE_TIMEOUT = timedelta(minutes=10)
# The control group carries the per-step broadcasts; workers wait on it while the server is idle, for days.
CONTROL_TIMEOUT = timedelta(days=365)


def rank_device(device: torch.device, rank: int) -> torch.device:
    """Rank r runs on cuda:r (one GPU per rank), or on the CPU."""
    return device if device.type == "cpu" else torch.device("cuda", rank)


def join_process_group(rank: int, world_size: int, store: dist.Store, device: torch.device) -> dist.ProcessGroup:
    """Initializes the default group (NCCL on CUDA, gloo on CPU) for the forward's collectives and returns the gloo
    control group that carries the step broadcasts."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=COLLECTIVE_TIMEOUT)
    return dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)


def min_over_ranks(value: int, group: dist.ProcessGroup) -> int:
    tensor = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN, group=group)
    return int(tensor.item())
