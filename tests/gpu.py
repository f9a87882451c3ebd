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


def assert_graph_replays_follow_inputs(layer, static_x, eager, other):
    """``layer(static_x)`` captured in a CUDA graph replays to ``eager`` (its eager output); with ``other``'s
    values copied into ``static_x`` (outliers in other columns: the graph must re-derive them on the device) it
    replays to ``layer(other)``. Warmed up on a side stream first, as torch asks before a capture."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        layer(static_x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = layer(static_x)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_y, eager)
    static_x.copy_(other)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_y, layer(other))
