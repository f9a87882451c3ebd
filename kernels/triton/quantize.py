"""Activation quantization with outlier columns (docs/SPEC.md), with no host sync.

``_activation_stats_kernel``, one program per block of rows and range of columns, folds into a
zero-filled int32 buffer with atomics:
    row_max_bits[M]:  the row's absmax over elements below the threshold, as fp32 bits. For
                      non-negative floats (and +NaN) the int32 order is the float order, with NaN above
                      Inf, so atomic_max of the bits both reduces the rows and lets NaN win;
    col_flags[K]:     1 where the column holds an outlier;
    block_counts[nkb]: how many columns of each column block are outlier columns (counted once, by the
                      program whose atomic exchange first raised the flag).
``_quantize_rows_kernel``, same tiling: int8 rows with outlier columns zeroed, the fp32 row scales,
and the ascending list of outlier columns (each column block writes its own slice at the offset given
by the counts of the blocks before it), so the result never depends on scheduling.

The prefill schemes "rowwise" and "resident" (INT8MM_PREFILL_QUANT) are in prefill_quantize.py.
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
def _row_reciprocal(s_x):
    """127 / s_x as one IEEE division (plain `/` compiles to the approximate div.full.f32); 0 where s_x is
    zero, NaN or Inf, which quantizes the whole row to 0."""
    usable = (s_x > 0.0) & (s_x < float("inf"))  # NaN comparisons are false
    ones = tl.full(s_x.shape, 1.0, tl.float32)
    return tl.where(usable, tl.div_rn(ones * INT8_MAX, tl.where(usable, s_x, 1.0)), 0.0)


@triton.jit
def _quantize_tile(x, reciprocal, is_outlier_col, INTERPRET: tl.constexpr):
    """round(x * r[row]) as int8, 0 in outlier columns and in rows whose reciprocal is 0. NaN is 0, as in the
    reference: a zero times the infinite reciprocal of a row whose scale is below 127 / FLT_MAX. On the GPU the
    clamp keeps NaN (max.NaN.f32: a plain max.f32 would turn it into -127) and the conversion to int8 makes it 0
    (PTX's cvt from float to integer takes NaN to 0), with no select that would cost registers (one more spilled
    8 bytes in the one-kernel decode under Triton 3.6); numpy's cast promises nothing, so the interpreter selects."""
    q = _round_half_even(x * reciprocal[:, None], INTERPRET)
    if INTERPRET:
        q = tl.where(q != q, 0.0, q)
    q = tl.minimum(tl.maximum(q, -INT8_MAX, propagate_nan=tl.PropagateNan.ALL), INT8_MAX,
                   propagate_nan=tl.PropagateNan.ALL)
    q = tl.where(is_outlier_col[None, :] | (reciprocal == 0.0)[:, None], 0.0, q)
    return q.to(tl.int8)


