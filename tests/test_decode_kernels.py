"""The fused decode path of the Triton backend (INT8MM_DECODE_PATH=fused): one quantization kernel, no fills.

Its quantized values, row scales, outlier list and count must equal the classic path's bit for bit, and its
``int8_linear`` output must equal the classic path's exactly (the same GEMM reads the same values). Without a
GPU the kernels run on CPU tensors through Triton's interpreter (conftest.py), which runs the programs one
after another: the last-arrival logic, the list merge and the clearing run, the memory ordering does not
(the GPU tests at the end check it under real concurrency, CUDA graphs and two streams).
"""
import json

import pytest
import torch

import int8mm
from int8mm import backends
from int8mm.backends import registry

from gpu import assert_graphs_and_streams_agree, replay_over, requires_cuda
from helpers import (DEVICE, OpRecorder, assert_output_close, assert_same_output, load_benchmark, planted_outliers,
                     raising_for, random_weight, record_triton_launches, run_out_of_counters, set_decode_path,
                     view_beyond_2_31)

triton = pytest.importorskip("triton", reason="the Triton backend needs the triton package")

from int8mm.backends import triton as triton_backend  # noqa: E402  (needs triton)
from int8mm.backends import triton_counters, triton_decode  # noqa: E402

classic_quantize = registry.lookup("triton", "quantize_activations")
triton_linear = registry.lookup("triton", "int8_linear")

DECODE_ROWS = [1, 2, 5, 16]
COLUMNS = [1, 33, 499]  # one column, ragged, longer than the interpreter's tiles below


@pytest.fixture
def fused(monkeypatch):
    set_decode_path(monkeypatch, "fused")
    yield
    monkeypatch.delenv(backends.DECODE_PATH_ENV_VAR)
    backends.refresh_from_environment()


def _activations(m, k, dtype=torch.float16, n_outlier_cols=8, seed=0):
    return planted_outliers(m, k, dtype, n_outlier_cols=n_outlier_cols, zero_row=m > 2, seed=seed).to(DEVICE)


def _assert_same_quantization(x, threshold):
    """The fused kernel's four outputs equal the classic path's, bit for bit."""
    q_c, s_c, cols_c, n_c = classic_quantize(x, threshold)
    q_f, s_f, cols_f, n_f = triton_decode.quantize_for_decode(x, threshold)
    assert torch.equal(n_f, n_c), (int(n_f), int(n_c))
    count = int(n_c)
    assert torch.equal(cols_f[:count], cols_c[:count]), "outlier lists differ"
    assert torch.equal(s_f.view(torch.int32), s_c.view(torch.int32)), "row scales differ (as fp32 bits)"
    assert torch.equal(q_f, q_c), "quantized values differ"
    return count


@pytest.mark.parametrize("threshold", [0.0, 6.0])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("k", COLUMNS)
@pytest.mark.parametrize("m", DECODE_ROWS)
def test_quantization_equals_the_classic_path(m, k, dtype, threshold):
    count = _assert_same_quantization(_activations(m, k, dtype), threshold)
    assert count == 0 if threshold == 0.0 else count > 0


@pytest.mark.parametrize("m", DECODE_ROWS)
def test_no_outliers(m):
    x = planted_outliers(m, 130, torch.float16, n_outlier_cols=0, at_threshold=None).to(DEVICE)
    assert _assert_same_quantization(x, 6.0) == 0


# 1: rows listing 2+ columns sweep flags over K (a tile must be a power of two: 0 compiles on no GPU)
@pytest.mark.parametrize("merge_tile", [1, 8, 32])
@pytest.mark.parametrize("outlier_cols", [0, 3, 12])
@pytest.mark.parametrize("m", [2, 5, 16])
def test_both_ways_of_merging_the_rows_lists(m, outlier_cols, merge_tile, monkeypatch):
    """Rows with few outlier columns are merged in registers, rows with many by flags swept over K."""
    monkeypatch.setattr(triton_decode, "MERGE_TILE", merge_tile)
    x = _activations(m, 257, n_outlier_cols=outlier_cols, seed=outlier_cols)
    x[0, 100] = -7.0  # columns only one row flags: two, so that a tile of 1 sweeps flags even without planted ones
    x[0, 101] = 7.0
    assert _assert_same_quantization(x, 6.0) >= outlier_cols + 2


