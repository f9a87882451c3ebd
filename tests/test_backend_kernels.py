"""The kernel backends (Triton, CUDA) against the reference (docs/SPEC.md tolerances).

On a GPU these run the compiled kernels; elsewhere the Triton launchers run on CPU tensors through
Triton's interpreter (conftest.py sets TRITON_INTERPRET=1), the CPU library runs natively, and the CUDA
cases wait for a GPU.
"""
import contextlib
import math

import pytest
import torch

import int8mm
from int8mm import _ops, backends
from int8mm.backends import registry
from gpu import requires_cuda
from helpers import (DEVICE, OpRecorder, assert_output_close, assert_quantized_equal, planted_outliers,
                     random_weight, set_setting, view_beyond_2_31)

def _activations(m, k, dtype, **kwargs):
    """Planted outlier columns, values exactly at +-6.0, and (past 2 rows) an all-zero row, on DEVICE."""
    return planted_outliers(m, k, dtype, zero_row=m > 2, **kwargs).to(DEVICE)


triton = pytest.importorskip("triton", reason="the Triton backend needs the triton package")

# every kernel backend, as a fixture: each test below runs once per backend. The CPU library takes CPU tensors:
# it joins here where DEVICE is the CPU (tests/test_backend_cpu.py tests it on every machine)
BACKENDS = [pytest.param("triton"), pytest.param("cuda", marks=requires_cuda)]
if DEVICE.type == "cpu":
    BACKENDS.append(pytest.param("cpu"))


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param

DTYPES = [torch.float16, torch.bfloat16, torch.float32]
SHAPES = [  # (M, K, N): ragged, decode (M <= 16) and prefill schedules, K not a multiple of the tile
    (1, 64, 32), (1, 499, 33), (3, 123, 7), (16, 256, 48), (17, 499, 7), (33, 1, 5), (40, 300, 50),
    (64, 4096, 24),
]


def _both(op, backend, *args):
    return op(*args, "reference"), op(*args, backend)


def _assert_quantize_equal(ref, got):
    q_r, s_r, cols_r, n_r = ref
    q_t, s_t, cols_t, n_t = got
    assert torch.equal(s_r, s_t) or torch.equal(s_r.isnan(), s_t.isnan()) and torch.equal(
        s_r.nan_to_num(), s_t.nan_to_num()), "row scales differ"
    assert torch.equal(n_r, n_t)
    count = int(n_r)
    assert torch.equal(cols_r[:count], cols_t[:count])
    assert_quantized_equal(q_t, q_r)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_quantize_activations_matches_reference(m, k, n, dtype, backend):
    x = _activations(m, k, dtype)
    _assert_quantize_equal(*_both(_ops.quantize_activations, backend, x, 6.0))


@pytest.mark.parametrize("m,k,n", SHAPES)
def test_int8_matmul_is_exact(m, k, n, backend):
    g = torch.Generator().manual_seed(m * 1000 + k)
    a = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=g).to(DEVICE)
    b = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g).to(DEVICE)
    ref, got = _both(_ops.int8_matmul, backend, a, b)
    assert got.dtype == torch.int32 and torch.equal(ref, got)


def test_int8_matmul_extremes_do_not_overflow(backend):
    k = 4096  # every product is +-127^2: the sum is far beyond int16 and exact in int32
    a = torch.full((17, k), -127, dtype=torch.int8, device=DEVICE)
    b = torch.full((9, k), 127, dtype=torch.int8, device=DEVICE)
    ref, got = _both(_ops.int8_matmul, backend, a, b)
    assert torch.equal(got, ref) and int(got[0, 0]) == -127 * 127 * k


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_int8_linear_matches_reference(m, k, n, dtype, bias, backend):
    x = _activations(m, k, dtype)
    q_w, s_w = int8mm.quantize_weight(random_weight(n, k).to(DEVICE))
    b = torch.randn(n, device=DEVICE).to(dtype) if bias else None
    ref, got = _both(_ops.int8_linear, backend, x, q_w, s_w, b, 6.0)
    assert_output_close(got, ref)


@pytest.mark.parametrize("threshold", [0.0, 6.0, 1e9])
def test_thresholds(threshold, backend):
    x = _activations(20, 200, torch.float16)
    q_w, s_w = int8mm.quantize_weight(random_weight(24, 200).to(DEVICE))
    _assert_quantize_equal(*_both(_ops.quantize_activations, backend, x, threshold))
    assert_output_close(*reversed(_both(_ops.int8_linear, backend, x, q_w, s_w, None, threshold)))


