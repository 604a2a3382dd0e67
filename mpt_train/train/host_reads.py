"""Reading a step's numbers back from the GPU without waiting for the work queued after them.

A plain ``.item()`` or ``.tolist()`` waits for everything queued on the stream so far. After a
training step that is the optimizer update (~15-20 ms at MPT-1B on one H100): the host sits
idle until it ends, and only then runs the between-step work (callbacks, loggers, the
scheduler, the next batch) while the GPU sits idle in turn. The loss, the loss guard's
statistics and the gradient norm are final once the backward is done, so they are copied to
pinned host memory right then (:func:`read_later`), in stream order, and read after the
optimizer kernels are queued: the host waits for the backward only, and its between-step work
overlaps the update.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

__all__ = ["beside_the_update", "read_later", "side_stream"]

_side_streams: dict[int, torch.cuda.Stream] = {}


def read_later(t: torch.Tensor) -> Callable[[], torch.Tensor]:
    """Start copying ``t`` (as it is at this point of the stream) to the host; the returned
    function waits for that copy only and gives the host tensor.

    On the host the value is simply kept (a copy, so later in-place changes do not show).
    """
    if t.device.type != "cuda":
        kept = t.detach().clone()
        return lambda: kept
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t.detach(), non_blocking=True)  # queued on t's device's current stream
    copied = torch.cuda.Event()
    copied.record(torch.cuda.current_stream(t.device))

    def get() -> torch.Tensor:
        copied.synchronize()
        return host

    return get


@contextmanager
def beside_the_update() -> Iterator[None]:
    """Run bookkeeping whose device work depends on nothing queued before it (host numbers
    copied up, all-reduced and read back, as Composer's SpeedMonitor does every step) on a side
    stream, so its read waits for that work only and not for the optimizer update queued on
    the current stream. Work that reads weights, gradients or the loss must not run here."""
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        yield
        return
    with torch.cuda.stream(side_stream()):
        yield


def side_stream() -> torch.cuda.Stream:
    """The current GPU's stream for work kept off the optimizer update's path (one per GPU)."""
    device = torch.cuda.current_device()
    if device not in _side_streams:
        _side_streams[device] = torch.cuda.Stream(device)
    return _side_streams[device]
