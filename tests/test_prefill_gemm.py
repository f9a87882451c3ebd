"""The persistent TMA prefill GEMM (kernels/triton/gemm_persistent.py) against the reference, and its selection.

On a CPU machine the kernel runs through Triton's interpreter, which executes tensor-descriptor loads as masked
loads with zero padding (the behaviour of TMA out of bounds): the persistent tile walk, the descriptor
offsets, the zero-filled ragged edges and the shared epilogue all run here; TMA itself, wgmma and the pipelining
are checked ahead of time in tests/test_triton_compile.py and measured by benchmarks/bench_prefill_gemm.py.
"""
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import int8mm
from int8mm import _ops
from int8mm.backends import reference
from gpu import assert_graph_replays_follow_inputs, host_syncs_refused, requires_cuda
from helpers import (DEVICE, assert_output_close, compiling_process_environment, interrupt_while_writing,
                     load_benchmark, planted_outliers, random_weight)

pytest.importorskip("triton", reason="the Triton backend needs the triton package")
from int8mm.backends import triton_prefill  # noqa: E402  (imports triton)

# (M, K, N): M > 16 rows (prefill), K a multiple of 16 (TMA rows), none a multiple of the interpreter's tiles;
# the last spans 7 x 5 tiles, several per program (the interpreter's launch gets 4 "SMs")
SHAPES = [(17, 64, 7), (40, 304, 50), (100, 96, 130)]
DTYPES = [torch.float16, torch.bfloat16, torch.float32]


@pytest.fixture
def persistent_launches(monkeypatch):
    """INT8MM_PREFILL_GEMM=persistent; yields the list of shapes the persistent launcher was called with."""
    monkeypatch.setenv(triton_prefill.PREFILL_GEMM_ENV_VAR, triton_prefill.PERSISTENT)
    calls = []
    launch = triton_prefill.launch_persistent_gemm

    def counting(q_x, q_w, *args, **kwargs):
        calls.append((q_x.shape[0], q_x.shape[1], q_w.shape[0]))
        return launch(q_x, q_w, *args, **kwargs)

    monkeypatch.setattr(triton_prefill, "launch_persistent_gemm", counting)
    triton_prefill.log_classic_fallback_once.cache_clear()
    yield calls
    triton_prefill.log_classic_fallback_once.cache_clear()


@pytest.fixture
def tma_launches(persistent_launches):
    """``persistent_launches`` where the persistent kernel can run: the interpreter, or a GPU with TMA (on an
    older one the launcher rightly takes the classic kernel, which test_pre_hopper_gpus_keep_the_classic_kernel
    checks)."""
    capability = triton_prefill.device_capability(DEVICE)
    if capability is not None and capability < triton_prefill.TMA_MIN_CAPABILITY:
        pytest.skip("needs an NVIDIA GPU of sm_90 or newer (TMA); this one falls back to the classic kernel")
    return persistent_launches


def _int8(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-127, 128, shape, dtype=torch.int8, generator=g).to(DEVICE)


@pytest.mark.parametrize("m,k,n", SHAPES)
def test_int32_product_is_exact(m, k, n, tma_launches):
    a, b = _int8((m, k), m), _int8((n, k), k)
    got = _ops.int8_matmul(a, b, "triton")
    assert tma_launches == [(m, k, n)]
    assert got.dtype == torch.int32 and torch.equal(got, reference.int8_matmul(a, b))


def test_int32_extremes_do_not_overflow(tma_launches):
    k = 4096  # every product is -127^2: far beyond int16, exact in int32
    a = torch.full((17, k), -127, dtype=torch.int8, device=DEVICE)
    b = torch.full((9, k), 127, dtype=torch.int8, device=DEVICE)
    got = _ops.int8_matmul(a, b, "triton")
    assert tma_launches and torch.equal(got, reference.int8_matmul(a, b))
    assert int(got[0, 0]) == -127 * 127 * k


@pytest.mark.parametrize("outlier_cols", [0, 3, 8])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_fused_output_matches_reference(m, k, n, dtype, bias, outlier_cols, tma_launches):
    # outlier_cols=0: no value reaches the threshold, the epilogue's outlier loop runs zero times
    x = planted_outliers(m, k, dtype, n_outlier_cols=outlier_cols, at_threshold=6.0 if outlier_cols else None,
                         zero_row=True).to(DEVICE)
    q_w, s_w = int8mm.quantize_weight(random_weight(n, k).to(DEVICE))
    b = torch.randn(n, generator=torch.Generator().manual_seed(n)).to(dtype).to(DEVICE) if bias else None
    got = _ops.int8_linear(x, q_w, s_w, b, 6.0, "triton")
    assert tma_launches == [(m, k, n)]
    count = reference.quantize_activations(x, 6.0)[2].numel()
    assert (count == 0) == (outlier_cols == 0)
    assert got.dtype == dtype
    assert_output_close(got, reference.int8_linear(x, q_w, s_w, b, 6.0))


