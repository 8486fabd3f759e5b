"""Running as one of several processes started by torchrun: which one this is, and the few
collective steps the commands need. Started any other way, a command is process 0 of 1."""
import os

from torch import distributed as dist


def rank_and_size():
    """(this process's rank, the number of processes) of a torchrun launch; (0, 1) otherwise."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def local_rank_and_size():
    """This process's rank and the number of processes on this machine."""
    return int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("LOCAL_WORLD_SIZE", 1))


def start(device):
    """Join the launch's process group: NCCL on GPUs, gloo on CPUs. Nothing for one process."""
    if rank_and_size()[1] > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def barrier():
    """Wait until every process gets here."""
    if dist.is_initialized():
        dist.barrier()


def shard(count, unit=1):
    """This process's rows [start, stop) of `count` rows split into contiguous, near-equal parts
    made of whole units of `unit` rows (batches: each batch is the one a single process would run)."""
    rank, size = rank_and_size()
    units = -(-count // unit)
    return min(count, units * rank // size * unit), min(count, units * (rank + 1) // size * unit)
