"""Timers: median with p20/p80, inputs rotated so that caches do not flatter.

- ``time_cuda_eager``: each call launched from Python, L2 flushed before each (device events): one isolated
  call's GPU time, for single kernels (ceilings), whose host time hides behind the flush.
- ``time_cuda_back_to_back``: calls launched from Python one after the other, as an eager model issues its
  layers: a call costs what the slower of the host and the GPU takes for it.
- ``time_cuda_graph``: a CUDA graph of ``rotations`` calls over distinct inputs, replayed; launch
  overhead disappears, as in a compiled/graphed decode loop.
- ``time_cpu``: ``time.perf_counter`` around each call after warm-up.
- ``time_cpu_interleaved``: several functions on the host clock, taking turns call by call (a shared CPU).
- ``time_side_by_side`` / ``time_call``: the one-call timer that fits a device, for several functions or one.
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
        return Timing(*spread(samples_s), len(samples_s))


def spread(values: Sequence[float]) -> tuple[float, float, float]:
    """Median, 20th and 80th percentiles of ``values``, the percentiles interpolated between samples.

    "inclusive" keeps them within the samples: the default ("exclusive") extrapolates beyond the extremes when there
    are few, and a time budget may leave only ``MIN_SAMPLES`` (``[1, 10, 10]`` gave a p20 of -0.8).
    """
    ordered = sorted(values)
    q = statistics.quantiles(ordered, n=10, method="inclusive") if len(ordered) >= 2 else [ordered[0]] * 9
    return statistics.median(ordered), q[1], q[7]


# a time budget never cuts a measurement below this many samples (p20/p80 need a few)
MIN_SAMPLES = 3


def time_cpu(fn: Callable, inputs: Sequence, warmup: int = 3, reps: int = 15,
             max_seconds: float | None = None) -> Timing:
    """``fn(*inputs[i % len(inputs)])`` timed on the host clock.

    ``max_seconds`` stops sampling early (after at least ``MIN_SAMPLES``) once the timed calls add up to it,
    so that a slow CPU cell (a 70B-sized prefill) costs seconds rather than minutes.
    """
    return time_cpu_interleaved([(fn, inputs)], warmup=warmup, reps=reps, max_seconds=max_seconds)[0]


def time_cpu_interleaved(calls: Sequence[tuple[Callable, Sequence]], warmup: int = 3, reps: int = 15,
                         max_seconds: float | None = None,
                         on_error: Callable[[int, Exception], None] | None = None) -> list[Timing | None]:
    """Each ``(fn, inputs)`` timed on the host clock, one call of each in turn per round.

    On a shared CPU another process's burst of work lands on whichever calls it overlaps; taking turns spreads
    every entry's samples over the same stretch of time, so such bursts fall on all of them alike and the
    medians stay comparable. ``max_seconds`` bounds the whole set (after at least ``MIN_SAMPLES`` rounds).

    ``on_error(index, error)``: an entry whose call raises is handed there and dropped (its Timing is None), the
    others going on taking turns; without it the error propagates.
    """
    dropped: set[int] = set()
    samples = [[] for _ in calls]
    spent = 0.0
    for i in range(-warmup, reps):  # the first ``warmup`` rounds are not timed
        for index, (fn, inputs) in enumerate(calls):
            if index in dropped:
                continue
            args = inputs[i % len(inputs)]
            start = time.perf_counter()
            try:
                fn(*args)
                seconds = time.perf_counter() - start
            except Exception as error:  # noqa: BLE001  with on_error, one entry's failure costs the others nothing
                if on_error is None:
                    raise
                on_error(index, error)
                dropped.add(index)
                continue
            if i >= 0:
                samples[index].append(seconds)
                spent += seconds
        if max_seconds is not None and i + 1 >= MIN_SAMPLES and spent >= max_seconds:
            break
    return [None if index in dropped else Timing.of(mine) for index, mine in enumerate(samples)]


def time_side_by_side(device: torch.device, calls: Sequence[tuple[Callable, Sequence]], warmup: int, reps: int,
                      max_seconds: float | None = None) -> list[Timing]:
    """Eager timings of several ``(fn, inputs)`` on ``device``: device events on CUDA (L2 flushed before each
    call, one entry after the other: a lent GPU runs nothing else), host clock in turns on CPU."""
    if device.type == "cuda":
        return [time_cuda_eager(fn, inputs, warmup=warmup, reps=reps) for fn, inputs in calls]
    return time_cpu_interleaved(calls, warmup=warmup, reps=reps, max_seconds=max_seconds)


def time_call(device: torch.device, fn: Callable, inputs: Sequence, warmup: int, reps: int,
              max_seconds: float | None = None) -> Timing:
    """Median time of one eager call on ``device``: device events on CUDA (L2 flushed), host clock on CPU."""
    return time_side_by_side(device, [(fn, inputs)], warmup, reps, max_seconds)[0]


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


# a round of back-to-back calls makes at least this many, so that the first call's launch, which the idle GPU waits
# for, weighs little
BACK_TO_BACK_MIN_CALLS = 20


def time_cuda_back_to_back(fn: Callable, inputs: Sequence, rounds: int = 10, warmup: int = 0) -> Timing:
    """Per-call device time of calls issued back to back from Python, cycling through ``inputs``: each round times
    at least ``BACK_TO_BACK_MIN_CALLS`` calls between two events, so a call costs the larger of its host time
    (Python, checks, launches) and its GPU time, as in an eager model's forward. Give ``inputs`` distinct weights,
    more than L2 holds, so that each call reads its weight from memory as a model's next layer does: the cycle
    runs on across warm-up and rounds, so every call's input was last used ``len(inputs)`` calls before.

    Raises:
        ValueError: no inputs, or fewer than one round.
    """
    if not inputs or rounds < 1:
        raise ValueError(f"need inputs and rounds >= 1; got {len(inputs)} inputs, rounds={rounds}")
    calls = max(BACK_TO_BACK_MIN_CALLS, len(inputs))
    made = 0
    for _ in range(max(warmup, len(inputs))):  # warm-up: compilation, autotuning, allocations, kept buffers
        fn(*inputs[made % len(inputs)])
        made += 1
    torch.cuda.synchronize()
    samples = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn(*inputs[made % len(inputs)])
            made += 1
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 1e3 / calls)
    return Timing.of(samples)


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
