"""Every CUDA-only line of tinydistill: the side stream device rendering runs on, the events
that order it with the model's stream, and asynchronous copies back to the host. Each call is
a no-op (or its plain equivalent) on other devices, so the code around them is the same on
every device and runs in the CPU tests."""

from __future__ import annotations

import contextlib

import torch


def select_device(device, world: int = 1, local_rank: int = 0) -> torch.device:
    """The device this process runs on, made CUDA's current device when it is a GPU: under
    torchrun (``world`` > 1) cuda:``local_rank``, else ``device`` as given (``cuda`` alone: the
    current one). Calls that take no device (events, nvjpeg's decoder, ``torch.cuda.*``) then
    go to it, not to cuda:0. Other devices are returned as they are."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return dev
    if world > 1:
        dev = torch.device("cuda", int(local_rank))
    elif dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    torch.cuda.set_device(dev)
    return dev


class SideStream:
    """The CUDA-only part of device rendering, in one place: a side stream to render on, an
    event per unit that the consumer's stream waits on, ``record_stream`` so the caching
    allocator does not reuse an image's memory while the consumer still reads it, and an
    explicit wait before each unit so images decoded by nvjpeg (which may use its own
    stream) never land in blocks the previous unit still reads. Elsewhere every call is a no-op.

    Take it with :meth:`of`: one per device for the whole process, since the caching allocator
    keeps each stream's blocks apart (a new stream per epoch would grow reserved memory)."""

    _made: dict = {}

    @classmethod
    def of(cls, device) -> "SideStream":
        """This process's side stream on ``device`` (made on first use)."""
        device = torch.device(device)
        if device not in cls._made:
            cls._made[device] = cls(device)
        return cls._made[device]

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.side = torch.cuda.Stream(device) if self.cuda else None

    def bind_thread(self) -> None:
        if self.cuda and self.device.index is not None:
            torch.cuda.set_device(self.device)

    def rendering(self):
        return torch.cuda.stream(self.side) if self.cuda else contextlib.nullcontext()

    def before_unit(self) -> None:
        if self.cuda:
            self.side.synchronize()  # the previous unit's kernels are done with their blocks

    def done(self):
        if not self.cuda:
            return None
        ev = torch.cuda.Event()
        ev.record(self.side)
        return ev

    def hand_over(self, batch, ready) -> None:
        """Let the consumer's stream use ``batch`` (a :class:`~tinydistill.batch.Batch`)."""
        if not self.cuda:
            return
        cur = torch.cuda.current_stream(self.device)
        cur.wait_event(ready)
        for v in vars(batch).values():
            if torch.is_tensor(v) and v.is_cuda:
                v.record_stream(cur)



class HostCopy:
    """Tensors copied to the host without stalling the device queue: the copies are queued
    now (into pinned memory on CUDA) and :meth:`get` waits for them only when the values are
    needed, typically one batch later. On the CPU the tensors are the values."""

    def __init__(self, *tensors: torch.Tensor):
        self.ready = None
        if tensors and tensors[0].is_cuda:
            self.tensors = tuple(t.to("cpu", non_blocking=True) for t in tensors)
            self.ready = torch.cuda.Event()
            self.ready.record(torch.cuda.current_stream(tensors[0].device))  # where the copies queue
        else:
            self.tensors = tuple(t.detach() for t in tensors)

    def get(self) -> tuple:
        if self.ready is not None:
            self.ready.synchronize()
        return self.tensors
