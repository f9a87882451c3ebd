"""The public functional API (int8mm/functional.py): exactness, accuracy, shapes, dtypes and errors."""
import math

import pytest
import torch

import int8mm
from helpers import (FLOAT_DTYPES, INT8_MAX, assert_scales_equal, float64_linear, planted_outliers,
                     random_weight, relative_error, spec_quantize_activations, spec_quantize_weight)
from int8mm import Backend, backends

THRESHOLD = 6.0


def _randint8(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-INT8_MAX, INT8_MAX + 1, shape, dtype=torch.int8, generator=g)


# ---- int8_matmul ----
@pytest.mark.parametrize("m", [0, 1, 3, 17])
@pytest.mark.parametrize("k", [1, 123, 499, 4096])
@pytest.mark.parametrize("n", [1, 7, 33])
def test_int8_matmul_is_exact(m, k, n):
    a = _randint8((m, k), seed=m * 10_000 + k * 10 + n)
    b = _randint8((n, k), seed=m * 10_000 + k * 10 + n + 1)
    expected = a.long() @ b.long().t()
    for backend in (None, "reference", Backend.REFERENCE):
        got = int8mm.int8_matmul(a, b, backend=backend)
        assert got.dtype == torch.int32 and got.shape == (m, n)
        assert torch.equal(got.long(), expected), backend