def test_a_threshold_past_fp32_max_is_compared_as_fp32(backend):
    """docs/SPEC.md compares the threshold as fp32; Triton took a float above FLT_MAX as fp64, so a threshold that
    rounds to FLT_MAX in fp32 made no outlier of an element of FLT_MAX there (the reference and cpu did)."""
    fp32_max = torch.finfo(torch.float32).max
    x = torch.tensor([[fp32_max, 1.0]], device=DEVICE)
    threshold = fp32_max * (1 + 2.0**-30)  # rounds down to FLT_MAX in fp32; 1 + 2**-24 would round up to inf
    assert int8mm.functional.check_threshold(threshold) == fp32_max
    assert int8mm.functional.check_threshold(fp32_max * (1 + 2.0**-23)) == math.inf
    for name in ("reference", backend):
        q_x, s_x, cols = int8mm.quantize_activations(x, threshold, backend=name)
        assert cols.tolist() == [0] and s_x.tolist() == [1.0], name


def test_every_column_an_outlier(backend):
    x = _activations(5, 100, torch.float32) + 100.0
    q_w, s_w = int8mm.quantize_weight(random_weight(16, 100).to(DEVICE))
    ref, got = _both(_ops.quantize_activations, backend, x, 6.0)
    _assert_quantize_equal(ref, got)
    assert int(got[3]) == 100 and not got[0].any()
    assert_output_close(*reversed(_both(_ops.int8_linear, backend, x, q_w, s_w, None, 6.0)))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("threshold", [0.0, 6.0])
def test_non_finite_rows_stay_in_their_row(bad, threshold, backend):
    x = _activations(19, 130, torch.float32)
    x[4, 17] = bad
    q_w, s_w = int8mm.quantize_weight(random_weight(12, 130).to(DEVICE))
    ref, got = _both(_ops.int8_linear, backend, x, q_w, s_w, None, threshold)
    assert not torch.isfinite(got[4]).any()
    others = torch.arange(19, device=DEVICE) != 4
    assert torch.isfinite(got[others]).all()
    assert_output_close(got, ref)
    _assert_quantize_equal(*_both(_ops.quantize_activations, backend, x, threshold))


@pytest.mark.parametrize("m", [1, 3, 20])
def test_tiny_scale_rows_quantize_zeros_to_zero(m, backend, monkeypatch):
    """A row (fp32 or bf16) whose scale is below 127 / FLT_MAX has an infinite reciprocal: its nonzero values scale
    to +-inf, hence +-127, and its zeros to NaN, which is 0 in the reference; never -127 (a GPU's max.f32 drops
    the NaN). One row, a decode batch and a prefill batch, on every Triton path (decode classic, fused and one
    kernel; prefill quantization classic, rowwise and resident)."""
    x = torch.randn(m, 96, generator=torch.Generator().manual_seed(m)).to(DEVICE)
    tiny = m // 2
    x[tiny] = -1e-40
    x[tiny, ::3] = 0.0
    x[tiny, 1] = 1e-38
    settings = [{}]
    if backend == "triton":
        from int8mm.backends.triton_prefill_quant import PREFILL_QUANT_ENV_VAR
        settings = [{backends.DECODE_PATH_ENV_VAR: path} for path in ("classic", "fused", "single")] if m <= 16 else [
            {PREFILL_QUANT_ENV_VAR: scheme} for scheme in ("classic", "rowwise", "resident")]
    for setting in settings:
        for variable, value in setting.items():
            set_setting(monkeypatch, variable, value)
        for threshold in (0.0, 6.0):
            ref, got = _both(_ops.quantize_activations, backend, x, threshold)
            assert torch.equal(got[0][tiny], ref[0][tiny]), (setting, threshold, got[0][tiny])
            _assert_quantize_equal(ref, got)
            q_w, s_w = int8mm.quantize_weight(random_weight(24, 96).to(DEVICE))
            assert_output_close(*reversed(_both(_ops.int8_linear, backend, x, q_w, s_w, None, threshold)))


