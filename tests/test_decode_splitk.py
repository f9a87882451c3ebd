"""The split-K decode GEMM of the Triton backend (INT8MM_DECODE_GEMM=splitk).

Its output must equal the classic decode GEMM's bit for bit: the slices' sums are integers, added in any order to
the same int32 value, then de-quantized by the same epilogue. Without a GPU the kernel runs on CPU tensors
through Triton's interpreter (conftest.py), one program after another: the slices, the tickets, the last
program's sum and the counter reset run, the memory ordering does not (the GPU tests at the end check it under
real concurrency, CUDA graphs and several streams, with the split sizes as shipped). The small tests shrink the
slices (K_STEP, MIN_SPLIT_COLUMNS) so that layers of a few hundred columns split several ways.
"""
import pytest
import torch

import int8mm
from int8mm import backends
from int8mm.backends import registry

from gpu import assert_graphs_and_streams_agree, replay_over, requires_cuda
from helpers import (DEVICE, OpRecorder, assert_output_close, assert_same_output, planted_outliers, random_weight,
                     record_triton_launches, run_out_of_counters, set_setting)

triton = pytest.importorskip("triton", reason="the Triton backend needs the triton package")

from int8mm.backends import triton as triton_backend  # noqa: E402  (needs triton)
from int8mm.backends import triton_counters, triton_decode, triton_splitk  # noqa: E402

triton_linear = registry.lookup("triton", "int8_linear")
H200_SMS = 132


@pytest.fixture
def splitk_as_shipped(monkeypatch):
    """INT8MM_DECODE_GEMM=splitk."""
    set_setting(monkeypatch, triton_splitk.DECODE_GEMM_ENV_VAR, "splitk")
    yield
    monkeypatch.delenv(triton_splitk.DECODE_GEMM_ENV_VAR)
    backends.refresh_from_environment()


@pytest.fixture
def splitk(splitk_as_shipped, monkeypatch):
    """INT8MM_DECODE_GEMM=splitk with short slices, so that layers of a few hundred columns split several ways
    (a slice need not be a multiple of BLOCK_K: the kernel masks its last step)."""
    monkeypatch.setattr(triton_splitk, "K_STEP", 64)
    monkeypatch.setattr(triton_splitk, "MIN_SPLIT_COLUMNS", 64)


def _activations(m, k, dtype=torch.float16, n_outlier_cols=8, seed=0):
    return planted_outliers(m, k, dtype, n_outlier_cols=n_outlier_cols, zero_row=m > 2, seed=seed).to(DEVICE)


def _classic(monkeypatch, *args):
    set_setting(monkeypatch, triton_splitk.DECODE_GEMM_ENV_VAR, "classic")
    try:
        return triton_linear(*args)
    finally:
        set_setting(monkeypatch, triton_splitk.DECODE_GEMM_ENV_VAR, "splitk")


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m,k,n", [(1, 499, 33), (2, 256, 32), (5, 300, 70), (16, 1000, 7), (16, 129, 64)])
def test_equals_the_classic_gemm(m, k, n, dtype, bias, splitk, monkeypatch):
    """Ragged K (slices that end inside a BLOCK_K step), N not a multiple of the tile, 1 to 16 rows."""
    split, _ = triton_splitk.split_schedule(n, k, triton_backend._multiprocessors(DEVICE))
    assert split > 1  # the shapes above do split: otherwise this would test the classic kernel against itself
    x = _activations(m, k, dtype)
    q_w, s_w = int8mm.quantize_weight(random_weight(n, k).to(DEVICE))
    b = torch.randn(n, device=DEVICE).to(dtype) if bias else None
    got = triton_linear(x, q_w, s_w, b, 6.0)
    assert_same_output(got, _classic(monkeypatch, x, q_w, s_w, b, 6.0))
    assert_output_close(got, int8mm.int8_linear(x, q_w, s_w, b, backend="reference"))


@pytest.mark.parametrize("threshold", [0.0, 6.0])
def test_without_outliers_and_with_every_column_one(threshold, splitk, monkeypatch):
    q_w, s_w = int8mm.quantize_weight(random_weight(40, 300).to(DEVICE))
    for x in (_activations(5, 300, n_outlier_cols=0), _activations(5, 300, torch.float32) + 100.0):
        assert_same_output(triton_linear(x, q_w, s_w, None, threshold),
                            _classic(monkeypatch, x, q_w, s_w, None, threshold))


