"""Launcher of the fused decode quantization (kernels/triton/decode.py): one kernel, no fills.

With INT8MM_DECODE_PATH=fused a Triton ``int8_linear`` of M <= 16 rows is two kernels: this one (row scales,
int8 rows, the ascending outlier list and its count) and the fused GEMM. Its outputs equal the classic
path's (``quantize_activations``) bit for bit.

The kernel's last-arriving program finds itself with an atomic ticket on a counter that must be 0 when a
launch starts; the program that draws the last ticket resets it. The counters come from
``triton_counters.counter_pool`` (per (device, stream) for eager calls, for good per captured call). If a capture
finds none left, that call takes the classic path, logged once. A single row needs no counter (its own outlier
list is the batch's).
"""
import functools
import logging

import torch

from ..kernels.triton.decode import _decode_quantize_kernel
from . import programmatic_launch, scratch, triton_counters, triton_interpreting
from .triton_launch import cdiv, launch, next_power_of_2, round_up

log = logging.getLogger("int8mm")

MAX_ROWS = 16  # the kernel's row limit (the decode regime)
# Columns a program loads at once (about 32 per thread at 16 warps, which fits the 128 registers a thread has
# then without spilling, AOT-checked): a row up to this long is loaded in one go and quantized from registers;
# longer rows (Llama-3-70B down_proj: 28672) are swept twice, the second sweep mostly from L1/L2
ROW_TILE_MAX = 16384
# the last program merges the rows' outlier lists in registers when none lists more than MERGE_TILE columns
# (LLM activations hold a handful of outlier features per token); otherwise it sweeps union flags over K,
# UNION_TILE_MAX columns per step (few registers; several steps for long rows)
MERGE_TILE = 8
UNION_TILE_MAX = 4096
# list entries per step of the flag sweep (setting the flags from the rows' lists, zeroing the columns of q_x)
LIST_TILE = 32


@functools.cache
def _log_capture_fallback_once(device: torch.device) -> None:
    log.warning("int8mm: INT8MM_DECODE_PATH=fused found no free counter on %s while capturing a CUDA graph (each "
                "captured call of 2-16 rows keeps one, %d int32 words; an eager call tops the pool up to %d free "
                "words): such calls use the classic decode path", device, triton_counters.SLOT_WORDS,
                triton_counters.CAPTURE_RESERVE_WORDS)


def row_tile(k: int, row_tile_max: int | None = None) -> int:
    """Columns a program loads at once for rows of ``k`` columns (a power of two), at most ``row_tile_max``
    (default ROW_TILE_MAX)."""
    return min(next_power_of_2(k), ROW_TILE_MAX if row_tile_max is None else row_tile_max)


def num_warps(tile: int, m: int) -> int:
    """Warps per row program: one row, about 32 columns per thread (4 to 16 warps); several rows, 16 warps, so
    that the last program's merge of up to 16 x MERGE_TILE columns (pairwise in registers) does not spill."""
    return max(4, min(16, tile // 1024)) if m == 1 else 16


def _buffers(m: int, k: int):
    """The scratch layout of one call (``scratch.Layout``): q_x int8 [M, K], s_x fp32 [M], outlier columns int32
    [K] and their count int32 [1]; with several rows also each row's outlier list ([M, K] int32 words), each
    row's count and the union flags (K bytes), each starting 16-byte aligned (one compiled variant whatever M and K
    are modulo 4). With one row, the row's outlier list is the batch's: written straight into the outputs, and no
    flags are needed (q_x stands in, typed as the kernel expects)."""
    cols_words, counts_words = round_up(m * k, 4), round_up(m, 4)
    parts = [(torch.int8, m * k), (torch.float32, m), (torch.int32, k), (torch.int32, 1)]
    if m > 1:
        parts.append((torch.int32, cols_words + counts_words + cdiv(k, 4)))

    def finish(views):
        q_x, s_x, outlier_cols, outlier_count = views[0].view(m, k), views[1], views[2], views[3]
        if m == 1:
            return q_x, s_x, outlier_cols, outlier_count, outlier_cols, outlier_count, q_x
        rows = views[4]
        return (q_x, s_x, outlier_cols, outlier_count, rows[:m * k], rows[cols_words:cols_words + m],
                rows[cols_words + counts_words:].view(torch.int8))

    return parts, finish


def quantize_for_decode(x: torch.Tensor, threshold: float, reuse: bool = False):
    """``(q_x, s_x, outlier_cols, outlier_count)`` of ``x`` [M, K], 1 <= M <= 16, K >= 1, in one launch.

    Equal bit for bit to the classic path's; ``outlier_cols`` beyond ``outlier_count`` is undefined.
    Returns None (logged once) when a CUDA-graph capture finds no free counter: use the classic path then.
    With ``reuse`` the outputs (and the kernel's scratch) are this thread's kept buffers for this shape and stream
    (``scratch.reused``): the next such call overwrites them, so only a caller that is done with them by then
    (``int8_linear``, whose GEMM reads them in stream order) may ask for it.

    Raises:
        ValueError: ``x`` has no element or more than MAX_ROWS rows (the kernel's merge covers 16 rows).
    """
    m, k = x.shape
    if not (1 <= m <= MAX_ROWS and k >= 1):
        raise ValueError(f"quantize_for_decode takes x of 1 to {MAX_ROWS} rows and at least one column, "
                         f"got shape {tuple(x.shape)}")
    dev = x.device
    counter = None
    if m > 1:
        counter = triton_counters.counter_pool(dev).counters(1)
        if counter is None:
            _log_capture_fallback_once(dev)
            return None
    buffers = (reuse and scratch.reused(x, _buffers, m, k)) or scratch.fresh(x, _buffers, m, k)
    q_x, s_x, outlier_cols, outlier_count, row_cols, row_counts, union_flags = buffers
    launch(_decode_quantize_kernel, (m,), (
        x, q_x, s_x, outlier_cols, outlier_count, row_cols, row_counts, union_flags,
        counter if counter is not None else outlier_count, m, k, *x.stride(), threshold,
    ), _options(m, k, triton_interpreting(), programmatic_launch(dev), ROW_TILE_MAX, MERGE_TILE, UNION_TILE_MAX,
                LIST_TILE))
    return q_x, s_x, outlier_cols, outlier_count


@functools.lru_cache(maxsize=1024)
def _options(m: int, k: int, interpreting: bool, launch_dependents: bool, row_tile_max: int, merge_tile: int,
             union_tile_max: int, list_tile: int) -> dict:
    """The kernel's constexprs and warps for ``m`` rows of ``k`` columns, from the module's tile sizes as passed
    (tests change them): one dict per setting, never changed (a decode call would otherwise build it anew)."""
    tile = row_tile(k, row_tile_max)
    return {"TILE": tile, "ROW_IN_REGISTERS": k <= tile, "MERGE_TILE": merge_tile,
            "UNION_TILE": min(tile, union_tile_max), "LIST_TILE": list_tile, "INTERPRET": interpreting,
            "LAUNCH_DEPENDENTS": launch_dependents, "num_warps": num_warps(tile, m)}
