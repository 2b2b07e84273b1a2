"""Multi-process training helpers: `torchrun --nproc_per_node=N script.py ...` sets RANK / WORLD_SIZE; a plain run
is rank 0 of 1, and every helper here is then a no-op. NCCL on GPU, gloo on CPU. Plumbing, not the method: the method
is in wmpo.py.
"""

import os

import torch
import torch.distributed as dist
import torch.nn as nn


def dist_init() -> tuple[int, int]:
    """(rank, world size). Under torchrun, joins the process group: NCCL on GPU, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return rank_world()


def rank_world() -> tuple[int, int]:
    """(rank, world size) of the process group already joined, (0, 1) without one; never joins one itself."""
    return (dist.get_rank(), dist.get_world_size()) if distributed() else (0, 1)


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized()  # a torch build without distributed has no is_initialized


def all_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of a tensor over ranks (the tensor itself in a single process)."""
    if distributed():
        x = x.clone()
        dist.all_reduce(x)
    return x


def barrier() -> None:
    if distributed():
        dist.barrier()


def wrap_ddp(model: nn.Module) -> nn.Module:
    """DistributedDataParallel around `model` when running under torchrun, else the model itself."""
    return nn.parallel.DistributedDataParallel(model) if distributed() else model


def mean_grads(model: nn.Module) -> None:
    """Average gradients over ranks by hand, for losses that are not a module's forward (GRPO's logprob)."""
    if not distributed():
        return
    for p in model.parameters():  # every parameter on every rank: the ranks' all-reduce calls must pair up
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad /= dist.get_world_size()
