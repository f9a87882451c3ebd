"""The device's measured ceilings, once per run: copy bandwidth and int8 / float matmul rates.

Results are stated as a fraction of these: weight bytes/s at decode against the copy rate (bytes read
and written), ops/s at prefill against the square matmul rate of the provider's arithmetic (int8 through
``torch._int_mm``, or on CPU the CPU backend's int8 GEMM, which is the library's own where torch's is a scalar loop;
float in the device's baseline dtype). On CPU one weight serves every call, so a decode weight
that the last-level cache holds is read from the cache, not from memory: its row gets no fraction of the copy rate.
"""
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .timing import time_call


@dataclass(frozen=True)
class CeilingSizes:
    copy_bytes: int
    matmul_n: int  # square n x n x n products
    reps: int


# large enough to leave every cache far behind, small enough to measure in a second or two
GPU_SIZES = CeilingSizes(copy_bytes=2 * 1024**3, matmul_n=8192, reps=10)
CPU_SIZES = CeilingSizes(copy_bytes=256 * 1024**2, matmul_n=2048, reps=5)
CPU_QUICK_SIZES = CeilingSizes(copy_bytes=64 * 1024**2, matmul_n=1024, reps=3)
CPU_CACHES = Path("/sys/devices/system/cpu/cpu0/cache")
DEFAULT_CPU_CACHE_BYTES = 64 * 1024**2  # where the sizes cannot be read: larger than most CPUs' last level


@dataclass(frozen=True)
class Ceilings:
    copy_bytes_per_s: float  # bytes read + written by a large device-to-device copy
    int8_ops_per_s: float  # int8_gemm's rate, n^3 int8 -> int32
    float_ops_per_s: float  # F.linear-style matmul in float_dtype
    float_dtype: str
    matmul_n: int
    cache_bytes: int | None = None  # CPU: the largest cache (None on a GPU, whose calls rotate weight copies)
    int8_gemm: str = "torch._int_mm"  # the int8 GEMM timed

    def to_dict(self) -> dict:
        return asdict(self)

    def for_provider(self, arithmetic: str) -> float:
        """The compute ceiling for a provider whose matmul is ``"int8"`` or ``"float"``."""
        return self.int8_ops_per_s if arithmetic == "int8" else self.float_ops_per_s


def baseline_float_dtype(device: torch.device) -> torch.dtype:
    """fp16 on a GPU (the dtype int8 replaces there); fp32 on CPU, where fp16 matmuls are not a real path."""
    return torch.float16 if device.type == "cuda" else torch.float32


def measure_ceilings(device: torch.device, quick: bool = False) -> Ceilings:
    if device.type == "cuda":
        sizes = GPU_SIZES
    else:
        sizes = CPU_QUICK_SIZES if quick else CPU_SIZES
    src = torch.empty(sizes.copy_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_s = time_call(device, dst.copy_, [(src,)], warmup=2, reps=sizes.reps).median_s
    del src, dst

    n = sizes.matmul_n
    a8 = torch.randint(-127, 128, (n, n), dtype=torch.int8, device=device)
    b8 = torch.randint(-127, 128, (n, n), dtype=torch.int8, device=device).t()
    int8_gemm, gemm = _int8_ceiling_gemm(device)
    int_mm_s = time_call(device, gemm, [(a8, b8)], warmup=2, reps=sizes.reps).median_s
    del a8, b8
    dtype = baseline_float_dtype(device)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    mm_s = time_call(device, torch.mm, [(a, b)], warmup=2, reps=sizes.reps).median_s
    ops = 2 * n**3
    return Ceilings(copy_bytes_per_s=2 * sizes.copy_bytes / copy_s, int8_ops_per_s=ops / int_mm_s,
                    float_ops_per_s=ops / mm_s, float_dtype=str(dtype).removeprefix("torch."), matmul_n=n,
                    cache_bytes=None if device.type == "cuda" else cpu_cache_bytes(), int8_gemm=int8_gemm)


def _int8_ceiling_gemm(device: torch.device):
    """``(name, fn(a, b_t))``: torch._int_mm, except on a CPU where torch runs it as a scalar loop and the CPU
    library, which then has its own GEMM, loads (a ceiling taken from the scalar loop would rate every int8 path
    far above 100%)."""
    if device.type == "cpu":
        from ..backends import cpu
        if not cpu.onednn_int8_is_vectorized() and cpu.library_available():
            return "int8mm cpu GEMM", lambda a, b_t: cpu.int8_matmul(a, b_t.t())
    return "torch._int_mm", torch._int_mm


def cpu_cache_bytes() -> int:
    """The largest CPU cache (Linux sysfs, e.g. "8192K"), or DEFAULT_CPU_CACHE_BYTES where it cannot be read."""
    units = {"K": 1024, "M": 1024**2, "G": 1024**3}
    sizes = []
    for entry in CPU_CACHES.glob("index*/size"):
        try:
            text = entry.read_text().strip()
        except OSError:
            continue
        if text[:-1].isdigit() and text[-1] in units:
            sizes.append(int(text[:-1]) * units[text[-1]])
    return max(sizes, default=DEFAULT_CPU_CACHE_BYTES)
