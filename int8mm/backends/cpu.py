"""The CPU backend: compiled C kernels (kernels/cpu) called through ctypes; the reference stays the spec.

Activation quantization is one C function (two passes over x instead of a dozen torch ops); decode-sized
batches (M <= FUSED_MAX_M) run quantize + int8 GEMV + epilogue in one call that reads the weight once;
larger batches take the reference path (``torch._int_mm``, oneDNN's tiled int8 GEMM, and BLAS for the outliers).
The quantized values and scales are the reference's bit for bit (tests/test_backend_cpu.py checks them).
"""
import ctypes
import functools
import logging
import threading

import torch

from . import cpu_build, reference, registry

BACKEND = "cpu"
ABI_VERSION = 1
# up to this many rows the fused GEMV (weights read once, all rows served from cache) beats oneDNN's GEMM
FUSED_MAX_M = 16
_SCRATCH_SHAPES = 8  # scratch buffers kept per thread
_DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}
_ERRORS = {1: "invalid argument", 2: "unsupported dtype", 3: "out of memory"}
log = logging.getLogger("int8mm")
CPU = torch.device("cpu")  # every buffer this backend hands to C: never the default device (set_default_device)

_p, _i64, _f32, _i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
_SIGNATURES = {
    "int8mm_cpu_abi_version": (_i32, []),
    "int8mm_cpu_quantize_activations": (_i32, [_p, _i32, _i64, _i64, _i64, _i64, _f32, _p, _p, _p, _p, _p]),
    "int8mm_cpu_int8_linear": (_i32, [_p, _i32, _i64, _i64, _i64, _i64, _p, _p, _i64, _p, _i32, _f32, _p, _p, _p, _p,
                                      _p, _p, _i32]),
}


@functools.cache
def library() -> ctypes.CDLL:
    """The loaded library (compiled first if needed); raises saying why it cannot be had."""
    if cpu_build.disabled():
        raise RuntimeError(f"the int8mm CPU library is turned off ({cpu_build.LIBRARY_ENV_VAR}={cpu_build.DISABLED})")
    path = cpu_build.library_path()
    lib = ctypes.CDLL(str(path))
    for name, (restype, argtypes) in _SIGNATURES.items():
        try:
            fn = getattr(lib, name)
        except AttributeError:
            raise RuntimeError(f"{path} lacks {name}: not the library this int8mm needs") from None
        fn.restype, fn.argtypes = restype, argtypes
    if lib.int8mm_cpu_abi_version() != ABI_VERSION:
        raise RuntimeError(f"{path} speaks ABI {lib.int8mm_cpu_abi_version()}, this int8mm needs {ABI_VERSION}")
    return lib


@functools.cache
def library_available() -> bool:
    """True if the library loads (compiling it now if needed); a failure is logged once, with its reason."""
    try:
        library()
        return True
    except (OSError, RuntimeError, ImportError) as exc:  # ImportError: no fcntl (not a POSIX system)
        log.warning("int8mm: the CPU library is not available (%s); the reference backend serves CPU tensors", exc)
        return False


def _check(status: int, what: str) -> None:
    if status != 0:
        raise RuntimeError(f"int8mm CPU kernel {what} failed: {_ERRORS.get(status, status)}")


_scratch_of_thread = threading.local()


def _scratch_pointers(m: int, k: int) -> tuple[int, int, int, int, int]:
    """Addresses of q_x int8 [M, K], s_x fp32 [M], outlier columns int32 [K], count int32 [1] and column flags
    uint8 [K] in one scratch buffer, kept per thread and per (M, K): the fused call never returns them, and a
    decode step calls the same shapes again and again (each allocation is host time such a call feels)."""
    cache = getattr(_scratch_of_thread, "buffers", None)
    if cache is None:
        cache = _scratch_of_thread.buffers = {}
    found = cache.get((m, k))
    if found is None:
        if len(cache) >= _SCRATCH_SHAPES:  # many prompt lengths: keep memory bounded
            cache.clear()
        sizes = [m * k, 4 * m, 4 * k, 4, k]
        padded = [-(-size // 64) * 64 for size in sizes]  # 64-byte aligned starts
        buffer = torch.empty(sum(padded) + 64, dtype=torch.uint8, device=CPU)
        start = -(-buffer.data_ptr() // 64) * 64
        offsets = [start + sum(padded[:i]) for i in range(len(sizes))]
        found = cache[(m, k)] = (buffer, tuple(offsets))
    return found[1]


@registry.register(BACKEND, "quantize_activations")
def quantize_activations(x, threshold):
    m, k = x.shape
    # separate tensors: an op's outputs may not alias one another
    q_x, s_x = torch.empty((m, k), dtype=torch.int8, device=CPU), torch.empty(m, dtype=torch.float32, device=CPU)
    cols, count = torch.empty(k, dtype=torch.int32, device=CPU), torch.empty(1, dtype=torch.int32, device=CPU)
    flags = torch.empty(k, dtype=torch.uint8, device=CPU)
    _check(library().int8mm_cpu_quantize_activations(
        x.data_ptr(), _DTYPE_CODES[x.dtype], m, k, x.stride(0), x.stride(1), threshold, q_x.data_ptr(),
        s_x.data_ptr(), cols.data_ptr(), count.data_ptr(), flags.data_ptr()), "quantize_activations")
    return q_x, s_x, cols, count


registry.register(BACKEND, "int8_matmul")(reference.int8_matmul)  # oneDNN's int8 GEMM, made exact there


@registry.register(BACKEND, "int8_linear")
def int8_linear(x, q_w, s_w, bias, threshold):
    m, k = x.shape
    if m > FUSED_MAX_M:
        # Many rows: the reference path (torch's vectorized quantization, oneDNN's int8 GEMM, the outlier term as
        # a BLAS matmul). A C epilogue looping over the outlier columns per output measured 1.5x slower on
        # SmolLM2's real activations (make demo's 1024-token windows: 437 vs 664 tokens/s, 2-core AMD EPYC).
        return reference.int8_linear(x, q_w, s_w, bias, threshold)
    n = q_w.shape[0]
    q_w, s_w = q_w.contiguous(), s_w.contiguous()
    bias = bias.contiguous() if bias is not None else None
    bias_ptr, bias_code = (bias.data_ptr(), _DTYPE_CODES[bias.dtype]) if bias is not None else (None, 0)
    out = torch.empty((m, n), dtype=x.dtype, device=CPU)
    q_x, s_x, cols, count, flags = _scratch_pointers(m, k)
    _check(library().int8mm_cpu_int8_linear(
        x.data_ptr(), _DTYPE_CODES[x.dtype], m, k, x.stride(0), x.stride(1), q_w.data_ptr(), s_w.data_ptr(), n,
        bias_ptr, bias_code, threshold, q_x, s_x, cols, count, flags, out.data_ptr(), torch.get_num_threads()),
        "int8_linear")
    return out
