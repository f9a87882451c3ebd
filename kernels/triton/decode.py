"""Decode (M <= 16 rows) activation quantization in one launch with no fills (docs/SPEC.md).

``_decode_quantize_kernel`` runs one program per row. A decode batch is at most 16 rows of at most a few
ten thousand columns, so a program holds its whole row (or sweeps it twice when the row is longer than
one tile) and computes the row scale itself: no atomics on the row maxima, no zero-filled buffer, and the
row is quantized from the registers it was loaded into. Each program writes

    q_x[m, :]      int8, its own outlier elements already 0;
    s_x[m]         the fp32 row scale;
    row_cols[m, :] the ascending list of the columns where row m holds an outlier, and row_counts[m].

Outlier columns are a property of the whole batch (a column is an outlier if any row holds one), so one
step needs every row: the union of the rows' lists (ascending), the count, and zeroing the union's
columns in every row of q_x. The program that arrives last does it (the ticket pattern: each program
takes a ticket with an acq_rel atomic on a counter; the one that draws M - 1 knows all others are done
and sees their writes, see ``_take_ticket``), then resets the counter to 0 for the next launch. It merges
short lists (the usual case: a few outlier features per token) in registers, longer ones through flags
swept over K in scratch it clears itself first. With a single row the row's own list is the union: the
program writes it straight into the outputs and draws no ticket. Only the counter must be zero when a
launch starts; the launcher keeps one per (device, stream) or per captured call
(int8mm/backends/triton_decode.py).

Every value equals the classic path's bit for bit (``_activation_stats_kernel`` + ``_quantize_rows_kernel``):
the row maximum is the same max over the same elements, and the quantization is the same function.
"""
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents

from .quantize import _quantize_tile, _row_reciprocal

MAX_DECODE_ROWS = tl.constexpr(16)


@triton.jit
def _row_stats(x, in_k, threshold):
    """(absmax below the threshold, NaN count, outlier flags) of one row tile ``x`` [1, TILE] in fp32."""
    magnitude = tl.abs(x)
    is_outlier = (magnitude >= threshold) & (threshold > 0.0) & in_k[None, :]  # padding is never an outlier
    row_max = tl.max(tl.max(tl.where(is_outlier, 0.0, magnitude), axis=1), axis=0)
    # max() may drop NaN; count it apart so a NaN row never gets a finite scale
    nans = tl.sum(tl.sum((x != x).to(tl.int32), axis=1), axis=0)
    return row_max, nans, tl.max(is_outlier.to(tl.int32), axis=0)


@triton.jit
def _append_columns(list_ptr, start, offs_k, flags):
    """Writes the columns whose flag is 1 at list[start:], ascending; returns how many."""
    count = tl.sum(flags, axis=0)
    if count > 0:  # rare: most tiles hold no outlier
        slot = start + tl.cumsum(flags, axis=0) - flags
        tl.store(list_ptr + slot, offs_k, mask=flags > 0)
    return count


@triton.jit
def _take_ticket(ticket_ptr):
    """The arrival rank of this program (0 .. num_programs - 1), ordered after all its writes.

    Memory order (PTX memory model, gpu scope): the CTA barrier orders every thread's earlier stores
    before the one thread that issues the atomic (bar.sync synchronizes the threads of the CTA); the
    atomic is acq_rel, so it releases those stores, and the program that later reads the counter's value
    with its own acq_rel atomic acquires them. Each ticket is one such read-modify-write of the same
    counter, so the programs form a chain in which every program's stores happen before the atomic of
    each program that arrives after it; the last arrival thus sees every program's stores. Triton
    broadcasts a scalar atomic's result to the CTA through shared memory and a barrier, which also
    orders the other threads' later loads after the acquire; the last program still loads what other
    programs wrote with .cg (L2, bypassing the SM's L1) so no stale L1 line can be read.
    """
    tl.debug_barrier()
    return tl.atomic_add(ticket_ptr, 1, sem="acq_rel", scope="gpu")


