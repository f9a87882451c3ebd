"""Launcher of the fused decode quantization (kernels/triton/decode.py): one kernel, no fills.

With INT8MM_DECODE_PATH=fused a Triton ``int8_linear`` of M <= 16 rows is two kernels: this one (row scales,
int8 rows, the ascending outlier list and its count) and the fused GEMM. Its outputs equal the classic
path's (``quantize_activations``) bit for bit.

The kernel's last-arriving program finds itself with an atomic ticket on a counter that must be 0 when a
launch starts; the program that draws the last ticket resets it. Counters are the only state kept between
calls: int32s in zeroed chunks allocated once per device (never zeroed again). Who may use which counter:
- an eager call uses the counter of its (device, stream): calls on one stream run one after another, calls
  on two streams never share one;
- a call captured into a CUDA graph takes a counter of its own for good: a graph replays the pointers it
  captured, so two graphs (or a graph and eager work) never share one, whatever streams they replay on.
  A graph must not be replayed concurrently with itself (as for any CUDA graph: its buffers are shared).
Counters are handed out only from chunks already allocated: a chunk is allocated (and, once, the host
waits for its zero-fill) outside graph capture, whenever an eager call finds fewer than CAPTURE_RESERVE
counters left. If a capture still finds none (more captures in a row than the reserve, with no eager call
between them), that call takes the classic path, logged once. A single row needs no counter (its own outlier
list is the batch's).
"""
import functools
import logging
import threading

import torch
import triton

from ..devices import raw_stream
from ..kernels.triton.decode import _decode_quantize_kernel
from . import triton_interpreting

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
# counters per chunk, and int32s between two counters (one 32-byte sector each: no contention between kernels
# running at once on different streams)
COUNTERS_PER_CHUNK = 1024
COUNTER_STRIDE = 8
# an eager call adds chunks while fewer counters than this are left for captures: one captured decode step of
# Llama-3-70B draws 560 (80 layers x 7 linears), and a model is often captured at several batch sizes (each
# chunk's zero-fill is one host wait, outside capture; 4096 counters take 128 KB)
CAPTURE_RESERVE = 4 * COUNTERS_PER_CHUNK


