"""The Triton prefill quantization passes that own whole rows, "rowwise" and "resident" (INT8MM_PREFILL_QUANT),
against the reference backend.

Every output must equal the reference's bit for bit: int8 values, fp32 row scales (NaN where the reference has
NaN), the whole outlier-column buffer (ascending, compact, tail cleared) and the count. Without a GPU the
kernels run on CPU tensors through Triton's interpreter (conftest.py); the interpreter's "GPU" has 4 SMs and a
1 MiB L2 (int8mm.backends.triton_launch, triton_prefill_quant), so every rowwise case below runs persistent
programs over several rows each, and M = 300 spans two row ranges of the outlier-column pass.
"""
import math
import os
import subprocess
import sys

import pytest
import torch

import int8mm
from int8mm.backends import refresh_from_environment, registry
from int8mm.backends.reference import quantize_activations_op as reference_quantize
from helpers import (DEVICE, OpRecorder, load_benchmark, planted_outliers, raising_for, random_weight,
                     view_beyond_2_31)

triton = pytest.importorskip("triton", reason="the Triton backend needs the triton package")
from int8mm.backends import triton_prefill_quant  # noqa: E402

PREFILL_M = [17, 64, 100]
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
# M = 300 spans two row ranges of the outlier-column pass, but under the interpreter it takes 3-13 s per case (one
# row per program step; 424 of the suite's 1967 test-seconds when every cross product ran it, 2-core EPYC,
# 2026-12-01). There the tests built with _cases run it for what the row ranges change (outlier columns, and bad
# values, in both ranges), and the cross products of dtype, K and the kind of bad value run at the smaller M; on a
# GPU, where it is cheap, every case runs at M = 300 too.
TWO_ROW_RANGES_M = 300


def _cases(others, at_two_row_ranges):
    """Parameters (M, *rest): each ``rest`` of ``others`` at every M of PREFILL_M, and at M = 300 (marked slow)
    those of ``at_two_row_ranges`` under the interpreter, all of ``others`` on a GPU."""
    extra = others if DEVICE.type == "cuda" else at_two_row_ranges
    return ([(m, *rest) for m in PREFILL_M for rest in others]
            + [pytest.param(TWO_ROW_RANGES_M, *rest, marks=pytest.mark.slow) for rest in extra])


def _dtype_name(value):
    """Test ids: float16 rather than dtype0 (None: pytest's own id for other values)."""
    return str(value).removeprefix("torch.") if isinstance(value, torch.dtype) else None


BENCH_SCRIPT = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "bench_quantize_pass.py")


@pytest.fixture
def scheme(monkeypatch):
    """Sets INT8MM_PREFILL_QUANT for the test (the backend reads it once; it is read again around the test)."""
    def choose(name):
        monkeypatch.setenv(triton_prefill_quant.PREFILL_QUANT_ENV_VAR, name)
        refresh_from_environment()

    yield choose
    monkeypatch.delenv(triton_prefill_quant.PREFILL_QUANT_ENV_VAR, raising=False)
    refresh_from_environment()


ROW_SCHEMES = ["rowwise", "resident"]


@pytest.fixture(params=ROW_SCHEMES)
def row_scheme(request, scheme):
    """Each test that takes it runs once per scheme that owns whole rows."""
    scheme(request.param)
    return request.param


def _activations(m, k, dtype=torch.float16, **kwargs):
    return planted_outliers(m, k, dtype, zero_row=m > 2, **kwargs).to(DEVICE)


def _triton_quantize(x, threshold):
    return registry.lookup("triton", "quantize_activations")(x, threshold)


def assert_same_quantization(x, threshold):
    """The Triton op's four outputs equal the reference's exactly; returns them."""
    q_r, s_r, cols_r, n_r = reference_quantize(x, threshold)
    q_t, s_t, cols_t, n_t = _triton_quantize(x, threshold)
    assert torch.equal(q_t, q_r), f"{int((q_t != q_r).sum())} int8 values differ"
    assert torch.equal(s_t.isnan(), s_r.isnan()), "NaN pattern of the row scales differs"
    assert torch.equal(s_t.nan_to_num(), s_r.nan_to_num()), "row scales differ"
    assert torch.equal(n_t, n_r), f"outlier count {int(n_t)} != {int(n_r)}"
    assert torch.equal(cols_t, cols_r), "outlier column lists differ"
    return q_t, s_t, cols_t, n_t


