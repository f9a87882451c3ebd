"""Zeroed int32 counters on the device, for kernels whose last-arriving program finds itself with an atomic ticket.

The fused decode quantization (triton_decode.py, one counter per call) and the split-K decode GEMM
(triton_splitk.py, one counter per output tile) need counters that are 0 when a launch starts; the program that
draws a counter's last ticket resets it, so a counter is zeroed once, when allocated, and never again. Who may
use which counters:
- an eager call uses the counters of its (device, stream, length): calls on one stream run one after another,
  calls on two streams never share any;
- a call captured into a CUDA graph takes counters of its own for good: a graph replays the pointers it
  captured, so two graphs (or a graph and eager work) never share any, whatever streams they replay on.
  A graph must not be replayed concurrently with itself (as for any CUDA graph: its buffers are shared).
- a call inside the ``int8mm::int8_linear`` op outside capture (``scratch.not_kept``: torch.compile, whose CUDA
  graphs warm up allocating into the graph's private pool, where no chunk may stay) gets zeroed counters of its
  own, allocated for it and freed with it.
Otherwise counters are handed out only from chunks already allocated: a chunk is allocated (and, once, the host
waits for its zero-fill) outside graph capture, whenever an eager call finds fewer than CAPTURE_RESERVE_WORDS free.
A capture that finds no room gets None and its caller takes a path without counters (each caller logs it).
"""
import threading

import torch

from ..devices import raw_stream
from .scratch import not_kept_here

# int32 words per chunk (256 KB; a larger request gets a chunk of its own size)
CHUNK_WORDS = 64 * 1024
# each request starts on a 32-byte sector of its own and takes whole sectors: no two requests (kernels that may
# run at once on different streams) share one. The counters of one request (one per output tile of a split-K
# GEMM) are contiguous, 8 to a sector
SLOT_WORDS = 8
# eager calls keep this many words free for captures to come: a captured decode step of Llama-3-70B draws
# about 71 thousand (80 layers x 7 linears: 8 words per quantization counter, one word per output tile of the
# split-K GEMMs), and a model is often captured at several batch sizes (each chunk's zero-fill is one host wait,
# outside capture)
CAPTURE_RESERVE_WORDS = 8 * CHUNK_WORDS


class CounterPool:
    """Zeroed int32 counters of one device (see the module docstring for who may use which)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.on_cuda = device.type == "cuda"  # asked on every call; device.type is slow to read (0.26 us)
        self.chunks: list[torch.Tensor] = []
        self.used: list[int] = []  # words handed out of each chunk, from its start
        self.free = 0  # words not handed out, over all chunks (kept, not summed: eager calls ask on every call)
        self.by_stream: dict[tuple[int, int], torch.Tensor] = {}
        self.lock = threading.Lock()

    def free_words(self) -> int:
        return self.free

    def _allocate_chunk(self, words: int) -> None:
        chunk = torch.zeros(max(words, CHUNK_WORDS), dtype=torch.int32, device=self.device)
        if self.on_cuda:
            # once per chunk: any stream or graph may get counters of it, so the fill must be done, not queued
            torch.cuda.current_stream(self.device).synchronize()
        self.chunks.append(chunk)
        self.used.append(0)
        self.free += chunk.numel()

    def take(self, length: int, may_allocate: bool) -> torch.Tensor | None:
        """``length`` counters of their own, from the first chunk with room (a new one if allowed), or None."""
        words = -(-length // SLOT_WORDS) * SLOT_WORDS
        for index, (chunk, used) in enumerate(zip(self.chunks, self.used)):
            if chunk.numel() - used >= words:
                self.used[index] = used + words
                self.free -= words
                return chunk[used: used + length]
        if not may_allocate:
            return None
        self._allocate_chunk(words)
        self.used[-1] = words
        self.free -= words
        return self.chunks[-1][:length]

    def counters(self, length: int = 1) -> torch.Tensor | None:
        """``length`` counters for a call on the current stream now; None while capturing with no room left."""
        if length < 1:
            raise ValueError(f"length must be at least 1, got {length}")
        with self.lock:
            if not self.on_cuda:  # CPU tensors under the interpreter: one program at a time
                stream, capturing = 0, False
            else:
                stream = raw_stream(self.device)
                capturing = torch.cuda.is_current_stream_capturing()
            if capturing:
                return self.take(length, may_allocate=False)
            if not_kept_here():
                # the int8_linear op outside capture: torch.compile's CUDA graphs warm up there with every
                # allocation going to the graph's private pool, which must keep no chunk; so counters of this
                # call alone, zeroed now, freed (stream-ordered) with the call
                return torch.zeros(length, dtype=torch.int32, device=self.device)
            found = self.by_stream.get((stream, length))
            if found is None:
                found = self.by_stream[(stream, length)] = self.take(length, may_allocate=True)
            # outside capture the pool keeps a reserve for the captures to come (each takes its counters for good:
            # a model captured at many batch sizes, or recaptured, draws many)
            while self.free_words() < CAPTURE_RESERVE_WORDS:
                self._allocate_chunk(CHUNK_WORDS)
            return found


_pools: dict[torch.device, CounterPool] = {}
_pools_lock = threading.Lock()


def counter_pool(device: torch.device) -> CounterPool:
    """The counters of ``device`` (created at first use)."""
    pool = _pools.get(device)
    if pool is None:
        with _pools_lock:
            pool = _pools.setdefault(device, CounterPool(device))
    return pool
