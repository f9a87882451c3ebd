"""The one-kernel decode path of the Triton backend (INT8MM_DECODE_PATH=single): quantization inside the GEMM.

Its ``int8_linear`` output must equal the classic path's bit for bit (the same int8 values, the same int32 sums,
the same epilogue term for term), for every row count of the decode regime, with and without outliers, bias,
non-finite rows and strided inputs, in one launch. Without a GPU the kernel runs on CPU tensors through Triton's
interpreter (conftest.py); the GPU tests at the end take Llama-sized layers and CUDA graphs.
"""
import pytest
import torch

import int8mm
from int8mm import backends
from int8mm.backends import registry

from gpu import replay_over, requires_cuda
from helpers import (DEVICE, assert_output_close, assert_same_output, planted_outliers, random_weight, set_decode_path,
                     view_beyond_2_31)

pytest.importorskip("triton", reason="the Triton backend needs the triton package")

from int8mm.backends import triton as triton_backend, triton_single  # noqa: E402  (needs triton)

triton_linear = registry.lookup("triton", "int8_linear")


@pytest.fixture(autouse=True)
def _classic_afterwards(monkeypatch):
    yield
    monkeypatch.delenv(backends.DECODE_PATH_ENV_VAR, raising=False)
    backends.refresh_from_environment()


def _both_paths(monkeypatch, x, q_w, s_w, bias, threshold=6.0):
    """(single, classic) outputs of the Triton backend's int8_linear."""
    set_decode_path(monkeypatch, "single")
    single = triton_linear(x, q_w, s_w, bias, threshold)
    set_decode_path(monkeypatch, "classic")
    return single, triton_linear(x, q_w, s_w, bias, threshold)


def _layer(n, k, seed=0):
    return int8mm.quantize_weight(random_weight(n, k, seed=seed).to(DEVICE))


@pytest.mark.parametrize("threshold", [0.0, 6.0])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m,k,n", [(1, 64, 32), (2, 499, 33), (5, 123, 7), (16, 256, 48), (1, 1, 5)])
def test_equals_the_classic_path(m, k, n, dtype, threshold, monkeypatch):
    """K ragged against the interpreter's 64-column tiles, N against its 32-column ones, one column, one row."""
    x = planted_outliers(m, k, dtype, n_outlier_cols=min(8, k), zero_row=m > 2, seed=m + k).to(DEVICE)
    q_w, s_w = _layer(n, k)
    bias = torch.randn(n, generator=torch.Generator().manual_seed(n)).to(dtype).to(DEVICE)
    single, classic = _both_paths(monkeypatch, x, q_w, s_w, bias, threshold)
    assert_same_output(single, classic)
    assert_output_close(single, int8mm.int8_linear(x, q_w, s_w, bias, threshold, backend="reference"))


@pytest.mark.parametrize("outlier_cols", [0, 3, 70])  # none; a few; more than a tile holds
def test_outlier_columns_and_no_bias(outlier_cols, monkeypatch):
    x = planted_outliers(4, 300, torch.float16, n_outlier_cols=outlier_cols,
                         at_threshold=6.0 if outlier_cols else None, seed=outlier_cols).to(DEVICE)
    q_w, s_w = _layer(40, 300, seed=1)
    single, classic = _both_paths(monkeypatch, x, q_w, s_w, None)
    assert_same_output(single, classic)


def test_every_column_an_outlier(monkeypatch):
    x = (planted_outliers(3, 100, torch.float32, n_outlier_cols=0, at_threshold=None) + 100.0).to(DEVICE)
    q_w, s_w = _layer(9, 100)
    single, classic = _both_paths(monkeypatch, x, q_w, s_w, None)
    assert_same_output(single, classic)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("threshold", [0.0, 6.0])
def test_non_finite_rows(bad, threshold, monkeypatch):
    """A row holding NaN or Inf has non-finite outputs, and only it."""
    x = planted_outliers(5, 130, torch.float32, seed=3).to(DEVICE)
    x[2, 9] = bad
    q_w, s_w = _layer(12, 130)
    single, classic = _both_paths(monkeypatch, x, q_w, s_w, None, threshold)
    assert_same_output(single, classic)
    others = torch.arange(5, device=DEVICE) != 2
    assert not torch.isfinite(single[2]).all() and torch.isfinite(single[others]).all()


@pytest.mark.parametrize("view", ["column-major", "every other column"])
def test_strided_inputs_and_weight(view, monkeypatch):
    base = planted_outliers(16, 2 * 123, torch.float16, seed=4).to(DEVICE)
    x = base[:, :123].t().contiguous().t() if view == "column-major" else base[:, ::2]
    assert x.shape == (16, 123) and not x.is_contiguous()
    q_w, s_w = _layer(20, 123)
    single, classic = _both_paths(monkeypatch, x, q_w, s_w, None)
    assert_same_output(single, classic)
    column_major_weight = q_w.t().contiguous().t()  # K stride N: the launcher makes it unit
    set_decode_path(monkeypatch, "single")
    assert_same_output(triton_linear(x, column_major_weight, s_w, None, 6.0), classic)


