"""Where one call's device time goes: per-kernel time from ``torch.profiler`` (CUDA only)."""
from typing import Callable

import torch

KERNEL_NAME_CHARS = 60


def kernel_breakdown(fn: Callable, args: tuple, warmup: int = 3, reps: int = 10) -> dict[str, float]:
    """Mean device microseconds per call of each kernel ``fn(*args)`` launches, in launch order."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(warmup):
        fn(*args)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn(*args)
        torch.cuda.synchronize()
    kernels = {}
    for event in prof.key_averages():
        # the attribute was renamed across torch versions
        device_us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)
        if device_us:
            kernels[event.key[:KERNEL_NAME_CHARS]] = device_us / reps
    return kernels
