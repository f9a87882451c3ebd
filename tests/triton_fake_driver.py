"""A stand-in for Triton's CUDA driver: real compiles for sm_90, launches recorded instead of run.

With it active, ``kernel[grid](...)`` and ``int8mm.backends.triton_launch.launch`` go through everything a GPU launch
does on the host (binding, specialization, the compile and kernel caches, the autotuner, the launcher's arguments)
on CPU tensors, without a GPU: what ``tests/triton_launch_check.py`` compares and ``benchmarks/bench_launch_host.py``
times. Import it in a process without TRITON_INTERPRET (the interpreter replaces Triton's jit functions at import),
before any kernel is launched.
"""
import hashlib
import itertools

import torch
from triton.backends.compiler import GPUTarget
from triton.runtime import driver

TARGET = GPUTarget("cuda", 90, 32)
SHARED_MEMORY = 227 * 1024  # per block on an H100 / H200

# what get_current_device / get_current_stream hand out: set them to switch "GPUs" and streams
current_device = 0
current_stream = 7
launches: list[tuple] = []  # (grid_x, grid_y, grid_z, stream, function, metadata, args) per launch
CONSTEXPR = "<constexpr>"  # what a launch records in place of a constexpr argument (the launcher skips those)
recording = True


def kernel_id(name: str, binary: bytes, device: int) -> str:
    """A function handle that tells compiled variants apart (one per specialization and config) and the device
    it was loaded on (a real handle belongs to one device's context)."""
    return f"{name}:{hashlib.sha1(binary).hexdigest()[:12]}:cuda{device}"


class _Utils:
    def load_binary(self, name, binary, shared, device):
        # module, function, registers, spills, max threads
        return object(), kernel_id(name, binary, device), 64, 0, 1024

    def get_device_properties(self, device):
        return {"max_shared_mem": SHARED_MEMORY, "multiprocessor_count": 132}


class _Launcher:
    """Stands for the compiled launcher: records what the C launcher would receive (hooks and launch metadata
    aside: the JIT passes them, a direct launch passes None)."""

    def __init__(self, src, metadata):
        self.signature = list(src.signature.values())

    def __call__(self, grid_x, grid_y, grid_z, stream, function, metadata, launch_metadata, enter_hook, exit_hook,
                 *args):
        # as Triton 3.6's generated launcher: one argument per parameter, constexpr ones read and ignored
        if len(args) != len(self.signature):
            raise TypeError(f"the launcher takes {len(self.signature)} kernel arguments, got {len(args)}")
        if recording:
            args = tuple(CONSTEXPR if kind == "constexpr" else arg for kind, arg in zip(self.signature, args))
            launches.append((grid_x, grid_y, grid_z, stream, function, metadata, args))


_timings = itertools.count()


def _bench(fn, quantiles=None, **kwargs):
    """The autotuner's timer: each timing the next of a fixed pseudo-random sequence, so that the configs an
    autotuner picks differ between keys (a launch key that lost the autotuner's key would show) yet are the same
    on every run."""
    fn()
    time = 1.0 + (next(_timings) * 7919 % 13) / 13
    return [time] * len(quantiles) if quantiles else time


class FakeCudaDriver:
    def __init__(self):
        self.utils = _Utils()
        self.launcher_cls = _Launcher

    def get_current_device(self):
        return current_device

    def get_current_stream(self, device):
        return current_stream

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
