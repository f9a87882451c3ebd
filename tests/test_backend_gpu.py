"""Kernel backends on a real GPU: model-sized shapes (autotuned schedules for Triton, GEMV/GEMM for CUDA),
CUDA graphs, torch.compile, no host synchronisation."""
import pytest
import torch

import int8mm
from gpu import assert_graph_replays_follow_inputs, host_syncs_refused, requires_cuda, requires_two_gpus
from helpers import assert_output_close, planted_outliers, random_weight

def _activations(m, k, dtype, **kwargs):
    """Planted outlier columns, values exactly at +-6.0, and (past 2 rows) an all-zero row, on "cuda"."""
    return planted_outliers(m, k, dtype, zero_row=m > 2, **kwargs).to("cuda")


pytestmark = requires_cuda


@pytest.fixture(params=["triton", "cuda"])
def backend(request):
    return request.param


def _layer(k, n, backend, threshold=6.0):
    linear = torch.nn.Linear(k, n).to("cuda", torch.float16)
    return int8mm.Int8Linear.from_linear(linear, threshold=threshold, backend=backend)


# 1, 3, 5 and 16 rows: the CUDA GEMV's one-row kernel and its tensor-core kernel at few, some and all 16 rows
@pytest.mark.parametrize("m", [1, 3, 5, 16, 17, 300, 2048])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_model_sized_shapes_match_reference(m, dtype, backend):
    k, n = 4096, 1536
    x = _activations(m, k, dtype, n_outlier_cols=8)
    q_w, s_w = int8mm.quantize_weight(random_weight(n, k).to("cuda"))
    bias = torch.randn(n, device="cuda", dtype=dtype)
    got = int8mm.int8_linear(x, q_w, s_w, bias, backend=backend)
    ref = int8mm.int8_linear(x, q_w, s_w, bias, backend="reference")
    assert_output_close(got, ref)
    q_x = int8mm.quantize_activations(x, backend="reference")[0]
    assert torch.equal(int8mm.int8_matmul(q_x, q_w, backend=backend), int8mm.int8_matmul(q_x, q_w, backend="reference"))


def test_forward_never_syncs_with_the_host(backend):
    layer = _layer(1024, 512, backend)
    x = _activations(16, 1024, torch.float16, n_outlier_cols=8)
    layer(x)  # autotune, compile and load first: those may sync
    with host_syncs_refused():
        layer(x)


@pytest.mark.parametrize("m", [1, 64])
def test_cuda_graph_replay_equals_eager(m, backend):
    layer = _layer(2048, 1024, backend)
    x = _activations(m, 2048, torch.float16, n_outlier_cols=8)
    eager = layer(x)
    other = _activations(m, 2048, torch.float16, n_outlier_cols=8, seed=7)
    assert_graph_replays_follow_inputs(layer, x.clone(), eager, other)


def test_torch_compile_fullgraph(backend):
    layer = _layer(512, 256, backend)
    x = _activations(33, 512, torch.bfloat16)
    compiled = torch.compile(lambda t: layer(t) * 2, fullgraph=True)
    assert torch.equal(compiled(x), layer(x) * 2)


@requires_two_gpus
def test_layer_on_another_gpu_than_the_current_one(backend):
    """device_map="auto" spreads a model over GPUs and calls each layer with the current device unchanged."""
    with torch.cuda.device(0):
        layer = _layer(512, 256, backend).to("cuda:1")
        x = _activations(33, 512, torch.float16).to("cuda:1")
        got = layer(x)
        torch.cuda.synchronize(1)
    assert got.device == torch.device("cuda", 1)
    assert_output_close(got, int8mm.int8_linear(x, layer.weight, layer.SCB, layer.bias, backend="reference"))
