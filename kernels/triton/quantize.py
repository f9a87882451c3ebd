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

Prefill scheme "rowwise" (INT8MM_PREFILL_QUANT), the same outputs bit for bit:
``_rowwise_quantize_kernel``, persistent programs that own whole rows: row scales without atomics, int8
values, and the same col_flags / block_counts (zero-filled); ``_outlier_columns_kernel`` writes the
ascending list and count as above and zeroes the outlier columns of q.
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
    """round(x * r[row]) as int8, 0 in outlier columns and in rows whose reciprocal is 0."""
    q = _round_half_even(x * reciprocal[:, None], INTERPRET)
    q = tl.minimum(tl.maximum(q, -INT8_MAX), INT8_MAX)
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


# ---- prefill (M > 16), scheme "rowwise": stats and quantization in one pass over rows ----
@triton.jit
def _clamp_round_to_int(v, INTERPRET: tl.constexpr):
    """round_half_even(clamp(v, -127, 127)) as int32, with one cvt.rni.s32.f32 on the GPU (rint then a
    truncating conversion would take two conversion instructions, which run at a quarter of the FMA rate).
    Clamping first equals clamping after (the bounds are integers). NaN gives -127: the GPU's max.f32 returns
    the other operand, and the interpreter (whose numpy max keeps NaN) is made to do the same."""
    if INTERPRET:
        v = tl.minimum(tl.maximum(tl.where(v != v, -INT8_MAX, v), -INT8_MAX), INT8_MAX)
        return ((v + ROUND_MAGIC) - ROUND_MAGIC).to(tl.int32)
    else:
        return libdevice.float2int_rn(tl.minimum(tl.maximum(v, -INT8_MAX), INT8_MAX))