@pytest.mark.parametrize("m, k, dtype", _cases(
    [(k, dtype) for k in (1, 123, 2049) for dtype in DTYPES],
    [(1, torch.float32), (123, torch.bfloat16), (2049, torch.float16)]), ids=_dtype_name)
def test_matches_reference(m, k, dtype, row_scheme):
    """Ragged shapes: K below one tile, and one column past a whole tile (the last tile holds one column);
    planted outlier columns, two values exactly at +-threshold, an all-zero row."""
    assert_same_quantization(_activations(m, k, dtype), 6.0)


@pytest.mark.parametrize("m, threshold", _cases(
    [(threshold,) for threshold in (0.0, 6.0, 1e9)],
    [(6.0,)]))  # 0 and 1e9 flag no column: the row ranges change nothing there
def test_thresholds(m, threshold, row_scheme):
    """0 disables decomposition (plain row absmax, no outlier columns); 1e9 finds none."""
    q, _, _, count = assert_same_quantization(_activations(m, 499), threshold)
    if threshold != 6.0:
        assert int(count) == 0
    else:
        assert int(count) >= 8 and not q[:, (_activations(m, 499).abs() >= 6.0).any(0)].any()


@pytest.mark.parametrize("m, threshold, bad", _cases(
    [(threshold, bad) for threshold in (0.0, 6.0) for bad in (math.nan, math.inf, -math.inf)],
    [(6.0, math.nan), (6.0, math.inf)]))  # at 6 the last row's Inf is an outlier column found in the second range
def test_non_finite_rows(m, bad, threshold, row_scheme):
    """A NaN row gets a NaN scale and int8 zeros; +-Inf is an outlier at threshold 6 and makes the scale Inf
    (and the row zero) at threshold 0. The other rows are untouched, outliers in a NaN row still count."""
    x = _activations(m, 300, torch.float32)
    x[4, 17] = bad
    x[m - 1, 0] = bad  # the last row, first column
    x[m - 1, 299] = 50.0  # an outlier in the same row as the NaN/Inf: its column is still an outlier column
    q, s, _, _ = assert_same_quantization(x, threshold)
    if math.isnan(bad) or threshold == 0.0:
        assert not q[4].any() and not torch.isfinite(s[4])


@pytest.mark.parametrize("m", [*PREFILL_M, pytest.param(TWO_ROW_RANGES_M, marks=pytest.mark.slow)])
def test_outlier_columns_across_blocks_and_row_ranges(m, row_scheme):
    """Outliers in several 2048-column blocks (the last one partial), some in a single row only: the list
    is assembled from every block in ascending order and each column is zeroed in every row."""
    k = 4100
    x = _activations(m, k, n_outlier_cols=0, at_threshold=None)
    planted = [0, 7, 2047, 2048, 3000, 4096, 4099]
    for i, col in enumerate(planted):
        x[(i * 37) % m, col] = (-1) ** i * (6.0 + i)
    x[:, 2100] = 30.0  # a whole outlier column too
    _, _, cols, count = assert_same_quantization(x, 6.0)
    assert cols[: int(count)].tolist() == sorted(planted + [2100])


def test_every_column_an_outlier(row_scheme):
    """count == K: the list spans two column blocks and many chunks of the zeroing loop."""
    x = _activations(40, 2100, torch.float32) + 100.0
    q, _, cols, count = assert_same_quantization(x, 6.0)
    assert int(count) == 2100 and not q.any() and torch.equal(cols.cpu(), torch.arange(2100, dtype=torch.int32))