class _CounterPool:
    """Zeroed int32 counters of one device (see the module docstring for who may use which)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.chunks: list[torch.Tensor] = []
        self.next_free = 0  # counters handed out so far, over all chunks
        self.by_stream: dict[int, torch.Tensor] = {}
        self.lock = threading.Lock()

    def _allocate_chunk(self) -> None:
        chunk = torch.zeros(COUNTERS_PER_CHUNK * COUNTER_STRIDE, dtype=torch.int32, device=self.device)
        if self.device.type == "cuda":
            # once per chunk: any stream or graph may get a counter of it, so the fill must be done, not queued
            torch.cuda.current_stream(self.device).synchronize()
        self.chunks.append(chunk)

    def _take(self, may_allocate: bool) -> torch.Tensor | None:
        chunk, index = divmod(self.next_free, COUNTERS_PER_CHUNK)
        if chunk == len(self.chunks):
            if not may_allocate:
                return None
            self._allocate_chunk()
        self.next_free += 1
        return self.chunks[chunk][index * COUNTER_STRIDE: index * COUNTER_STRIDE + 1]

    def counter(self) -> torch.Tensor | None:
        """The counter for a call on the current stream now; None while capturing with none left."""
        with self.lock:
            if self.device.type != "cuda":  # CPU tensors under the interpreter: one program at a time
                stream, capturing = 0, False
            else:
                stream = raw_stream(self.device)
                capturing = torch.cuda.is_current_stream_capturing()
            if capturing:
                return self._take(may_allocate=False)
            counter = self.by_stream.get(stream)
            if counter is None:
                counter = self.by_stream[stream] = self._take(may_allocate=True)
            # outside capture the pool keeps a reserve for the captures to come (each takes a counter for good:
            # a model captured at many batch sizes, or recaptured, draws thousands)
            while len(self.chunks) * COUNTERS_PER_CHUNK - self.next_free < CAPTURE_RESERVE:
                self._allocate_chunk()
            return counter


_pools: dict[torch.device, _CounterPool] = {}
_pools_lock = threading.Lock()


def counter_pool(device: torch.device) -> _CounterPool:
    """The counters of ``device`` (created at first use)."""
    pool = _pools.get(device)
    if pool is None:
        with _pools_lock:
            pool = _pools.setdefault(device, _CounterPool(device))
    return pool


@functools.cache
def _log_capture_fallback_once(device: torch.device) -> None:
    log.warning("int8mm: INT8MM_DECODE_PATH=fused found no free counter on %s while capturing a CUDA graph (each "
                "captured call of 2-16 rows keeps one; an eager decode call tops the free ones up to %d): such "
                "calls use the classic decode path", device, CAPTURE_RESERVE)


def row_tile(k: int) -> int:
    """Columns a program loads at once for rows of ``k`` columns (a power of two)."""
    return min(triton.next_power_of_2(k), ROW_TILE_MAX)


def num_warps(tile: int, m: int) -> int:
    """Warps per row program: one row, about 32 columns per thread (4 to 16 warps); several rows, 16 warps, so
    that the last program's merge of up to 16 x MERGE_TILE columns (pairwise in registers) does not spill."""
    return max(4, min(16, tile // 1024)) if m == 1 else 16


def quantize_for_decode(x: torch.Tensor, threshold: float):
    """``(q_x, s_x, outlier_cols, outlier_count)`` of ``x`` [M, K], 1 <= M <= 16, K >= 1, in one launch.

    Equal bit for bit to the classic path's; ``outlier_cols`` beyond ``outlier_count`` is undefined.
    Returns None (logged once) when a CUDA-graph capture finds no free counter: use the classic path then.

    Raises:
        ValueError: ``x`` has no element or more than MAX_ROWS rows (the kernel's merge covers 16 rows).
    """
    m, k = x.shape
    if not (1 <= m <= MAX_ROWS and k >= 1):
        raise ValueError(f"quantize_for_decode takes x of 1 to {MAX_ROWS} rows and at least one column, "
                         f"got shape {tuple(x.shape)}")
    dev = x.device
    q_x = torch.empty((m, k), dtype=torch.int8, device=dev)
    s_x = torch.empty(m, dtype=torch.float32, device=dev)
    outlier_cols = torch.empty(k, dtype=torch.int32, device=dev)
    outlier_count = torch.empty(1, dtype=torch.int32, device=dev)
    if m == 1:  # the row's own outlier list is the batch's: written straight into the outputs, no counter
        row_cols, row_counts = outlier_cols, outlier_count
        union_flags, counter = q_x, outlier_count  # never touched with one row; typed as the kernel expects
    else:
        counter = counter_pool(dev).counter()
        if counter is None:
            _log_capture_fallback_once(dev)
            return None
        scratch = torch.empty(m * k + m + triton.cdiv(k, 4), dtype=torch.int32, device=dev)
        row_cols, row_counts, flag_words = scratch.split([m * k, m, triton.cdiv(k, 4)])
        union_flags = flag_words.view(torch.int8)
    tile = row_tile(k)
    _decode_quantize_kernel[(m,)](
        x, q_x, s_x, outlier_cols, outlier_count, row_cols, row_counts, union_flags, counter,
        m, k, x.stride(0), x.stride(1), threshold,
        TILE=tile, ROW_IN_REGISTERS=k <= tile, MERGE_TILE=MERGE_TILE, UNION_TILE=min(tile, UNION_TILE_MAX),
        LIST_TILE=LIST_TILE, INTERPRET=triton_interpreting(),
        num_warps=num_warps(tile, m),
    )
    return q_x, s_x, outlier_cols, outlier_count
