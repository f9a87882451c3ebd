"""A decode call's intermediates, kept from one eager call to the next: ``reused(x, layout, *args)``.

Between its kernels an ``int8_linear`` call holds the int8 activations, their row scales, the outlier-column list
and its count (and, depending on the path, a statistics buffer, the decode kernel's per-row lists, the split-K
slices' sums). Allocating each is a trip through the caching allocator and a tensor's construction on every call:
about 1-1.5 us of host time apiece on a 2-core AMD EPYC (CPU tensors), 7-17 us of a Triton decode call's 26-40 us
(benchmarks/bench_launch_host.py). A decode call (<= 16 rows) therefore takes them from a buffer kept per (thread,
device, current stream, layout), the same tensors at every call of the same shape. That is safe because:
- calls on one stream run in the order they were issued, so a call's first kernel writes the buffers only after
  the previous call's last kernel has read them. (Triton's split-K GEMM and the CUDA library's GEMV may start early
  under programmatic dependent launch, but they wait on the GPU for the kernel before them, and a call's first
  kernel is a plain launch, which starts only once the previous call's GEMM has finished: tests/test_scratch.py
  checks that it stays so for Triton, kernels/cuda/api.cu says so for the library, and a GPU test of
  tests/test_backend_kernels.py issues its calls back to back.)
- each thread has buffers of its own: two threads issuing on one stream would interleave their launches.
- nothing is kept while the current stream captures a CUDA graph (``reused`` returns None and the caller
  allocates, from the graph's pool): a graph replays the pointers it captured, and its replays may run on
  another stream than later eager calls. Nor inside the ``int8mm::int8_linear`` op (``not_kept``): the op runs
  under torch.compile, whose CUDA graphs (mode="reduce-overhead") warm up with every allocation going to the
  graph's private pool, where a kept buffer would outlive the pool's bookkeeping. Only the eager call, which
  skips the op, keeps buffers.
- the buffers never leave the backend: ``int8_linear`` returns only its output, which is allocated per call.

Each (thread, device, stream, layout) keeps one allocation, as large as the largest shape it has served, carved
into every shape's tensors (each part 256-byte aligned); at most MAX_SHAPES shapes' views are remembered. The
layouts are the classic and the fused quantization's, the split-K sums and the CUDA library's scratch: for a
Llama-3-70B at 16 rows about 4 MB per thread and stream (the fused quantization's 2.3 MB for down_proj, the
split-K sums' 1.5 MB). ``release()`` frees them all (a thread's own also go when the thread ends, and
``int8mm.backends.refresh_from_environment()`` releases them too). INT8MM_KEEP_BUFFERS=0 turns the keeping off:
every call allocates.
"""
import threading
import weakref
from typing import Callable, Sequence

import torch

from ..devices import raw_stream
from . import env_setting

# "0": every call allocates its own intermediates (benchmarks time both ways side by side; a debugging aid)
KEEP_ENV_VAR = "INT8MM_KEEP_BUFFERS"
ALIGN = 256  # bytes: each part starts as aligned as a fresh CUDA allocation
MAX_SHAPES = 256  # shapes whose views one allocation remembers (past that, they are carved again)

# a layout: ``layout(*args)`` -> (parts as (dtype, element count), finish(part views) -> the tensors handed out)
Layout = Callable[..., tuple[Sequence[tuple[torch.dtype, int]], Callable[[list[torch.Tensor]], tuple]]]


class _Kept:
    """One allocation and the views carved from it, per shape."""

    __slots__ = ("storage", "views")

    def __init__(self):
        self.storage: torch.Tensor | None = None
        self.views: dict[tuple, tuple] = {}


class _ThreadBuffers:
    """One thread's kept buffers: ``kept`` maps (device index, stream, layout) to a _Kept (an object of its own,
    which ``release`` can hold weakly and a thread's end frees); ``paused`` counts the ``not_kept`` blocks the
    thread is in."""

    __slots__ = ("kept", "paused", "__weakref__")

    def __init__(self):
        self.kept: dict[tuple, _Kept] = {}
        self.paused = 0


_local = threading.local()
_every_thread: "weakref.WeakSet[_ThreadBuffers]" = weakref.WeakSet()
_every_thread_lock = threading.Lock()
_is_capturing = getattr(torch._C, "_cuda_isCurrentStreamCapturing", None)
_current_device = getattr(torch._C, "_cuda_getDevice", None)


