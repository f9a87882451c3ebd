"""A stand-in for Triton's CUDA driver: real compiles for sm_90, launches recorded instead of run.

With it active, ``kernel[grid](...)`` and ``int8mm.backends.triton_launch.launch`` go through everything a GPU launch
does on the host (binding, specialization, the compile and kernel caches, the autotuner, the launcher's arguments)
on CPU tensors, without a GPU: what ``tests/triton_launch_check.py`` compares and ``benchmarks/bench_launch_host.py``
times. Import it in a process without TRITON_INTERPRET (the interpreter replaces Triton's jit functions at import),
before any kernel is launched.
"""
import hashlib

import torch
from triton.backends.compiler import GPUTarget
from triton.runtime import driver

TARGET = GPUTarget("cuda", 90, 32)
SHARED_MEMORY = 227 * 1024  # per block on an H100 / H200
STREAM = 7  # what get_current_stream hands out: any value the launcher must pass on

launches: list[tuple] = []  # (grid_x, grid_y, grid_z, stream, function, metadata, args) per launch
recording = True


def kernel_id(name: str, binary: bytes) -> str:
    """A function handle that tells compiled variants apart (one per specialization and config)."""
    return f"{name}:{hashlib.sha1(binary).hexdigest()[:12]}"


class _Utils:
    def load_binary(self, name, binary, shared, device):
        return object(), kernel_id(name, binary), 64, 0, 1024  # module, function, registers, spills, max threads

    def get_device_properties(self, device):
        return {"max_shared_mem": SHARED_MEMORY, "multiprocessor_count": 132}


class _Launcher:
    """Stands for the compiled launcher: records what the C launcher would receive (hooks and launch metadata
    aside: the JIT passes them, a direct launch passes None)."""

    def __init__(self, src, metadata):
        self.src = src

    def __call__(self, grid_x, grid_y, grid_z, stream, function, metadata, launch_metadata, enter_hook, exit_hook,
                 *args):
        if recording:
            launches.append((grid_x, grid_y, grid_z, stream, function, metadata, args))


def _bench(fn, quantiles=None, **kwargs):
    """The autotuner's timer: every config takes the same time, so the first config wins, as on every run."""
    fn()
    return [1.0] * len(quantiles) if quantiles else 1.0


class FakeCudaDriver:
    def __init__(self):
        self.utils = _Utils()
        self.launcher_cls = _Launcher

    def get_current_device(self):
        return 0

    def get_current_stream(self, device):
        return STREAM

    def get_current_target(self):
        return TARGET

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_benchmarker(self):
        return _bench

    def get_empty_cache_for_benchmark(self):
        return torch.empty(16, dtype=torch.int32)

    def clear_cache(self, cache):
        pass


def install() -> None:
    """Make the stand-in Triton's active driver for this process."""
    driver.set_active(FakeCudaDriver())
