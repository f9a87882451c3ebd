"""The CPU library (kernels/cpu, int8mm/backends/cpu.py) against the reference, on every machine.

Quantized values and scales must be the reference's bit for bit (the same fp32 math, no fast-math); the
int32 products exact; outputs within SPEC tolerances (and the many-row path, which keeps the reference's order of
operations, bit for bit). The shapes walk the fused GEMV's edges: weight rows in blocks of eight, rows of x in
tiles of one to four, K around the 64-byte vector, M at the fused/GEMM boundary (16/17).
"""
import contextlib
import hashlib
import platform
import subprocess
import sys
import textwrap

import pytest
import torch

import int8mm
from helpers import (FLOAT_DTYPES, INT8_MAX, assert_output_close, compiling_process_environment, planted_outliers,
                     random_weight, torch_threads)
from int8mm import Backend, _ops
from int8mm.backends import cpu as cpu_backend
from int8mm.backends import cpu_build

THRESHOLD = 6.0


def _both(op, *args):
    return op(*args, "reference"), op(*args, "cpu")


def _assert_quantize_identical(ref, got):
    (q_r, s_r, cols_r, n_r), (q_c, s_c, cols_c, n_c) = ref, got
    assert torch.equal(q_r, q_c)
    assert torch.equal(s_r.isnan(), s_c.isnan()) and torch.equal(s_r.nan_to_num(), s_c.nan_to_num())
    assert torch.equal(n_r, n_c) and torch.equal(cols_r[: int(n_r)], cols_c[: int(n_c)])


def test_auto_picks_the_cpu_library_on_cpu():
    assert Backend.CPU in int8mm.available_backends("cpu")
    assert int8mm.backends.resolve_backend(Backend.AUTO, torch.device("cpu")) is Backend.CPU


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("m,k", [(1, 1), (1, 63), (1, 64), (1, 65), (2, 130), (5, 576), (16, 499), (17, 499),
                                 (40, 1536)])
@pytest.mark.parametrize("threshold", [THRESHOLD, 0.0])
def test_quantize_activations_is_the_reference(m, k, dtype, threshold):
    x = planted_outliers(m, k, dtype, zero_row=m > 2, seed=m * 7 + k)
    _assert_quantize_identical(*_both(_ops.quantize_activations, x, threshold))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 7, 8, 16, 17, 33])
@pytest.mark.parametrize("k,n", [(64, 33), (130, 7), (576, 48)])
def test_int8_linear_matches_the_reference(m, k, n, dtype):
    x = planted_outliers(m, k, dtype, zero_row=m > 2, seed=m + k)
    q_w, s_w = int8mm.quantize_weight(random_weight(n, k))
    bias = torch.randn(n).to(dtype)
    ref, got = _both(_ops.int8_linear, x, q_w, s_w, bias, THRESHOLD)
    assert got.dtype == dtype
    assert_output_close(got, ref)


@pytest.mark.parametrize("m", [1, 3, 4, 5, 16, 17, 40])
@pytest.mark.parametrize("k", [1, 63, 64, 65, 130, 4096])
def test_without_outliers_or_bias_the_output_is_the_reference_bit_for_bit(m, k, many_row_gemm):
    """The epilogue scales in the reference's order (fp32(acc) * s_x, then * (s_w * fp32(1 / 127^2))), so with
    no outlier term or bias to sum in another order the outputs are identical: any wrong int32 sum shows."""
    g = torch.Generator().manual_seed(m * 10_000 + k)
    x = torch.randn(m, k, generator=g)
    q_w, s_w = int8mm.quantize_weight(torch.randn(9, k, generator=g))
    ref, got = _both(_ops.int8_linear, x, q_w, s_w, None, 0.0)
    assert torch.equal(got, ref)


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 16])
def test_weights_of_minus_128_are_exact(m):
    """A checkpoint's int8 weight may hold -128 (quantize_weight never writes it): the VNNI GEMV turns w into an
    unsigned byte, which must be exact for every int8 value."""
    g = torch.Generator().manual_seed(m)
    x = torch.randn(m, 200, generator=g)
    q_w = torch.randint(-128, 128, (19, 200), dtype=torch.int8, generator=g)
    q_w[:, :50] = -128
    s_w = torch.rand(19, generator=g) + 0.5
    ref, got = _both(_ops.int8_linear, x, q_w, s_w, None, 0.0)
    assert torch.equal(got, ref)


@pytest.fixture(params=["onednn", "library"])
def many_row_gemm(request, monkeypatch):
    """The many-row path with each GEMM it may take: which one a run takes depends on the CPU (oneDNN's with
    AVX-512 VNNI, else the library's), so every host tests both."""
    monkeypatch.setattr(cpu_backend, "onednn_int8_is_vectorized", lambda: request.param == "onednn")
    return request.param