@triton.jit
def _merge_short_lists(q_ptr, outlier_cols_ptr, row_cols_ptr, counts, rows, in_m, K, MERGE_TILE: tl.constexpr):
    """The union when no row lists more than MERGE_TILE columns (the usual case), ranked in registers: a
    column is kept at its first occurrence, and its slot is the number of distinct columns below it."""
    j = tl.arange(0, MERGE_TILE)
    listed = in_m[:, None] & (j[None, :] < counts[:, None])
    cols = tl.load(row_cols_ptr + rows[:, None].to(tl.int64) * K + j[None, :], mask=listed, other=0,
                   cache_modifier=".cg")
    value = tl.reshape(cols, [MAX_DECODE_ROWS * MERGE_TILE])
    valid = tl.reshape(listed.to(tl.int32), [MAX_DECODE_ROWS * MERGE_TILE]) > 0
    order = tl.arange(0, MAX_DECODE_ROWS * MERGE_TILE)
    seen_before = (value[:, None] == value[None, :]) & valid[None, :] & (order[None, :] < order[:, None])
    first = valid & (tl.max(seen_before.to(tl.int32), axis=1) == 0)
    slot = tl.sum(((value[None, :] < value[:, None]) & first[None, :]).to(tl.int32), axis=1)
    tl.store(outlier_cols_ptr + slot, value, mask=first)
    q_rows = q_ptr + rows[:, None].to(tl.int64) * K
    tl.store(q_rows + value[None, :], tl.zeros([MAX_DECODE_ROWS, MAX_DECODE_ROWS * MERGE_TILE], tl.int8),
             mask=in_m[:, None] & first[None, :])
    return tl.sum(first.to(tl.int32), axis=0)


@triton.jit
def _union_by_flags(q_ptr, outlier_cols_ptr, row_cols_ptr, union_flags_ptr, counts, most, rows, in_m, K,
                    UNION_TILE: tl.constexpr, LIST_TILE: tl.constexpr):
    """The union for rows with many outlier columns: flags over K (cleared here: the scratch is per call and
    uninitialised), set from every row's list, then swept in order."""
    offs = tl.arange(0, UNION_TILE)
    for k0 in range(0, K, UNION_TILE):
        tl.store(union_flags_ptr + k0 + offs, tl.zeros([UNION_TILE], tl.int8), mask=k0 + offs < K)
    tl.debug_barrier()  # the CTA's clearing stores before its flag stores
    row_lists = row_cols_ptr + rows[:, None].to(tl.int64) * K
    for j0 in range(0, most, LIST_TILE):
        j = j0 + tl.arange(0, LIST_TILE)
        listed = in_m[:, None] & (j[None, :] < counts[:, None])
        cols = tl.load(row_lists + j[None, :], mask=listed, other=0, cache_modifier=".cg")
        tl.store(union_flags_ptr + cols, tl.full([MAX_DECODE_ROWS, LIST_TILE], 1, tl.int8), mask=listed)
    tl.debug_barrier()  # the flag stores before the CTA reads them back
    total = most * 0
    for k0 in range(0, K, UNION_TILE):
        offs_k = k0 + offs
        flags = tl.load(union_flags_ptr + offs_k, mask=offs_k < K, other=0).to(tl.int32)
        total += _append_columns(outlier_cols_ptr, total, offs_k, flags)
    tl.debug_barrier()  # the list's stores before the CTA reads it back
    q_rows = q_ptr + rows[:, None].to(tl.int64) * K
    for j0 in range(0, total, LIST_TILE):
        j = j0 + tl.arange(0, LIST_TILE)
        cols = tl.load(outlier_cols_ptr + j, mask=j < total, other=0)
        tl.store(q_rows + cols[None, :], tl.zeros([MAX_DECODE_ROWS, LIST_TILE], tl.int8),
                 mask=in_m[:, None] & (j < total)[None, :])
    return total


@triton.jit
def _union_outlier_columns(
    q_ptr, outlier_cols_ptr, outlier_count_ptr, row_cols_ptr, row_counts_ptr, union_flags_ptr,
    M, K, MERGE_TILE: tl.constexpr, UNION_TILE: tl.constexpr, LIST_TILE: tl.constexpr,
):
    """The last program's step: the ascending union of the rows' outlier lists, its count, and q_x = 0 in
    those columns for every row."""
    rows = tl.arange(0, MAX_DECODE_ROWS)
    in_m = rows < M
    counts = tl.load(row_counts_ptr + rows, mask=in_m, other=0, cache_modifier=".cg")
    most = tl.max(counts, axis=0)
    total = most * 0
    if most > 0:
        if most <= MERGE_TILE:
            total = _merge_short_lists(q_ptr, outlier_cols_ptr, row_cols_ptr, counts, rows, in_m, K, MERGE_TILE)
        else:
            total = _union_by_flags(q_ptr, outlier_cols_ptr, row_cols_ptr, union_flags_ptr, counts, most, rows,
                                    in_m, K, UNION_TILE, LIST_TILE)
    tl.store(outlier_count_ptr + tl.arange(0, 1), total + tl.zeros([1], tl.int32))


