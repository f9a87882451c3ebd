"""The direct launch of cached compiled Triton kernels launches exactly what the JIT launches.

``tests/triton_launch_check.py`` runs the Triton backend's entry points under a stand-in CUDA driver (real sm_90
compiles, launches recorded) with INT8MM_TRITON_LAUNCH=jit and twice with the direct path; here every launch is
compared: grid, stream, compiled kernel, its metadata, and every argument the launcher receives.
"""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton", reason="needs the triton package")

import triton  # noqa: E402

from gpu import requires_cuda  # noqa: E402
from int8mm import backends  # noqa: E402
from int8mm.backends import triton_launch  # noqa: E402

ALWAYS_JIT = ("launch hook in use", "argument of an unknown type", "runtime argument given by name")


@pytest.fixture(scope="module")
def report():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = os.path.join(os.path.dirname(__file__), "triton_launch_check.py")
    done = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout)


# the scenarios of triton_launch_check.py (test_every_scenario_ran keeps the two lists the same)
SCENARIOS = [
    "classic decode, fp16, 1 row",
    "classic decode, bf16, 3 rows, bias",
    "prefill, fp32, 40 rows",
    "prefill, 40 then 41 rows (one specialization)",
    "rowwise prefill quantization",
    "fused decode + split-K, 1 and 4 rows",
    "x 16-byte aligned, then not, then aligned",
    "autotuned decode GEMM",
    "backward input gradient",
    "quantize_activations op",
    *ALWAYS_JIT,
]