@pytest.mark.parametrize("m", [1, 5, 16])
def test_rows_longer_than_a_tile(m, monkeypatch):
    """Rows swept twice (longer than the kernel's tile) and the union in several steps, with small tiles."""
    monkeypatch.setattr(triton_decode, "ROW_TILE_MAX", 64)
    monkeypatch.setattr(triton_decode, "UNION_TILE_MAX", 32)
    monkeypatch.setattr(triton_decode, "LIST_TILE", 2)
    for dtype in (torch.float16, torch.float32):
        assert _assert_same_quantization(_activations(m, 499, dtype, n_outlier_cols=12), 6.0) > 2


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("threshold", [0.0, 6.0])
def test_non_finite_rows(bad, threshold):
    x = _activations(5, 130, torch.float32)
    x[3, 17] = bad
    _assert_same_quantization(x, threshold)


def test_every_column_an_outlier():
    x = _activations(5, 100, torch.float32) + 100.0
    assert _assert_same_quantization(x, 6.0) == 100


@pytest.mark.parametrize("view", ["column-major", "every other column"])
def test_strided_inputs(view):
    base = _activations(16, 2 * 123, torch.float16)
    x = base.t().contiguous().t() if view == "column-major" else base[:, ::2]
    assert not x.is_contiguous()
    _assert_same_quantization(x, 6.0)


@pytest.mark.parametrize("layout", ["rows", "columns"])
def test_views_spanning_more_than_2_to_31_elements(layout, fused):
    """x's last row, or last column, lies more than 2^31 elements into its storage: offsets must not wrap
    (only the viewed elements are written, so on the CPU the storage costs address space, not memory)."""
    m, k, strides = (3, 64, (2**30 + 64, 1)) if layout == "rows" else (4, 34, (1, 2**26))
    x = view_beyond_2_31(_activations(m, k), strides)
    _, _, cols, count = classic_quantize(x, 6.0)
    assert k - 1 in cols[: int(count)].tolist()
    _assert_same_quantization(x, 6.0)
    q_w, s_w = int8mm.quantize_weight(random_weight(24, k).to(DEVICE))
    assert_output_close(triton_linear(x, q_w, s_w, None, 6.0), int8mm.int8_linear(x, q_w, s_w, backend="reference"))