def test_persistent_programs_walk_several_tiles(tma_launches):
    # more tiles than programs: under the interpreter 7 x 5 tiles of 16 x 32 over min(tiles, 4 "SMs") programs;
    # on a GPU 4096 x 8192 outputs are at least 256 tiles of the largest config, for at most 2 x 132 programs
    m, k, n = SHAPES[-1] if DEVICE.type == "cpu" else (4096, 256, 8192)
    if DEVICE.type == "cpu":
        meta = triton_prefill.INTERPRETER_PERSISTENT
        tiles = -(-m // meta["BLOCK_M"]) * -(-n // meta["BLOCK_N"])
        assert tiles > 4 * meta["PROGRAMS_PER_SM"]
    a, b = _int8((m, k), 5), _int8((n, k), 6)
    assert torch.equal(_ops.int8_matmul(a, b, "triton"), reference.int8_matmul(a, b))
    assert tma_launches == [(m, k, n)]


def test_classic_is_the_default(monkeypatch, persistent_launches):
    monkeypatch.delenv(triton_prefill.PREFILL_GEMM_ENV_VAR)
    a, b = _int8((40, 64), 1), _int8((24, 64), 2)
    assert torch.equal(_ops.int8_matmul(a, b, "triton"), reference.int8_matmul(a, b))
    assert persistent_launches == []


def test_decode_rows_keep_the_decode_kernel(persistent_launches):
    a, b = _int8((16, 64), 1), _int8((24, 64), 2)
    assert torch.equal(_ops.int8_matmul(a, b, "triton"), reference.int8_matmul(a, b))
    assert persistent_launches == []


def test_a_triton_without_host_tensor_descriptors_keeps_the_backend_and_the_classic_gemm():
    """triton.tools.tensor_descriptor came with Triton 3.3; setup.py allows older ones: the Triton backend must
    still import there, and a persistent request falls back to the classic kernel (run apart: it hides the
    module from a fresh interpreter)."""
    code = """
import sys
sys.modules["triton.tools.tensor_descriptor"] = None  # import of it raises ImportError
import torch
from int8mm.backends import triton, triton_prefill
a = torch.zeros(40, 64, dtype=torch.int8)
reason = triton_prefill.persistent_unsupported(a, a)
assert reason is not None and "host-side TMA descriptors" in reason, reason
print("ok")
"""
    env = compiling_process_environment()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_unknown_schedule_is_refused(monkeypatch):
    monkeypatch.setenv(triton_prefill.PREFILL_GEMM_ENV_VAR, "stream-k")
    a, b = _int8((40, 64), 1), _int8((24, 64), 2)
    with pytest.raises(ValueError, match=r"INT8MM_PREFILL_GEMM must be one of 'classic', 'persistent', got 'stream-k'"):
        _ops.int8_matmul(a, b, "triton")


def _assert_classic_fallback(caplog, calls, a, b, reason):
    with caplog.at_level(logging.WARNING, logger="int8mm"):
        got = _ops.int8_matmul(a, b, "triton")
    assert calls == []
    assert torch.equal(got, reference.int8_matmul(a, b))
    assert reason in caplog.text and "classic prefill GEMM runs" in caplog.text


def test_pre_hopper_gpus_keep_the_classic_kernel(monkeypatch, caplog, persistent_launches):
    monkeypatch.setattr(triton_prefill, "device_capability", lambda device: (8, 0))
    _assert_classic_fallback(caplog, persistent_launches, _int8((40, 64), 1), _int8((24, 64), 2), "sm_80")
    monkeypatch.setattr(triton_prefill, "device_capability", lambda device: (9, 0))
    assert triton_prefill.persistent_unsupported(_int8((40, 64), 1), _int8((24, 64), 2)) is None


def test_operands_tma_cannot_address_fall_back(caplog, tma_launches):
    # K = 499: rows are not 16-byte multiples; the classic kernel computes it (exactly), logged once
    _assert_classic_fallback(caplog, tma_launches, _int8((40, 499), 1), _int8((24, 499), 2),
                             "16-byte aligned")


def test_unaligned_weight_view_falls_back(caplog, tma_launches):
    big = _int8((25, 65), 3)
    b = big[1:, 1:]  # a view: row stride 65, base one byte past an aligned address
    assert triton_prefill.persistent_unsupported(_int8((40, 64), 1), b) is not None
    _assert_classic_fallback(caplog, tma_launches, _int8((40, 64), 1), b, "16-byte aligned")


@requires_cuda
@pytest.mark.parametrize("m", [300, 2048])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_model_sized_shapes_on_the_gpu(m, dtype, tma_launches):
    k, n = 4096, 1536
    x = planted_outliers(m, k, dtype, n_outlier_cols=8, zero_row=True).to("cuda")
    q_w, s_w = int8mm.quantize_weight(random_weight(n, k).to("cuda"))
    bias = torch.randn(n, device="cuda", dtype=dtype)
    assert_output_close(_ops.int8_linear(x, q_w, s_w, bias, 6.0, "triton"),
                        reference.int8_linear(x, q_w, s_w, bias, 6.0))
    q_x = reference.quantize_activations(x, 6.0)[0]
    assert torch.equal(_ops.int8_matmul(q_x, q_w, "triton"), reference.int8_matmul(q_x, q_w))
    assert tma_launches == [(m, k, n)] * 2


@requires_cuda
def test_gpu_forward_never_syncs_and_replays_in_a_cuda_graph(tma_launches):
    layer = int8mm.Int8Linear.from_linear(torch.nn.Linear(2048, 1024).to("cuda", torch.float16), backend="triton")
    x = planted_outliers(64, 2048, torch.float16, n_outlier_cols=8).to("cuda")
    eager = layer(x)  # autotune, compile and load first: those may sync
    with host_syncs_refused():
        layer(x)
    other = planted_outliers(64, 2048, torch.float16, n_outlier_cols=8, seed=7).to("cuda")
    assert_graph_replays_follow_inputs(layer, x.clone(), eager, other)
    assert tma_launches and set(tma_launches) == {(64, 2048, 1024)}


BENCH_SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_prefill_gemm.py"


def test_benchmark_script_dry_run(tmp_path):
    # a process of its own: --dry-run needs the interpreter, which a GPU test process has not enabled
    env = {k: v for k, v in os.environ.items() if k not in ("INT8MM_PREFILL_GEMM", "INT8MM_AUTOTUNE")}
    env["PYTHONPATH"] = os.pathsep.join([str(BENCH_SCRIPT.parents[1]), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, str(BENCH_SCRIPT), "--out", str(tmp_path), "--dry-run"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    saved = json.loads((tmp_path / "prefill_gemm.json").read_text())
    rows = saved["rows"]
    assert saved["meta"]["dry_run"] and saved["meta"]["complete"]
    providers = {r["provider"] for r in rows}
    assert providers == {"cuBLAS torch._int_mm", "fp16 F.linear", "triton classic int32", "triton classic fused",
                         "triton persistent int32", "triton persistent fused"}
    persistent = [r for r in rows if "persistent" in r["provider"]]
    assert persistent and all(r["matches_classic"] is True and r["persistent_unsupported"] is None
                              for r in persistent)
    assert all(r["median_us"] > 0 and r["vs_fp16"] > 0 for r in rows)
    assert all(r["vs_int_mm"] == 1.0 for r in rows if r["provider"] == "cuBLAS torch._int_mm")
    assert "| tiny proj (64 -> 48) | 32 | triton persistent fused |" in (tmp_path / "prefill_gemm.md").read_text()


def _bench_script():
    return load_benchmark("bench_prefill_gemm")


def test_benchmark_script_keeps_the_previous_cell_whole_when_interrupted_while_writing(tmp_path, monkeypatch):
    """Its files are rewritten after every cell: cut short while writing, the previous cell's stay whole."""
    script = _bench_script()
    monkeypatch.setattr(script, "autotune_choices", lambda: {})
    meta = {"device": "cpu", "date": "-", "torch": "-", "triton": "-", "timer": "-", "seconds": 1.0, "dry_run": True,
            "complete": False, "outlier_columns": 8, "threshold": 6.0}
    script.write({"meta": meta, "rows": []}, tmp_path)
    before = [(tmp_path / name).read_text() for name in ("prefill_gemm.json", "prefill_gemm.md")]
    assert json.loads(before[0])["meta"]["complete"] is False
    interrupt_while_writing(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        script.write({"meta": dict(meta, complete=True), "rows": []}, tmp_path)
    assert [(tmp_path / name).read_text() for name in ("prefill_gemm.json", "prefill_gemm.md")] == before


def test_benchmark_script_refuses_decode_rows():
    with pytest.raises(SystemExit, match="--m must be prefill row counts"):
        _bench_script().main(["--out", "unused", "--m", "16", "--dry-run"])
