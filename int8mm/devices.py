"""The default device, decided in one place: the current CUDA device when torch sees one, else the CPU.

Loading (``device_map=None``), backend lookup (``available_backends()``) and the benchmark and command-line
``--device auto`` all use it, so they agree on where work goes.

``on_device_of`` makes a tensor's GPU the current one for a launch, only when it is not already; ``raw_stream``
is the current stream's handle, cheaply.
"""
import contextlib

import torch


def default_device() -> torch.device:
    """``cuda:<current device>`` if CUDA is available, else ``cpu`` (always with an index on CUDA, so that two
    calls compare equal to the device a tensor reports)."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def on_device_of(t: torch.Tensor):
    """A context in which ``t``'s CUDA device is the current one. Kernels launch on the current device; a model
    spread over GPUs (device_map="auto") calls layers whose tensors live on another one, and accelerate moves
    the inputs there without changing the current device. Switches only when needed (the switch costs host
    time on every call)."""
    # is_cuda and get_device(): a quarter of the host time of reading t.device twice
    if t.is_cuda and t.get_device() != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def raw_stream(device: torch.device | int) -> int:
    """The handle (``cudaStream_t`` as an int) of the current stream of ``device`` (a CUDA device, or its index),
    without building a ``torch.cuda.Stream`` object each call (what torch's own generated kernels use); the public
    call where this torch lacks it."""
    index = device if isinstance(device, int) else device.index
    if index is None:
        index = torch.cuda.current_device()
    get_raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    if get_raw is not None:
        return get_raw(index)
    return torch.cuda.current_stream(index).cuda_stream