@pytest.mark.parametrize("layout", ["rows", "columns"])
def test_views_spanning_more_than_2_to_31_elements(layout, monkeypatch):
    """x's last row, or last column, lies more than 2^31 elements into its storage (with an outlier at that far
    end): element offsets must not wrap (only the viewed elements are written: address space, not memory)."""
    m, k, strides = (3, 64, (2**30 + 64, 1)) if layout == "rows" else (4, 34, (1, 2**26))
    x = view_beyond_2_31(planted_outliers(m, k, torch.float16, seed=6).to(DEVICE), strides)
    q_w, s_w = _layer(24, k)
    single, classic = _both_paths(monkeypatch, x, q_w, s_w, None)
    assert_same_output(single, classic)
    assert_output_close(single, int8mm.int8_linear(x, q_w, s_w, backend="reference"))


@pytest.mark.parametrize("config", triton_single.CONFIGS, ids=lambda c: "{BLOCK_N}x{BLOCK_K}".format(**c.kwargs))
def test_every_gpu_tile_shape(config, monkeypatch):
    """The GPU configs' tile shapes (the interpreter otherwise runs one), on K and N ragged against each."""
    monkeypatch.setattr(triton_single, "INTERPRETER_CONFIG", dict(config.kwargs))
    x = planted_outliers(5, 300, torch.float16, seed=7).to(DEVICE)
    q_w, s_w = _layer(70, 300)
    single, classic = _both_paths(monkeypatch, x, q_w, s_w, None)
    assert_same_output(single, classic)


def test_the_split_k_setting_does_not_apply(monkeypatch):
    """INT8MM_DECODE_GEMM=splitk changes the two-kernel paths' GEMM; the one-kernel path has no GEMM of its own to
    split and ignores it."""
    monkeypatch.setenv("INT8MM_DECODE_GEMM", "splitk")
    x = planted_outliers(2, 256, torch.float16, seed=8).to(DEVICE)
    q_w, s_w = _layer(40, 256)
    single, classic = _both_paths(monkeypatch, x, q_w, s_w, None)
    assert_same_output(single, classic)


def test_one_launch_and_nothing_kept(monkeypatch):
    """The whole call is one kernel: no quantization kernel, no fill, no kept buffer."""
    from int8mm.backends import triton_launch
    from int8mm.kernels.triton.decode_single import _decode_single_kernel
    launches = []  # the one-kernel launcher launches through triton_launch.launch_scheduled
    real = triton_launch.launch
    monkeypatch.setattr(triton_launch, "launch", lambda *a: launches.append(a[0]) or real(*a))
    monkeypatch.setattr(triton_backend, "launch", lambda *a: pytest.fail(f"another launch: {a[0]}"))
    from int8mm.backends import scratch
    scratch.release()
    x = planted_outliers(3, 200, torch.float16, seed=5).to(DEVICE)
    q_w, s_w = _layer(24, 200)
    set_decode_path(monkeypatch, "single")
    got = triton_linear(x, q_w, s_w, None, 6.0)
    assert launches == [_decode_single_kernel] and scratch.kept_bytes() == 0
    assert_output_close(got, int8mm.int8_linear(x, q_w, s_w, backend="reference"))


def test_prefill_rows_are_not_affected(monkeypatch):
    monkeypatch.setattr(triton_single, "decode_linear", lambda *a, **k: pytest.fail("took the decode kernel"))
    x = planted_outliers(17, 64, torch.float16).to(DEVICE)
    q_w, s_w = _layer(8, 64)
    set_decode_path(monkeypatch, "single")
    assert_output_close(triton_linear(x, q_w, s_w, None, 6.0), int8mm.int8_linear(x, q_w, s_w, backend="reference"))


# ---- on a GPU: Llama-sized layers, autotuned schedules, CUDA graphs ----
@requires_cuda
@pytest.mark.parametrize("m,k,n", [(1, 4096, 4096), (16, 4096, 6144), (1, 14336, 4096), (16, 28672, 512),
                                   (5, 8192, 1000)])
def test_gpu_single_equals_classic(m, k, n, monkeypatch):
    q_w, s_w = _layer(n, k)
    for seed in range(3):
        x = planted_outliers(m, k, torch.float16, seed=seed).to(DEVICE)
        single, classic = _both_paths(monkeypatch, x, q_w, s_w, None)
        assert_same_output(single, classic)


@requires_cuda
@pytest.mark.parametrize("m", [1, 16])
def test_gpu_single_graph_replays_follow_their_inputs(m, monkeypatch):
    """Outliers appear, move and disappear between replays; each replay equals an eager classic call."""
    k, n = 4096, 1024
    q_w, s_w = _layer(n, k)
    inputs = [planted_outliers(m, k, torch.float16, seed=s).to(DEVICE) for s in range(3)]
    inputs.append(planted_outliers(m, k, torch.float16, n_outlier_cols=0, at_threshold=None).to(DEVICE))
    classic = {}
    for i, x in enumerate(inputs):
        set_decode_path(monkeypatch, "classic")
        classic[i] = triton_linear(x, q_w, s_w, None, 6.0)
    set_decode_path(monkeypatch, "single")

    def check(static_y, x):
        which = next(i for i, candidate in enumerate(inputs) if candidate is x)
        assert_same_output(static_y, classic[which])

    replay_over(lambda x: triton_linear(x, q_w, s_w, None, 6.0), inputs, 8, check)