@pytest.mark.parametrize("layout", ["column-major", "padded rows"])
@pytest.mark.parametrize("m", [17, 100])
def test_strided_inputs(m, layout, row_scheme):
    base = _activations(m, 300, torch.bfloat16)
    if layout == "column-major":
        x = base.t().contiguous().t()
    else:
        x = torch.zeros(m, 333, dtype=base.dtype, device=DEVICE)[:, 7:307]
        x.copy_(base)
    assert not x.is_contiguous()
    assert_same_quantization(x, 6.0)


@pytest.mark.parametrize("layout", ["rows", "columns"])
def test_views_spanning_more_than_2_to_31_elements(layout, row_scheme):
    """Element offsets beyond 2^31 must not wrap: x is a view whose last row, or last column, lies more than
    2^31 elements into its storage (only the viewed elements are written: address space, not memory)."""
    m, k, strides = (17, 64, (2**27 + 64, 1)) if layout == "rows" else (17, 34, (1, 2**26))
    x = view_beyond_2_31(_activations(m, k), strides)
    _, _, cols, count = assert_same_quantization(x, 6.0)
    assert int(cols[int(count) - 1]) == k - 1


@pytest.mark.parametrize("m", [17, 101])
def test_two_rows_per_program(m, scheme, monkeypatch):
    """The rowwise kernel takes BLOCK_M rows at a time (the launcher picks 1 today); an odd M leaves a half block.
    The schedule is pinned to 4 SMs and 2 rows per SM so that it picks 2-row blocks on any device."""
    scheme("rowwise")
    monkeypatch.setattr(triton_prefill_quant, "ROWWISE_MAX_BLOCK_M", 2)
    monkeypatch.setattr(triton_prefill_quant, "ROWWISE_ROWS_PER_SM", 2)
    monkeypatch.setattr(triton_prefill_quant, "multiprocessors", lambda device: 4)
    x = _activations(m, 499)
    assert triton_prefill_quant.rowwise_schedule(x)[0] == 2
    assert_same_quantization(x, 6.0)


@pytest.mark.parametrize("k", [300, 499, 2049])
def test_resident_rows_longer_than_a_tile(k, scheme, monkeypatch):
    """Rows longer than RESIDENT_TILE_MAX are swept twice (here 64-column steps, the first sweep in two slices of
    32: several steps, the last one partial), with NaN and outlier rows as in the other tests."""
    scheme("resident")
    monkeypatch.setattr(triton_prefill_quant, "RESIDENT_TILE_MAX", 128)
    monkeypatch.setattr(triton_prefill_quant, "RESIDENT_SWEEP_TILE", 64)
    assert not triton_prefill_quant.resident_options(k)["ROW_IN_REGISTERS"]
    x = _activations(40, k, torch.float32)
    x[3, k - 1] = math.nan
    assert_same_quantization(x, 6.0)


def test_outlier_row_ranges_stay_within_the_grid_limit(row_scheme, monkeypatch):
    """Past MAX_GRID_Y row ranges (16.7M rows on a GPU; 3 here) each program takes more rows, and every row of an
    outlier column is still zeroed."""
    monkeypatch.setattr(triton_prefill_quant, "OUTLIER_ROWS_PER_PROGRAM", 8)
    monkeypatch.setattr(triton_prefill_quant, "MAX_GRID_Y", 3)
    assert triton_prefill_quant.outlier_rows_per_program(40) == 14  # cdiv(40, 3): 3 ranges, not 5
    assert triton_prefill_quant.outlier_rows_per_program(20) == 8
    grids, launch = [], triton_prefill_quant.launch

    def recording(kernel, grid, args, options):
        grids.append(grid)
        launch(kernel, grid, args, options)

    monkeypatch.setattr(triton_prefill_quant, "launch", recording)
    assert_same_quantization(_activations(40, 96), 6.0)
    assert len(grids) == 2 and grids[1][1] == 3  # the outlier kernel: 3 row ranges of 14 rows


def test_the_outlier_kernel_tiles_fit_its_arithmetic():
    """A column block holds whole words of bits (its offset in words is BLOCK_K // 32) and Triton tiles are powers
    of two."""
    block, tile = triton_prefill_quant.OUTLIER_BLOCK_K, triton_prefill_quant.OUTLIER_COUNT_TILE
    assert block % 32 == 0 and block & (block - 1) == 0 and tile & (tile - 1) == 0


