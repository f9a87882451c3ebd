"""The reference backend (int8mm/backends/reference.py) against the docs/SPEC.md oracle in helpers.py.

These call the backend functions directly, below the argument checks, so they pin down the executable
spec every other backend is compared with.
"""
import pytest
import torch

from helpers import (DEVICE, FLOAT_DTYPES, INT8_MAX, assert_output_close, assert_scales_equal, planted_outliers,
                     random_weight, spec_int8_linear64, spec_quantize_activations, spec_quantize_weight)
from gpu import requires_cuda
from int8mm.backends import reference

THRESHOLD = 6.0


def _int64_matmul(a, b):
    return a.long() @ b.long().t()


def _randint8(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-INT8_MAX, INT8_MAX + 1, shape, dtype=torch.int8, generator=g)


# ---- int8_matmul: exact for every layout (torch._int_mm on CPU is not, for some) ----
def _layouts(rows, k, seed, device="cpu"):
    """The same int8 values as a row-major, column-major, sliced (an odd start and row stride), strided and (for
    one row) odd-stride view."""
    base = _randint8((rows, k), seed).to(device)
    wide = torch.zeros(rows, k + 5, dtype=torch.int8, device=device)
    wide[:, 2:k + 2] = base
    doubled = torch.zeros(rows, 2 * k, dtype=torch.int8, device=device)
    doubled[:, ::2] = base
    views = {"contiguous": base, "column-major": base.t().contiguous().t(), "sliced": wide[:, 2:k + 2],
             "every-other": doubled[:, ::2]}
    if rows == 1:
        views["row-stride-0"] = base.as_strided((1, k), (0, 1))  # a size-1 dim may carry any stride
    return views


@pytest.mark.parametrize("m,k,n", [(1, 1, 7), (3, 1, 33), (17, 1, 2), (1, 64, 1), (5, 64, 1), (2, 3, 33), (17, 123, 7)])
def test_int8_matmul_exact_for_every_layout(m, k, n):
    """Regression: oneDNN (behind torch._int_mm on CPU) returned garbage for K == 1 and for row strides below
    the row length (pytorch/pytorch#195066); the backend must route around both."""
    for a_name, a in _layouts(m, k, seed=m * 100 + k).items():
        for b_name, b in _layouts(n, k, seed=n * 100 + k + 1).items():
            got = reference.int8_matmul(a, b)
            assert got.dtype == torch.int32 and got.shape == (m, n)
            assert torch.equal(got.long(), _int64_matmul(a, b)), (a_name, b_name)


def test_cublas_operands_are_aligned_row_major():
    """cuBLAS refuses int8 operands whose start or row stride is unaligned (torch._int_mm on CUDA checks only the
    shapes); the reference copies exactly those and hands every other operand over as it is."""
    base = _randint8((24, 65), seed=5)
    for view in (base[1:, 1:], base[:, :64], base[:, :64].t().contiguous().t()):
        operand = reference._cublas_operand(view)
        assert operand.stride(1) == 1 and operand.stride(0) % 8 == 0 and operand.data_ptr() % 16 == 0
        assert torch.equal(operand, view)
    aligned = _randint8((24, 64), seed=6)
    assert reference._cublas_operand(aligned) is aligned
    rows_of_a_wider_matrix = torch.zeros(24, 96, dtype=torch.int8)[:, :64]
    assert reference._cublas_operand(rows_of_a_wider_matrix) is rows_of_a_wider_matrix


@requires_cuda
@pytest.mark.parametrize("m,k,n", [(40, 64, 24), (17, 128, 8)])
def test_int8_matmul_exact_for_every_layout_on_the_gpu(m, k, n):
    """cuBLAS takes these shapes directly (M > 16, K and N multiples of 8), so every layout reaches it."""
    for a_name, a in _layouts(m, k, seed=m, device="cuda").items():
        for b_name, b in _layouts(n, k, seed=n + 1, device="cuda").items():
            got = reference.int8_matmul(a, b).cpu()
            assert torch.equal(got.long(), _int64_matmul(a.cpu(), b.cpu())), (a_name, b_name)


