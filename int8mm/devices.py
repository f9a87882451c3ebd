"""The default device, decided in one place: the current CUDA device when torch sees one, else the CPU.

Loading (``device_map=None``), backend lookup (``available_backends()``) and the benchmark and command-line
``--device auto`` all use it, so they agree on where work goes.
"""
import torch


def default_device() -> torch.device:
    """``cuda:<current device>`` if CUDA is available, else ``cpu`` (always with an index on CUDA, so that two
    calls compare equal to the device a tensor reports)."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