def _thread_buffers() -> _ThreadBuffers:
    buffers = getattr(_local, "buffers", None)
    if buffers is None:
        buffers = _local.buffers = _ThreadBuffers()
        with _every_thread_lock:
            _every_thread.add(buffers)
    return buffers


def reused(x: torch.Tensor, layout: Layout, *args) -> tuple | None:
    """The tensors ``layout(*args)`` describes, on ``x``'s device, the same ones at every call with these ``args``
    from this thread on the current stream; None (allocate then: ``fresh``) while that stream captures a CUDA
    graph, inside ``not_kept``, when x's device is not the current one, or when INT8MM_KEEP_BUFFERS=0 (read once,
    as the other settings).

    Args:
        x: a tensor on the device the call runs on (its current stream is the call's).
        layout: a function of ``args`` returning the parts (dtype, element count) and a function that turns
            the parts' 1-D views into what the caller uses (reshaped, sliced); called when a shape is new.
        args: what the layout depends on (hashable: the shape).
    """
    if env_setting(KEEP_ENV_VAR, ("0", "1"), "1") == "0":
        return None
    buffers = _thread_buffers()
    if buffers.paused:
        return None
    if x.is_cuda:
        device = x.get_device()
        # the capture state is the current device's stream's: asked only when that is x's device (callers switch
        # to it first; one that did not allocates)
        if (_current_device() if _current_device is not None else torch.cuda.current_device()) != device:
            return None
        if _is_capturing() if _is_capturing is not None else torch.cuda.is_current_stream_capturing():
            return None
        stream = raw_stream(device)
    else:  # CPU tensors (Triton's interpreter): one stream
        device, stream = -1, 0
    kept = buffers.kept.get((device, stream, layout))
    if kept is not None:
        found = kept.views.get(args)
        if found is not None:
            return found
    return _carve(x, (device, stream, layout), args)


def aligned_offsets(sizes: Sequence[int]) -> tuple[int, tuple[int, ...]]:
    """(total bytes, offset of each part) when parts of ``sizes`` bytes follow one another in one allocation, each
    starting ALIGN-aligned."""
    padded = [-(-size // ALIGN) * ALIGN for size in sizes]
    return sum(padded), tuple(sum(padded[:i]) for i in range(len(sizes)))


# normal tensors even when the call runs under torch.inference_mode: a kept inference tensor could not be updated
# in place (the classic path zeroes its statistics) by a later call outside it
@torch.inference_mode(False)
def _carve(x: torch.Tensor, key: tuple, args: tuple) -> tuple:
    layout = key[2]
    parts, finish = layout(*args)
    total, offsets = aligned_offsets([count * dtype.itemsize for dtype, count in parts])
    buffers = _thread_buffers().kept
    kept = buffers.get(key)
    if kept is None:
        kept = buffers[key] = _Kept()
    if kept.storage is None or kept.storage.numel() < total:
        # the old allocation goes (stream-ordered) once the views that hold it are dropped with the dict
        kept.storage = torch.empty(max(total, 1), dtype=torch.uint8, device=x.device)
        kept.views.clear()
    if len(kept.views) >= MAX_SHAPES:
        kept.views.clear()
    views = [kept.storage[offset:offset + count * dtype.itemsize].view(dtype)
             for (dtype, count), offset in zip(parts, offsets)]
    found = kept.views[args] = finish(views)
    return found


def fresh(x: torch.Tensor, layout: Layout, *args) -> tuple:
    """What ``reused`` hands out, allocated for this call alone (each part a tensor of its own)."""
    parts, finish = layout(*args)
    return finish([torch.empty(count, dtype=dtype, device=x.device) for dtype, count in parts])


class not_kept:
    """Within the block, this thread's ``reused`` returns None: every call allocates (the ``int8mm::int8_linear``
    op's body, which torch.compile and CUDA graph trees run)."""

    def __enter__(self):
        _thread_buffers().paused += 1

    def __exit__(self, *exc):
        _thread_buffers().paused -= 1


def not_kept_here() -> bool:
    """Whether this thread is inside ``not_kept``."""
    return _thread_buffers().paused > 0


def release() -> None:
    """Free every thread's kept buffers (calls already issued keep theirs until they are done, as the caching
    allocator orders frees on the stream)."""
    with _every_thread_lock:
        for buffers in list(_every_thread):
            buffers.kept.clear()


def kept_bytes() -> int:
    """Bytes held by the kept buffers of every thread."""
    with _every_thread_lock:
        return sum(kept.storage.numel() for buffers in list(_every_thread) for kept in list(buffers.kept.values())
                   if kept.storage is not None)