@pytest.mark.parametrize("m,k,n", [(24, 0, 8), (0, 64, 8), (24, 64, 0)])
def test_int8_matmul_of_empty_operands_is_zeros(m, k, n):
    """Every empty case is a (possibly empty) matrix of zeros; cuBLAS, behind torch._int_mm on CUDA, refuses them."""
    got = reference.int8_matmul(torch.ones(m, k, dtype=torch.int8, device=DEVICE),
                                torch.ones(n, k, dtype=torch.int8, device=DEVICE))
    assert got.dtype == torch.int32 and got.device.type == DEVICE.type
    assert torch.equal(got.cpu(), torch.zeros(m, n, dtype=torch.int32))


def test_int8_matmul_expanded_rows():
    row = _randint8((1, 64), seed=3)
    a = row.expand(9, 64)  # stride 0 between rows
    b = _randint8((7, 64), seed=4)
    assert torch.equal(reference.int8_matmul(a, b).long(), _int64_matmul(a.contiguous(), b))
    assert torch.equal(reference.int8_matmul(b, a).long(), _int64_matmul(b, a.contiguous()))


def test_int8_matmul_extremes_fill_int32_exactly():
    k = 4096
    a = torch.full((3, k), -INT8_MAX, dtype=torch.int8)
    b = torch.full((2, k), INT8_MAX, dtype=torch.int8)
    got = reference.int8_matmul(a, b)
    assert torch.equal(got, torch.full((3, 2), -INT8_MAX * INT8_MAX * k, dtype=torch.int32))


# ---- quantization against the oracle ----
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("m,k", [(1, 1), (3, 123), (17, 499), (4, 4096)])
@pytest.mark.parametrize("threshold", [THRESHOLD, 0.0])
def test_quantize_activations_matches_spec(m, k, dtype, threshold):
    x = planted_outliers(m, k, dtype, zero_row=m > 2, seed=m + k)
    q_x, s_x, cols = reference.quantize_activations(x, threshold)
    q_ref, s_ref, cols_ref = spec_quantize_activations(x, threshold)
    assert q_x.dtype == torch.int8 and cols.dtype == torch.int64 and cols.dim() == 1
    assert_scales_equal(s_x, s_ref)
    assert torch.equal(q_x, q_ref)
    assert cols.tolist() == cols_ref


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_quantize_weight_matches_spec(dtype):
    w = random_weight(33, 499, dtype)
    w[3] = 0.0  # a zero row quantizes to zeros with scale 0, never NaN
    w[5, 7] = 1.5  # a row whose absmax is one large value
    q_w, s_w = reference.quantize_weight(w)
    q_ref, s_ref = spec_quantize_weight(w)
    assert_scales_equal(s_w, s_ref)
    assert torch.equal(q_w, q_ref)
    assert torch.equal(q_w[3], torch.zeros(499, dtype=torch.int8)) and float(s_w[3]) == 0.0
    assert int(q_w.abs().max()) == INT8_MAX


def test_nan_in_an_outlier_column_keeps_the_column():
    """A NaN hides a column's max, so the outlier flag of a column holding both a NaN and an outlier, or only
    a NaN, must come from its other elements."""
    x = torch.randn(4, 16)
    x[0, 3], x[1, 3] = 25.0, float("nan")  # NaN and an outlier in one column
    x[2, 9] = float("nan")  # NaN alone: not an outlier column
    x[3, 12] = -6.0  # exactly at the threshold: an outlier
    q_x, s_x, cols = reference.quantize_activations(x, THRESHOLD)
    q_ref, s_ref, cols_ref = spec_quantize_activations(x, THRESHOLD)
    assert cols.tolist() == cols_ref == [3, 12]
    assert_scales_equal(s_x, s_ref)
    assert torch.equal(q_x, q_ref)
    assert s_x[1].isnan() and s_x[2].isnan() and torch.equal(q_x[1], torch.zeros(16, dtype=torch.int8))