def _exact_int8_product(a, b):
    return (a.long() @ b.long().t()).int()  # int64 sums, exact; they fit in int32 for these K


def _random_int8(shape, seed):
    return torch.randint(-128, 128, shape, dtype=torch.int8, generator=torch.Generator().manual_seed(seed))


# the library GEMM's edges: tiles of 3 rows of a by 3 rows of w, K in steps of 16 and in passes of 1024, blocks of
# weight rows
@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (1, 16, 3), (4, 15, 3), (5, 17, 4), (7, 31, 2), (17, 33, 7),
                                   (40, 300, 37), (64, 1024, 200), (3, 0, 5), (5, 2500, 7)])
def test_the_library_gemm_is_exact(m, k, n, monkeypatch):
    monkeypatch.setattr(cpu_backend, "onednn_int8_is_vectorized", lambda: False)
    a, b = _random_int8((m, k), seed=m * 1000 + k), _random_int8((n, k), seed=n * 1000 + k)
    if k:
        a[0], b[-1] = -128, -128  # the largest products, (-128) * (-128), in one pair of the sum
    got = cpu_backend.int8_matmul(a, b)
    assert got.dtype == torch.int32 and torch.equal(got, _exact_int8_product(a, b))


def test_onednn_is_taken_only_where_torch_hands_it_int_mm(monkeypatch):
    """torch 2.13's _int_mm calls oneDNN only with AVX-512 VNNI and torch.backends.mkldnn.enabled (its scalar loop
    otherwise, AVX-512 without VNNI included)."""
    probe = cpu_backend._cpu_has_avx512_vnni
    if platform.machine() in ("x86_64", "AMD64"):  # torch's probe agrees with the CPU's own flags
        assert probe() == ("avx512_vnni" in cpu_build.cpu_features().split())
    monkeypatch.setattr(cpu_backend, "_cpu_has_avx512_vnni", lambda: True)
    assert cpu_backend.onednn_int8_is_vectorized()
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)  # read on every call: it may change at run time
    assert not cpu_backend.onednn_int8_is_vectorized()
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", True)
    monkeypatch.setattr(cpu_backend, "_cpu_has_avx512_vnni", lambda: False)
    assert not cpu_backend.onednn_int8_is_vectorized()


def test_the_many_row_path_runs_the_library_gemm_where_chosen(monkeypatch):
    """With oneDNN's GEMM not chosen, nothing reaches torch._int_mm (the scalar loop the library replaces)."""
    x = planted_outliers(40, 300, seed=12)
    q_w, s_w = int8mm.quantize_weight(random_weight(37, 300))
    expected = _ops.int8_linear(x, q_w, s_w, None, THRESHOLD, "reference")  # the reference's GEMM is torch._int_mm
    monkeypatch.setattr(cpu_backend, "onednn_int8_is_vectorized", lambda: False)
    monkeypatch.setattr(torch, "_int_mm", lambda *args: pytest.fail("torch._int_mm was called"))
    assert torch.equal(_ops.int8_linear(x, q_w, s_w, None, THRESHOLD, "cpu"), expected)


def test_the_library_gemm_reads_any_row_stride(monkeypatch):
    """Rows farther apart than K (a column slice), rows that repeat (stride 0) and a transposed weight view."""
    monkeypatch.setattr(cpu_backend, "onednn_int8_is_vectorized", lambda: False)
    wide, tall = _random_int8((9, 80), seed=1), _random_int8((50, 13), seed=2)
    repeated = _random_int8((1, 50), seed=3).expand(6, 50)
    for a, w in ((wide[:, 5:55], tall.t()), (repeated, wide[:, :50]), (wide[:, ::2][:, :33], wide[:, 1:34])):
        assert torch.equal(cpu_backend.int8_matmul(a, w), _exact_int8_product(a, w))


def test_the_library_gemm_at_the_largest_k(monkeypatch):
    """127 against -128 over MAX_EXACT_K columns: -2_147_482_624 in every element, at the tiles' edges."""
    monkeypatch.setattr(cpu_backend, "onednn_int8_is_vectorized", lambda: False)
    k = int8mm.MAX_EXACT_K
    a, b = torch.full((5, k), 127, dtype=torch.int8), torch.full((4, k), -128, dtype=torch.int8)
    assert torch.equal(cpu_backend.int8_matmul(a, b), torch.full((5, 4), -127 * 128 * k, dtype=torch.int32))


