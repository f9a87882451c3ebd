"""The CUDA backend: hand-written kernels (kernels/cuda) in a shared library called through ctypes.

The library links no torch library; Python hands it data pointers and the current CUDA stream. It is
loaded (and, where nvcc is present, built into the cache) at first use, never at import.
"""
import ctypes
import functools
import struct

import torch

from ..devices import on_device_of, raw_stream
from . import DECODE_MAX_M, c_calls, cuda_build, programmatic_launch, registry, scratch

BACKEND = "cuda"
ABI_VERSION = 3
_DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}

_p, _i64, _f32, _i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
_SIGNATURES = {
    "int8mm_abi_version": (_i32, []),
    "int8mm_error_string": (ctypes.c_char_p, [_i32]),
    "int8mm_workspace_ints": (_i64, [_i64, _i64]),
    "int8mm_quantize_activations": (_i32, [_p, _i32, _i64, _i64, _i64, _i64, _f32, _p, _p, _p, _p, _p, _p]),
    "int8mm_int8_matmul": (_i32, [_p, _p, _p, _i64, _i64, _i64, _p]),
    # one packed struct int8mm_linear_call (kernels/cuda/int8mm.h), LINEAR_CALL below, as a bytes object
    "int8mm_int8_linear": (_i32, [_p]),
    "int8mm_linear_call_size": (_i32, []),
}
# the fused call's arguments: x, x_dtype, M, K, stride_xm, stride_xk, q_w, s_w, N, bias, bias_dtype, workspace, q_x,
# s_x, outlier_cols, outlier_count, out, stream, flags as 8-byte integers, then the threshold as a double
LINEAR_CALL = struct.Struct("<19qd")
# flags: the decode GEMV launched with programmatic dependent launch (int8mm.h: INT8MM_CALL_PROGRAMMATIC)
CALL_PROGRAMMATIC = 1


@functools.cache
def library() -> ctypes.CDLL:
    """The loaded library (built first if needed and possible); raises saying how to build it."""
    path = cuda_build.library_path()
    lib = ctypes.CDLL(str(path))
    for name, (restype, argtypes) in _SIGNATURES.items():
        try:
            fn = getattr(lib, name)
        except AttributeError:  # a library of another int8mm version
            raise RuntimeError(f"{path} lacks {name}: it is not the library this int8mm needs; "
                               f"{cuda_build.HOW_TO_BUILD}") from None
        fn.restype, fn.argtypes = restype, argtypes
    if lib.int8mm_abi_version() != ABI_VERSION:
        raise RuntimeError(f"the int8mm CUDA library speaks ABI {lib.int8mm_abi_version()}, this int8mm "
                           f"needs {ABI_VERSION}: {cuda_build.HOW_TO_BUILD}")
    c_calls.check_call_size(lib.int8mm_linear_call_size(), "the int8mm CUDA library", LINEAR_CALL,
                            f": {cuda_build.HOW_TO_BUILD}")
    return lib


@functools.cache
def library_available() -> bool:
    """True if the library is built, or can be built here (nvcc on the PATH)."""
    found = cuda_build.find_library()
    return found.exists() if found is not None else cuda_build.nvcc() is not None


def _check(status: int) -> None:
    if status != 0:
        message = library().int8mm_error_string(status).decode()
        raise RuntimeError(f"int8mm CUDA kernel failed: {message} (CUDA error {status})")


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


def _activation_buffers(x: torch.Tensor):
    m, k = x.shape
    dev = x.device
    return (
        torch.empty(library().int8mm_workspace_ints(m, k), dtype=torch.int32, device=dev),
        torch.empty((m, k), dtype=torch.int8, device=dev),
        torch.empty(m, dtype=torch.float32, device=dev),  # the library writes the scales and the count
        torch.empty(k, dtype=torch.int32, device=dev),
        torch.empty(1, dtype=torch.int32, device=dev),
    )


@registry.register(BACKEND, "quantize_activations")
def quantize_activations(x, threshold):
    m, k = x.shape
    workspace, q_x, s_x, outlier_cols, outlier_count = _activation_buffers(x)
    outlier_cols.zero_()  # the standalone op's outputs depend on its inputs alone: no stale tail in the list
    with on_device_of(x):
        _check(library().int8mm_quantize_activations(
            _ptr(x), _DTYPE_CODES[x.dtype], m, k, x.stride(0), x.stride(1), threshold, _ptr(workspace), _ptr(q_x),
            _ptr(s_x), _ptr(outlier_cols), _ptr(outlier_count), raw_stream(x.device)))
    return q_x, s_x, outlier_cols, outlier_count


@registry.register(BACKEND, "int8_matmul")
def int8_matmul(a, b):
    a, b = a.contiguous(), b.contiguous()
    out = torch.empty((a.shape[0], b.shape[0]), dtype=torch.int32, device=a.device)
    with on_device_of(a):
        _check(library().int8mm_int8_matmul(_ptr(a), _ptr(b), _ptr(out), a.shape[0], b.shape[0], a.shape[1],
                                            raw_stream(a.device)))
    return out


@functools.lru_cache(maxsize=64)
def _scratch_layout(m: int, k: int) -> tuple[int, tuple[int, ...]]:
    """Total bytes and the offsets of workspace int32 [library's count], q_x int8 [M, K], s_x fp32 [M], outlier
    columns int32 [K] and count int32 [1] in the fused call's one scratch allocation (five would cost five
    trips through the caching allocator on every call), each starting ``scratch.ALIGN``-aligned."""
    return scratch.aligned_offsets([4 * library().int8mm_workspace_ints(m, k), m * k, 4 * m, 4 * k, 4])


def _scratch_bytes(total: int):
    """The fused call's scratch as a ``scratch.Layout``: one byte buffer, carved by ``_scratch_layout``'s offsets."""
    return [(torch.uint8, total)], tuple


@registry.register(BACKEND, "int8_linear")
def int8_linear(x, q_w, s_w, bias, threshold):
    m, k = x.shape
    n = q_w.shape[0]
    q_w, s_w = q_w.contiguous(), s_w.contiguous()
    bias = bias.contiguous() if bias is not None else None
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    total, offsets = _scratch_layout(m, k)
    with on_device_of(x):
        # the intermediates live in one allocation, kept from call to call for decode (scratch.py: on x's device,
        # current here; a call of more rows allocates its own, freed stream-ordered when it returns)
        buffer = ((m <= DECODE_MAX_M and scratch.reused(x, _scratch_bytes, total))
                  or scratch.fresh(x, _scratch_bytes, total))[0]
        base = buffer.data_ptr()
        workspace, q_x, s_x, outlier_cols, outlier_count = (base + offset for offset in offsets)
        # a fresh bytes object per call (ctypes passes its address): cheaper than a per-thread buffer's lookups
        call = LINEAR_CALL.pack(
            x.data_ptr(), _DTYPE_CODES[x.dtype], m, k, x.stride(0), x.stride(1), q_w.data_ptr(), s_w.data_ptr(), n,
            bias.data_ptr() if bias is not None else 0, _DTYPE_CODES[bias.dtype if bias is not None else x.dtype],
            workspace, q_x, s_x, outlier_cols, outlier_count, out.data_ptr(), raw_stream(x.device),
            CALL_PROGRAMMATIC if programmatic_launch(x.device) else 0, threshold)
        _check(library().int8mm_int8_linear(call))
    return out
