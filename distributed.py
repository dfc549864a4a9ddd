"""How the processes share the work: one process group for 1 or N processes (with a timeout), FSDP2
sharding, sums and agreements over ranks, and the memory a process holds.

The sharding policy is chosen here, once, outside the model: every block is one FSDP unit, the root holds
the embedding, final norm and head; bf16 parameters with fp32 gradient reduction on CUDA, fp32 on CPU.
A plain `python train.py` is a group of one, so the code path is the same for 1 and N processes.
"""
import os
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist


# A collective that waits this long for its peers fails with an error instead of hanging: ranks that run
# different collectives (a bug) never pair up. Long enough for rank 0 to write a large checkpoint.
TIMEOUT = timedelta(seconds=float(os.environ.get("OPD_DIST_TIMEOUT_S", 600)))


def setup_dist(device_arg):
    """Process group for 1 or N processes (torchrun sets RANK/WORLD_SIZE); returns (rank, world, device)."""
    cuda = device_arg == "cuda" or (device_arg == "auto" and torch.cuda.is_available())
    if device_arg == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but CUDA is not available")
    backend = "nccl" if cuda else "gloo"
    if "RANK" in os.environ:
        local = int(os.environ.get("LOCAL_RANK", 0))
        device = torch.device("cuda", local) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group(backend, device_id=device if cuda else None, timeout=TIMEOUT)
    else:  # plain `python train.py`: a group of one, so the FSDP code path is the same
        device = torch.device("cuda", 0) if cuda else torch.device("cpu")
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return dist.get_rank(), dist.get_world_size(), device


def compute_dtype(device):
    """The dtype shard's models compute in: bf16 on CUDA, fp32 on CPU."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def shard(model, device):
    """FSDP2: each block is one all-gather unit, the root holds the embedding, final norm and head. On CUDA
    the parameters are gathered in bf16 and gradients reduced in fp32 (the fp32 master weights stay
    sharded); the losses upcast one chunk of positions at a time. CPU runs fp32."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if device.type == "cuda" \
        else MixedPrecisionPolicy()
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


@contextmanager
def decoding(model):
    """Keep FSDP's blocks unsharded between decode steps, or every token re-gathers every block."""
    fsdp = hasattr(model, "set_reshard_after_forward")
    if fsdp:
        model.set_reshard_after_forward(False)
    try:
        yield
    finally:
        if fsdp:
            model.set_reshard_after_forward(True)


@torch.no_grad()
def full_parameters(model):
    """{name: the whole parameter}, gathered from FSDP's shards (an all-gather each) on every rank."""
    from torch.distributed.tensor import DTensor
    return {name: p.full_tensor() if isinstance(p, DTensor) else p for name, p in model.named_parameters()}


def any_rank(flag, device):
    """Whether flag is true on any rank: a branch that changes which FSDP forwards a rank runs must be taken
    by every rank, or the ranks' all-gathers no longer pair up."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return bool(flag)
    t = torch.tensor(float(bool(flag)), device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item() > 0


def all_sum(x, device):
    t = torch.tensor(float(x), device=device, dtype=torch.float64)
    dist.all_reduce(t)
    return t.item()


def optimizer_state_bytes(optimizer):
    """Bytes of this rank's optimizer state (AdamW: two moments per trainable number, and a step count)."""
    local = lambda t: t.to_local() if hasattr(t, "to_local") else t  # noqa: E731  an FSDP2 shard
    return sum(local(t).nbytes for st in optimizer.state.values() for t in st.values() if torch.is_tensor(t))


def peak_mem_mb(device):
    """CUDA: the most memory allocated; CPU: the process's peak resident set (only grows)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    import resource
    import sys
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / 2 ** 20 if sys.platform == "darwin" else rss / 2 ** 10