def test_resident_options():
    """A whole row per tile up to RESIDENT_TILE_MAX columns, about 32 columns per thread, then two sweeps."""
    got = {k: triton_prefill_quant.resident_options(k) for k in (1, 17, 4096, 8192, 14336, 16384, 28672)}
    assert [got[k]["BLOCK_K"] for k in got] == [32, 32, 4096, 8192, 16384, 16384, 8192]
    assert [got[k]["num_warps"] for k in got] == [1, 1, 4, 8, 16, 16, 16]
    assert [got[k]["ROW_IN_REGISTERS"] for k in got] == [True, True, True, True, True, True, False]


@pytest.mark.parametrize("count_tile", [1, 4, 16])
def test_outlier_list_counted_across_many_blocks(count_tile, row_scheme, monkeypatch):
    """Column blocks of 128 columns (4 words of bits) counted 1, 4 or 16 words at a time (a count tile smaller than
    a block, equal to one, and larger than several): each block's slice of the list starts after every bit before
    it, across 20 blocks, some empty, with a column at a word's and a block's first and last bit somewhere, and one
    word whose top bit (the int32 sign) is set."""
    monkeypatch.setattr(triton_prefill_quant, "OUTLIER_BLOCK_K", 128)
    monkeypatch.setattr(triton_prefill_quant, "OUTLIER_COUNT_TILE", count_tile)
    m, k = 20, 128 * 20 - 3
    x = _activations(m, k, n_outlier_cols=0, at_threshold=None)
    planted = sorted({0, 31, 32, 62, 63, 127, 128, 129, 640, 641, 1000, 1983, 1984, 2047, 2500, k - 1})
    for i, col in enumerate(planted):
        x[i % m, col] = (-1) ** i * (7.0 + i)
    _, _, cols, count = assert_same_quantization(x, 6.0)
    assert cols[: int(count)].tolist() == planted


def test_fused_forward_is_the_same(scheme):
    """int8_linear over each scheme that owns whole rows gives exactly what it gives over the classic pass."""
    x = _activations(100, 499)
    q_w, s_w = int8mm.quantize_weight(random_weight(24, 499).to(DEVICE))
    linear = registry.lookup("triton", "int8_linear")
    scheme("classic")
    classic = linear(x, q_w, s_w, None, 6.0)
    for name in ROW_SCHEMES:
        scheme(name)
        assert torch.equal(linear(x, q_w, s_w, None, 6.0), classic), name


def test_row_schemes_serve_prefill_only(scheme, monkeypatch):
    """Decode (M <= 16) keeps the classic kernels whatever the variable says; prefill follows it."""
    launched = []

    def record(x, threshold, name, *outputs):
        launched.append((x.shape[0], name))

    monkeypatch.setattr(triton_prefill_quant, "quantize_rows", record)
    for name in ROW_SCHEMES:
        scheme(name)
        for m in (1, 16, 17):
            _triton_quantize(_activations(m, 64), 6.0)
    scheme("classic")
    _triton_quantize(_activations(64, 64), 6.0)
    assert launched == [(17, "rowwise"), (17, "resident")]


def test_forward_fills_only_the_flag_buffer(row_scheme):
    """A prefill forward launches one fill (the column flags), the row pass, the outlier-column pass and the GEMM;
    the passes write every row scale and the count themselves."""
    x = _activations(40, 96)
    q_w, s_w = int8mm.quantize_weight(random_weight(24, 96).to(DEVICE))
    with OpRecorder() as counter:
        registry.lookup("triton", "int8_linear")(x, q_w, s_w, None, 6.0)
    assert counter.fills == ["aten.zeros.default"]


@pytest.mark.parametrize("value", ["fast", "ROWWISE"])  # (empty counts as unset)
def test_unknown_scheme_is_an_error(value, scheme):
    scheme(value)
    expected = rf"INT8MM_PREFILL_QUANT must be one of 'classic', 'rowwise', 'resident', got '{value}'"
    with pytest.raises(ValueError, match=expected):
        _triton_quantize(_activations(17, 64), 6.0)