def test_the_library_gemm_on_one_and_two_threads(monkeypatch):
    """Big enough for the weight rows to be split into blocks that threads share: the same integers."""
    monkeypatch.setattr(cpu_backend, "onednn_int8_is_vectorized", lambda: False)
    a, b = _random_int8((70, 1030), seed=4), _random_int8((301, 1030), seed=5)
    expected = _exact_int8_product(a, b)
    for count in (1, 2):
        with torch_threads(count):
            assert torch.equal(cpu_backend.int8_matmul(a, b), expected), count


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("threshold", [THRESHOLD, 1000.0])  # with outlier columns, and with none
@pytest.mark.parametrize("with_bias", [True, False])
def test_many_rows_are_the_reference_bit_for_bit(dtype, threshold, with_bias, many_row_gemm):
    """Past the fused limit the C quantization and the C scaling pass keep the reference's order of operations
    (integer part, then the outlier term, then the bias): the outputs are identical, in every dtype."""
    x = planted_outliers(40, 300, dtype, zero_row=True, seed=11)
    q_w, s_w = int8mm.quantize_weight(random_weight(37, 300))
    bias = torch.randn(37).to(dtype) if with_bias else None
    ref, got = _both(_ops.int8_linear, x, q_w, s_w, bias, threshold)
    assert got.dtype == dtype and torch.equal(got, ref)


@pytest.mark.parametrize("m", [1, 3, 16])
def test_the_gemv_on_several_threads_is_the_reference(m):
    """Large enough layers split their weight-row blocks over threads (a ragged last block included)."""
    with torch_threads(2):
        g = torch.Generator().manual_seed(m)
        q_w, s_w = int8mm.quantize_weight(torch.randn(203, 1030, generator=g))  # 209,090 weight bytes
        x = torch.randn(m, 1030, generator=g)
        assert torch.equal(*_both(_ops.int8_linear, x, q_w, s_w, None, 0.0))  # no outlier term: bit for bit
        x = planted_outliers(m, 1030, seed=m)
        bias = torch.randn(203, generator=g)
        assert_output_close(*reversed(_both(_ops.int8_linear, x, q_w, s_w, bias, THRESHOLD)))


def test_quantization_in_parallel_is_the_reference():
    """Large inputs quantize their rows on several threads (the column flags raised from any of them)."""
    with torch_threads(2):
        for dtype in FLOAT_DTYPES:
            x = planted_outliers(300, 1030, dtype, zero_row=True, seed=5)  # 309,000 elements: past the limit
            x[7, 1000] = 50.0  # an outlier column only one row (one thread's share) sees
            x[299, 3] = -60.0
            got = _ops.quantize_activations(x, THRESHOLD, "cpu")
            _assert_quantize_identical(_ops.quantize_activations(x, THRESHOLD, "reference"), got)
            assert {1000, 3} <= set(got[2][: int(got[3])].tolist())


def test_large_k_sums_wrap_back_exactly():
    """The VNNI path adds 128 to the weight's int8 values: sum((w + 128) * x) passes 2^31 beyond K = 66,313, and
    must still come back to the exact int32 result."""
    k = 70_000
    x = torch.ones(2, k)
    x[1] = -1.0
    q_w, s_w = int8mm.quantize_weight(torch.ones(3, k))
    ref, got = _both(_ops.int8_linear, x, q_w, s_w, None, THRESHOLD)
    assert torch.equal(got, ref) and torch.equal(got[0], torch.full((3,), float(k)))


def test_the_largest_k_is_exact_with_weights_of_minus_128():
    """At the contract's K limit, activations of 127 against a file's weight of -128 sum to -2_147_482_624: still
    an int32 (one column more would not be, and is refused)."""
    k = int8mm.MAX_EXACT_K
    x = torch.ones(1, k)
    q_w = torch.full((2, k), -128, dtype=torch.int8)
    s_w = torch.full((2,), float(INT8_MAX))  # y = sum * s_x * s_w / 127^2 = sum / 127 = -128 * K
    for y in _both(_ops.int8_linear, x, q_w, s_w, None, THRESHOLD):
        torch.testing.assert_close(y, torch.full((1, 2), -128.0 * k), rtol=1e-6, atol=0)


def test_ties_and_negative_subnormals_like_the_reference():
    row = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -2.5, 126.5, -125.5])
    x = torch.stack([row, torch.full((8,), -1e-40), row.flip(0)])
    for threshold in (THRESHOLD, 200.0, 0.0):
        ref, got = _both(_ops.quantize_activations, x, threshold)
        _assert_quantize_identical(ref, got)
    q_x = _ops.quantize_activations(x, 200.0, "cpu")[0]
    assert q_x[0].tolist() == [127, 0, 2, 2, 0, -2, 126, -126] and q_x[1].tolist() == [-INT8_MAX] * 8


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_values_like_the_reference(bad):
    x = planted_outliers(6, 100, seed=3)
    x[2, 5] = bad
    q_w, s_w = int8mm.quantize_weight(random_weight(12, 100))
    for threshold in (THRESHOLD, 0.0):
        _assert_quantize_identical(*_both(_ops.quantize_activations, x, threshold))
        for rows in (slice(0, 3), slice(0, 6)):  # fused (M <= 16) and the same rows again
            assert_output_close(*reversed(_both(_ops.int8_linear, x[rows], q_w, s_w, None, threshold)))


