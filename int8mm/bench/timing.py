"""Timers: median with p20/p80, inputs rotated so that caches do not flatter.

- ``time_cuda_eager``: each call launched from Python, L2 flushed before each (device events).
- ``time_cuda_graph``: a CUDA graph of ``rotations`` calls over distinct inputs, replayed; launch
  overhead disappears, as in a compiled/graphed decode loop.
- ``time_cpu``: ``time.perf_counter`` around each call after warm-up.
"""
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch


@dataclass
class Timing:
    median_s: float
    p20_s: float
    p80_s: float
    samples: int

    @staticmethod
    def of(samples_s: Sequence[float]) -> "Timing":
        ordered = sorted(samples_s)
        q = statistics.quantiles(ordered, n=10) if len(ordered) >= 2 else [ordered[0]] * 9
        return Timing(statistics.median(ordered), q[1], q[7], len(ordered))


def time_cpu(fn: Callable, inputs: Sequence, warmup: int = 3, reps: int = 15) -> Timing:
    """``fn(*inputs[i % len(inputs)])`` timed on the host clock."""
    for i in range(warmup):
        fn(*inputs[i % len(inputs)])
    samples = []
    for i in range(reps):
        args = inputs[i % len(inputs)]
        start = time.perf_counter()
        fn(*args)
        samples.append(time.perf_counter() - start)
    return Timing.of(samples)


_L2_FLUSH_BYTES = 256 * 1024 * 1024


def time_cuda_eager(fn: Callable, inputs: Sequence, warmup: int = 10, reps: int = 50) -> Timing:
    """Device-event time of single launches from Python, with L2 flushed before each."""
    flush = torch.empty(_L2_FLUSH_BYTES, dtype=torch.int8, device="cuda")
    for i in range(warmup):
        fn(*inputs[i % len(inputs)])
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        flush.zero_()
        starts[i].record()
        fn(*inputs[i % len(inputs)])
        ends[i].record()
    torch.cuda.synchronize()
    return Timing.of([s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends)])


def time_cuda_graph(fn: Callable, inputs: Sequence, replays: int = 20) -> Timing:
    """Per-call time of a CUDA graph that calls ``fn`` once per input set (distinct buffers in turn)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for args in inputs:  # warm-up (autotuning, allocator) outside the capture
            fn(*args)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for args in inputs:
            fn(*args)
    graph.replay()
    torch.cuda.synchronize()
    samples = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 1e3 / len(inputs))
    return Timing.of(samples)