@triton.jit
def _decode_quantize_kernel(
    # pointers
    x_ptr,               # [M, K] fp16/bf16/fp32 activations (any strides)
    q_ptr,               # [M, K] int8 out (contiguous)
    s_x_ptr,             # [M] fp32 out: row scales
    outlier_cols_ptr,    # [K] int32 out: ascending outlier columns (the first `count` valid)
    outlier_count_ptr,   # [1] int32 out
    row_cols_ptr,        # [M, K] int32 scratch: each row's own outlier columns (M == 1: outlier_cols_ptr)
    row_counts_ptr,      # [M] int32 scratch: their counts (M == 1: outlier_count_ptr)
    union_flags_ptr,     # [K] int8 scratch, any content (M > 1)
    ticket_ptr,          # [1] int32, 0 when the launch starts and again when it ends (M > 1)
    # sizes
    M, K,
    # strides
    stride_xm, stride_xk,
    # parameters
    threshold,           # fp32; |x| >= threshold is an outlier, 0 disables decomposition
    # meta-parameters
    TILE: tl.constexpr,              # columns per step, a power of two
    ROW_IN_REGISTERS: tl.constexpr,  # K <= TILE: one load, quantized from registers
    MERGE_TILE: tl.constexpr,        # rows listing at most this many columns are merged in registers
    UNION_TILE: tl.constexpr,        # else the union sweeps K, this many columns per step (<= TILE)
    LIST_TILE: tl.constexpr,         # list entries per step of the union
    INTERPRET: tl.constexpr,
    LAUNCH_DEPENDENTS: tl.constexpr = False,  # sm_90+: let a kernel launched with PDL start now (it waits for us)
):
    if LAUNCH_DEPENDENTS:
        # programmatic dependent launch: the GEMM after this kernel may be scheduled while it runs; the GEMM waits
        # (griddepcontrol.wait) for this grid to finish, and its memory to be visible, before reading anything
        gdc_launch_dependents()
    row = tl.program_id(0)
    offs = tl.arange(0, TILE)
    # int64 element offsets: x (any strides, a view whose rows or columns lie far apart) may span more than 2^31
    x_row = x_ptr + row.to(tl.int64) * stride_xm
    q_row = q_ptr + row.to(tl.int64) * K
    own_cols = row_cols_ptr + row.to(tl.int64) * K
    if ROW_IN_REGISTERS:
        in_k = offs < K
        x = tl.load(x_row + offs[None, :].to(tl.int64) * stride_xk, mask=in_k[None, :], other=0.0).to(tl.float32)
        row_max, nans, flags = _row_stats(x, in_k, threshold)
        s_x = tl.where(nans > 0, float("nan"), row_max) + tl.zeros([1], tl.float32)
        q = _quantize_tile(x, _row_reciprocal(s_x), flags > 0, INTERPRET)
        tl.store(q_row + offs[None, :], q, mask=in_k[None, :])
        count = _append_columns(own_cols, 0, offs, flags)  # after the store: x no longer holds registers
    else:
        # a row longer than a tile: statistics, then quantization on a second sweep (mostly L1/L2 hits)
        row_max = 0.0
        nans = 0
        count = 0
        for k0 in range(0, K, TILE):
            offs_k = k0 + offs
            in_k = offs_k < K
            x = tl.load(x_row + offs_k[None, :].to(tl.int64) * stride_xk, mask=in_k[None, :],
                        other=0.0).to(tl.float32)
            tile_max, tile_nans, flags = _row_stats(x, in_k, threshold)
            row_max = tl.maximum(row_max, tile_max)
            nans += tile_nans
            count += _append_columns(own_cols, count, offs_k, flags)
        s_x = tl.where(nans > 0, float("nan"), row_max) + tl.zeros([1], tl.float32)
        reciprocal = _row_reciprocal(s_x)
        for k0 in range(0, K, TILE):
            offs_k = k0 + offs
            in_k = offs_k < K
            x = tl.load(x_row + offs_k[None, :].to(tl.int64) * stride_xk, mask=in_k[None, :],
                        other=0.0).to(tl.float32)
            magnitude = tl.abs(x)
            is_outlier = (magnitude >= threshold) & (threshold > 0.0)
            q = _quantize_tile(x, reciprocal, tl.max(is_outlier.to(tl.int32), axis=0) > 0, INTERPRET)
            tl.store(q_row + offs_k[None, :], q, mask=in_k[None, :])
    tl.store(s_x_ptr + row + tl.arange(0, 1), s_x)
    tl.store(row_counts_ptr + row + tl.arange(0, 1), count + tl.zeros([1], tl.int32))
    if M > 1:
        if _take_ticket(ticket_ptr) == M - 1:
            _union_outlier_columns(q_ptr, outlier_cols_ptr, outlier_count_ptr, row_cols_ptr, row_counts_ptr,
                                   union_flags_ptr, M, K, MERGE_TILE, UNION_TILE, LIST_TILE)
            # every program has drawn its ticket: the counter is free for the next launch
            tl.atomic_xchg(ticket_ptr, 0, sem="relaxed", scope="gpu")
