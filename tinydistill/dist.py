"""torch.distributed plumbing both stages share: joining torchrun's group, devices, reductions."""

from __future__ import annotations

import functools
import os
from datetime import timedelta

import torch
import torch.distributed as dist

from .errors import TinydistillError

# How long a rank waits for the others in a gloo collective (barriers, objects). torch's default
# (10 minutes) is shorter than rank 0 may take to create a large store, or to write its last
# shards, while the other ranks wait; TINYDISTILL_DIST_TIMEOUT_S overrides it.
TIMEOUT_S = 4 * 3600
# NCCL collectives (DDP's all-reduces, the final counts) only run while every rank is stepping:
# when one rank dies the others must stop soon, not hang for hours holding the GPUs.
# TINYDISTILL_NCCL_TIMEOUT_MIN overrides it.
NCCL_TIMEOUT_MIN = 30


def timeout() -> timedelta:
    """The gloo groups' timeout (long: rank 0 may be creating a store)."""
    return timedelta(seconds=float(os.environ.get("TINYDISTILL_DIST_TIMEOUT_S", TIMEOUT_S)))


def nccl_timeout() -> timedelta:
    """The NCCL group's timeout (short: a dead rank ends the job in minutes)."""
    return timedelta(minutes=float(os.environ.get("TINYDISTILL_NCCL_TIMEOUT_MIN", NCCL_TIMEOUT_MIN)))


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_world() -> tuple[int, int]:
    """Rank and world size from torch.distributed, else RANK/WORLD_SIZE, else (0, 1)."""
    if active():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def setup(device: str, workers: int = 0) -> tuple[int, int, torch.device]:
    """Join torchrun's process group when launched by it (nccl on CUDA, else gloo);
    returns (rank, world, this rank's device).

    The main process's torch threads leave one core to each DataLoader worker (unless
    OMP_NUM_THREADS says otherwise): OpenMP threads that share cores with busy workers spin
    and run several times slower than one thread alone, and on a GPU node the workers are
    the ones that need the cores.
    """
    world = int(os.environ.get("WORLD_SIZE", 1))
    cuda = device.startswith("cuda")
    if workers > 0 and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(int(os.environ.get("LOCAL_WORLD_SIZE", 1)), 1) - workers))
    if cuda and not torch.cuda.is_available():
        raise TinydistillError(f"--device {device}: no CUDA device is available here")
    from .cuda import select_device

    dev = select_device(device, world, int(os.environ.get("LOCAL_RANK", 0)))  # before NCCL: its rank's GPU
    if world > 1 and not active():
        dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=nccl_timeout() if cuda else timeout())
    rank, world = rank_world()
    return rank, world, dev


def gpu_defaults(benchmark: bool = False) -> None:
    """What timm's scripts set on a GPU (flags only CUDA reads, so set alike on every device):
    TF32 for float32 matmuls and convolutions (what ``--amp none`` runs in on Ampere and
    later), and with ``benchmark`` cuDNN timing its algorithms once per input shape. Not for
    stored values: the fastest algorithm by timing can change between runs, and ``verify``
    must recompute a store's values to the bit."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    if benchmark:
        torch.backends.cudnn.benchmark = True


def amp_dtype(amp: str | None) -> torch.dtype | None:
    """The autocast dtype of an ``--amp`` value (None: no autocast)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp or "none")


def default_device() -> str:
    """cuda when a GPU is visible, else cpu."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def keeps_threads(fn):
    """Restore torch's CPU thread count after ``fn``: callers (notebooks, tests) keep theirs."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        threads = torch.get_num_threads()
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)

    return wrapper


def barrier() -> None:
    """Wait for every rank (through the gloo group: no NCCL watchdog on a long wait)."""
    if active():
        dist.barrier(group=_objects_group())


def broadcast_error(msg: str | None) -> None:
    """Rank 0's set-up failure stops every rank with the same one-line message."""
    if active():
        box = [msg]
        dist.broadcast_object_list(box, src=0, group=_objects_group())
        msg = box[0]
    if msg:
        raise TinydistillError(msg)


def broadcast(obj, src: int = 0):
    """Rank ``src``'s ``obj`` on every rank (through the gloo group); ``obj`` without torch.distributed."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=_objects_group())
    return box[0]


_cpu_group = None


def gather_parts(obj, dst: int) -> list | None:
    """Every rank's ``obj`` on rank ``dst``, in rank order (None on the others); ``[obj]``
    without torch.distributed. Goes through a gloo group, so objects never touch GPU memory
    (every rank must call it, in the same order)."""
    if not active():
        return [obj]
    out = [None] * dist.get_world_size() if dist.get_rank() == dst else None
    dist.gather_object(obj, out, dst=dst, group=_objects_group())
    return out


def _objects_group():
    """A gloo group (with :func:`timeout`) for Python objects, so they never touch GPU memory."""
    global _cpu_group
    if _cpu_group is None:
        _cpu_group = (dist.new_group(backend="gloo", timeout=timeout()) if dist.get_backend() != "gloo"
                      else dist.group.WORLD)
    return _cpu_group


def all_reduce(values: list[float], op: str = "sum") -> list[float]:
    """Sum (or min) a few numbers over ranks; the values themselves without torch.distributed."""
    if not active():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    if dist.get_backend() == "nccl":  # nccl reduces CUDA tensors only
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MIN if op == "min" else dist.ReduceOp.SUM)
    return t.cpu().tolist()
