"""Prefill (M > 16) activation quantization by programs that own whole rows (docs/SPEC.md): the same outputs as
the classic passes in quantize.py, bit for bit, with no host sync.

``_row_quantize_kernel`` computes each row's scale itself, so no atomics fold row maxima: the fp32 bits of |x|
with the sign bit cleared order like the magnitudes, with NaN above Inf, so an integer max keeps the largest
magnitude and lets NaN win (no NaN count). It writes the int8 rows (an outlier element itself as 0), the row
scales, and sets the bit of each column where a row holds an outlier (a bit per column, K / 32 words) with an
atomic OR whose reply nobody waits for (run 4 on an H200 set int32 flags and per-block counts with an exchange then
an add per tile: two round trips that each program waited for, on the same few addresses from every row). Two
schedules (INT8MM_PREFILL_QUANT):

- "rowwise": persistent programs own BLOCK_M rows at a time and sweep them twice, the second sweep from L2 (the
  launcher keeps the rows in flight within a share of the L2);
- "resident": one program per row block, which loads the whole row once and quantizes it from the registers it
  was loaded into (ROW_IN_REGISTERS, K <= BLOCK_K): DRAM and L2 see x once. Longer rows are swept twice.

Outlier columns depend on all M rows, so the int8 values of an outlier column's other elements are written here
and zeroed by ``_outlier_columns_kernel``, which also counts the bits (a population count of the words before
each column block gives its offset in the list) and writes the ascending list and its count.
"""
import triton
import triton.language as tl
from triton.language.extra import libdevice

from .quantize import INT8_MAX, ROUND_MAGIC, _row_reciprocal

# columns whose outlier bits a thread gathers before one atomic OR: a divisor of 32 that fits the 4 or 8 columns of
# every 16-byte load of x
FLAG_CHUNK = tl.constexpr(4)


@triton.jit
def _clamp_round_to_int(v, INTERPRET: tl.constexpr):
    """round_half_even(clamp(v, -127, 127)) as int32, with one cvt.rni.s32.f32 on the GPU (rint then a
    truncating conversion would take two conversion instructions, which run at a quarter of the FMA rate).
    Clamping first equals clamping after (the bounds are integers). NaN gives 0, as in the reference: a zero times
    the infinite reciprocal of a row whose scale is below 127 / FLT_MAX (left alone, the GPU's max.f32 would
    return the other operand, -127)."""
    v = tl.minimum(tl.maximum(tl.where(v != v, 0.0, v), -INT8_MAX), INT8_MAX)
    if INTERPRET:
        return ((v + ROUND_MAGIC) - ROUND_MAGIC).to(tl.int32)
    else:
        return libdevice.float2int_rn(v)


@triton.jit
def _magnitude_bits(x):
    """The fp32 bits of |x|: as int32 they order like the magnitudes, with NaN above Inf."""
    return x.to(tl.int32, bitcast=True) & 0x7FFFFFFF


