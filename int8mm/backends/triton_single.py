"""Launcher of the one-kernel decode linear (kernels/triton/decode_single.py): ``INT8MM_DECODE_PATH=single``.

A Triton ``int8_linear`` of 1-16 rows is then one launch: no quantization kernel, no fill, no intermediate
buffer (nothing to keep from call to call, nothing to allocate but the output), and its output equals the
classic path's bit for bit. Why it may pay: on the H200 (benchmarks/TUNING.md, run 4) a decode call's time on
the 8B layers was mostly the kernels around the GEMM and the gaps between them (8B o_proj at one row: 16.8 us
classic, 14.0 us with the quantization in one kernel, against 13.8 us for fp16's whole call).
"""
import triton

from ..kernels.triton.decode_single import _decode_single_kernel
from .triton_launch import cdiv, launch_scheduled, next_power_of_2

BLOCK_M = 16  # the smallest int8 tensor-core tile: the whole decode batch


def _config(block_n, block_k, stages, warps):
    return triton.Config({"BLOCK_M": BLOCK_M, "BLOCK_N": block_n, "BLOCK_K": block_k},
                         num_stages=stages, num_warps=warps)


# (BLOCK_N, BLOCK_K, stages, warps): tiles of the classic decode GEMM's size, and 16 columns a program, which
# doubles the programs streaming an 8B layer's weight (o_proj: 256 programs for 132 SMs). Each program also holds
# an fp32 x tile of 16 x BLOCK_K. AOT for sm_80 and sm_90 under Triton 3.6.0 (the GPU image's) and 3.7.1: these
# take 72-168 registers and spill nothing; 16 columns with 4 warps spilled 8 bytes on sm_90 under 3.6 (16 x 256
# under 3.7 too), and 32 x 512 took 255 registers, so those are not here.
CONFIGS = [_config(32, 256, 4, 4), _config(16, 256, 4, 8), _config(32, 128, 5, 4), _config(64, 128, 4, 4)]
INTERPRETER_CONFIG = {"BLOCK_M": BLOCK_M, "BLOCK_N": 32, "BLOCK_K": 64}

_autotuned = triton.autotune(configs=CONFIGS, key=["M_BUCKET", "N", "K", "HAS_BIAS"])(_decode_single_kernel)


def decode_linear(x, q_w, s_w, bias, threshold: float, out, *, interpreting: bool, autotune: bool):
    """``out = int8_linear(x, q_w, s_w, bias, threshold)`` for x of 1 to 16 rows and K >= 1, in one launch;
    ``q_w`` has unit K stride (the caller made it so)."""
    m, k = x.shape
    n = q_w.shape[0]
    args = (x, q_w, out, s_w, bias if bias is not None else out, m, n, k, next_power_of_2(m),
            *x.stride(), q_w.stride(0), *out.stride(), threshold)
    flags = {"HAS_BIAS": bias is not None, "INTERPRET": interpreting}

    def grid(meta):  # one program per BLOCK_N output columns, every row
        return (cdiv(n, meta["BLOCK_N"]),)

    launch_scheduled(_decode_single_kernel, _autotuned, CONFIGS[0], grid, args, flags, INTERPRETER_CONFIG, autotune)
    return out
