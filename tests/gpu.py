"""The one place that decides whether GPU-only tests run, and GPU checks shared by the test files."""
import contextlib

import pytest
import torch

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (CUDA); none here")
requires_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2,
                                       reason="needs an NVIDIA GPU, two of them (CUDA); fewer here")


@contextlib.contextmanager
def host_syncs_refused():
    """Inside, any CUDA call that waits for the device raises (torch's sync debug mode "error")."""
    torch.cuda.synchronize()  # what came before may sync (autotuning, compiling, loading): not counted
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def captured(fn, static_x):
    """``(graph, static output)`` of ``fn(static_x)`` captured in a CUDA graph, after a warm-up call on a side
    stream, as torch asks (compiling, autotuning and one-time allocations happen outside the capture)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn(static_x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = fn(static_x)
    return graph, static_y


def replay_over(fn, inputs, replays, check):
    """Captures ``fn`` on a copy of ``inputs[0]``, then replays it ``replays`` times, copying the inputs in turn
    into the captured input; ``check(static_output, x)`` after each replay."""
    static_x = inputs[0].clone()
    graph, static_y = captured(fn, static_x)
    for replay in range(replays):
        x = inputs[replay % len(inputs)]
        static_x.copy_(x)
        graph.replay()
        torch.cuda.synchronize()
        check(static_y, x)


def assert_graphs_and_streams_agree(fn, xs, expected, rounds=20):
    """One CUDA graph of ``fn`` per input in ``xs``, replayed at once on two streams, next to eager calls of ``fn``
    on two more streams, ``rounds`` times: every replay's output (cloned in stream order) and every eager output
    must equal ``expected[i]`` for ``xs[i]`` bit for bit (kernels that keep state between calls, such as counters,
    must not share it across streams or graphs)."""
    captures = [captured(fn, x) for x in xs]
    streams = [torch.cuda.Stream() for _ in range(4)]
    results = []  # (input index, output)
    torch.cuda.synchronize()
    for _ in range(rounds):
        for which, ((graph, static_y), stream) in enumerate(zip(captures, streams)):
            with torch.cuda.stream(stream):
                graph.replay()
                results.append((which, static_y.clone()))  # after this replay, before the next one
        for which, stream in ((0, streams[2]), (1, streams[3])):
            with torch.cuda.stream(stream):
                results.append((which, fn(xs[which])))
    torch.cuda.synchronize()
    for which, got in results:
        torch.testing.assert_close(got, expected[which], rtol=0, atol=0, equal_nan=True)


def assert_graph_replays_follow_inputs(layer, static_x, eager, other):
    """``layer(static_x)`` captured in a CUDA graph replays to ``eager`` (its eager output); with ``other``'s
    values copied into ``static_x`` (outliers in other columns: the graph must re-derive them on the device) it
    replays to ``layer(other)``."""
    graph, static_y = captured(layer, static_x)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_y, eager)
    static_x.copy_(other)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_y, layer(other))