@triton.jit
def _rowwise_quantize_kernel(
    # pointers
    x_ptr,              # [M, K] fp16/bf16/fp32 activations (any strides)
    q_ptr,              # [M, K] int8 out (contiguous); outlier columns are zeroed by _outlier_columns_kernel
    s_x_ptr,            # [M] fp32 out: row scales
    col_flags_ptr,      # [K] int32, zero-filled: 1 where the column holds an outlier
    block_counts_ptr,   # [cdiv(K, BLOCK_K)] int32, zero-filled: outlier columns per column block
    # sizes
    M, K,
    # strides
    stride_xm, stride_xk,
    # parameters
    threshold,          # fp32; |x| >= threshold is an outlier, 0 disables decomposition
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, SWEEP_PARTS: tl.constexpr, INTERPRET: tl.constexpr,
):
    """A persistent program owns BLOCK_M whole rows at a time and sweeps them twice: the first sweep keeps
    per-element running maxima in registers (no reduction, barrier or atomic per step) and reduces them once
    per row block, so the row scale needs no atomics; the second sweep quantizes. The launcher keeps the rows
    in flight small enough for the second sweep to read them from L2, so DRAM sees x about once.

    Outlier columns depend on all M rows, so the int8 values of an outlier column's non-outlier elements
    are written here and zeroed by _outlier_columns_kernel; an outlier element itself is written as 0.
    """
    # |x| >= NaN is never true: threshold 0 (no decomposition) needs no test of its own per element
    outlier_bound = tl.where(threshold > 0.0, threshold, float("nan"))
    num_row_blocks = tl.cdiv(M, BLOCK_M)
    for row_block in range(tl.program_id(0), num_row_blocks, tl.num_programs(0)):
        offs_m = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
        in_m = offs_m < M
        x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm  # int64: x may span more than 2^31 elements
        q_rows = q_ptr + offs_m[:, None].to(tl.int64) * K

        # sweep 1: the fp32 bits of |x| with the sign bit cleared order like the magnitudes, with NaN above
        # Inf, so an integer max both keeps the largest magnitude and lets NaN win (no NaN count per step).
        # Each step loads SWEEP_PARTS slices of BLOCK_K // 2 columns before using any and folds them into
        # one set of BLOCK_K // 2 maxima: more bytes in flight per program than the maxima take registers.
        kept_bits = tl.zeros([BLOCK_M, BLOCK_K // 2], dtype=tl.int32)
        seen_outlier = tl.zeros([BLOCK_M, BLOCK_K // 2], dtype=tl.int1)
        for k0 in range(0, K, SWEEP_PARTS * (BLOCK_K // 2)):
            for part in tl.static_range(SWEEP_PARTS):
                offs_k = k0 + part * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
                x = tl.load(x_rows + offs_k[None, :].to(tl.int64) * stride_xk,
                            mask=in_m[:, None] & (offs_k < K)[None, :], other=0.0).to(tl.float32)
                is_outlier = tl.abs(x) >= outlier_bound  # padding is 0, never an outlier
                magnitude_bits = x.to(tl.int32, bitcast=True) & 0x7FFFFFFF
                kept_bits = tl.maximum(kept_bits, tl.where(is_outlier, 0, magnitude_bits))
                seen_outlier = seen_outlier | is_outlier
        s_x = tl.max(kept_bits, axis=1).to(tl.float32, bitcast=True)
        tl.store(s_x_ptr + offs_m, s_x, mask=in_m)
        has_outlier = tl.max(tl.max(seen_outlier.to(tl.int32), axis=1), axis=0) > 0

        # sweep 2: round(x * r), 0 for outlier elements and for rows whose reciprocal is 0 (zero, NaN, Inf)
        reciprocal = _row_reciprocal(s_x)
        zero_row = (reciprocal == 0.0)[:, None]
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            in_k = offs_k < K
            x = tl.load(x_rows + offs_k[None, :].to(tl.int64) * stride_xk,
                        mask=in_m[:, None] & in_k[None, :], other=0.0).to(tl.float32)
            is_outlier = tl.abs(x) >= outlier_bound
            # NaN (x * 0 in a NaN/Inf row) only reaches elements that the where() zeroes
            q = tl.where(is_outlier | zero_row, 0, _clamp_round_to_int(x * reciprocal[:, None], INTERPRET))
            tl.store(q_rows + offs_k[None, :].to(tl.int64), q.to(tl.int8), mask=in_m[:, None] & in_k[None, :])
            if has_outlier:  # rows without outliers (and threshold 0) skip the flags entirely
                col_flag = tl.max(is_outlier.to(tl.int32), axis=0)
                if tl.max(col_flag, axis=0) > 0:
                    has_flag = col_flag > 0
                    previous = tl.atomic_xchg(col_flags_ptr + offs_k, col_flag, mask=has_flag, sem="relaxed")
                    newly_flagged = tl.sum((has_flag & (previous == 0)).to(tl.int32), axis=0)
                    tl.atomic_add(block_counts_ptr + k0 // BLOCK_K, newly_flagged, sem="relaxed")


@triton.jit
def _outlier_columns_kernel(
    # pointers
    col_flags_ptr,       # [K] int32 from _rowwise_quantize_kernel
    block_counts_ptr,    # [num_k_blocks] int32 from _rowwise_quantize_kernel
    q_ptr,               # [M, K] int8 in/out: the outlier columns are zeroed
    outlier_cols_ptr,    # [K] int32 out: ascending outlier column indices (the first `count` valid)
    outlier_count_ptr,   # [1] int32 out
    # sizes
    M, K, num_k_blocks,
    ROWS_PER_PROGRAM,    # rows of q each program zeroes
    # meta-parameters
    BLOCK_K: tl.constexpr,      # the column block of block_counts (the quantize kernel's BLOCK_K)
    MAX_K_BLOCKS: tl.constexpr, BLOCK_R: tl.constexpr, COLS_CHUNK: tl.constexpr,
):
    """Grid (column blocks, row ranges). Each program writes its column block's slice of the ascending
    outlier list (at the offset the earlier blocks' counts give; the programs of one column block write the
    same values) and zeroes those columns in its rows of q: only the M x |O| elements are touched."""
    pid_k = tl.program_id(0)
    pid_r = tl.program_id(1)
    blocks = tl.arange(0, MAX_K_BLOCKS)
    counts = tl.load(block_counts_ptr + blocks, mask=blocks < num_k_blocks, other=0)
    if (pid_k == 0) & (pid_r == 0):
        tl.store(outlier_count_ptr + tl.arange(0, 1), tl.sum(counts, axis=0) + tl.zeros([1], tl.int32))
    n_here = tl.sum(tl.where(blocks == pid_k, counts, 0), axis=0)
    if n_here > 0:
        start = tl.sum(tl.where(blocks < pid_k, counts, 0), axis=0)
        offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        col_flags = tl.load(col_flags_ptr + offs_k, mask=offs_k < K, other=0)
        slot = start + tl.cumsum(col_flags, axis=0) - col_flags
        tl.store(outlier_cols_ptr + slot, offs_k, mask=col_flags > 0)
        tl.debug_barrier()  # the slice, just written by this program's threads, is read back compacted below
        row_start = pid_r * ROWS_PER_PROGRAM
        row_end = tl.minimum(row_start + ROWS_PER_PROGRAM, M)
        for c0 in range(0, n_here, COLS_CHUNK):
            j = c0 + tl.arange(0, COLS_CHUNK)
            cols = tl.load(outlier_cols_ptr + start + j, mask=j < n_here, other=0)
            for r0 in range(row_start, row_end, BLOCK_R):
                rows = r0 + tl.arange(0, BLOCK_R)
                tl.store(q_ptr + rows[:, None].to(tl.int64) * K + cols[None, :].to(tl.int64),
                         tl.zeros([BLOCK_R, COLS_CHUNK], tl.int8),
                         mask=(rows < row_end)[:, None] & (j < n_here)[None, :])
