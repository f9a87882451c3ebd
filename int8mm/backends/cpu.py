"""The CPU backend: compiled C kernels (kernels/cpu) called through ctypes; the reference stays the spec.

Activation quantization is one C function (two vectorized passes over x instead of a dozen torch ops);
decode-sized batches (M <= FUSED_MAX_M) run quantize + int8 GEMV + epilogue in one call that reads the weight
once; larger batches quantize in C, multiply with an exact int8 GEMM (``torch._int_mm``, oneDNN's, where torch
hands it to oneDNN: AVX-512 VNNI; else the library's own, see ``int8_matmul``), scale the int32 result in one C
pass and add the outlier term with BLAS, in the reference's order of operations.
The quantized values and scales are the reference's bit for bit (tests/test_backend_cpu.py checks them).
"""
import ctypes
import functools
import logging
import struct

import torch

from . import c_calls, cpu_build, reference, registry

BACKEND = "cpu"
ABI_VERSION = 5
# up to this many rows the fused GEMV (weights read once, all rows served from cache) beats the GEMM path: oneDNN's
# GEMM with VNNI, and the library's on AVX2 (16 rows of 4096 x 4096 on a Zen 1 EPYC: 18.3 vs 20.4 ms on one
# thread, 9.4 vs 11.2 ms on two; 576 -> 1536: 1.17 vs 1.20 and 0.63 vs 0.82 ms)
FUSED_MAX_M = 16
_DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}
_ERRORS = {1: "invalid argument", 2: "unsupported dtype", 3: "out of memory"}
log = logging.getLogger("int8mm")
CPU = torch.device("cpu")  # every buffer this backend hands to C: never the default device (set_default_device)

_p, _i64, _f32, _i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
_SIGNATURES = {
    "int8mm_cpu_abi_version": (_i32, []),
    "int8mm_cpu_quantize_activations": (_i32, [_p, _i32, _i64, _i64, _i64, _i64, _f32, _p, _p, _p, _p, _p, _i32]),
    "int8mm_cpu_scale_int32": (_i32, [_p, _i64, _i64, _p, _p, _p, _i32, _p, _i32, _i32]),
    # one packed struct int8mm_cpu_linear_call (kernels/cpu/int8mm_cpu.c), LINEAR_CALL below, as a bytes object
    # (ctypes hands C a pointer to its contents, which C only reads)
    "int8mm_cpu_int8_linear": (_i32, [_p]),
    "int8mm_cpu_linear_call_size": (_i32, []),
    "int8mm_cpu_int8_gemm": (_i32, [_p, _i64, _i64, _i64, _p, _i64, _i64, _p, _i32]),
}
# the fused call's arguments: x, dtype, M, K, sxm, sxk, q_w, s_w, N, bias, bias_dtype, out, num_threads as 8-byte
# integers, then the threshold as a double (the C side keeps its scratch itself)
LINEAR_CALL = struct.Struct("<13qd")


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
    c_calls.check_call_size(lib.int8mm_cpu_linear_call_size(), str(path), LINEAR_CALL)
    return lib


# why library_available() last said no (for the error of an explicit backend="cpu"), None after a success
failure_reason: str | None = None


@functools.cache
def library_available() -> bool:
    """True if the library loads (compiling it now if needed); a failure is logged once, with its reason."""
    global failure_reason
    try:
        library()
        failure_reason = None
        return True
    except (OSError, RuntimeError) as exc:  # OSError also where the build has no file lock (not POSIX)
        failure_reason = str(exc)
        # the reference's GEMM is torch._int_mm: where that is a scalar loop, say what it costs
        slow = "" if onednn_int8_is_vectorized() else (
            "; without AVX-512 VNNI its int8 GEMM (torch._int_mm) is a scalar loop, so calls of more than 16 rows run "
            "about 16x slower than fp32 (a C compiler with OpenMP gives the library its own GEMM)")
        log.warning("int8mm: the CPU library is not available (%s); the reference backend serves CPU tensors%s",
                    exc, slow)
        return False


def _check(status: int, what: str) -> None:
    if status != 0:
        raise RuntimeError(f"int8mm CPU kernel {what} failed: {_ERRORS.get(status, status)}")


@registry.register(BACKEND, "quantize_activations")
def quantize_activations(x, threshold):
    m, k = x.shape
    # separate tensors: an op's outputs may not alias one another
    q_x, s_x = torch.empty((m, k), dtype=torch.int8, device=CPU), torch.empty(m, dtype=torch.float32, device=CPU)
    cols, count = torch.empty(k, dtype=torch.int32, device=CPU), torch.empty(1, dtype=torch.int32, device=CPU)
    flags = torch.empty(k, dtype=torch.uint8, device=CPU)
    _check(library().int8mm_cpu_quantize_activations(
        x.data_ptr(), _DTYPE_CODES[x.dtype], m, k, x.stride(0), x.stride(1), threshold, q_x.data_ptr(),
        s_x.data_ptr(), cols.data_ptr(), count.data_ptr(), flags.data_ptr(), torch.get_num_threads()),
        "quantize_activations")
    return q_x, s_x, cols, count


