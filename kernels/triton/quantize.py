"""Activation quantization with outlier columns (SPEC.md), in two passes and no host sync.

Pass 1 (``_activation_stats_kernel``), one program per [BLOCK_M, BLOCK_K] tile of x:
    per tile, each row's absmax over elements below the threshold (NaN if the tile row holds a NaN),
    and each column's outlier flag within the tile's rows.
Pass 2 (``_quantize_rows_kernel``), same tiling:
    reduces those partials to the row scales s_x and the outlier-column flags, writes int8 rows with
    outlier columns zeroed; program (0, 0) also compacts the flags into an ascending index list + count.
Partials are indexed by tile, so every location is written by exactly one program: no atomics, no
zero-fill, and the result does not depend on scheduling.
"""
import triton
import triton.language as tl
from triton.language.extra import libdevice

INT8_MAX = tl.constexpr(127.0)
# adding then subtracting 1.5 * 2^23 rounds an fp32 |v| < 2^22 to an integer, half to even
ROUND_MAGIC = tl.constexpr(12582912.0)


@triton.jit
def _round_half_even(v, INTERPRET: tl.constexpr):
    if INTERPRET:
        # the interpreter cannot run libdevice; numpy's fp32 add rounds half to even too
        return (v + ROUND_MAGIC) - ROUND_MAGIC
    else:
        return libdevice.rint(v)


@triton.jit
def _activation_stats_kernel(
    # pointers
    x_ptr,            # [M, K] fp16/bf16/fp32 activations
    row_max_ptr,      # [cdiv(K, BLOCK_K), M] fp32 out: absmax of each row's non-outliers in each column block
    col_flags_ptr,    # [cdiv(M, BLOCK_M), K] int8 out: 1 where a column has an outlier in each row block
    # sizes
    M, K,
    # strides
    stride_xm, stride_xk,
    # parameters
    threshold,        # fp32; |x| >= threshold is an outlier, 0 disables decomposition
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    in_m = offs_m < M
    in_k = offs_k < K
    x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                mask=in_m[:, None] & in_k[None, :], other=0.0).to(tl.float32)
    magnitude = tl.abs(x)
    is_outlier = (magnitude >= threshold) & (threshold > 0.0)  # padding is 0, never an outlier
    row_max = tl.max(tl.where(is_outlier, 0.0, magnitude), axis=1)
    # max() may drop NaN; track it explicitly so a NaN row never gets a finite scale
    row_has_nan = tl.max((x != x).to(tl.int32), axis=1) > 0
    row_max = tl.where(row_has_nan, float("nan"), row_max)
    tl.store(row_max_ptr + pid_k * M + offs_m, row_max, mask=in_m)
    col_flag = tl.max(is_outlier.to(tl.int32), axis=0).to(tl.int8)
    tl.store(col_flags_ptr + pid_m * K + offs_k, col_flag, mask=in_k)


@triton.jit
def _outlier_columns_of_block(col_flags_ptr, offs_k, in_k, K, num_m_blocks):
    """OR of the per-row-block flags of columns ``offs_k``, as int32 0/1."""
    flags = tl.zeros(offs_k.shape, dtype=tl.int32)
    for mb in range(0, num_m_blocks):
        flags = tl.maximum(flags, tl.load(col_flags_ptr + mb * K + offs_k, mask=in_k, other=0).to(tl.int32))
    return flags


@triton.jit
def _quantize_rows_kernel(
    # pointers
    x_ptr,               # [M, K] float activations
    row_max_ptr,         # [num_k_blocks, M] fp32 from pass 1
    col_flags_ptr,       # [num_m_blocks, K] int8 from pass 1
    q_ptr,               # [M, K] int8 out (contiguous)
    s_x_ptr,             # [M] fp32 out: row scales
    outlier_cols_ptr,    # [K] int32 out: ascending outlier column indices (first `count` valid)
    outlier_count_ptr,   # [1] int32 out
    # sizes
    M, K, num_k_blocks, num_m_blocks,
    # strides
    stride_xm, stride_xk,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, COMPACT_BLOCK: tl.constexpr, INTERPRET: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    in_m = offs_m < M
    in_k = offs_k < K

    # row scales: max over the column-block partials, NaN if any partial is NaN
    s_x = tl.zeros([BLOCK_M], dtype=tl.float32)
    row_has_nan = tl.zeros([BLOCK_M], dtype=tl.int32)
    for kb in range(0, num_k_blocks):
        partial = tl.load(row_max_ptr + kb * M + offs_m, mask=in_m, other=0.0)
        row_has_nan = tl.maximum(row_has_nan, (partial != partial).to(tl.int32))
        s_x = tl.maximum(s_x, partial)
    s_x = tl.where(row_has_nan > 0, float("nan"), s_x)
    if pid_k == 0:
        tl.store(s_x_ptr + offs_m, s_x, mask=in_m)

    # zero, NaN and Inf scales quantize their whole row to 0 (NaN comparisons are false)
    usable = (s_x > 0.0) & (s_x < float("inf"))
    # div_rn: an IEEE division like the reference (plain `/` compiles to the approximate div.full.f32)
    reciprocal = tl.where(usable, tl.div_rn(tl.full([BLOCK_M], INT8_MAX, tl.float32), tl.where(usable, s_x, 1.0)), 0.0)
    is_outlier_col = _outlier_columns_of_block(col_flags_ptr, offs_k, in_k, K, num_m_blocks) > 0

    x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                mask=in_m[:, None] & in_k[None, :], other=0.0).to(tl.float32)
    q = _round_half_even(x * reciprocal[:, None], INTERPRET)
    q = tl.minimum(tl.maximum(q, -INT8_MAX), INT8_MAX)
    q = tl.where(is_outlier_col[None, :] | (~usable)[:, None], 0.0, q)
    tl.store(q_ptr + offs_m[:, None] * K + offs_k[None, :], q.to(tl.int8), mask=in_m[:, None] & in_k[None, :])

    if (pid_m == 0) & (pid_k == 0):
        _compact_outlier_columns(col_flags_ptr, outlier_cols_ptr, outlier_count_ptr, K, num_m_blocks, COMPACT_BLOCK)


@triton.jit
def _compact_outlier_columns(col_flags_ptr, outlier_cols_ptr, outlier_count_ptr, K, num_m_blocks,
                             COMPACT_BLOCK: tl.constexpr):
    """Ascending list of outlier columns via a running exclusive prefix sum (deterministic order)."""
    count = tl.zeros([1], dtype=tl.int32)
    for k0 in range(0, K, COMPACT_BLOCK):
        offs = k0 + tl.arange(0, COMPACT_BLOCK)
        in_k = offs < K
        flags = _outlier_columns_of_block(col_flags_ptr, offs, in_k, K, num_m_blocks)
        slot = tl.cumsum(flags, axis=0) - flags + tl.sum(count, axis=0)
        tl.store(outlier_cols_ptr + slot, offs, mask=flags > 0)
        count += tl.sum(flags, axis=0)
    tl.store(outlier_count_ptr + tl.arange(0, 1), count)