def test_non_contiguous_and_nd_inputs(backend):
    base = _activations(24, 96, torch.bfloat16)
    x = base.t().contiguous().t()  # column-major view with the same values
    assert not x.is_contiguous()
    q_w, s_w = int8mm.quantize_weight(random_weight(40, 96).to(DEVICE))
    y = int8mm.int8_linear(x, q_w, s_w, backend=backend)
    assert torch.equal(y, int8mm.int8_linear(base, q_w, s_w, backend=backend))
    x4 = base.reshape(2, 3, 4, 96)
    y4 = int8mm.int8_linear(x4, q_w, s_w, backend=backend)
    assert y4.shape == (2, 3, 4, 40) and torch.equal(y4.reshape(24, 40), y)


@pytest.mark.parametrize("m", [2, 20])  # decode and prefill epilogues
def test_strided_and_expanded_scale_and_bias(m, backend):
    """A layer's scale or bias may be a view (a slice of a packed tensor, an expanded constant): the epilogue read
    them at unit stride, so the padding (here 1e6) came into the output."""
    q_w, s_w = int8mm.quantize_weight(random_weight(5, 64).to(DEVICE))
    bias = torch.randn(5, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    padded = lambda t: torch.stack([t, torch.full_like(t, 1e6)], 1)[:, 0]  # same values, stride 2
    x = _activations(m, 64, torch.float16)
    expected = int8mm.int8_linear(x, q_w, s_w, bias, backend=backend)
    assert torch.equal(int8mm.int8_linear(x, q_w, padded(s_w), padded(bias), backend=backend), expected)
    constant = torch.tensor([0.5], device=DEVICE).expand(5)  # stride 0
    assert torch.equal(int8mm.int8_linear(x, q_w, s_w, constant, backend=backend),
                       int8mm.int8_linear(x, q_w, s_w, constant.contiguous(), backend=backend))


@pytest.mark.parametrize("layout", ["rows", "columns"])
def test_views_spanning_more_than_2_to_31_elements(layout, backend):
    """Element offsets beyond 2^31 (a long prefill's [M, K], a transposed view) must not wrap around: x is a
    view whose last row, or last column, lies more than 2^31 elements into its storage. Only the viewed
    elements are written, so on the CPU the storage costs address space, not memory."""
    m, k, strides = (3, 64, (2**30 + 64, 1)) if layout == "rows" else (4, 34, (1, 2**26))
    x = view_beyond_2_31(_activations(m, k, torch.float16), strides)  # the fused epilogue reads its outlier too
    q_w, s_w = int8mm.quantize_weight(random_weight(24, k).to(DEVICE))
    ref, got = _both(_ops.quantize_activations, backend, x, 6.0)
    _assert_quantize_equal(ref, got)
    assert k - 1 in got[2][: int(got[3])].tolist()
    assert_output_close(*reversed(_both(_ops.int8_linear, backend, x, q_w, s_w, None, 6.0)))


@requires_cuda
def test_rows_beyond_one_grid_dimension(backend):
    """More row tiles than a CUDA grid's y dimension holds (65535 blocks: 8,388,480 rows of 128, the CUDA
    library's GEMM tile): the product covers every row, the last one included."""
    m, k, n = 65535 * 128 + 1, 16, 8
    x = torch.randn(m, k, dtype=torch.float16, device=DEVICE)
    x[:, 3] = 8.0  # an outlier column the epilogue reads for every row
    x[-1] = torch.arange(k, dtype=torch.float16, device=DEVICE)
    q_w, s_w = int8mm.quantize_weight(random_weight(n, k).to(DEVICE))
    expected, got = _both(_ops.int8_linear, backend, x, q_w, s_w, None, 6.0)
    # the first row tiles, those around grid.y's last one and the last (the tiles in between run the same path as
    # any smaller M): compared on the host in double, so only these rows, to keep the GPU stage short
    rows = torch.cat([torch.arange(0, 256), torch.arange(65535 * 128 - 256, m)]).to(DEVICE)
    assert_output_close(got[rows], expected[rows])
    q_x = _ops.quantize_activations(x, 0.0, "reference")[0]
    expected, got = _both(_ops.int8_matmul, backend, q_x, q_w)
    assert torch.equal(got, expected)


def test_empty_batch(backend):
    q_w, s_w = int8mm.quantize_weight(random_weight(8, 32).to(DEVICE))
    x = torch.empty(0, 32, dtype=torch.float16, device=DEVICE)
    y = int8mm.int8_linear(x, q_w, s_w, backend=backend)
    assert y.shape == (0, 8) and y.dtype == torch.float16


def test_int8_linear_module_uses_the_backend(backend):
    linear = torch.nn.Linear(128, 40).to(DEVICE)
    layer = int8mm.Int8Linear.from_linear(linear, backend=backend)
    x = _activations(7, 128, torch.float32)
    assert_output_close(layer(x), int8mm.int8_linear(x, layer.weight, layer.SCB, layer.bias, backend="reference"))


def test_triton_launches_switch_to_the_tensors_gpu(monkeypatch):
    """Triton launches on the current device: a layer on another GPU (device_map="auto") must switch to its own
    for the launch, and only then. The GPU test with two devices checks the effect; this checks the choice."""
    from int8mm.devices import on_device_of
    switched = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", lambda device: switched.append(device) or contextlib.nullcontext())
    for device in (torch.device("cuda", 1), torch.device("cuda", 0), torch.device("cpu")):
        cuda = device.type == "cuda"  # what a tensor on that device answers
        fake = type("FakeTensor", (), {"device": device, "is_cuda": cuda,
                                       "get_device": lambda self, index=device.index if cuda else -1: index})()
        with on_device_of(fake):
            pass
    assert switched == [torch.device("cuda", 1)]


def test_forward_fills_only_the_stats_buffer(backend):
    """On a GPU every fill is a kernel of its own, a visible share of a decode call: the passes write each row
    scale and the outlier count themselves, so the forward fills at most the buffer the stats pass
    accumulates into (Triton: the buffer it kept from the call before; the CUDA library clears its workspace
    itself)."""
    x = _activations(5, 96, torch.float16)
    q_w, s_w = int8mm.quantize_weight(random_weight(24, 96).to(DEVICE))
    impl = registry.lookup(backend, "int8_linear")
    ref = _ops.int8_linear(x, q_w, s_w, None, 6.0, "reference")
    impl(x, q_w, s_w, None, 6.0)  # one-time set-up (the fused decode path's counters) is not a call's cost
    with OpRecorder() as counter:
        got = impl(x, q_w, s_w, None, 6.0)
    classic_triton = backend == "triton" and backends.decode_path() == "classic"  # INT8MM_DECODE_PATH=fused: none
    # one fill: of the buffer kept from the call before, or of a fresh one (INT8MM_KEEP_BUFFERS=0)
    assert counter.fills in ((["aten.zero_.default"], ["aten.zeros.default"]) if classic_triton else ([],))
    assert_output_close(got, ref)


@pytest.mark.parametrize("m,k", [(0, 16), (3, 0)])
def test_quantize_without_elements(m, k, backend):
    x = torch.randn(m, k, dtype=torch.float16, device=DEVICE)
    q_x, s_x, _, count = _ops.quantize_activations(x, 6.0, backend)
    assert q_x.shape == (m, k) and torch.equal(s_x, torch.zeros(m, device=DEVICE)) and int(count) == 0


# one row of x: the CUDA library quantizes it in one block holding the row in registers (K <= 32768; longer rows
# take the two passes): columns at the edges of a thread's slots (1024 columns apart), several outliers in one slot,
# ragged K, and the first K past the one-block path
ONE_ROW_K = [1, 31, 1024, 1025, 3000, 14336, 32768, 32769]


@requires_cuda
@pytest.mark.parametrize("threshold", [0.0, 6.0])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", ONE_ROW_K)
def test_cuda_one_row_quantization_in_one_block(k, dtype, threshold):
    x = planted_outliers(1, k, dtype, n_outlier_cols=min(8, k)).to(DEVICE)
    for col in (0, 1023, 1024, 2047, 2048 + 5, 31 * 1024 + 1023):
        if col < k:
            x[0, col] = 7.0 + col % 5
    _assert_quantize_equal(*_both(_ops.quantize_activations, "cuda", x, threshold))
    q_w, s_w = int8mm.quantize_weight(random_weight(40, k).to(DEVICE))
    assert_output_close(*reversed(_both(_ops.int8_linear, "cuda", x, q_w, s_w, None, threshold)))


# 2-16 rows: the CUDA library quantizes them in one block too (M * K <= 131072, K <= 32768; more take the two passes):
# an outlier in one row only (its column is an outlier column of every row) at the edges of a word of column bits,
# ragged K, and the first shapes past the one-block path
FEW_ROWS = [(2, 1), (2, 33), (3, 1025), (5, 3000), (9, 14563), (16, 4096), (16, 8192), (4, 32768), (16, 8193),
            (2, 32769)]


@requires_cuda
@pytest.mark.parametrize("threshold", [0.0, 6.0])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k", FEW_ROWS)
def test_cuda_few_rows_quantization_in_one_block(m, k, dtype, threshold):
    """Against the reference, and bit for bit against the two passes (which quantize 17 rows and more)."""
    x = planted_outliers(m, k, dtype, n_outlier_cols=min(8, k), zero_row=m > 2).to(DEVICE)
    for i, col in enumerate((0, 31, 32, 1023, 1024, 32767, k - 1)):
        if col < k:
            x[i % m, col] = 7.0 + col % 5
    ref, got = _both(_ops.quantize_activations, "cuda", x, threshold)
    _assert_quantize_equal(ref, got)
    _assert_equal_to_two_passes(x, threshold, got)
    q_w, s_w = int8mm.quantize_weight(random_weight(40, k).to(DEVICE))
    assert_output_close(*reversed(_both(_ops.int8_linear, "cuda", x, q_w, s_w, None, threshold)))


@requires_cuda
@pytest.mark.parametrize("m,k,kernel", [(1, 4096, "quantize_one_row_kernel"), (1, 40000, "activation_stats_kernel"),
                                        (16, 4096, "quantize_few_rows_kernel"), (3, 8192, "quantize_few_rows_kernel"),
                                        (16, 8193, "activation_stats_kernel"), (2, 32769, "activation_stats_kernel")])
def test_cuda_decode_takes_the_one_kernel_quantization(m, k, kernel):
    """Outputs cannot tell the quantization paths apart: the kernels launched can. One row of up to 32768 columns,
    or 2-16 rows of up to 131072 elements: one quantization kernel and the GEMV, no fill; larger: the fill and the
    two passes."""
    from torch.profiler import ProfilerActivity, profile

    x = planted_outliers(m, k, torch.float16).to(DEVICE)
    q_w, s_w = int8mm.quantize_weight(random_weight(64, k).to(DEVICE))
    impl = registry.lookup("cuda", "int8_linear")
    impl(x, q_w, s_w, None, 6.0)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as trace:
        impl(x, q_w, s_w, None, 6.0)
        torch.cuda.synchronize()
    kernels = [e.name for e in trace.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    quantizers = ("quantize_one_row_kernel", "quantize_few_rows_kernel", "activation_stats_kernel")
    assert [q for q in quantizers if any(q in name for name in kernels)] == [kernel], kernels
    assert any("gemv" in name for name in kernels), kernels
    one_kernel = kernel != "activation_stats_kernel"
    assert len(kernels) == 2 or not one_kernel, kernels  # the quantization and the GEMV: no fill, nothing else


@requires_cuda
@pytest.mark.parametrize("m,k", [(1, 4096), (5, 4096), (16, 4096), (5, 4100), (1, 40000), (16, 8208), (5, 32804)])
def test_cuda_decode_calls_back_to_back_read_their_own_activations(m, k, monkeypatch):
    """On sm_90+ the CUDA library's GEMV starts before its call's quantization kernel has finished (programmatic
    dependent launch) and waits for it on the GPU before reading the int8 rows, scales and outlier list. Calls
    issued back to back on the kept buffers, each with other activations (other outlier columns, scales 50x apart),
    must each give their own input's output, bit for bit as when run one at a time: a GEMV that read too early
    would read the call before's. Eagerly and replayed in a CUDA graph (compared after each replay, the inputs
    rotated between replays); and PDL off (INT8MM_PDL=0) changes no bit. Quantized by the one-row kernel, the
    few-rows kernel (5 and 16 rows of 4096; 5 of 4100) and the two passes (1 x 40000, 16 x 8208, 5 x 32804), into
    the vector (one row), tensor-core (K % 16 == 0) and element-wise GEMVs."""
    assert backends.programmatic_launch(DEVICE) == (torch.cuda.get_device_capability(DEVICE) >= (9, 0))
    n = 8192 if k <= 8192 else 2048  # 256 GEMV blocks at K = 4096: more than one per multiprocessor start early
    q_w, s_w = int8mm.quantize_weight(random_weight(n, k).to(DEVICE))
    impl = registry.lookup("cuda", "int8_linear")
    xs = [planted_outliers(m, k, torch.float16, seed=seed, n_outlier_cols=1 + 3 * seed).to(DEVICE) * scale
          for seed, scale in ((1, 1.0), (2, 0.02), (3, 1.0), (4, 0.02))]
    originals = [x.clone() for x in xs]
    alone = []
    for x in xs:
        alone.append(impl(x, q_w, s_w, None, 6.0))
        torch.cuda.synchronize()
    order = [i % len(xs) for i in range(40)]
    in_a_row = [impl(xs[i], q_w, s_w, None, 6.0) for i in order]
    torch.cuda.synchronize()
    for call, i in enumerate(order):
        assert torch.equal(in_a_row[call], alone[i]), f"call {call} (input {i}) differs from its input alone"

    graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        impl(xs[0], q_w, s_w, None, 6.0)  # warm-up outside the capture
        with torch.cuda.graph(graph, stream=stream):
            captured = [impl(xs[i], q_w, s_w, None, 6.0) for i in order[:8]]
    torch.cuda.current_stream().wait_stream(stream)
    for shift in range(len(xs)):  # replay r computes input (i + r) % 4 where the capture read input i
        for i, x in enumerate(xs):
            x.copy_(originals[(i + shift) % len(xs)])
        graph.replay()
        torch.cuda.synchronize()
        for call, i in enumerate(order[:8]):
            expected = alone[(i + shift) % len(xs)]
            assert torch.equal(captured[call], expected), f"replay {shift}: graph call {call} differs"
    for x, original in zip(xs, originals):
        x.copy_(original)

    set_setting(monkeypatch, backends.PDL_ENV_VAR, "0")  # read again without it after the test (conftest.py)
    for x, expected in zip(xs, alone):
        assert torch.equal(impl(x, q_w, s_w, None, 6.0), expected)


@requires_cuda
@pytest.mark.parametrize("m", [1, 5, 16])
@pytest.mark.parametrize("case", ["nan", "negative inf", "inf", "zero", "all outliers", "column view", "wider rows"])
def test_cuda_one_block_quantization_edge_rows(case, m):
    """The one-block quantizations (one row; 2-16 rows) on non-finite, zero and all-outlier rows (in the last row
    only, with several rows) and on strided views, against the reference, and each row's scale bit for bit as the
    two passes store it (NaN's bits too), its int8 values and outlier list bit for bit."""
    k = 4100
    x = planted_outliers(m, k, torch.float16).to(DEVICE)
    if case == "nan":
        x[-1, 3000] = float("nan")
    elif case == "inf":
        x[-1, 5] = float("inf")
    elif case == "negative inf":
        x[-1, 4099] = -float("inf")
    elif case == "zero":
        x[-1].zero_()
    elif case == "all outliers":
        x[-1] = x[-1].abs() + 10.0
    elif case == "column view":  # rows of a column-major matrix: stride_xk != 1
        x = torch.randn(k, m + 2, device=DEVICE, dtype=torch.float16).t()[:m]
    else:  # rows of a wider matrix: stride_xm != K
        x = torch.randn(m, k + 100, device=DEVICE, dtype=torch.float16)[:, :k]
    for threshold in (0.0, 6.0):
        ref, got = _both(_ops.quantize_activations, "cuda", x, threshold)
        _assert_quantize_equal(ref, got)
        _assert_equal_to_two_passes(x, threshold, got)


def _assert_equal_to_two_passes(x, threshold, got):
    """``got``, the one-block quantization of ``x``'s rows, equals bit for bit what the two passes make of the same
    rows repeated 17 times (17 rows and more take them): int8 values, scales (their bits: NaN's too), the list."""
    m = x.shape[0]
    q_x, s_x, cols, count = _ops.quantize_activations(x.repeat(17, 1), threshold, "cuda")
    assert torch.equal(got[0], q_x[:m])
    assert torch.equal(got[1].view(torch.int32), s_x[:m].view(torch.int32))
    assert int(got[3]) == int(count) and torch.equal(got[2][:int(count)], cols[:int(count)])