@triton.jit
def _store_quantized(x, reciprocal, is_outlier, q_rows, flag_words_ptr, k0, offs_k, mask, flag_columns,
                     INTERPRET: tl.constexpr):
    """Stores the tile's round(x * r) as int8 (0 for outlier elements and in rows whose reciprocal is 0: zero, NaN,
    Inf) and, if ``flag_columns``, sets the bits of its outlier columns (tile columns from ``k0``)."""
    zero = is_outlier | (reciprocal == 0.0)[:, None]
    # NaN (x * 0 in a NaN/Inf row) only reaches elements that the where() zeroes
    q = tl.where(zero, 0, _clamp_round_to_int(x * reciprocal[:, None], INTERPRET))
    tl.store(q_rows + offs_k[None, :].to(tl.int64), q.to(tl.int8), mask=mask)
    if flag_columns:  # rows without outliers (and threshold 0) skip the flags entirely
        # the bits of each run of FLAG_CHUNK columns of a row, gathered within the thread that holds them (a run
        # lies in one 16-byte load), go to their word with one atomic OR, only where a run holds an outlier: no
        # reply to wait for, and no per-column store (which Triton gives a layout of its own, through shared memory)
        num_runs: tl.constexpr = x.shape[0] * x.shape[1] // FLAG_CHUNK
        runs = tl.reshape(is_outlier.to(tl.int32), [num_runs, FLAG_CHUNK])  # row by row, FLAG_CHUNK columns each
        bits = tl.sum(runs << tl.arange(0, FLAG_CHUNK)[None, :], axis=1)  # padding is never an outlier
        first_col = k0 + (tl.arange(0, num_runs) % (x.shape[1] // FLAG_CHUNK)) * FLAG_CHUNK
        tl.atomic_or(flag_words_ptr + first_col // 32, bits << (first_col % 32), mask=bits != 0, sem="relaxed")


@triton.jit
def _row_quantize_kernel(
    # pointers
    x_ptr,              # [M, K] fp16/bf16/fp32 activations (any strides)
    q_ptr,              # [M, K] int8 out (contiguous); outlier columns are zeroed by _outlier_columns_kernel
    s_x_ptr,            # [M] fp32 out: row scales
    flag_words_ptr,     # [cdiv(K, 32)] int32, zero-filled: bit k % 32 of word k // 32 is set where column k holds
                        # an outlier
    # sizes
    M, K,
    # strides
    stride_xm, stride_xk,
    # parameters
    threshold,          # fp32; |x| >= threshold is an outlier, 0 disables decomposition
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    SWEEP_PARTS: tl.constexpr,       # two sweeps: slices of BLOCK_K // 2 columns loaded per step of the first
    ROW_IN_REGISTERS: tl.constexpr,  # K <= BLOCK_K: one load, quantized from registers
    INTERPRET: tl.constexpr,
):
    # |x| >= NaN is never true: threshold 0 (no decomposition) needs no test of its own per element
    outlier_bound = tl.where(threshold > 0.0, threshold, float("nan"))
    num_row_blocks = tl.cdiv(M, BLOCK_M)
    for row_block in range(tl.program_id(0), num_row_blocks, tl.num_programs(0)):
        offs_m = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
        in_m = offs_m < M
        x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm  # int64: x may span more than 2^31 elements
        q_rows = q_ptr + offs_m[:, None].to(tl.int64) * K
        if ROW_IN_REGISTERS:
            offs_k = tl.arange(0, BLOCK_K)
            mask = in_m[:, None] & (offs_k < K)[None, :]
            x = tl.load(x_rows + offs_k[None, :].to(tl.int64) * stride_xk, mask=mask, other=0.0).to(tl.float32)
            is_outlier = tl.abs(x) >= outlier_bound  # padding is 0, never an outlier
            s_x = tl.max(tl.where(is_outlier, 0, _magnitude_bits(x)), axis=1).to(tl.float32, bitcast=True)
            tl.store(s_x_ptr + offs_m, s_x, mask=in_m)
            has_outlier = tl.max(tl.max(is_outlier.to(tl.int32), axis=1), axis=0) > 0
            _store_quantized(x, _row_reciprocal(s_x), is_outlier, q_rows, flag_words_ptr, 0, offs_k, mask,
                             has_outlier, INTERPRET)
        else:
            # sweep 1: per-element running maxima in registers (no reduction, barrier or atomic per step), reduced
            # once per row block. Each step loads SWEEP_PARTS slices of BLOCK_K // 2 columns before using any and
            # folds them into one set of BLOCK_K // 2 maxima: more bytes in flight than the maxima take registers.
            kept_bits = tl.zeros([BLOCK_M, BLOCK_K // 2], dtype=tl.int32)
            seen_outlier = tl.zeros([BLOCK_M, BLOCK_K // 2], dtype=tl.int1)
            for k0 in range(0, K, SWEEP_PARTS * (BLOCK_K // 2)):
                for part in tl.static_range(SWEEP_PARTS):
                    offs_k = k0 + part * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
                    x = tl.load(x_rows + offs_k[None, :].to(tl.int64) * stride_xk,
                                mask=in_m[:, None] & (offs_k < K)[None, :], other=0.0).to(tl.float32)
                    is_outlier = tl.abs(x) >= outlier_bound
                    kept_bits = tl.maximum(kept_bits, tl.where(is_outlier, 0, _magnitude_bits(x)))
                    seen_outlier = seen_outlier | is_outlier
            s_x = tl.max(kept_bits, axis=1).to(tl.float32, bitcast=True)
            tl.store(s_x_ptr + offs_m, s_x, mask=in_m)
            has_outlier = tl.max(tl.max(seen_outlier.to(tl.int32), axis=1), axis=0) > 0
            # sweep 2: quantize
            reciprocal = _row_reciprocal(s_x)
            for k0 in range(0, K, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                mask = in_m[:, None] & (offs_k < K)[None, :]
                x = tl.load(x_rows + offs_k[None, :].to(tl.int64) * stride_xk, mask=mask, other=0.0).to(tl.float32)
                _store_quantized(x, reciprocal, tl.abs(x) >= outlier_bound, q_rows, flag_words_ptr, k0, offs_k, mask,
                                 has_outlier, INTERPRET)


@triton.jit
def _bits_set(words):
    """The number of set bits of each int32 word (the SWAR population count, on uint32 so shifts are logical)."""
    v = words.to(tl.uint32, bitcast=True)
    v = v - ((v >> 1) & 0x55555555)
    v = (v & 0x33333333) + ((v >> 2) & 0x33333333)
    v = (v + (v >> 4)) & 0x0F0F0F0F
    return ((v * 0x01010101) >> 24).to(tl.int32)


@triton.jit
def _outlier_columns_kernel(
    # pointers
    flag_words_ptr,      # [cdiv(K, 32)] int32 from _row_quantize_kernel: bit k % 32 of word k // 32 for column k
    q_ptr,               # [M, K] int8 in/out: the outlier columns are zeroed
    outlier_cols_ptr,    # [K] int32 out: ascending outlier column indices (the first `count` valid)
    outlier_count_ptr,   # [1] int32 out
    # sizes
    M, K,
    ROWS_PER_PROGRAM,    # rows of q each program zeroes
    # meta-parameters
    BLOCK_K: tl.constexpr,      # columns per column block, a multiple of 32
    COUNT_TILE: tl.constexpr,   # flag words counted per step
    BLOCK_R: tl.constexpr, COLS_CHUNK: tl.constexpr,
):
    """Grid (column blocks, row ranges). A program whose column block holds outlier columns counts the bits of
    the blocks before it, writes its slice of the ascending list at that offset (the programs of one column block
    write the same values) and zeroes those columns in its rows of q: only the M x |O| elements are touched. The
    last column block's first program writes the count."""
    pid_k = tl.program_id(0)
    pid_r = tl.program_id(1)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    words = tl.load(flag_words_ptr + offs_k // 32, mask=offs_k < K, other=0)
    col_flags = (words >> (offs_k % 32)) & 1  # bit j of a word, whatever the sign extension of the shift
    n_here = tl.sum(col_flags, axis=0)
    writes_count = (pid_k == tl.num_programs(0) - 1) & (pid_r == 0)
    if (n_here > 0) | writes_count:
        start = n_here * 0
        for w0 in range(0, pid_k * (BLOCK_K // 32), COUNT_TILE):
            offs_w = w0 + tl.arange(0, COUNT_TILE)
            earlier = tl.load(flag_words_ptr + offs_w, mask=offs_w < pid_k * (BLOCK_K // 32), other=0)
            start += tl.sum(_bits_set(earlier), axis=0)
        if writes_count:
            tl.store(outlier_count_ptr + tl.arange(0, 1), start + n_here + tl.zeros([1], tl.int32))
        if n_here > 0:
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