@functools.cache
def _cpu_has_avx512_vnni() -> bool:
    probe = getattr(torch.cpu, "_is_vnni_supported", None)  # private in torch: a later one may move it
    if probe is not None:
        return bool(probe())
    return "avx512_vnni" in cpu_build.cpu_features().split()


def onednn_int8_is_vectorized() -> bool:
    """Whether ``torch._int_mm`` runs oneDNN's int8 GEMM here. Torch 2.13 hands it to oneDNN only where the CPU has
    AVX-512 VNNI and ``torch.backends.mkldnn.enabled`` (checked on every call: it may change); the many-row path
    through it ran a 512-row 4096 x 4096 layer 3.7x faster than fp32 on such a CPU (README). Elsewhere torch runs
    a scalar loop, 0.06x an fp32 matmul of the same shape (benchmarks/results/2026-12-01-cpu-epyc-avx2), where the
    library's GEMM (kernels/cpu/gemm.c) is about as fast as fp32. The choice never changes a result: both exact."""
    return torch.backends.mkldnn.enabled and _cpu_has_avx512_vnni()


def _with_unit_k_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(1) == 1 or t.shape[1] <= 1 else t.contiguous()


@registry.register(BACKEND, "int8_matmul")
def int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact ``a @ b.T`` in int32: oneDNN's GEMM where it is vectorized, else the library's (the same integers)."""
    return reference.int8_matmul(a, b) if onednn_int8_is_vectorized() else library_int8_matmul(a, b)


def library_int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact ``a @ b.T`` in int32 by the library's GEMM (kernels/cpu/gemm.c), whatever the CPU."""
    # held in names until the C call returns (a temporary would be freed before C reads it)
    a, b = _with_unit_k_stride(a), _with_unit_k_stride(b)
    (m, k), n = a.shape, b.shape[0]
    out = torch.empty((m, n), dtype=torch.int32, device=CPU)
    _check(library().int8mm_cpu_int8_gemm(a.data_ptr(), m, k, a.stride(0), b.data_ptr(), n, b.stride(0),
                                          out.data_ptr(), torch.get_num_threads()), "int8_gemm")
    return out


def _pointer_and_code(t):
    return (t.data_ptr(), _DTYPE_CODES[t.dtype]) if t is not None else (None, 0)


def _int8_linear_many_rows(x, q_w, s_w, bias, threshold):
    """The reference's int8_linear with its passes over x and [M, N] done in C: the same results bit for bit."""
    q_x, s_x, cols, count = quantize_activations(x, threshold)
    acc = int8_matmul(q_x, q_w)
    outliers = cols[: int(count)]
    # the outlier term comes between the integer part and the bias (the reference's order): y stays fp32 then
    out_dtype = x.dtype if outliers.numel() == 0 else torch.float32
    y = torch.empty(acc.shape, dtype=out_dtype, device=CPU)
    s_w = s_w.contiguous()
    # held in a name until the C call returns: a temporary's storage is freed at once, and C would read freed memory
    bias_in_c = bias.contiguous() if bias is not None and outliers.numel() == 0 else None
    bias_ptr, bias_code = _pointer_and_code(bias_in_c)
    _check(library().int8mm_cpu_scale_int32(
        acc.data_ptr(), acc.shape[0], acc.shape[1], s_x.data_ptr(), s_w.data_ptr(), bias_ptr, bias_code,
        y.data_ptr(), _DTYPE_CODES[out_dtype], torch.get_num_threads()), "scale_int32")
    if outliers.numel() == 0:
        return y
    y.addmm_(x.index_select(1, outliers).float(), reference.dequantized_columns(q_w, s_w, outliers).t())
    if bias is not None:
        y += bias
    return y.to(x.dtype)


@registry.register(BACKEND, "int8_linear")
def int8_linear(x, q_w, s_w, bias, threshold):
    m, k = x.shape
    if m > FUSED_MAX_M:
        # Many rows: an int8 GEMM and the outlier term as a BLAS matmul. A C epilogue looping over the
        # outlier columns per output measured 1.5x slower on SmolLM2's real activations (make demo's 1024-token
        # windows: 437 vs 664 tokens/s, 2-core AMD EPYC).
        return _int8_linear_many_rows(x, q_w, s_w, bias, threshold)
    # A decode step calls this once per layer, each time with caches cold from the layers before it, where every
    # Python or torch call costs ~1 us: so the call below packs its arguments into a fresh bytes object (no
    # per-thread buffer to look up) and allocates the output with x.new_empty(m, n) (x's dtype and device, CPU:
    # about 1.5 us less than torch.empty((m, n), dtype=..., device=...) with a cold cache, 2-core AMD EPYC).
    n = q_w.shape[0]
    q_w, s_w = q_w.contiguous(), s_w.contiguous()
    bias = bias.contiguous() if bias is not None else None  # kept alive in this name until the C call returns
    bias_ptr, bias_code = _pointer_and_code(bias)
    out = x.new_empty(m, n)
    sxm, sxk = x.stride()
    call = LINEAR_CALL.pack(x.data_ptr(), _DTYPE_CODES[x.dtype], m, k, sxm, sxk, q_w.data_ptr(), s_w.data_ptr(), n,
                            bias_ptr or 0, bias_code, out.data_ptr(), torch.get_num_threads(), threshold)
    _check(library().int8mm_cpu_int8_linear(call), "int8_linear")
    return out