@pytest.mark.slow
def test_every_scenario_ran(report):
    assert sorted(name for name in report if name != "cached_launch_keys") == sorted(SCENARIOS)
    assert report["cached_launch_keys"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_direct_launches_equal_the_jit_launches(report, scenario):
    runs = report[scenario]
    for call, (jit, first, hit) in enumerate(zip(runs["jit"], runs["direct_first"], runs["direct_hit"])):
        assert jit["launches"], f"call {call} launched nothing"
        assert first["launches"] == jit["launches"], f"call {call}: the direct path's first launches differ"
        assert hit["launches"] == jit["launches"], f"call {call}: the direct path's cached launches differ"


@pytest.mark.slow
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_a_warm_direct_launch_skips_the_jit(report, scenario):
    for call, (jit, hit) in enumerate(zip(report[scenario]["jit"], report[scenario]["direct_hit"])):
        expected = jit["jit_runs"] if scenario in ALWAYS_JIT else 0
        assert jit["jit_runs"] == len(jit["launches"]), "the JIT path should run the JIT once per launch"
        assert hit["jit_runs"] == expected, f"call {call}: {hit['jit_runs']} JIT runs on a warm launch"


@pytest.mark.slow
def test_an_unaligned_input_gets_its_own_compiled_kernel(report):
    aligned, unaligned, aligned_again = (call["launches"] for call in
                                         report["x 16-byte aligned, then not, then aligned"]["direct_hit"])
    functions = [[launch[4] for launch in launches] for launches in (aligned, unaligned, aligned_again)]
    assert functions[0] == functions[2]
    assert functions[0][0] != functions[1][0], "the stats kernel reads x: its specialization must differ"


@pytest.mark.slow
def test_row_counts_of_one_specialization_share_their_kernels(report):
    # 41 rows right after 40 (neither a multiple of 16, the same autotune bucket): every launch a cache hit, so
    # the cache does not grow with each prompt length
    first, second = report["prefill, 40 then 41 rows (one specialization)"]["direct_first"]
    assert first["jit_runs"] == len(first["launches"]) and second["jit_runs"] == 0


@pytest.mark.slow
def test_split_k_scenario_launches_the_split_k_kernel(report):
    for call in report["fused decode + split-K, 1 and 4 rows"]["direct_hit"]:
        names = [launch[4].split(":")[0] for launch in call["launches"]]
        assert names == ["_decode_quantize_kernel", "_int8_gemm_splitk_kernel"]


@pytest.mark.parametrize("a", [0, 1, 2, 15, 16, 17, 255, 4096, 28673])
@pytest.mark.parametrize("b", [1, 4, 16, 32, 128])
def test_cdiv_matches_triton(a, b):
    assert triton_launch.cdiv(a, b) == triton.cdiv(a, b)


def test_next_power_of_2_matches_triton():
    for n in [*range(0, 1030), 4095, 4096, 4097, 28672, 2**31 - 1, 2**31]:
        assert triton_launch.next_power_of_2(n) == triton.next_power_of_2(n), n


def test_interpreter_launches_never_fill_the_cache():
    import torch
    from int8mm.backends import triton as triton_backend
    if not backends.triton_interpreting():
        pytest.skip("runs under TRITON_INTERPRET=1 (a GPU run uses the direct path instead)")
    triton_launch.clear_cache()
    triton_backend.quantize_activations(torch.randn(2, 64), 6.0)
    assert triton_launch.cached_launches() == 0


def test_launch_mode_rejects_other_values(monkeypatch):
    monkeypatch.setenv(triton_launch.LAUNCH_ENV_VAR, "fast")
    backends.refresh_from_environment()
    try:
        with pytest.raises(ValueError, match="INT8MM_TRITON_LAUNCH"):
            triton_launch.launch_mode()
    finally:
        monkeypatch.delenv(triton_launch.LAUNCH_ENV_VAR)
        backends.refresh_from_environment()


# ---- on a GPU: the direct path computes what the JIT path computes, eagerly, on other streams, in graphs ----
GPU_PATHS = {  # environment of each Triton path a decode or prefill call can take
    "classic": {},
    "fused+splitk": {"INT8MM_DECODE_PATH": "fused", "INT8MM_DECODE_GEMM": "splitk"},
    "rowwise": {"INT8MM_PREFILL_QUANT": "rowwise"},
}


def _gpu_call(m, k=4096, n=4096, seed=0):
    import torch
    from helpers import planted_outliers, random_weight
    import int8mm
    x = planted_outliers(m, k, torch.float16, n_outlier_cols=8, seed=seed).to("cuda")
    q_w, s_w = int8mm.quantize_weight(random_weight(n, k).to("cuda"))
    bias = torch.randn(n, device="cuda", dtype=torch.float16)
    return x, lambda inputs: int8mm.int8_linear(inputs, q_w, s_w, bias, backend="triton")


def _with_launch_mode(monkeypatch, mode, environment):
    for name, value in {**environment, triton_launch.LAUNCH_ENV_VAR: mode}.items():
        monkeypatch.setenv(name, value)
    backends.refresh_from_environment()


@requires_cuda
@pytest.mark.parametrize("path", GPU_PATHS)
@pytest.mark.parametrize("m", [1, 4, 64])
def test_gpu_direct_launch_equals_jit_launch(monkeypatch, path, m):
    import torch
    from gpu import assert_graphs_and_streams_agree
    x, call = _gpu_call(m)
    other, _ = _gpu_call(m, seed=3)
    try:
        _with_launch_mode(monkeypatch, "jit", GPU_PATHS[path])
        expected = [call(x), call(other)]
        _with_launch_mode(monkeypatch, "direct", GPU_PATHS[path])
        triton_launch.clear_cache()
        for _ in range(3):  # the first call fills the cache through the JIT; the others launch directly
            assert torch.equal(call(x), expected[0])
        assert triton_launch.cached_launches() > 0, "the direct path cached nothing"
        assert_graphs_and_streams_agree(call, [x, other], expected, rounds=5)
    finally:
        monkeypatch.undo()
        backends.refresh_from_environment()


@pytest.mark.slow
def test_bench_launch_host_script(tmp_path):
    """benchmarks/bench_launch_host.py runs end to end (its own process: it installs the stand-in driver) and
    writes its table and medians."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "bench_launch_host.py")
    done = subprocess.run([sys.executable, script, "--rounds", "1", "--calls", "2", "--out", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    medians = json.loads((tmp_path / "launch_host.json").read_text())["median_us"]
    assert len(medians) == 9 and all(row["jit"] > 0 and row["direct"] > 0 for row in medians.values())
    assert "| 1 x 4096 -> 4096 | fused+splitk |" in (tmp_path / "launch_host.md").read_text()
