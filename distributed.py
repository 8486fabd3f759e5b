"""Running as one of several processes started by torchrun: which one this is, and the few
collective steps the commands need. Started any other way, a command is process 0 of 1."""
import os

import torch
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


def finish():
    """Leave the process group at the end of a command."""
    if dist.is_initialized():
        dist.destroy_process_group()


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


def parallel(module, device, find_unused=False):
    """module wrapped in DistributedDataParallel (its forward averages gradients across processes
    in backward); module itself for one process. find_unused: some steps may leave parameters out
    of the loss (self-critical samples that all end at the first word never embed a word)."""
    if not dist.is_initialized():
        return module
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=find_unused)


def any_process(flag):
    """True on every process when flag is true on any (e.g. one process was told to stop)."""
    if not dist.is_initialized():
        return bool(flag)
    flag = torch.tensor([float(bool(flag))], device=_collective_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def sums(values):
    """Each value summed over all processes (floats)."""
    if not dist.is_initialized():
        return list(values)
    total = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    dist.all_reduce(total)
    return total.tolist()


def merged(part):
    """The dicts of all processes merged into one, on every process."""
    if not dist.is_initialized():
        return part
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, part)
    return {key: value for each in parts for key, value in each.items()}


def from_process_0(compute):
    """compute() on process 0 only (it reads a file there, or starts Java); its result, or its
    error, reaches every process."""
    if not dist.is_initialized():
        return compute()
    box = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = (compute(), None)
        except Exception as error:  # every process raises it, none waits forever
            box[0] = (None, error)
    dist.broadcast_object_list(box, src=0)
    result, error = box[0]
    if error is not None:
        raise error
    return result


def _collective_device():
    """NCCL reduces tensors on this process's GPU, gloo on the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