def test_strided_inputs_and_reused_scratch():
    """Views with any strides; the fused path's scratch (the same stack memory every call) must not leak between
    calls."""
    base = planted_outliers(4, 96, torch.bfloat16, seed=4)
    q_w, s_w = int8mm.quantize_weight(random_weight(40, 96))
    expected = _ops.int8_linear(base, q_w, s_w, None, THRESHOLD, "reference")
    doubled = torch.zeros(4, 192, dtype=torch.bfloat16)
    doubled[:, ::2] = base
    for x in (base.t().contiguous().t(), doubled[:, ::2], doubled[:, ::2].t().contiguous().t()):
        assert torch.equal(x, base)
        assert_output_close(_ops.int8_linear(x, q_w, s_w, None, THRESHOLD, "cpu"), expected)
    other = planted_outliers(4, 96, torch.bfloat16, seed=5)  # same shape: the same scratch, other values
    assert_output_close(_ops.int8_linear(other, q_w, s_w, None, THRESHOLD, "cpu"),
                        _ops.int8_linear(other, q_w, s_w, None, THRESHOLD, "reference"))


@pytest.mark.parametrize("m", [1, 16, 17, 40])  # the fused path and the many-row one
@pytest.mark.parametrize("threshold", [THRESHOLD, 1000.0])  # with outlier columns, and with none
def test_a_strided_bias_is_read_while_it_lives(m, threshold):
    """A bias that is a view (every other element) is copied to contiguous memory for C: the copy must outlive the
    call. A freed copy's memory goes to the output allocated next, and C then read its own output as the bias."""
    x = planted_outliers(m, 96, torch.float32, seed=6)
    q_w, s_w = int8mm.quantize_weight(random_weight(200, 96))
    bias = torch.linspace(1.0, 400.0, 400)[::2]
    assert not bias.is_contiguous()
    assert_output_close(_ops.int8_linear(x, q_w, s_w, bias, threshold, "cpu"),
                        _ops.int8_linear(x, q_w, s_w, bias.contiguous(), threshold, "reference"))


def _fused_arithmetic(x, q_w, s_w, bias, threshold):
    """The fused call's fp32 arithmetic op by op (kernels/cpu/int8mm_cpu.c): acc * s_x * (s_w * (1 / 127^2)), plus
    the outlier term summed from 0 over the outlier columns in ascending order, plus the bias; in x's dtype."""
    q_x, s_x, cols, count = _ops.quantize_activations(x, threshold, "reference")
    one = torch.tensor(1.0)
    row_scale, col_scale = s_w * (one / (INT8_MAX * INT8_MAX)), s_w * (one / INT8_MAX)
    y = _ops.int8_matmul(q_x, q_w, "reference").float() * s_x[:, None] * row_scale
    if int(count) > 0:
        extra = torch.zeros_like(y)
        for c in cols[: int(count)].tolist():
            extra = extra + x[:, c : c + 1].float() * (q_w[:, c].float() * col_scale)
        y = y + extra
    return (y + (bias.float() if bias is not None else 0.0)).to(x.dtype)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("m,n", [(1, 576), (3, 203), (16, 37)])  # 203 and 37: a ragged last block of weight rows
@pytest.mark.parametrize("with_bias", [True, False])
def test_the_fused_epilogue_is_its_formula_bit_for_bit(m, n, dtype, with_bias):
    """The fused call's epilogue (eight outputs side by side in AVX-512 builds) is its scalar formula, in its order
    of operations, to the last bit: the outlier columns' products summed in column order, then the bias."""
    x = planted_outliers(m, 320, dtype, seed=m + n)
    q_w, s_w = int8mm.quantize_weight(random_weight(n, 320))
    bias = torch.randn(n).to(dtype) if with_bias else None
    got = _ops.int8_linear(x, q_w, s_w, bias, THRESHOLD, "cpu")
    assert int(_ops.quantize_activations(x, THRESHOLD, "reference")[3]) >= 2  # an outlier term to sum
    assert torch.equal(got, _fused_arithmetic(x, q_w, s_w, bias, THRESHOLD))