# ---- quantization against the docs/SPEC.md oracle ----
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("n,k", [(1, 1), (7, 123), (33, 4096)])
def test_quantize_weight_matches_spec(n, k, dtype):
    w = random_weight(n, k, dtype, seed=n + k)
    if n > 1:
        w[n // 2] = 0.0
    q_w, s_w = int8mm.quantize_weight(w)
    q_ref, s_ref = spec_quantize_weight(w)
    assert q_w.dtype == torch.int8 and q_w.shape == (n, k) and q_w.is_contiguous()
    assert_scales_equal(s_w, s_ref)
    assert torch.equal(q_w, q_ref)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("m,k", [(1, 1), (1, 4096), (3, 123), (17, 499)])
@pytest.mark.parametrize("threshold", [THRESHOLD, 2.5, 0.0])
def test_quantize_activations_matches_spec(m, k, dtype, threshold):
    x = planted_outliers(m, k, dtype, zero_row=m > 2, seed=3 * m + k)
    q_x, s_x, cols = int8mm.quantize_activations(x, threshold)
    q_ref, s_ref, cols_ref = spec_quantize_activations(x, threshold)
    assert_scales_equal(s_x, s_ref)
    assert torch.equal(q_x, q_ref)
    assert cols.dtype == torch.int64 and cols.tolist() == cols_ref


def test_values_exactly_at_the_threshold_are_outliers():
    x = torch.zeros(3, 8)
    x[0, 1] = 6.0  # |x| >= t: an outlier
    x[1, 2] = -6.0
    below = torch.nextafter(torch.tensor(6.0), torch.tensor(0.0))  # the fp32 value just below 6
    x[2, 3] = below  # an ordinary value, and its row's scale
    x[2, 4] = 1.0
    q_x, s_x, cols = int8mm.quantize_activations(x, 6.0)
    assert cols.tolist() == [1, 2]
    assert torch.equal(s_x, torch.stack([torch.tensor(0.0), torch.tensor(0.0), below]))
    assert torch.equal(q_x[0], torch.zeros(8, dtype=torch.int8))
    assert int(q_x[2, 3]) == INT8_MAX and int(q_x[2, 4]) == round(INT8_MAX / 6)
    # fp16 and bf16, where 6.0 is exact too (the fp32 value just below 6 is not: use 5.5)
    x[2, 3] = 5.5
    for dtype in (torch.float16, torch.bfloat16):
        q_h, s_h, cols_h = int8mm.quantize_activations(x.to(dtype), 6.0)
        assert cols_h.tolist() == [1, 2] and float(s_h[2]) == 5.5 and int(q_h[2, 3]) == INT8_MAX


def test_outlier_columns_span_all_rows():
    """One outlier in one row makes the whole column an outlier column: zero in q_x for every row, while
    the other rows' small values in that column still count in their scales (docs/SPEC.md)."""
    x = torch.full((3, 4), 0.5)
    x[0, 2] = 30.0
    x[1, 2] = 2.0  # the largest value of row 1, in an outlier column
    q_x, s_x, cols = int8mm.quantize_activations(x, 6.0)
    assert cols.tolist() == [2]
    assert torch.equal(q_x[:, 2], torch.zeros(3, dtype=torch.int8))
    assert float(s_x[1]) == 2.0 and float(s_x[0]) == 0.5


def test_zero_rows_quantize_to_zero():
    x = planted_outliers(5, 64)
    x[1] = 0.0
    x[3, :] = 0.0
    q_x, s_x, _ = int8mm.quantize_activations(x, THRESHOLD)
    assert float(s_x[1]) == 0.0 and float(s_x[3]) == 0.0
    assert not bool(s_x.isnan().any())
    assert torch.equal(q_x[1], torch.zeros(64, dtype=torch.int8))


def test_threshold_zero_disables_decomposition():
    x = planted_outliers(4, 64)
    q_x, s_x, cols = int8mm.quantize_activations(x, 0.0)
    assert cols.numel() == 0
    assert torch.equal(s_x, x.abs().amax(dim=1))  # plain row absmax
    assert int(q_x.abs().amax(dim=1).min()) == INT8_MAX  # every row reaches +-127


def test_quantize_activations_flattens_leading_dims():
    x = planted_outliers(12, 40, seed=5)
    q2, s2, c2 = int8mm.quantize_activations(x, THRESHOLD)
    q3, s3, c3 = int8mm.quantize_activations(x.reshape(3, 4, 40), THRESHOLD)
    assert q3.shape == (12, 40) and torch.equal(q2, q3) and torch.equal(s2, s3) and torch.equal(c2, c3)


# ---- int8_linear ----
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("m,k,n", [(1, 4096, 33), (17, 499, 7), (64, 1024, 96)])
def test_int8_linear_accuracy_vs_float64(m, k, n, dtype):
    """int8 quantization keeps the relative error well under 2e-2 on data with planted outliers (the per-row
    step is s/254, so the error of a K-term dot product grows like sqrt(K) steps, not K)."""
    x = planted_outliers(m, k, dtype, seed=k)
    w = random_weight(n, k, dtype)
    bias = torch.randn(n, dtype=dtype)
    q_w, s_w = int8mm.quantize_weight(w)
    y = int8mm.int8_linear(x, q_w, s_w, bias, THRESHOLD)
    assert y.dtype == dtype and y.shape == (m, n)
    assert relative_error(y, float64_linear(x, w, bias)) < 2e-2
    # outlier decomposition matters: without it the 20-60 outliers wreck every row's scale
    y_plain = int8mm.int8_linear(x, q_w, s_w, bias, 0.0)
    assert relative_error(y, float64_linear(x, w, bias)) < relative_error(y_plain, float64_linear(x, w, bias))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_int8_linear_keeps_leading_dims(dtype):
    x = planted_outliers(24, 64, dtype, seed=2)
    q_w, s_w = int8mm.quantize_weight(random_weight(7, 64))
    flat = int8mm.int8_linear(x, q_w, s_w, None, THRESHOLD)
    for shape in [(4, 6, 64), (2, 3, 4, 64), (24, 64)]:
        y = int8mm.int8_linear(x.reshape(shape), q_w, s_w, None, THRESHOLD)
        assert y.shape == (*shape[:-1], 7) and y.dtype == dtype
        assert torch.equal(y.reshape(24, 7), flat)
    y1 = int8mm.int8_linear(x[0], q_w, s_w, None, THRESHOLD)  # a 1-D input is one row
    assert y1.shape == (7,)


def test_int8_linear_non_contiguous_inputs_match_contiguous():
    base = planted_outliers(32, 96, seed=4)
    q_w, s_w = int8mm.quantize_weight(random_weight(9, 48))
    bias = torch.randn(9)
    views = {
        "transposed": base.t().contiguous().t()[:, :48],
        "column slice": base[:, 10:58],
        "row step": base[::2, :48],
        "3-D transposed": base[:, :48].reshape(4, 8, 48).transpose(0, 1),
        "expanded": base[:1, :48].expand(5, 48),
    }
    for name, view in views.items():
        assert not view.is_contiguous(), name
        got = int8mm.int8_linear(view, q_w, s_w, bias, THRESHOLD)
        expected = int8mm.int8_linear(view.contiguous(), q_w, s_w, bias, THRESHOLD)
        assert torch.equal(got, expected), name
    # a non-contiguous weight is quantized like its contiguous copy
    w = random_weight(48, 9).t()
    q_t, s_t = int8mm.quantize_weight(w)
    q_c, s_c = int8mm.quantize_weight(w.contiguous())
    assert torch.equal(q_t, q_c) and torch.equal(s_t, s_c)


@pytest.mark.parametrize("shape", [(0, 64), (2, 0, 64), (0, 3, 64)])
def test_int8_linear_empty_batch(shape):
    q_w, s_w = int8mm.quantize_weight(random_weight(7, 64))
    for dtype in FLOAT_DTYPES:
        y = int8mm.int8_linear(torch.zeros(shape, dtype=dtype), q_w, s_w, torch.randn(7), THRESHOLD)
        assert y.shape == (*shape[:-1], 7) and y.dtype == dtype


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("threshold", [THRESHOLD, 0.0])
def test_nan_row_poisons_only_its_row(dtype, threshold):
    x = planted_outliers(9, 128, dtype, seed=6)
    q_w, s_w = int8mm.quantize_weight(random_weight(33, 128))
    bias = torch.randn(33)
    bad = x.clone()
    bad[4] = 0.5
    bad[4, 17] = float("nan")
    clean = x.clone()
    clean[4] = 0.5  # the same batch with a finite row 4: NaN is no outlier, so the outlier set is the same
    y_bad = int8mm.int8_linear(bad, q_w, s_w, bias, threshold)
    y_clean = int8mm.int8_linear(clean, q_w, s_w, bias, threshold)
    assert not bool(torch.isfinite(y_bad[4]).any())
    others = torch.arange(9) != 4
    # same M, same outlier columns: bit-identical rows (removing the row instead would change M, and a BLAS
    # may then pick another kernel for the fp32 outlier product)
    assert torch.equal(y_bad[others], y_clean[others])
    assert bool(torch.isfinite(y_bad[others]).all())


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("value", [math.inf, -math.inf])
def test_inf_row_poisons_only_its_row(dtype, value):
    """An Inf is an outlier element (|Inf| >= t), so it adds its column to the outlier set of the whole
    batch; other rows then take that column in fp32 instead of int8, which changes their rounding but not
    their accuracy: they must stay finite and close to float64."""
    x = planted_outliers(9, 128, dtype, seed=7)
    w = random_weight(33, 128)
    q_w, s_w = int8mm.quantize_weight(w)
    bias = torch.randn(33)
    x[2, 50] = value
    for threshold in (THRESHOLD, 0.0):
        y = int8mm.int8_linear(x, q_w, s_w, bias, threshold)
        assert not bool(torch.isfinite(y[2]).any()), threshold
        others = torch.arange(9) != 2
        assert bool(torch.isfinite(y[others]).all()), threshold
        if threshold > 0:
            assert relative_error(y[others], float64_linear(x[others], w, bias)) < 2e-2


def test_int8_linear_bias_dtypes():
    x = planted_outliers(5, 64)
    q_w, s_w = int8mm.quantize_weight(random_weight(7, 64))
    no_bias = int8mm.int8_linear(x, q_w, s_w, None, THRESHOLD)
    for dtype in FLOAT_DTYPES:
        bias = torch.randn(7).to(dtype)
        y = int8mm.int8_linear(x, q_w, s_w, bias, THRESHOLD)
        assert y.dtype == torch.float32
        assert torch.equal(y, no_bias + bias.float())  # added in fp32, after the rest


def test_int8_linear_backward_uses_the_dequantized_weight():
    x = planted_outliers(6, 32).requires_grad_()
    w = random_weight(5, 32)
    q_w, s_w = int8mm.quantize_weight(w)
    bias = torch.randn(5, requires_grad=True)
    y = int8mm.int8_linear(x, q_w, s_w, bias, THRESHOLD)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    w_dq = q_w.float() * (s_w / INT8_MAX)[:, None]
    torch.testing.assert_close(x.grad, grad_y @ w_dq)
    torch.testing.assert_close(bias.grad, grad_y.sum(0))


def test_backward_computes_only_the_gradients_asked_for(monkeypatch):
    """A bias trained alone (BitFit) must not de-quantize the weight for an input gradient nobody wants; an input
    alone gets no bias gradient."""
    from int8mm import _ops

    q_w, s_w = int8mm.quantize_weight(random_weight(5, 32))
    grad_y = torch.randn(6, 5)
    calls = []
    real = _ops.dequant_matmul
    monkeypatch.setattr(_ops, "dequant_matmul", lambda *args: calls.append(1) or real(*args))
    x, bias = planted_outliers(6, 32), torch.randn(5, requires_grad=True)
    int8mm.int8_linear(x, q_w, s_w, bias, THRESHOLD).backward(grad_y)
    assert calls == [] and x.grad is None
    torch.testing.assert_close(bias.grad, grad_y.sum(0))
    x, bias = planted_outliers(6, 32).requires_grad_(), torch.randn(5)
    int8mm.int8_linear(x, q_w, s_w, bias, THRESHOLD).backward(grad_y)
    assert calls == [1] and x.grad is not None and bias.grad is None


# ---- backend choice ----
def test_backend_by_name_enum_and_environment(monkeypatch):
    x = planted_outliers(3, 64)
    q_w, s_w = int8mm.quantize_weight(random_weight(7, 64))
    expected = int8mm.int8_linear(x, q_w, s_w, None, THRESHOLD, backend="reference")
    assert torch.equal(int8mm.int8_linear(x, q_w, s_w, None, THRESHOLD, backend=Backend.REFERENCE), expected)
    assert torch.equal(int8mm.int8_linear(x, q_w, s_w, None, THRESHOLD, backend="REFERENCE"), expected)
    auto = int8mm.int8_linear(x, q_w, s_w, None, THRESHOLD, backend="auto")  # the CPU library here
    assert torch.equal(auto, int8mm.int8_linear(x, q_w, s_w, None, THRESHOLD, backend="cpu"))
    monkeypatch.setenv("INT8MM_BACKEND", "reference")
    backends.refresh_from_environment()
    assert torch.equal(int8mm.int8_linear(x, q_w, s_w, None, THRESHOLD), expected)
    monkeypatch.setenv("INT8MM_BACKEND", "fastest")
    # read once: the op calls keep what they read until the environment is read again
    assert torch.equal(int8mm.int8_linear(x, q_w, s_w, None, THRESHOLD), expected)
    backends.refresh_from_environment()
    try:
        with pytest.raises(ValueError, match=r"INT8MM_BACKEND.*'fastest'"):
            int8mm.int8_linear(x, q_w, s_w, None, THRESHOLD)
        monkeypatch.setenv("INT8MM_BACKEND", "")  # empty counts as unset, as for INT8MM_CACHE
        backends.refresh_from_environment()
        assert backends.default_backend() is Backend.AUTO
    finally:
        monkeypatch.undo()
        backends.refresh_from_environment()


def test_set_default_backend_applies_to_calls_that_name_none():
    x = planted_outliers(3, 64)
    q_w, s_w = int8mm.quantize_weight(random_weight(7, 64))
    try:
        backends.set_default_backend("cuda")  # not available on CPU: the next call says so
        with pytest.raises(RuntimeError, match=r"backend 'cuda' is not available on cpu"):
            int8mm.int8_linear(x, q_w, s_w, None, THRESHOLD)
        with pytest.raises(ValueError, match=r"backend must be a Backend or one of .*got 'tpu'"):
            backends.set_default_backend("tpu")
        backends.set_default_backend(Backend.REFERENCE)
        assert int8mm.int8_linear(x, q_w, s_w, None, THRESHOLD).shape == (3, 7)
    finally:
        backends.set_default_backend(None)


def test_unknown_backend_name():
    x = torch.randn(2, 8)
    q_w, s_w = int8mm.quantize_weight(torch.randn(3, 8))
    with pytest.raises(ValueError, match=r"backend must be a Backend or one of .*'reference'.*got 'tpu'"):
        int8mm.int8_linear(x, q_w, s_w, backend="tpu")
    with pytest.raises(ValueError, match=r"got 3"):
        int8mm.int8_matmul(q_w, q_w, backend=3)


def test_cuda_backend_unavailable_on_cpu_lists_available():
    a = _randint8((2, 8), seed=0)
    with pytest.raises(RuntimeError, match=r"backend 'cuda' is not available on cpu.*available: reference"):
        int8mm.int8_matmul(a, a, backend="cuda")


def test_triton_backend_unavailable_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    backends.refresh_from_environment()  # the environment is read once otherwise
    try:
        x = torch.randn(2, 8)
        q_w, s_w = int8mm.quantize_weight(torch.randn(3, 8))
        with pytest.raises(RuntimeError, match=r"backend 'triton' is not available on cpu.*TRITON_INTERPRET=1.*"
                                               r"available: reference, cpu$"):
            int8mm.int8_linear(x, q_w, s_w, backend=Backend.TRITON)
        assert int8mm.available_backends("cpu") == [Backend.REFERENCE, Backend.CPU]
    finally:
        monkeypatch.undo()
        backends.refresh_from_environment()


# ---- argument errors: each names the argument and quotes what it got ----
def _layer(n=3, k=8):
    q_w, s_w = int8mm.quantize_weight(torch.randn(n, k))
    return q_w, s_w


@pytest.mark.parametrize("dtype", [torch.int32, torch.int8, torch.float64, torch.bool])
def test_bad_activation_dtype(dtype):
    q_w, s_w = _layer()
    x = torch.ones(2, 8, dtype=dtype)
    with pytest.raises(TypeError, match=rf"x must be one of float16, bfloat16, float32, got {dtype}"):
        int8mm.int8_linear(x, q_w, s_w)
    with pytest.raises(TypeError, match=rf"x must be one of .*got {dtype}"):
        int8mm.quantize_activations(x)


def test_bad_weight_dtype_and_rank():
    with pytest.raises(TypeError, match=r"weight must be one of float16, bfloat16, float32, got torch.float64"):
        int8mm.quantize_weight(torch.randn(3, 8, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"w must be a torch.Tensor, got list"):
        int8mm.quantize_weight([[1.0]], name="w")
    with pytest.raises(ValueError, match=r"weight must be 2-D, got shape \(2, 3, 8\)"):
        int8mm.quantize_weight(torch.randn(2, 3, 8))
    with pytest.raises(ValueError, match=r"weight must be 2-D, got shape \(8,\)"):
        int8mm.quantize_weight(torch.randn(8))


def test_bad_int8_linear_operands():
    q_w, s_w = _layer()
    x = torch.randn(2, 8)
    with pytest.raises(TypeError, match=r"q_w must be int8 .*got torch.float32"):
        int8mm.int8_linear(x, q_w.float(), s_w)
    with pytest.raises(ValueError, match=r"q_w must be 2-D, got shape \(24,\)"):
        int8mm.int8_linear(x, q_w.flatten(), s_w)
    with pytest.raises(TypeError, match=r"s_w must be float32, got torch.float16"):
        int8mm.int8_linear(x, q_w, s_w.half())
    with pytest.raises(ValueError, match=r"s_w must have shape \(3,\) .*got \(4,\)"):
        int8mm.int8_linear(x, q_w, torch.ones(4))
    with pytest.raises(ValueError, match=r"bias must have shape \(3,\), got \(8,\)"):
        int8mm.int8_linear(x, q_w, s_w, torch.ones(8))
    with pytest.raises(TypeError, match=r"bias must be one of .*got torch.int64"):
        int8mm.int8_linear(x, q_w, s_w, torch.ones(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"x must have at least 1 dimension, got a 0-D tensor"):
        int8mm.int8_linear(torch.tensor(1.0), q_w, s_w)
    with pytest.raises(ValueError, match=r"inner dimensions differ: x has K=9, q_w has K=8"):
        int8mm.int8_linear(torch.randn(2, 9), q_w, s_w)
    with pytest.raises(ValueError, match=r"inner dimensions differ: x has K=7, q_w has K=8"):
        int8mm.int8_linear(torch.randn(4, 2, 7), q_w, s_w)


def test_bad_int8_matmul_operands():
    a = _randint8((2, 8), seed=1)
    with pytest.raises(TypeError, match=r"a must be int8, got torch.float32"):
        int8mm.int8_matmul(a.float(), a)
    with pytest.raises(TypeError, match=r"b must be int8, got torch.int32"):
        int8mm.int8_matmul(a, a.int())
    with pytest.raises(ValueError, match=r"b must be 2-D, got shape \(1, 2, 8\)"):
        int8mm.int8_matmul(a, a[None])
    with pytest.raises(ValueError, match=r"inner dimensions differ: a has K=8, b has K=4"):
        int8mm.int8_matmul(a, a[:, :4])


def test_device_mismatch():
    q_w, s_w = _layer()
    x_meta = torch.empty(2, 8, device="meta")
    with pytest.raises(ValueError, match=r"x and q_w must be on one device, got meta and cpu"):
        int8mm.int8_linear(x_meta, q_w, s_w)
    with pytest.raises(ValueError, match=r"q_w and s_w must be on one device, got cpu and meta"):
        int8mm.int8_linear(torch.randn(2, 8), q_w, s_w.to("meta"))
    with pytest.raises(ValueError, match=r"q_w and bias must be on one device, got cpu and meta"):
        int8mm.int8_linear(torch.randn(2, 8), q_w, s_w, torch.empty(3, device="meta"))
    with pytest.raises(ValueError, match=r"a and b must be on one device, got cpu and meta"):
        int8mm.int8_matmul(q_w, q_w.to("meta"))
    # the outlier columns' count depends on the values (before: Tensor.item() cannot be called on meta tensors)
    with pytest.raises(ValueError, match=r"x is on the meta device; quantize_activations returns the outlier"):
        int8mm.quantize_activations(x_meta)


@pytest.mark.parametrize("threshold", [-1.0, -1e-30, math.nan, -math.inf])
def test_bad_threshold_value(threshold):
    q_w, s_w = _layer()
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match=rf"threshold must be >= 0 .*got {threshold}"):
        int8mm.int8_linear(x, q_w, s_w, threshold=threshold)
    with pytest.raises(ValueError, match=r"threshold must be >= 0"):
        int8mm.quantize_activations(x, threshold)


def test_integer_thresholds_past_fp64_range():
    """float() of 10**400 raises OverflowError: such a threshold is infinite (no outliers), its negative refused
    like any negative threshold."""
    assert int8mm.functional.check_threshold(10**400) == math.inf
    with pytest.raises(ValueError, match=r"threshold must be >= 0 .*got -inf"):
        int8mm.functional.check_threshold(-(10**400))


def test_thresholds_below_fp32_normals_are_what_the_kernels_receive():
    """The kernels take the threshold as an fp32 argument (docs/SPEC.md compares it as fp32): a positive threshold
    that rounds to 0 there disables decomposition on every backend, the reference included, instead of making
    every element an outlier on some and none on others; one that rounds to a subnormal keeps that value."""
    assert int8mm.functional.check_threshold(1e-50) == 0.0
    subnormal = int8mm.functional.check_threshold(1e-40)
    assert subnormal == torch.tensor(1e-40, dtype=torch.float32).item() != 1e-40
    assert int8mm.functional.check_threshold(6.0) == 6.0 and int8mm.functional.check_threshold(2.0**-126) == 2.0**-126
    q_w, s_w = _layer()
    x = torch.randn(2, 8)
    for backend in ("reference", "auto"):
        assert torch.equal(int8mm.int8_linear(x, q_w, s_w, threshold=1e-50, backend=backend),
                           int8mm.int8_linear(x, q_w, s_w, threshold=0.0, backend=backend))
    assert int(int8mm.quantize_activations(x, 1e-50)[2].numel()) == 0


@pytest.mark.parametrize("threshold", ["6.0", None, True, torch.tensor(6.0)])
def test_bad_threshold_type(threshold):
    q_w, s_w = _layer()
    with pytest.raises(TypeError, match=rf"threshold must be a number, got {type(threshold).__name__}"):
        int8mm.int8_linear(torch.randn(2, 8), q_w, s_w, threshold=threshold)
    with pytest.raises(TypeError, match=r"threshold must be a number, got str: '6.0'"):
        int8mm.quantize_activations(torch.randn(2, 8), "6.0")


def test_k_beyond_exact_int32_accumulation_is_refused():
    """127 * 128 * K must stay below 2^31 (a weight from a file may hold -128); meta tensors keep the check free of
    huge allocations."""
    k = int8mm.MAX_EXACT_K + 1
    assert INT8_MAX * 128 * int8mm.MAX_EXACT_K < 2**31 <= INT8_MAX * 128 * k  # the bound is tight
    meta = torch.device("meta")
    message = rf"K={k}, above {int8mm.MAX_EXACT_K}"
    with pytest.raises(ValueError, match=rf"weight has {message}"):
        int8mm.quantize_weight(torch.empty(2, k, device=meta))
    with pytest.raises(ValueError, match=rf"x has {message}"):
        int8mm.quantize_activations(torch.empty(2, k, device=meta))
    # int8_matmul takes -128 too, so its bound is 128^2 * K < 2^31
    k_full = (2**31 - 1) // 128**2 + 1
    assert 128**2 * (k_full - 1) < 2**31 <= 128**2 * k_full
    with pytest.raises(ValueError, match=rf"a has K={k_full}, above {k_full - 1}"):
        int8mm.int8_matmul(torch.empty(2, k_full, dtype=torch.int8, device=meta),
                           torch.empty(3, k_full, dtype=torch.int8, device=meta))
    with pytest.raises(ValueError, match=rf"q_w has {message}"):
        int8mm.int8_linear(torch.empty(2, k, device=meta), torch.empty(3, k, dtype=torch.int8, device=meta),
                           torch.empty(3, device=meta))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_weights_are_refused(bad):
    w = torch.randn(4, 8)
    w[1, 2] = bad
    w[3, 0] = bad
    with pytest.raises(ValueError, match=r"layers.0.q_proj.weight holds 2 non-finite value\(s\)"):
        int8mm.quantize_weight(w, name="layers.0.q_proj.weight")
    with pytest.raises(ValueError, match=r"^weight holds 2 non-finite"):
        int8mm.quantize_weight(w.half())


def test_quantized_values_are_row_major_whatever_the_input_layout():
    w = random_weight(64, 16).t()  # [16, 64] seen through a transpose
    q_w = int8mm.quantize_weight(w)[0]
    assert q_w.is_contiguous() and torch.equal(q_w, int8mm.quantize_weight(w.contiguous())[0])
    x = planted_outliers(64, 5).t()
    q_x = int8mm.quantize_activations(x)[0]
    assert q_x.is_contiguous() and torch.equal(q_x, int8mm.quantize_activations(x.contiguous())[0])


def test_quantizing_a_trainable_tensor_keeps_no_autograd_graph():
    """README's ``quantize_weight(linear.weight)``: a weight that requires grad. The scale kept it alive through
    its grad_fn, and as a non-leaf it made ``copy.deepcopy`` of a layer holding it fail."""
    import copy
    import gc
    import weakref

    linear = torch.nn.Linear(64, 32)
    alive = weakref.ref(linear.weight)
    q_w, s_w = int8mm.quantize_weight(linear.weight)
    del linear
    gc.collect()
    assert alive() is None
    assert not s_w.requires_grad and s_w.is_leaf and not q_w.requires_grad
    layer = int8mm.Int8Linear(64, 32, bias=False)
    layer.weight, layer.SCB = q_w, s_w
    assert torch.equal(copy.deepcopy(layer).SCB, s_w)
    x = torch.randn(3, 64, requires_grad=True)
    q_x, s_x, _ = int8mm.quantize_activations(x)
    assert not s_x.requires_grad and not q_x.requires_grad


def test_quantize_weight_on_meta_gives_shapes():
    """Building on the meta device then loading real tensors (load_state_dict(assign=True)) quantizes on meta."""
    q_w, s_w = int8mm.quantize_weight(torch.empty(7, 12, device="meta"))
    assert (q_w.device.type, q_w.dtype, q_w.shape) == ("meta", torch.int8, (7, 12))
    assert (s_w.dtype, s_w.shape) == (torch.float32, (7,))


def test_threshold_is_taken_as_fp32():
    """6.1 is not an fp32 value: every backend compares |x| with fp32(6.1), as the oracle does."""
    x = torch.tensor([[float(torch.tensor(6.1)), 1.0, 0.5], [0.25, 2.0, -1.0]])
    q, s, cols = int8mm.quantize_activations(x, 6.1)
    q_o, s_o, cols_o = spec_quantize_activations(x, 6.1)
    assert cols.tolist() == cols_o == [0]
    assert torch.equal(q, q_o) and torch.equal(s, s_o)


def test_numpy_thresholds():
    np = pytest.importorskip("numpy")
    q_w, s_w = _layer()
    x = torch.randn(2, 8)
    for threshold in (np.float32(6.0), np.float64(6.0), np.int64(6)):
        assert torch.equal(int8mm.int8_linear(x, q_w, s_w, threshold=threshold), int8mm.int8_linear(x, q_w, s_w))


def test_nd_input_without_features():
    q_w = torch.zeros(4, 0, dtype=torch.int8)
    y = int8mm.int8_linear(torch.randn(2, 3, 0), q_w, torch.zeros(4), torch.ones(4))
    assert y.shape == (2, 3, 4) and torch.equal(y, torch.ones(2, 3, 4))


def test_weight_without_inputs():
    q_w, s_w = int8mm.quantize_weight(torch.randn(3, 0))
    assert q_w.shape == (3, 0) and q_w.dtype == torch.int8 and torch.equal(s_w, torch.zeros(3))