def test_default_is_classic(scheme, monkeypatch):
    monkeypatch.delenv(triton_prefill_quant.PREFILL_QUANT_ENV_VAR, raising=False)
    refresh_from_environment()
    assert triton_prefill_quant.prefill_quant_scheme() == "classic"


def test_refresh_from_environment_reads_the_scheme_again(scheme, monkeypatch):
    scheme("classic")
    assert triton_prefill_quant.prefill_quant_scheme() == "classic"
    monkeypatch.setenv(triton_prefill_quant.PREFILL_QUANT_ENV_VAR, "rowwise")
    assert triton_prefill_quant.prefill_quant_scheme() == "classic"  # read once
    refresh_from_environment()
    assert triton_prefill_quant.prefill_quant_scheme() == "rowwise"


@pytest.mark.parametrize("with_reference", [True, False])
def test_benchmark_names_the_scheme_that_differs(with_reference):
    """bench_quantize_pass.py judges each scheme on its own, so one that disagrees does not take the others down
    with it in benchmarks/gpu_choose.py."""
    bench = load_benchmark("bench_quantize_pass")
    x = _activations(20, 64)
    right = reference_quantize(x, 6.0)
    wrong = (right[0].clone(), *right[1:])
    wrong[0][3, 5] += 1
    got = bench.check_equal({"classic": right, "rowwise": right, "resident": wrong}, x, 6.0, with_reference)
    assert got == {"classic": True, "rowwise": True, "resident": False}


@pytest.mark.skipif(DEVICE.type == "cuda", reason="the dry run's plumbing, on CPU tensors through the interpreter")
def test_benchmark_keeps_the_other_rows_when_a_pass_fails(tmp_path, monkeypatch):
    """A pass that raises (say, a kernel that does not compile for this GPU) gets error rows and is not run again;
    the copy and the other passes are still timed and checked, and gpu_choose never picks it."""
    from int8mm.backends import triton as triton_backend

    bench = load_benchmark("bench_quantize_pass")
    monkeypatch.setattr(triton_backend, "quantize_pass", raising_for(triton_backend.quantize_pass, "resident",
                                                                     RuntimeError("out of resource: shared memory")))
    args = bench.build_parser().parse_args(["--dry-run", "--out", str(tmp_path), "--m", "17", "--k", "64", "300"])
    args.replays = 2
    rows = bench.measure(args, torch.device("cpu"))
    failed = [r for r in rows if r.get("error")]
    assert [r["provider"] for r in failed] == ["resident", "resident"]
    assert failed[0]["error"] == "M=17 K=64: RuntimeError: out of resource: shared memory" == failed[1]["error"]
    assert all(r["us"] > 0 for r in rows if r not in failed) and len(rows) == 8
    assert all(r["equal"] is True for r in rows if r["provider"] in ("classic", "rowwise"))
    meta = {"device": "cpu", "date": "-", "torch": "-", "triton": "-", "int8mm": "-", "dtype": "fp16", "outliers": 8,
            "threshold": 6.0, "timer": "-"}
    assert "- resident: M=17 K=64: RuntimeError: out of resource" in bench.markdown(meta, rows)
    chosen, why = load_benchmark("gpu_choose").choose_prefill_quant(rows)
    assert chosen != "resident" and "resident failed (M=17 K=64: RuntimeError: out of resource" in why


def test_benchmark_dry_run(tmp_path):
    """benchmarks/bench_quantize_pass.py --dry-run: tiny shapes, CPU tensors through the interpreter; every scheme
    is timed and checked against the others, and the JSON and markdown land under --out."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(sys.path))
    done = subprocess.run([sys.executable, BENCH_SCRIPT, "--dry-run", "--out", str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "quantize_pass.json").is_file() and (tmp_path / "quantize_pass.md").is_file()
    table = (tmp_path / "quantize_pass.md").read_text()
    assert "fraction of copy" in table
    assert all(f"{name} speed-up" in table for name in triton_prefill_quant.PREFILL_QUANT_SCHEMES[1:])