def test_tiny_scales_and_non_finite_rows_match_spec():
    x = torch.randn(6, 32)
    x[0] = 1e-39  # subnormal scale: 127 / s overflows fp32 to inf
    x[1] = 0.0
    x[2, 5] = float("inf")  # an outlier element (|inf| >= t): its row scale stays finite
    x[3, 6] = float("-inf")
    x[4, 7] = float("nan")
    for threshold in (THRESHOLD, 0.0):
        q_x, s_x, _ = reference.quantize_activations(x, threshold)
        q_ref, s_ref, _ = spec_quantize_activations(x, threshold)
        assert_scales_equal(s_x, s_ref)
        assert torch.equal(q_x, q_ref), threshold


def test_quantization_leaves_its_input_alone():
    for dtype in FLOAT_DTYPES:
        x = planted_outliers(17, 123, dtype)
        x_before = x.clone()
        reference.quantize_activations(x, THRESHOLD)
        reference.quantize_weight(x)
        q_w, s_w = reference.quantize_weight(random_weight(7, 123))
        reference.int8_linear(x, q_w, s_w, torch.randn(7), THRESHOLD)
        assert torch.equal(x, x_before), dtype


# ---- the fused linear against docs/SPEC.md's output formula ----
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("m,k,n", [(1, 123, 7), (3, 499, 33), (17, 4096, 33), (5, 1, 7)])
@pytest.mark.parametrize("threshold", [THRESHOLD, 0.0])
def test_int8_linear_is_the_spec_formula(m, k, n, dtype, threshold):
    x = planted_outliers(m, k, dtype, zero_row=m > 2, seed=k)
    w = random_weight(n, k)
    bias = torch.randn(n)
    q_w, s_w = reference.quantize_weight(w)
    y = reference.int8_linear(x, q_w, s_w, bias, threshold)
    assert y.dtype == dtype and y.shape == (m, n)
    assert_output_close(y, spec_int8_linear64(x, q_w, s_w, bias, threshold))


# ---- rounding and clamping, where random data rarely looks ----
def test_negative_subnormal_row_clamps_to_minus_127():
    """A row of negative subnormals has a scale whose reciprocal overflows to inf: every value scales to
    -inf and must clamp to -127, never -128 (docs/SPEC.md: int8 values stay in [-127, 127])."""
    x = torch.randn(3, 16)
    x[1] = -1e-40
    x[1, 4] = 0.0  # 0 * inf is NaN: quantizes to 0
    for threshold in (THRESHOLD, 0.0):
        q_x, s_x, _ = reference.quantize_activations(x, threshold)
        expected = torch.full((16,), -INT8_MAX, dtype=torch.int8)
        expected[4] = 0
        assert torch.equal(q_x[1], expected), q_x[1]
        assert torch.equal(q_x, spec_quantize_activations(x, threshold)[0])
    q_w, _ = reference.quantize_weight(x)
    assert int(q_w.min()) == -INT8_MAX


def _ties_row(k: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """A row whose absmax is 127 (so r = 1 and x * r = x) holding .5 ties, and the round-half-even result."""
    row = torch.tensor([127.0, 0.5, 1.5, 2.5, 3.5, -0.5, -1.5, -2.5, 126.5, -125.5, 4.5, 0.25, 5.5, -6.5, 7.5, 8.5])
    expected = torch.tensor([127, 0, 2, 2, 4, 0, -2, -2, 126, -126, 4, 0, 6, -6, 8, 8], dtype=torch.int8)
    return row[:k], expected[:k]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_ties_round_half_to_even(dtype):
    row, expected = _ties_row()
    if dtype == torch.bfloat16:  # 126.5 and 125.5 need 10 bits; bf16 keeps 8
        row, expected = row[:8], expected[:8]
    x = torch.stack([row, row.flip(0)]).to(dtype)
    q_x, s_x, _ = reference.quantize_activations(x, 200.0)  # no outliers: the plain row absmax
    assert torch.equal(s_x, torch.full((2,), 127.0))
    assert torch.equal(q_x, torch.stack([expected, expected.flip(0)]))
    q_w, s_w = reference.quantize_weight(x)
    assert torch.equal(q_w, q_x) and torch.equal(s_w, s_x)
