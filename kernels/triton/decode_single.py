"""The whole LLM.int8() linear of a decode call (M <= 16 rows) in one kernel: ``INT8MM_DECODE_PATH=single``.

Every program owns BLOCK_N output columns and all the call's rows, and quantizes the activations itself: a
first sweep over x finds each row's scale (the absmax below the threshold, NaN if the row holds one), a second
quantizes x tile by tile (the outlier columns of each tile, those where any row reaches the threshold, become
0) and feeds the int8 tensor-core product, and, if the first sweep met an outlier, a third adds the outlier
columns' fp32 terms in ascending column order, as the classic GEMM's epilogue does. So the output equals the
classic path's bit for bit, with no intermediate buffer, no fill and no second launch. Each program reads x (2 to
64 bytes a column) up to three times, mostly from L1/L2: next to the weight tile it streams, little for a row or
a few, comparable to the weight at 16 rows.
"""
import triton
import triton.language as tl

from .gemm import INV_INT8_MAX, INV_INT8_MAX_SQ
from .quantize import _quantize_tile, _row_reciprocal


@triton.jit
def _decode_single_kernel(
    # pointers
    x_ptr,               # [M, K] fp16/bf16/fp32 activations (any strides)
    b_ptr,               # [N, K] int8 quantized weight (unit K stride)
    out_ptr,             # [M, N] out, x's dtype
    s_w_ptr,             # [N] fp32 weight row scales
    bias_ptr,            # [N] float bias (ignored unless HAS_BIAS)
    # sizes
    M, N, K,
    M_BUCKET,            # only an autotune key: M rounded to a power of two
    # strides
    stride_xm, stride_xk, stride_bn, stride_om, stride_on,
    # parameters
    threshold,           # fp32; |x| >= threshold is an outlier, 0 disables decomposition
    # meta-parameters
    HAS_BIAS: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    in_m = offs_m < M
    in_n = offs_n < N
    # int64 element offsets: x may be a view whose rows lie far apart, the weight may hold more than 2^31 bytes
    rows = offs_m.to(tl.int64)
    cols = offs_n.to(tl.int64)
    x_rows = x_ptr + rows[:, None] * stride_xm

    # sweep 1: row scales; max() may drop NaN, so NaNs are counted apart and a NaN row gets a NaN scale. Its loads
    # are pipelined (cp.async) like the weight stream's: the weight waits for this sweep, K / BLOCK_K steps
    row_max = tl.zeros([BLOCK_M], dtype=tl.float32)
    row_nans = tl.zeros([BLOCK_M], dtype=tl.int32)
    outliers = tl.zeros([BLOCK_M], dtype=tl.int32)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=3):
        in_k = k0 + offs_k < K
        x = tl.load(x_rows + (k0 + offs_k)[None, :].to(tl.int64) * stride_xk, mask=in_m[:, None] & in_k[None, :],
                    other=0.0).to(tl.float32)
        magnitude = tl.abs(x)
        is_outlier = (magnitude >= threshold) & (threshold > 0.0)  # padding is 0, never an outlier
        row_max = tl.maximum(row_max, tl.max(tl.where(is_outlier, 0.0, magnitude), axis=1))
        row_nans += tl.sum((x != x).to(tl.int32), axis=1)
        outliers += tl.sum(is_outlier.to(tl.int32), axis=1)
    s_x = tl.where(row_nans > 0, float("nan"), row_max)
    reciprocal = _row_reciprocal(s_x)

    # sweep 2: quantize each x tile (0 in its outlier columns) and multiply with the weight tile
    b_ptrs = b_ptr + cols[None, :] * stride_bn + offs_k[:, None]  # [BLOCK_K, BLOCK_N] = b.T tile
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        in_k = k0 + offs_k < K
        x = tl.load(x_rows + (k0 + offs_k)[None, :].to(tl.int64) * stride_xk, mask=in_m[:, None] & in_k[None, :],
                    other=0.0).to(tl.float32)
        is_outlier = (tl.abs(x) >= threshold) & (threshold > 0.0)
        outlier_col = tl.max(is_outlier.to(tl.int32), axis=0) > 0
        q = _quantize_tile(x, reciprocal, outlier_col, INTERPRET)
        b = tl.load(b_ptrs + k0, mask=in_k[:, None] & in_n[None, :], other=0)
        acc = tl.dot(q, b, acc, out_dtype=tl.int32)

    # the epilogue of the classic GEMM (kernels/triton/gemm.py), term for term
    s_w = tl.load(s_w_ptr + offs_n, mask=in_n, other=0.0)
    y = acc.to(tl.float32) * s_x[:, None] * (s_w * INV_INT8_MAX_SQ)[None, :]
    w_scale = s_w * INV_INT8_MAX
    if tl.max(outliers, axis=0) > 0:
        # sweep 3 (only when there are outliers): each outlier column's rank-1 update, in ascending order
        for k0 in range(0, K, BLOCK_K):
            in_k = k0 + offs_k < K
            x = tl.load(x_rows + (k0 + offs_k)[None, :].to(tl.int64) * stride_xk,
                        mask=in_m[:, None] & in_k[None, :], other=0.0).to(tl.float32)
            flags = (tl.max(((tl.abs(x) >= threshold) & (threshold > 0.0)).to(tl.int32), axis=0) > 0).to(tl.int32)
            rank = tl.cumsum(flags, axis=0) - 1
            for j in range(0, tl.sum(flags, axis=0)):
                col = (k0 + tl.sum(tl.where((flags > 0) & (rank == j), offs_k, 0), axis=0)).to(tl.int64)
                x_col = tl.load(x_ptr + rows * stride_xm + col * stride_xk, mask=in_m, other=0.0)
                w_col = tl.load(b_ptr + cols * stride_bn + col, mask=in_n, other=0)
                y += x_col.to(tl.float32)[:, None] * (w_col.to(tl.float32) * w_scale)[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=in_n, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on
    tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=in_m[:, None] & in_n[None, :])