def test_scratch_content_does_not_matter(monkeypatch):
    """The per-call scratch (the rows' lists, the union flags) is torch.empty memory: fill it with junk."""
    x = _activations(16, 257)
    expected = classic_quantize(x, 6.0)
    real_empty = torch.empty

    def junk(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(0x01010101 if t.dtype == torch.int32 else 1)

    monkeypatch.setattr(triton_decode.torch, "empty", junk)
    q_f, s_f, cols_f, n_f = triton_decode.quantize_for_decode(x, 6.0)
    monkeypatch.undo()
    count = int(expected[3])
    assert torch.equal(n_f, expected[3]) and torch.equal(cols_f[:count], expected[2][:count])
    assert torch.equal(q_f, expected[0]) and torch.equal(s_f, expected[1])


def test_calls_in_a_row_leave_the_counter_at_zero():
    """The second call's outliers must not include the first's: the counter is reset by each launch's last
    program, so each launch finds its own last program."""
    first = _activations(5, 200, n_outlier_cols=8, seed=1)
    second = _activations(5, 200, n_outlier_cols=3, seed=2)
    counter = triton_counters.counter_pool(DEVICE).counters(1)
    for x in (first, second, first, first[:2], second[:1], second):
        _assert_same_quantization(x, 6.0)
        assert int(counter) == 0
    assert set(classic_quantize(first, 6.0)[2][:8].tolist()) != set(classic_quantize(second, 6.0)[2][:3].tolist())


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("m,k,n", [(1, 64, 32), (2, 499, 33), (5, 123, 7), (16, 256, 48)])
def test_int8_linear_equals_the_classic_path(m, k, n, dtype, bias, monkeypatch):
    x = _activations(m, k, dtype)
    q_w, s_w = int8mm.quantize_weight(random_weight(n, k).to(DEVICE))
    b = torch.randn(n, device=DEVICE).to(dtype) if bias else None
    set_decode_path(monkeypatch, "classic")
    classic = triton_linear(x, q_w, s_w, b, 6.0)
    set_decode_path(monkeypatch, "fused")
    fused = triton_linear(x, q_w, s_w, b, 6.0)
    set_decode_path(monkeypatch, "classic")
    assert_same_output(fused, classic)
    assert_output_close(fused, int8mm.int8_linear(x, q_w, s_w, b, backend="reference"))


def test_non_finite_rows_in_int8_linear(fused):
    x = _activations(5, 130, torch.float32)
    x[2, 9] = float("nan")
    q_w, s_w = int8mm.quantize_weight(random_weight(12, 130).to(DEVICE))
    got = triton_linear(x, q_w, s_w, None, 6.0)
    assert not torch.isfinite(got[2]).any() and torch.isfinite(got[torch.arange(5, device=DEVICE) != 2]).all()
    assert_output_close(got, int8mm.int8_linear(x, q_w, s_w, backend="reference"))


# no kernel behind any of these torch ops (Tensor.view(dtype) records a detach as well)
ALLOCATIONS_AND_VIEWS = frozenset({"aten.empty.memory_format", "aten.split.Tensor", "aten.view.dtype",
                                   "aten.view.default", "aten.detach.default", "aten.slice.Tensor",
                                   "aten.split_with_sizes.default"})


@pytest.mark.parametrize("m", [1, 5, 16])
def test_two_launches_and_no_fills(m, monkeypatch):
    x = _activations(m, 96)
    q_w, s_w = int8mm.quantize_weight(random_weight(24, 96).to(DEVICE))
    set_decode_path(monkeypatch, "classic")
    expected = triton_linear(x, q_w, s_w, None, 6.0)
    triton_counters.counter_pool(DEVICE).counters(1)  # the counters' one-time allocation is not part of a call
    recorder = OpRecorder()
    launches = record_triton_launches(monkeypatch, (triton_backend, triton_decode), recorder)
    with recorder:
        classic = triton_linear(x, q_w, s_w, None, 6.0)
    # what the fused path removes: a fill (of a fresh buffer, or of the one kept from the previous call)
    assert len(launches) == 3 and {"aten.zeros.default", "aten.zero_.default"} & set(recorder.ops), recorder.ops
    set_decode_path(monkeypatch, "fused")
    launches.clear()
    recorder.ops.clear()
    with recorder:
        fused = triton_linear(x, q_w, s_w, None, 6.0)
    set_decode_path(monkeypatch, "classic")
    # the GEMM is the autotuned decode GEMM on a GPU, the plain kernel under the interpreter
    names = [name for name, _ in launches]
    assert len(names) == 2 and names[0] == "decode_quantize_kernel" and "gemm" in names[1], names
    assert set(recorder.ops) <= ALLOCATIONS_AND_VIEWS, recorder.ops
    assert_same_output(fused, classic)
    assert_same_output(fused, expected)


def test_decode_path_variable(monkeypatch):
    monkeypatch.delenv(backends.DECODE_PATH_ENV_VAR, raising=False)
    backends.refresh_from_environment()
    assert backends.decode_path() == "classic"  # the default: fused lost under CUDA graphs on the H200 (TUNING.md)
    set_decode_path(monkeypatch, "fast")
    with pytest.raises(ValueError, match=r"INT8MM_DECODE_PATH must be one of 'classic', 'fused', 'single', got 'fast'"):
        backends.decode_path()
    x = _activations(2, 32)
    q_w, s_w = int8mm.quantize_weight(random_weight(8, 32).to(DEVICE))
    with pytest.raises(ValueError, match="INT8MM_DECODE_PATH"):
        triton_linear(x, q_w, s_w, None, 6.0)
    set_decode_path(monkeypatch, "classic")


@pytest.mark.parametrize("shape", [(17, 8), (0, 8), (3, 0)])
def test_shapes_outside_decode_are_refused(shape):
    with pytest.raises(ValueError, match=rf"1 to 16 rows .* got shape \({shape[0]}, {shape[1]}\)"):
        triton_decode.quantize_for_decode(torch.zeros(shape, device=DEVICE), 6.0)


def test_empty_inputs(fused):
    q_w, s_w = int8mm.quantize_weight(random_weight(8, 32).to(DEVICE))
    assert triton_linear(torch.empty(0, 32, device=DEVICE), q_w, s_w, None, 6.0).shape == (0, 8)
    empty_w, empty_s = int8mm.quantize_weight(random_weight(8, 0).to(DEVICE))
    y = triton_linear(torch.empty(3, 0, device=DEVICE), empty_w, empty_s, None, 6.0)
    assert y.shape == (3, 8) and not y.any()


def test_prefill_ignores_the_decode_path(fused, monkeypatch):
    called = []
    monkeypatch.setattr(triton_decode, "quantize_for_decode", lambda *a: called.append(a))
    x = _activations(17, 64)
    q_w, s_w = int8mm.quantize_weight(random_weight(8, 64).to(DEVICE))
    triton_linear(x, q_w, s_w, None, 6.0)
    assert not called


def test_eager_calls_keep_a_reserve_of_counters_for_captures():
    """Each captured call keeps its counters for good; captures only draw from allocated chunks, so eager calls
    top the pool up: a model captured at many batch sizes (or recaptured) must not run out."""
    pool = triton_counters.CounterPool(torch.device("cpu"))
    pool.counters(1)  # eager: the pool fills its reserve
    left = pool.free_words()
    assert left >= triton_counters.CAPTURE_RESERVE_WORDS
    slot = triton_counters.SLOT_WORDS
    taken = [pool.take(1, may_allocate=False) for _ in range(left // slot)]  # captures, one after another
    assert all(c is not None for c in taken) and pool.take(1, may_allocate=False) is None  # all used up
    pool.counters(1)  # an eager call between captures
    fresh = [pool.take(1, may_allocate=False) for _ in range(triton_counters.CAPTURE_RESERVE_WORDS // slot)]
    assert all(c is not None and int(c) == 0 for c in fresh)
    assert len({c.data_ptr() for c in taken + fresh}) == len(taken) + len(fresh)  # never shared


def test_capture_without_a_free_counter_takes_the_classic_path(fused, monkeypatch, caplog):
    run_out_of_counters(monkeypatch)
    x = _activations(5, 64)
    q_w, s_w = int8mm.quantize_weight(random_weight(8, 64).to(DEVICE))
    with caplog.at_level("WARNING", logger="int8mm"):
        got = triton_linear(x, q_w, s_w, None, 6.0)
    assert "INT8MM_DECODE_PATH=fused found no free counter" in caplog.text
    assert_output_close(got, int8mm.int8_linear(x, q_w, s_w, backend="reference"))
    assert triton_decode.quantize_for_decode(x, 6.0) is None


def test_bench_decode_script(tmp_path):
    """benchmarks/bench_decode.py runs end to end and writes its two files: a dry run through the interpreter
    on the CPU, the smallest model's layers on a GPU."""
    script = load_benchmark("bench_decode")
    if DEVICE.type == "cuda":
        script.main(["--models", "SmolLM2-135M", "--m", "1", "--reps", "3", "--out", str(tmp_path)])
        cells = {"graph": 4, "eager": 4}  # SmolLM2's four layers, under graphs and eager
    else:
        script.main(["--dry-run", "--m", "1", "3", "--reps", "1", "--out", str(tmp_path)])
        cells = {"graph": 0, "eager": 2}  # one tiny layer, M = 1 and 3, eager
    rows = json.loads((tmp_path / "decode_bench.json").read_text())["rows"]
    # the CUDA library's rows where it is built, on a GPU
    with_cuda = backends.Backend.CUDA in backends.available_backends(DEVICE)
    timed = [p for p in script.PROVIDERS if p not in script.CUDA_PROVIDERS or with_cuda]
    in_graphs = [p for p in timed if p not in script.EAGER_ONLY]
    assert [r["provider"] for r in rows if r["mode"] == "eager"] == timed * cells["eager"]
    assert [r["provider"] for r in rows if r["mode"] == "graph"] == in_graphs * cells["graph"]
    assert len(rows) == len(timed) * cells["eager"] + len(in_graphs) * cells["graph"]
    assert all(r["median_us"] > 0 for r in rows)
    assert ("DRY RUN" in (tmp_path / "decode_bench.md").read_text()) == (DEVICE.type != "cuda")
    assert backends.decode_path() == "classic"  # the script restores the variable


@pytest.mark.skipif(DEVICE.type == "cuda", reason="the dry run's plumbing; the GPU's run is test_bench_decode_script")
def test_bench_decode_keeps_the_other_rows_when_a_candidate_fails(tmp_path, monkeypatch):
    """A candidate that raises (say, a kernel that does not compile for this GPU) gets error rows, is not run
    again, and the other providers are still timed; gpu_choose never picks it."""
    script = load_benchmark("bench_decode")
    monkeypatch.setattr(script, "output_of", raising_for(script.output_of, "int8mm single",
                                                         RuntimeError("PassManager::run failed")))
    with pytest.raises(SystemExit, match=r"int8mm single failed"):  # after writing its files
        script.main(["--dry-run", "--m", "1", "3", "--reps", "1", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "decode_bench.json").read_text())["rows"]
    failed = [r for r in rows if r.get("error")]
    assert {r["provider"] for r in failed} == {"int8mm single"} and len(failed) == 2  # M = 1 and 3, eager
    assert all(r["median_us"] is None and r["error"] == "tiny o_proj M=1: RuntimeError: PassManager::run failed"
               for r in failed)
    assert all(r["median_us"] > 0 for r in rows if r not in failed) and len(rows) > len(failed)
    report = (tmp_path / "decode_bench.md").read_text()
    assert "- int8mm single: tiny o_proj M=1: RuntimeError: PassManager::run failed" in report
    chosen, reasons = load_benchmark("gpu_choose").choices(tmp_path)
    assert "INT8MM_DECODE_PATH" not in chosen or chosen["INT8MM_DECODE_PATH"] != "single"
    assert "int8mm single failed (tiny o_proj M=1: RuntimeError: PassManager::run failed)" in reasons[0]


@pytest.mark.skipif(DEVICE.type == "cuda", reason="the dry run's plumbing; the GPU's run is test_bench_decode_script")
def test_bench_decode_leaves_out_the_candidates_named(tmp_path, monkeypatch):
    """--leave-out (a GPU run that skipped a candidate's tests): that candidate is neither run nor timed."""
    script = load_benchmark("bench_decode")
    monkeypatch.setattr(script, "output_of", raising_for(script.output_of, "int8mm single",
                                                         RuntimeError("an untested kernel ran")))
    script.main(["--dry-run", "--m", "1", "--reps", "1", "--leave-out", "single", "fused+splitk",
                 "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "decode_bench.json").read_text())["rows"]
    timed = {r["provider"] for r in rows}
    assert "int8mm single" not in timed and "int8mm fused+splitk" not in timed and "int8mm fused" in timed
    assert all(r["median_us"] > 0 for r in rows)
    assert "Left out (neither run nor timed): int8mm single, int8mm fused+splitk." in (
        tmp_path / "decode_bench.md").read_text()
    with pytest.raises(SystemExit):
        script.main(["--dry-run", "--leave-out", "classic", "--out", str(tmp_path)])  # only candidates


# ---- on a GPU: real concurrency, CUDA graphs, streams ----
LLAMA_DECODE = [(1, 4096, 4096), (16, 4096, 6144), (1, 14336, 4096), (16, 28672, 512), (5, 8192, 1000)]


@requires_cuda
@pytest.mark.parametrize("m,k,n", LLAMA_DECODE)
def test_gpu_fused_equals_classic(m, k, n, monkeypatch):
    for seed in range(3):
        x = _activations(m, k, seed=seed)
        _assert_same_quantization(x, 6.0)
        q_w, s_w = int8mm.quantize_weight(random_weight(n, k).to(DEVICE))
        set_decode_path(monkeypatch, "classic")
        classic = triton_linear(x, q_w, s_w, None, 6.0)
        set_decode_path(monkeypatch, "fused")
        assert_same_output(triton_linear(x, q_w, s_w, None, 6.0), classic)
    set_decode_path(monkeypatch, "classic")


@requires_cuda
@pytest.mark.parametrize("m", [1, 16])
def test_gpu_graph_replays_follow_their_inputs(m, fused):
    """Outliers appear, move and disappear between replays; each replay equals an eager classic call."""
    k, n = 4096, 1024
    q_w, s_w = int8mm.quantize_weight(random_weight(n, k).to(DEVICE))
    inputs = [_activations(m, k, seed=s) for s in range(3)]
    inputs.append(planted_outliers(m, k, torch.float16, n_outlier_cols=0, at_threshold=None).to(DEVICE))

    def check(static_y, x):
        assert_same_output(static_y, triton_linear(x, q_w, s_w, None, 6.0))
        assert_output_close(static_y, int8mm.int8_linear(x, q_w, s_w, backend="reference"))

    replay_over(lambda x: triton_linear(x, q_w, s_w, None, 6.0), inputs, 8, check)


@requires_cuda
def test_gpu_two_graphs_and_two_streams(fused):
    """Two graphs replayed at once on two streams, next to eager calls on two more: each has its own counter."""
    m, k, n = 16, 8192, 2048
    q_w, s_w = int8mm.quantize_weight(random_weight(n, k).to(DEVICE))
    xs = [_activations(m, k, seed=s) for s in range(2)]
    expected = [triton_linear(x, q_w, s_w, None, 6.0) for x in xs]
    assert_graphs_and_streams_agree(lambda x: triton_linear(x, q_w, s_w, None, 6.0), xs, expected)