@triton.jit
def _activation_stats_kernel(
    # pointers
    x_ptr,              # [M, K] fp16/bf16/fp32 activations
    row_max_bits_ptr,   # [M] int32, zero-filled: fp32 bits of each row's absmax below the threshold
    col_flags_ptr,      # [K] int32, zero-filled: 1 where the column holds an outlier
    block_counts_ptr,   # [cdiv(K, BLOCK_K)] int32, zero-filled: outlier columns per column block
    # sizes
    M, K,
    K_PER_PROGRAM,      # columns each program sweeps (a multiple of BLOCK_K)
    # strides
    stride_xm, stride_xk,
    # parameters
    threshold,          # fp32; |x| >= threshold is an outlier, 0 disables decomposition
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One program per BLOCK_M rows x K_PER_PROGRAM columns, swept BLOCK_K at a time: decode splits K
    across many programs (one block each), prefill gives each program a long sweep so loads stream."""
    pid_m = tl.program_id(0)
    k_start = tl.program_id(1) * K_PER_PROGRAM
    k_end = tl.minimum(k_start + K_PER_PROGRAM, K)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    in_m = offs_m < M
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm  # int64: x may span more than 2^31 elements
    row_max = tl.zeros([BLOCK_M], dtype=tl.float32)
    row_nans = tl.zeros([BLOCK_M], dtype=tl.int32)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        in_k = offs_k < k_end
        x = tl.load(x_rows + offs_k[None, :].to(tl.int64) * stride_xk,
                    mask=in_m[:, None] & in_k[None, :], other=0.0).to(tl.float32)
        magnitude = tl.abs(x)
        is_outlier = (magnitude >= threshold) & (threshold > 0.0)  # padding is 0, never an outlier
        row_max = tl.maximum(row_max, tl.max(tl.where(is_outlier, 0.0, magnitude), axis=1))
        # max() may drop NaN; count it apart so a NaN row never gets a finite scale
        row_nans += tl.sum((x != x).to(tl.int32), axis=1)
        col_flag = tl.max(is_outlier.to(tl.int32), axis=0)
        if tl.max(col_flag, axis=0) > 0:  # rare: only tiles that hold outliers touch the flags
            has_flag = col_flag > 0
            previous = tl.atomic_xchg(col_flags_ptr + offs_k, col_flag, mask=has_flag, sem="relaxed")
            newly_flagged = tl.sum((has_flag & (previous == 0)).to(tl.int32), axis=0)
            tl.atomic_add(block_counts_ptr + k0 // BLOCK_K, newly_flagged, sem="relaxed")
    row_max = tl.where(row_nans > 0, float("nan"), row_max)
    # relaxed: the kernel boundary orders these for the next pass
    tl.atomic_max(row_max_bits_ptr + offs_m, row_max.to(tl.int32, bitcast=True), mask=in_m, sem="relaxed")


@triton.jit
def _quantize_rows_kernel(
    # pointers
    x_ptr,               # [M, K] float activations
    row_max_bits_ptr,    # [M] int32 from the stats pass
    col_flags_ptr,       # [K] int32 from the stats pass
    block_counts_ptr,    # [num_k_blocks] int32 from the stats pass
    q_ptr,               # [M, K] int8 out (contiguous)
    s_x_ptr,             # [M] fp32 out: row scales
    outlier_cols_ptr,    # [K] int32 out: ascending outlier column indices (the first `count` valid)
    outlier_count_ptr,   # [1] int32 out
    # sizes
    M, K, num_k_blocks,
    # strides
    stride_xm, stride_xk,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, MAX_K_BLOCKS: tl.constexpr, INTERPRET: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    in_m = offs_m < M
    in_k = offs_k < K

    s_x = tl.load(row_max_bits_ptr + offs_m, mask=in_m, other=0).to(tl.float32, bitcast=True)
    if pid_k == 0:
        tl.store(s_x_ptr + offs_m, s_x, mask=in_m)
    col_flags = tl.load(col_flags_ptr + offs_k, mask=in_k, other=0)
    # int64 element offsets: x (any strides) and q ([M, K]) may span more than 2^31 elements
    rows, ks = offs_m[:, None].to(tl.int64), offs_k[None, :].to(tl.int64)
    x = tl.load(x_ptr + rows * stride_xm + ks * stride_xk, mask=in_m[:, None] & in_k[None, :], other=0.0)
    q = _quantize_tile(x.to(tl.float32), _row_reciprocal(s_x), col_flags > 0, INTERPRET)
    tl.store(q_ptr + rows * K + ks, q, mask=in_m[:, None] & in_k[None, :])

    if pid_m == 0:
        # this column block's slice of the ascending outlier list starts after the earlier blocks' columns
        blocks = tl.arange(0, MAX_K_BLOCKS)
        counts = tl.load(block_counts_ptr + blocks, mask=blocks < num_k_blocks, other=0)
        start = tl.sum(tl.where(blocks < pid_k, counts, 0), axis=0)
        slot = start + tl.cumsum(col_flags, axis=0) - col_flags
        tl.store(outlier_cols_ptr + slot, offs_k, mask=col_flags > 0)
        if pid_k == 0:
            tl.store(outlier_count_ptr + tl.arange(0, 1), tl.sum(counts, axis=0) + tl.zeros([1], tl.int32))
