"""Triton launchers: check shapes, allocate, pick a schedule, launch. Kernels live in kernels/triton.

Registered as the ``triton`` backend of the ops in ``int8mm._ops``. The forward of ``int8_linear`` is
three launches (activation statistics, quantization + outlier compaction, fused GEMM) and never reads a
device value on the host, so it can be captured in a CUDA graph.

Under ``TRITON_INTERPRET=1`` the same launchers run on CPU tensors; the interpreter accepts a single
config, so a fixed schedule replaces autotuning there.
"""
import triton

from .. import _ops
from ..kernels.triton.gemm import _int8_gemm_dequant_kernel
from ..kernels.triton.quantize import _activation_stats_kernel, _quantize_rows_kernel
from . import triton_interpreting

import torch

BACKEND = "triton"
# M <= DECODE_MAX_M reads weights like a GEMV: thin row tiles, many programs along N
DECODE_MAX_M = 16
COMPACT_BLOCK = 1024
GROUP_M = 8


def _config(block_m, block_n, block_k, stages, warps):
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": GROUP_M},
                         num_stages=stages, num_warps=warps)


# (BLOCK_M, BLOCK_N, BLOCK_K, stages, warps). Prefill: the large tiles measured best for int8 on Hopper
# (GPU-ANCHORS.md), plus smaller ones for modest M or N. Decode: weight streaming, 16-row tiles (the
# smallest int8 tensor-core tile) and narrow N so that enough programs keep loads in flight.
PREFILL_CONFIGS = [
    _config(128, 256, 128, 3, 8),
    _config(256, 128, 128, 3, 8),
    _config(128, 128, 128, 4, 4),
    _config(64, 128, 128, 4, 4),
]
DECODE_CONFIGS = [
    _config(16, 32, 256, 4, 4),
    _config(16, 64, 256, 4, 4),
    _config(16, 32, 512, 3, 4),
    _config(16, 128, 128, 5, 4),
]
# the single schedule used where autotuning cannot run (the interpreter)
INTERPRETER_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "GROUP_M": GROUP_M}

_AUTOTUNE_KEY = ["M_BUCKET", "N", "K", "FUSED", "HAS_BIAS"]
_gemm_prefill = triton.autotune(configs=PREFILL_CONFIGS, key=_AUTOTUNE_KEY)(_int8_gemm_dequant_kernel)
_gemm_decode = triton.autotune(configs=DECODE_CONFIGS, key=_AUTOTUNE_KEY)(_int8_gemm_dequant_kernel)


def _stats_tile(m: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_K) of the quantization passes: whole decode batches in one row block."""
    block_m = 16 if m <= DECODE_MAX_M else 32
    return block_m, 256


def _quantize_activations(x: torch.Tensor, threshold: float):
    m, k = x.shape
    dev = x.device
    q_x = torch.empty((m, k), dtype=torch.int8, device=dev)
    s_x = torch.empty(m, dtype=torch.float32, device=dev)
    outlier_cols = torch.empty(k, dtype=torch.int32, device=dev)
    outlier_count = torch.zeros(1, dtype=torch.int32, device=dev)
    if m == 0 or k == 0:
        s_x.zero_()
        return q_x, s_x, outlier_cols, outlier_count
    block_m, block_k = _stats_tile(m)
    grid = (triton.cdiv(m, block_m), triton.cdiv(k, block_k))
    row_max = torch.empty((grid[1], m), dtype=torch.float32, device=dev)
    col_flags = torch.empty((grid[0], k), dtype=torch.int8, device=dev)
    _activation_stats_kernel[grid](
        x, row_max, col_flags, m, k, x.stride(0), x.stride(1), threshold,
        BLOCK_M=block_m, BLOCK_K=block_k, num_warps=4,
    )
    _quantize_rows_kernel[grid](
        x, row_max, col_flags, q_x, s_x, outlier_cols, outlier_count,
        m, k, grid[1], grid[0], x.stride(0), x.stride(1),
        BLOCK_M=block_m, BLOCK_K=block_k, COMPACT_BLOCK=COMPACT_BLOCK, INTERPRET=triton_interpreting(),
        num_warps=4,
    )
    return q_x, s_x, outlier_cols, outlier_count


def _launch_gemm(q_x, q_w, out, s_x=None, s_w=None, x=None, outlier_cols=None, outlier_count=None, bias=None):
    m, k = q_x.shape
    n = q_w.shape[0]
    if m == 0 or n == 0:
        return out
    fused = s_x is not None
    if not fused:  # int8_matmul: the epilogue pointers are never read; pass any tensor
        s_x = s_w = x = outlier_cols = outlier_count = q_x
    x = x if x is not None else q_x
    args = (
        q_x, q_w, out, s_x, s_w, x, outlier_cols, outlier_count, bias if bias is not None else out,
        m, n, k, triton.next_power_of_2(m),
        q_x.stride(0), q_x.stride(1), q_w.stride(0), q_w.stride(1), out.stride(0), out.stride(1),
        x.stride(0), x.stride(1),
    )
    flags = {"FUSED": fused, "HAS_BIAS": bias is not None}
    if triton_interpreting():
        cfg = INTERPRETER_CONFIG
        grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
        _int8_gemm_dequant_kernel[grid](*args, **flags, **cfg)
        return out
    kernel = _gemm_decode if m <= DECODE_MAX_M else _gemm_prefill

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    kernel[grid](*args, **flags)
    return out


@_ops.register_impl(BACKEND, "quantize_activations")
def quantize_activations(x, threshold):
    return _quantize_activations(x, threshold)


@_ops.register_impl(BACKEND, "int8_matmul")
def int8_matmul(a, b):
    out = torch.empty((a.shape[0], b.shape[0]), dtype=torch.int32, device=a.device)
    return _launch_gemm(a, b, out)


@_ops.register_impl(BACKEND, "int8_linear")
def int8_linear(x, q_w, s_w, bias, threshold):
    q_x, s_x, outlier_cols, outlier_count = _quantize_activations(x, threshold)
    out = torch.empty((x.shape[0], q_w.shape[0]), dtype=x.dtype, device=x.device)
    return _launch_gemm(q_x, q_w, out, s_x, s_w, x, outlier_cols, outlier_count, bias)