def test_calls_in_a_row_leave_the_counters_at_zero(splitk, monkeypatch):
    """Each launch's last program per tile resets its counter: a later launch (other shapes, other splits)
    must find its own last programs, or a tile would be written from a partial sum, or not at all."""
    n = 70
    weights = {k: int8mm.quantize_weight(random_weight(n, k).to(DEVICE)) for k in (300, 1000)}
    tiles = triton.cdiv(n, triton_splitk.BLOCK_N)
    counters = triton_counters.counter_pool(DEVICE).counters(tiles)
    for m, k, seed in [(1, 300, 0), (5, 1000, 1), (16, 300, 2), (2, 1000, 3), (5, 300, 4)]:
        x = _activations(m, k, seed=seed)
        q_w, s_w = weights[k]
        assert_same_output(triton_linear(x, q_w, s_w, None, 6.0), _classic(monkeypatch, x, q_w, s_w, None, 6.0))
        assert not counters.any()


def test_slice_sums_content_does_not_matter(splitk, monkeypatch):
    """The slices' sums live in torch.empty memory, filled with junk here: the last program of a tile must read
    only slots that this launch wrote (a wrong slot or row index would add junk). Run one program after another,
    this cannot show a slot read before it is written: that ordering is the ticket's, checked on a GPU below."""
    x = _activations(5, 300)
    q_w, s_w = int8mm.quantize_weight(random_weight(70, 300).to(DEVICE))
    expected = _classic(monkeypatch, x, q_w, s_w, None, 6.0)
    real_empty = torch.empty

    def junk(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(0x01010101) if t.dtype == torch.int32 else t

    monkeypatch.setattr(triton_splitk.torch, "empty", junk)
    assert_same_output(triton_linear(x, q_w, s_w, None, 6.0), expected)


@pytest.mark.parametrize("path", ["classic", "fused"])
def test_launches_and_no_fills(path, splitk, monkeypatch):
    """With the fused decode path, a call is two kernels (quantization, split-K GEMM) and no fill."""
    set_setting(monkeypatch, backends.DECODE_PATH_ENV_VAR, path)
    x = _activations(5, 300)
    q_w, s_w = int8mm.quantize_weight(random_weight(70, 300).to(DEVICE))
    expected = triton_linear(x, q_w, s_w, None, 6.0)  # counters allocated, kernels compiled
    recorder = OpRecorder()
    launches = record_triton_launches(monkeypatch, (triton_backend, triton_decode, triton_splitk), recorder)
    with recorder:
        got = triton_linear(x, q_w, s_w, None, 6.0)
    set_setting(monkeypatch, backends.DECODE_PATH_ENV_VAR, "classic")
    names = [name for name, _ in launches]
    assert names[-1] == "int8_gemm_splitk_kernel", names
    split, _ = triton_splitk.split_schedule(70, 300, triton_backend._multiprocessors(DEVICE))
    assert launches[-1][1] == (triton.cdiv(70, triton_splitk.BLOCK_N) * split,)
    if path == "fused":
        assert names == ["decode_quantize_kernel", "int8_gemm_splitk_kernel"]
        assert "aten.zeros.default" not in recorder.ops and "aten.fill_.Scalar" not in recorder.ops, recorder.ops
    assert_same_output(got, expected)


def test_layers_with_enough_tiles_take_the_classic_kernel(splitk, monkeypatch):
    """One split would do (many output tiles, or a short K): the classic kernel runs, nothing is allocated."""
    sms = triton_backend._multiprocessors(DEVICE)
    n = triton_splitk.BLOCK_N * triton_splitk.PROGRAMS_PER_SM * sms  # enough tiles alone
    assert triton_splitk.split_schedule(n, 300, sms)[0] == 1
    q_w, s_w = int8mm.quantize_weight(random_weight(n, 300).to(DEVICE))
    x = _activations(3, 300)
    launches = record_triton_launches(monkeypatch, (triton_backend, triton_decode, triton_splitk))
    got = triton_linear(x, q_w, s_w, None, 6.0)
    assert [name for name, _ in launches][-1] == "int8_gemm_dequant_kernel"
    assert_output_close(got, int8mm.int8_linear(x, q_w, s_w, backend="reference"))


def test_capture_without_free_counters_takes_the_classic_kernel(splitk, monkeypatch, caplog):
    run_out_of_counters(monkeypatch)
    x = _activations(5, 300)
    q_w, s_w = int8mm.quantize_weight(random_weight(70, 300).to(DEVICE))
    launches = record_triton_launches(monkeypatch, (triton_backend, triton_decode, triton_splitk))
    with caplog.at_level("WARNING", logger="int8mm"):
        got = triton_linear(x, q_w, s_w, None, 6.0)
    assert [name for name, _ in launches][-1] == "int8_gemm_dequant_kernel"
    assert "INT8MM_DECODE_GEMM=splitk found no free counters" in caplog.text
    assert_output_close(got, int8mm.int8_linear(x, q_w, s_w, backend="reference"))


def test_prefill_and_int8_matmul_keep_their_kernels(splitk, monkeypatch):
    launches = record_triton_launches(monkeypatch, (triton_backend, triton_decode, triton_splitk))
    q_w, s_w = int8mm.quantize_weight(random_weight(70, 300).to(DEVICE))
    triton_linear(_activations(17, 300), q_w, s_w, None, 6.0)
    registry.lookup("triton", "int8_matmul")(q_w[:5], q_w)
    assert "int8_gemm_splitk_kernel" not in [name for name, _ in launches]


def test_opcheck_and_torch_compile(splitk, monkeypatch):
    """What torch.compile, export and opcheck see is the op: with split-K (and the fused quantization) behind it,
    its schema, fake kernel and output must still hold."""
    set_setting(monkeypatch, backends.DECODE_PATH_ENV_VAR, "fused")
    q_w, s_w = int8mm.quantize_weight(random_weight(70, 300).to(DEVICE))
    bias = torch.randn(70, device=DEVICE)
    x = _activations(5, 300, torch.float32)
    torch.library.opcheck(torch.ops.int8mm.int8_linear, (x, q_w, s_w, bias, 6.0, "triton"))
    torch._dynamo.reset()

    def layer(x):
        return torch.relu(int8mm.int8_linear(x, q_w, s_w, bias, 6.0, backend="triton"))

    compiled = torch.compile(layer, fullgraph=True)
    expected = _classic(monkeypatch, x, q_w, s_w, bias, 6.0).relu()
    assert_same_output(compiled(x), expected)
    set_setting(monkeypatch, backends.DECODE_PATH_ENV_VAR, "classic")


def test_counters_of_several_lengths_never_overlap():
    """The split-K GEMM takes one counter per output tile: arrays of any length, each on sectors of its own,
    one per (stream, length) for eager calls, and a request longer than a chunk gets a chunk of its own."""
    pool = triton_counters.CounterPool(torch.device("cpu"))
    eager = {length: pool.counters(length) for length in (1, 3, 8, 9, 128)}
    assert all(pool.counters(length) is eager[length] for length in eager)  # the same stream: reused
    huge = pool.counters(triton_counters.CHUNK_WORDS + 5)
    captured = [pool.take(length, may_allocate=False) for length in (1, 40, 7)]
    arrays = list(eager.values()) + [huge] + captured
    assert all(a is not None and a.dtype == torch.int32 and not a.any() for a in arrays)
    assert [a.numel() for a in arrays] == [1, 3, 8, 9, 128, triton_counters.CHUNK_WORDS + 5, 1, 40, 7]
    words = [(a.data_ptr() // 4, a.data_ptr() // 4 + a.numel()) for a in arrays]
    for i, (start, end) in enumerate(words):
        assert start % triton_counters.SLOT_WORDS == 0  # 32-byte sectors of their own
        for other_start, other_end in words[i + 1:]:
            assert end <= other_start or other_end <= start, "two requests share counters"
    with pytest.raises(ValueError, match="length must be at least 1, got 0"):
        pool.counters(0)


def test_programmatic_launch_only_on_hopper_and_newer(monkeypatch):
    """PDL (griddepcontrol) exists from compute capability 9.0; INT8MM_PDL=0 turns it off; CPU tensors never."""
    capabilities = {torch.device("cuda", 0): (9, 0), torch.device("cuda", 1): (8, 0)}
    monkeypatch.setattr(backends, "_compute_capability", lambda device: capabilities.get(device, (0, 0)))
    monkeypatch.delenv(backends.PDL_ENV_VAR, raising=False)
    backends.refresh_from_environment()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    backends.refresh_from_environment()
    assert [backends.programmatic_launch(d) for d in (*capabilities, torch.device("cpu"))] == [True, False, False]
    set_setting(monkeypatch, "TRITON_INTERPRET", "1")  # the interpreter cannot run griddepcontrol, even on CUDA tensors
    assert not backends.programmatic_launch(torch.device("cuda", 0))
    set_setting(monkeypatch, "TRITON_INTERPRET", "0")
    set_setting(monkeypatch, backends.PDL_ENV_VAR, "0")
    assert not backends.programmatic_launch(torch.device("cuda", 0))
    set_setting(monkeypatch, backends.PDL_ENV_VAR, "yes")
    with pytest.raises(ValueError, match=r"INT8MM_PDL must be one of '0', '1', got 'yes'"):
        backends.programmatic_launch(torch.device("cuda", 0))
    monkeypatch.undo()  # TRITON_INTERPRET and INT8MM_PDL as they were
    backends.refresh_from_environment()


@pytest.mark.parametrize("pdl", [False, True])
def test_the_launch_asks_for_pdl_where_it_runs(pdl, splitk, monkeypatch):
    """Where PDL runs, the split-K GEMM is launched with it and waits for the grid before it; the fused
    quantization lets it start (the launches are recorded, not run: the interpreter has no griddepcontrol)."""
    set_setting(monkeypatch, backends.DECODE_PATH_ENV_VAR, "fused")
    for module in (triton_splitk, triton_decode):
        monkeypatch.setattr(module, "programmatic_launch", lambda device: pdl)
    launched = {}

    class Recorded:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launched.setdefault(self.name, kwargs)

    # the plain kernel (the interpreter, INT8MM_AUTOTUNE=0) and the autotuned one (a GPU): neither really runs, so
    # nothing reads what the recorded quantization did not write
    monkeypatch.setattr(triton_splitk, "_int8_gemm_splitk_kernel", Recorded("gemm"))
    monkeypatch.setattr(triton_splitk, "_splitk_autotuned", Recorded("gemm"))
    monkeypatch.setattr(triton_decode, "_decode_quantize_kernel", Recorded("quantize"))
    q_w, s_w = int8mm.quantize_weight(random_weight(70, 300).to(DEVICE))
    triton_linear(_activations(5, 300), q_w, s_w, None, 6.0)
    set_setting(monkeypatch, backends.DECODE_PATH_ENV_VAR, "classic")
    assert launched["quantize"]["LAUNCH_DEPENDENTS"] is pdl
    gemm = launched["gemm"]
    assert (gemm.get("WAIT_FOR_PRIOR_GRID", False), gemm.get("launch_pdl", False)) == (pdl, pdl)


# Llama-3-8B and -70B decode layers (N, K) on an H200's 132 SMs: the narrow ones split, the wide ones do not
@pytest.mark.parametrize("n,k,expected_split", [
    (4096, 4096, 4), (6144, 4096, 3), (4096, 14336, 5), (14336, 4096, 2), (28672, 4096, 1),
    (8192, 8192, 3), (10240, 8192, 2), (8192, 28672, 3), (57344, 8192, 1),
])
def test_split_schedule_of_llama_layers(n, k, expected_split):
    split, k_per_split = triton_splitk.split_schedule(n, k, H200_SMS)
    assert split == expected_split
    assert k_per_split % triton_splitk.K_STEP == 0  # slices start on whole K steps
    assert (split - 1) * k_per_split < k <= split * k_per_split  # every slice holds columns; together all of K
    if split > 1:
        assert k_per_split >= triton_splitk.MIN_SPLIT_COLUMNS


@pytest.mark.parametrize("n,k", [(1, 1), (7, 100_000), (33, 1024), (4096, 2047), (200_000, 64)])
def test_split_schedule_covers_k_without_empty_slices(n, k):
    for sms in (1, 4, 132):
        split, k_per_split = triton_splitk.split_schedule(n, k, sms)
        assert split >= 1 and (split - 1) * k_per_split < k <= split * k_per_split


def test_decode_gemm_variable(monkeypatch):
    monkeypatch.delenv(triton_splitk.DECODE_GEMM_ENV_VAR, raising=False)
    backends.refresh_from_environment()
    assert triton_splitk.decode_gemm() == "classic"  # the default: split-K measured slower on the H200
    set_setting(monkeypatch, triton_splitk.DECODE_GEMM_ENV_VAR, "stream-k")
    with pytest.raises(ValueError, match=r"INT8MM_DECODE_GEMM must be one of 'classic', 'splitk', got 'stream-k'"):
        triton_splitk.decode_gemm()
    q_w, s_w = int8mm.quantize_weight(random_weight(8, 32).to(DEVICE))
    with pytest.raises(ValueError, match="INT8MM_DECODE_GEMM"):
        triton_linear(_activations(2, 32), q_w, s_w, None, 6.0)
    monkeypatch.delenv(triton_splitk.DECODE_GEMM_ENV_VAR)
    backends.refresh_from_environment()


# ---- on a GPU: real concurrency, CUDA graphs, streams ----
LLAMA_DECODE = [(1, 4096, 4096), (16, 4096, 6144), (1, 14336, 4096), (16, 8192, 8192), (5, 28672, 8192),
                (3, 4096, 1000)]


@requires_cuda
@pytest.mark.parametrize("m,k,n", LLAMA_DECODE)
def test_gpu_equals_classic_on_llama_layers(m, k, n, splitk_as_shipped, monkeypatch):
    assert triton_splitk.split_schedule(n, k, triton_backend._multiprocessors(DEVICE))[0] > 1
    q_w, s_w = int8mm.quantize_weight(random_weight(n, k).to(DEVICE))
    for seed in range(3):
        x = _activations(m, k, seed=seed)
        assert_same_output(triton_linear(x, q_w, s_w, None, 6.0), _classic(monkeypatch, x, q_w, s_w, None, 6.0))


@requires_cuda
@pytest.mark.parametrize("m", [1, 16])
def test_gpu_graph_replays_follow_their_inputs(m, splitk_as_shipped, monkeypatch):
    """Outliers appear, move and disappear between replays; each replay equals an eager classic call."""
    k, n = 4096, 2048
    q_w, s_w = int8mm.quantize_weight(random_weight(n, k).to(DEVICE))
    inputs = [_activations(m, k, seed=s) for s in range(3)]
    inputs.append(planted_outliers(m, k, torch.float16, n_outlier_cols=0, at_threshold=None).to(DEVICE))
    replay_over(lambda x: triton_linear(x, q_w, s_w, None, 6.0), inputs, 8,
                lambda static_y, x: assert_same_output(static_y, _classic(monkeypatch, x, q_w, s_w, None, 6.0)))


@requires_cuda
def test_gpu_two_graphs_and_two_streams(splitk_as_shipped, monkeypatch, caplog):
    """Two graphs replayed at once on two streams, next to eager calls on two more: each has its own counters.
    Every replay's output is kept (a race in any replay shows), and the captures must have taken split-K."""
    m, k, n = 16, 8192, 2048
    assert triton_splitk.split_schedule(n, k, triton_backend._multiprocessors(DEVICE))[0] > 1
    q_w, s_w = int8mm.quantize_weight(random_weight(n, k).to(DEVICE))
    xs = [_activations(m, k, seed=s) for s in range(2)]
    expected = [_classic(monkeypatch, x, q_w, s_w, None, 6.0) for x in xs]
    with caplog.at_level("WARNING", logger="int8mm"):
        assert_graphs_and_streams_agree(lambda x: triton_linear(x, q_w, s_w, None, 6.0), xs, expected)
    assert "found no free counters" not in caplog.text  # the captures took split-K