def test_the_scratch_on_the_stack_and_on_the_heap():
    """The fused call keeps its scratch on the stack up to STACK_SCRATCH_BYTES and mallocs it beyond: both sides of
    the limit, at one row of x and at sixteen."""
    import re

    limit = int(re.search(r"#define STACK_SCRATCH_BYTES (\d+)", (cpu_build.source_dir() / "int8mm_cpu.c").read_text())
                .group(1))
    for m in (1, 16):
        largest_on_stack = (limit - 4 * m) // (5 + m)  # 4K (outlier columns) + 4M (s_x) + MK (q_x) + K (flags)
        for k in (largest_on_stack, largest_on_stack + 1):
            x = planted_outliers(m, k, seed=k)
            q_w, s_w = int8mm.quantize_weight(random_weight(11, k))
            assert torch.equal(_ops.int8_linear(x, q_w, s_w, None, THRESHOLD, "cpu"),
                               _fused_arithmetic(x, q_w, s_w, None, THRESHOLD))
            x0 = torch.randn(m, k, generator=torch.Generator().manual_seed(k))
            assert torch.equal(*_both(_ops.int8_linear, x0, q_w, s_w, None, 0.0))


def test_buffers_stay_on_the_cpu_under_another_default_device():
    """The C code writes through the pointers of the buffers this backend allocates: under
    torch.set_default_device("meta") they once landed off the CPU and the process crashed (run apart, so that a
    crash fails this test alone)."""
    code = textwrap.dedent("""
        import torch, int8mm
        layer = int8mm.Int8Linear.from_linear(torch.nn.Linear(64, 16), backend="cpu")
        inputs = [torch.randn(3, 64), torch.randn(40, 64)]  # the fused decode path and the GEMM path
        for x in inputs:
            x[:, 5] = 30.0
        expected = [layer(x) for x in inputs]
        torch.set_default_device("meta")
        got = [layer(x) for x in inputs]
        q_x = int8mm.quantize_activations(inputs[0], 6.0, backend="cpu")[0]
        assert all(t.device.type == "cpu" for t in got) and q_x.device.type == "cpu"
        assert all(torch.equal(a, b) for a, b in zip(got, expected))
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert (done.returncode, done.stdout.strip()) == (0, "ok"), done.stderr[-2000:]


def test_a_system_without_posix_file_locks_falls_back_to_the_reference(tmp_path):
    """Where there is no fcntl (Windows), the library builds cannot take their file lock: the CPU library counts as
    unavailable and AUTO serves CPU tensors with the reference, warning once with the reason (importing the CPU
    and CUDA backends raised ModuleNotFoundError at the first call before)."""
    code = textwrap.dedent("""
        import sys
        sys.modules["fcntl"] = None  # import fcntl raises ImportError
        import torch, int8mm
        from int8mm.backends import cuda_build
        layer = int8mm.Int8Linear.from_linear(torch.nn.Linear(64, 16))
        x = torch.randn(3, 64)
        x[:, 5] = 30.0
        got = layer(x)
        assert int8mm.available_backends("cpu") == [int8mm.Backend.REFERENCE]
        assert torch.equal(got, int8mm.int8_linear(x, layer.weight, layer.SCB, layer.bias, backend="reference"))
        try:
            with cuda_build.building_in(cuda_build.cache_root() / "probe"):
                pass
        except OSError as exc:
            print(exc)
    """)
    env = dict(compiling_process_environment(), INT8MM_CACHE=str(tmp_path))  # no library there: a build is tried
    env.pop("INT8MM_CPU_LIB", None)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    reason = "building int8mm's C libraries needs POSIX file locks (fcntl), which this system lacks"
    assert (done.returncode, done.stdout.strip()) == (0, reason), done.stderr[-2000:]
    assert f"the CPU library is not available ({reason}); the reference backend serves CPU tensors" in done.stderr
    assert not list(tmp_path.rglob("*.so"))


def test_threads_give_the_same_output():
    x = planted_outliers(3, 512, seed=6)
    q_w, s_w = int8mm.quantize_weight(random_weight(300, 512))
    with torch_threads(1):
        one = _ops.int8_linear(x, q_w, s_w, None, THRESHOLD, "cpu")
    with torch_threads(2):
        assert torch.equal(_ops.int8_linear(x, q_w, s_w, None, THRESHOLD, "cpu"), one)


@contextlib.contextmanager
def _cpu_library_named(monkeypatch, value: str):
    """INT8MM_CPU_LIB=value for the block, the library's caches cleared on the way in and out; afterwards the
    real library loads again."""
    monkeypatch.setenv("INT8MM_CPU_LIB", value)
    cpu_backend.library.cache_clear()
    cpu_backend.library_available.cache_clear()
    try:
        yield
    finally:
        monkeypatch.undo()
        cpu_backend.library.cache_clear()
        cpu_backend.library_available.cache_clear()
    assert cpu_backend.library_available() and cpu_backend.failure_reason is None


def test_a_failed_library_is_reported_and_auto_falls_back(monkeypatch, caplog):
    """No compiler (or INT8MM_CPU_LIB=none): AUTO serves CPU tensors with the reference and says so once; an
    explicit choice of the CPU backend is an error that says why."""
    monkeypatch.setattr(cpu_backend, "onednn_int8_is_vectorized", lambda: False)
    with _cpu_library_named(monkeypatch, "none"):
        assert cpu_backend.library_available() is False
        assert "INT8MM_CPU_LIB=none" in caplog.text
        # where torch's int8 GEMM is a scalar loop the warning says what the fallback costs
        assert "torch._int_mm) is a scalar loop, so calls of more than 16 rows run about 16x slower" in caplog.text
        assert int8mm.backends.resolve_backend(Backend.AUTO, torch.device("cpu")) is Backend.REFERENCE
        with pytest.raises(RuntimeError, match=r"backend 'cpu' is not available on cpu \(turned off by INT8MM_CPU_LIB="
                                               r"none\)"):
            int8mm.backends.resolve_backend(Backend.CPU, torch.device("cpu"))


def test_an_explicit_cpu_backend_names_why_the_library_did_not_load(monkeypatch, tmp_path):
    """Before: a mistyped INT8MM_CPU_LIB made backend="cpu" say only that it needs a C compiler with OpenMP."""
    missing = tmp_path / "nowhere.so"
    with _cpu_library_named(monkeypatch, str(missing)):
        assert cpu_backend.library_available() is False
        with pytest.raises(RuntimeError, match=rf"backend 'cpu' is not available on cpu \(the CPU library: "
                                               rf"INT8MM_CPU_LIB={missing} does not exist\)"):
            int8mm.backends.resolve_backend(Backend.CPU, torch.device("cpu"))


@pytest.mark.parametrize("march", ["x86-64-v3", "x86-64"])
def test_the_portable_loops_match_too(monkeypatch, tmp_path, march):
    """Built for a CPU without AVX-512 (x86-64-v3) the library takes its plain C loops, and without AVX2 either
    (x86-64) its GEMM's plain loop too: same results."""
    if platform.machine() not in ("x86_64", "AMD64"):
        march = "native"  # elsewhere native is plain C
    monkeypatch.setenv("INT8MM_CPU_LIB", str(cpu_build.build(tmp_path, march=march)))
    monkeypatch.setattr(cpu_backend, "onednn_int8_is_vectorized", lambda: False)  # the many-row path: its GEMM
    cpu_backend.library.cache_clear()
    try:
        # K = 100 at one row: the one-row tile's 64-byte steps, a 16-byte step and the scalar tail; 40 rows: the plain
        # quantize and scaling loops
        for m, k in ((1, 100), (5, 130), (16, 576), (40, 300)):
            x = planted_outliers(m, k, seed=m)
            q_w, s_w = int8mm.quantize_weight(random_weight(33, k))
            ref, got = _both(_ops.int8_linear, x, q_w, s_w, None, THRESHOLD)
            assert_output_close(got, ref)
            if m <= cpu_backend.FUSED_MAX_M:  # the plain epilogue: the same formula, to the last bit
                assert torch.equal(got, _fused_arithmetic(x, q_w, s_w, None, THRESHOLD))
            x0 = torch.randn(m, k, generator=torch.Generator().manual_seed(k))
            assert torch.equal(*_both(_ops.int8_linear, x0, q_w, s_w, None, 0.0))
        for k in (70, 2100):  # one pass of K and three
            wide, b = _random_int8((9, k + 5), seed=k), _random_int8((8, k), seed=k + 1)
            a = wide[:, 5:]  # rows farther apart than K
            assert torch.equal(cpu_backend.int8_matmul(a, b), _exact_int8_product(a, b))
    finally:
        monkeypatch.undo()
        cpu_backend.library.cache_clear()


def _halves(bits):
    """fp16 values from their bit patterns (0 .. 0xFFFF)."""
    return torch.as_tensor(bits, dtype=torch.int32).to(torch.int16).view(torch.float16)  # the cast wraps


def _bits(t):
    return t.view({torch.float16: torch.int16, torch.float32: torch.int32}[t.dtype])


# bits of fp16 values a conversion may get wrong: the smallest and largest subnormals, -0.0, the smallest normal,
# the largest finite values, +-inf, quiet and signaling NaNs with payloads
SPECIAL_HALVES = [0x0001, 0x8001, 0x03FF, 0x8000, 0x0400, 0x7BFF, 0xFBFF, 0x7C00, 0xFC00, 0x7E00, 0xFE01, 0x7C01,
                  0x7D55]


def _scale_int32(x_bias, out_dtype):
    """The library's scale_int32 with a zero product and s_x = -0.0: y = -0.0 + bias exactly (-0.0 kept, a NaN
    quieted with its payload), so out = the bias converted from its dtype to out_dtype by the library."""
    n = x_bias.numel()
    acc, s_x, s_w = torch.zeros(1, n, dtype=torch.int32), torch.tensor([-0.0]), torch.ones(n)
    out = torch.empty(1, n, dtype=out_dtype)
    codes = cpu_backend._DTYPE_CODES
    cpu_backend._check(cpu_backend.library().int8mm_cpu_scale_int32(
        acc.data_ptr(), 1, n, s_x.data_ptr(), s_w.data_ptr(), x_bias.data_ptr(), codes[x_bias.dtype], out.data_ptr(),
        codes[out_dtype], 1), "scale_int32")
    return out[0]


def _fp32_near_fp16_roundings():
    """fp32 values around every rounding an fp16 conversion makes: each fp16 value and each midpoint between
    neighbours (a tie), one fp32 ulp either side; fp32 subnormals, the overflow edge (65520 is a tie that goes to
    inf), NaNs whose payload is only in the bits an fp16 drops."""
    finite = _halves(torch.arange(0x7C00)).double()
    points = torch.cat([finite, (finite[:-1] + finite[1:]) / 2]).float()  # the midpoints are exact in fp32
    bits = points.view(torch.int32)
    bits = torch.cat([bits - 1, bits, bits + 1])
    bits = bits[bits >= 0]
    extra = torch.tensor([1, 0x7FFFFF, 0x477FEFFF, 0x477FF000, 0x477FF001, 0x477FFFFF, 0x7F7FFFFF, 0x7F800000,
                          0x7F800001, 0x7FC00001, 0x7FFFE000, 0x7FBFFFFF, 0x33000000, 0x33000001, 0x337FFFFF],
                         dtype=torch.int32)
    bits = torch.cat([bits, extra])
    return torch.cat([bits, bits | -0x80000000]).view(torch.float32)  # and negated


def _fp16_paths():
    """Every way fp16 goes in or out of the library, each output as raw bits: fp16 -> fp32 for all 65,536 fp16
    values, fp32 -> fp16 around every rounding, and the ops on fp16 activations and bias holding SPECIAL_HALVES
    (contiguous rows, strided ones, the fused path and the many-row one, with and without outlier columns)."""
    outs = [_bits(_scale_int32(_halves(torch.arange(0x10000)), torch.float32)),
            _bits(_scale_int32(_fp32_near_fp16_roundings(), torch.float16))]
    specials = _halves(SPECIAL_HALVES)
    x = planted_outliers(40, 130, torch.float16, seed=9)
    for row in range(1, 40, 3):  # one special value in every third row, the first row left plain
        x[row, (7 * row) % 130] = specials[row % len(specials)]
    q_w, s_w = int8mm.quantize_weight(random_weight(33, 130))
    bias = torch.randn(33, generator=torch.Generator().manual_seed(9)).half()
    bias[: len(specials)] = specials
    doubled = torch.zeros(40, 260, dtype=torch.float16)
    doubled[:, ::2] = x
    for threshold in (THRESHOLD, 0.0):
        for view in (x, doubled[:, ::2], x.t().contiguous().t()):
            outs += [t.view(torch.uint8) for t in _ops.quantize_activations(view, threshold, "cpu")]
            for rows in (slice(0, 1), slice(1, 2), slice(0, 5), slice(0, 16), slice(0, 40)):
                outs.append(_bits(_ops.int8_linear(view[rows], q_w, s_w, bias, threshold, "cpu")))
    return outs


@pytest.mark.parametrize("march", ["native", "x86-64"])
def test_fp16_without_float16_is_bit_identical(monkeypatch, tmp_path, march):
    """The C type _Float16 exists only from GCC 12 (clang 15) on x86: GCC 11, the gcc of Ubuntu 22.04, Debian 11 and
    RHEL 8/9, failed to build the library. Without it fp16 is converted by F16C's instructions (native: any AVX2
    CPU) or by integer code (x86-64: no F16C): the same bits as _Float16's, every fp16 value read and every rounding
    written, signed zeros, subnormals, infinities and NaN payloads included."""
    if platform.machine() not in ("x86_64", "AMD64") and march != "native":
        pytest.skip("-march=x86-64 is an x86 target")
    # GCC 11 made of _Float16 an error: so does this header, after the system headers that may name it
    without_float16 = tmp_path / "without_float16.h"
    without_float16.write_text(textwrap.dedent("""\
        #include <math.h>
        #include <stdint.h>
        #include <stdlib.h>
        #include <string.h>
        #if defined(__x86_64__)
        #include <immintrin.h>
        #endif
        #pragma GCC poison _Float16
        """))
    outputs = []
    try:
        for name, flags in (("plain", ()), ("fallback", ("-DINT8MM_NO_FLOAT16", "-include", str(without_float16)))):
            library = cpu_build.build(tmp_path / name, march=march, extra_flags=flags)
            monkeypatch.setenv("INT8MM_CPU_LIB", str(library))
            cpu_backend.library.cache_clear()
            outputs.append(_fp16_paths())
    finally:
        monkeypatch.undo()
        cpu_backend.library.cache_clear()
    plain, fallback = outputs
    assert len(plain) == len(fallback)
    for i, (a, b) in enumerate(zip(plain, fallback)):
        assert torch.equal(a, b), f"output {i} of _fp16_paths differs"
    # and both are the exact / correctly rounded conversions (torch's), NaN for NaN
    read, written = plain[0].view(torch.float32), plain[1].view(torch.float16)
    for got, want in ((read, _halves(torch.arange(0x10000)).float()), (written, _fp32_near_fp16_roundings().half())):
        assert torch.equal(got.isnan(), want.isnan())
        assert torch.equal(_bits(got[~got.isnan()]), _bits(want[~want.isnan()]))


def test_refresh_from_environment_reads_int8mm_cpu_lib_again(monkeypatch):
    """A process that turns the library off (or names another) and calls refresh_from_environment gets what the
    variable says now, not the library loaded before."""
    assert cpu_backend.library_available()
    monkeypatch.setenv("INT8MM_CPU_LIB", "none")
    int8mm.backends.refresh_from_environment()
    try:
        assert cpu_backend.library_available() is False
        assert int8mm.backends.backend_for(None, torch.device("cpu")) == "reference"
    finally:
        monkeypatch.undo()
        int8mm.backends.refresh_from_environment()
    assert int8mm.backends.backend_for(None, torch.device("cpu")) == "cpu"


def test_cc_with_arguments_builds_the_library(monkeypatch, tmp_path):
    """$CC as make reads it: a program and its arguments (``ccache gcc``, ``gcc -pthread``), not a file name."""
    plain = cpu_build.compiler()
    if plain is None:
        pytest.skip("needs a C compiler")
    monkeypatch.setenv("CC", f"{plain[0]} -pthread")
    assert cpu_build.compiler() == [plain[0], "-pthread"]
    assert cpu_build.build(tmp_path, march="x86-64" if platform.machine() in ("x86_64", "AMD64") else "native").exists()


@pytest.mark.slow  # five compiles
def test_a_damaged_cached_library_is_built_again(monkeypatch, tmp_path):
    """A cached library cut short (a crash before its data reached the disk, a partial copy of the cache) killed
    the process with SIGBUS inside dlopen; an empty or garbage one sent every later process to the reference
    backend for good. The cache now keeps each library's size and hash beside it and builds a damaged one again."""
    if cpu_build.compiler() is None:
        pytest.skip("needs a C compiler")
    monkeypatch.delenv("INT8MM_CPU_LIB", raising=False)
    monkeypatch.setenv("INT8MM_CACHE", str(tmp_path))
    path = cpu_build.library_path()
    built = path.read_bytes()
    stamp = path.with_name(path.name + ".sha256")
    assert stamp.read_text().strip() == f"{len(built)} {hashlib.sha256(built).hexdigest()}"
    for damage in (lambda: path.write_bytes(built[:8000]), lambda: path.write_bytes(b""),
                   lambda: path.write_bytes(b"\0" * len(built)), stamp.unlink):  # no stamp: cached by an older int8mm
        damage()
        assert cpu_build.library_path() == path and path.read_bytes() == built
    loaded = subprocess.run([sys.executable, "-c", f"import ctypes; ctypes.CDLL({str(path)!r})"], timeout=60)
    assert loaded.returncode == 0


@pytest.mark.parametrize("named, says", [("no-such-cc-int8mm -O2", "names no program found on the PATH"),
                                         ("'unbalanced", "cannot be read as a command line")])
def test_cc_naming_no_program_says_which_value(monkeypatch, tmp_path, named, says):
    monkeypatch.setenv("CC", named)
    assert cpu_build.compiler() is None
    with pytest.raises(RuntimeError, match=f"CC={named!r} {says}"):
        cpu_build.build(tmp_path)


def test_library_paths_from_the_environment_expand_home(monkeypatch, tmp_path):
    """A ``~`` in INT8MM_CPU_LIB or INT8MM_CACHE set without a shell (a quoted value, a Docker ENV) means the home
    directory, not a folder named ``~`` in the working directory."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "lib.so").write_bytes(b"")
    monkeypatch.setenv("INT8MM_CPU_LIB", "~/lib.so")
    assert cpu_build.library_path() == tmp_path / "lib.so"
    monkeypatch.setenv("INT8MM_CACHE", "~/cache")
    from int8mm.backends import cuda_build
    assert cuda_build.cache_root() == tmp_path / "cache"


def test_the_c_library_and_python_agree_on_the_fused_row_limit():
    """The C entry point refuses more rows than its #define with a bare 'invalid argument': the Python side
    must send it exactly the calls it takes."""
    import re

    source = (cpu_build.source_dir() / "int8mm_cpu.c").read_text()
    defined = int(re.search(r"#define DECODE_MAX_M (\d+)", source).group(1))
    assert defined == cpu_backend.FUSED_MAX_M
