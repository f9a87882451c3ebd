"""The direct launch of cached compiled Triton kernels launches exactly what the JIT launches.

``tests/triton_launch_check.py`` runs the Triton backend's entry points under a stand-in CUDA driver (real sm_90
compiles, launches recorded) with INT8MM_TRITON_LAUNCH=jit and twice with the direct path; here every launch is
compared: grid, stream, compiled kernel, its metadata, and every argument the launcher receives.
"""
import functools
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton", reason="needs the triton package")

import torch  # noqa: E402
import triton  # noqa: E402

import int8mm  # noqa: E402
from gpu import requires_cuda  # noqa: E402
from helpers import DEVICE, REPOSITORY, compiling_process_environment  # noqa: E402
from int8mm import backends  # noqa: E402
from int8mm.backends import cpu_build, triton_launch  # noqa: E402

ALWAYS_JIT = ("launch hook in use", "argument of an unknown type", "runtime argument given by name", "heuristics",
              "autotuner config with a pre-hook", "kernel with a pre-run hook", "a wrapper of another kind",
              "Triton older than 3.6")


@pytest.fixture(scope="module")
def report():
    script = os.path.join(os.path.dirname(__file__), "triton_launch_check.py")
    done = subprocess.run([sys.executable, script], env=compiling_process_environment(), capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout)


# the scenarios of triton_launch_check.py (test_every_scenario_ran keeps the two lists the same)
SCENARIOS = [
    "classic decode, fp16, 1 row",
    "classic decode, bf16, 3 rows, bias",
    "bias, then none, then bias",
    "prefill, fp32, 40 rows",
    "prefill, 40 then 41 rows (one specialization)",
    "prefill, 32 rows, then 40, then 32",
    "rowwise prefill quantization",
    "resident prefill quantization",
    "fused decode + split-K, 1 and 4 rows",
    "x 16-byte aligned, then 2 and 8 bytes off, then aligned",
    "x row-major, then column-major, then row-major",
    "autotuned decode GEMM, two widths of one int class",
    "device 0, then device 1 on another stream, then device 0",
    "backward input gradient",
    "quantize_activations op",
    "a constexpr given positionally, 32 then 64",
    "an int of 17, then of 1, then of 17",
    "an int of 17, then of 2**31 + 17, then of 17",
    "an int of 32, then of 2**31, then of 32",
    "an int of 17, then of -2**31 - 1, then of 17",
    "an nn.Parameter 16-byte aligned, then 4 bytes off, then aligned",
    "an int of 1, then True, then 1",
    "an option as True, then as 1",
    "a grid of an argument by name, n = 100 then 300 (one key)",
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


def _hit_launches(report, scenario):
    return [call["launches"] for call in report[scenario]["direct_hit"]]


def _compiled(launch):
    """What identifies the compiled kernel of a recorded launch: its function handle and its metadata object."""
    return launch[4], launch[5]


# scenarios whose middle call must run other compiled kernels than its neighbours (else they test nothing), and
# the index of a launch that shows it
DIFFERENT_KERNELS = {
    "bias, then none, then bias": 2,  # the GEMM
    "prefill, 32 rows, then 40, then 32": 0,  # the stats kernel reads M
    "x 16-byte aligned, then 2 and 8 bytes off, then aligned": 0,  # the stats kernel reads x
    "x row-major, then column-major, then row-major": 0,
    "autotuned decode GEMM, two widths of one int class": 2,  # the autotuner picked another config
    "device 0, then device 1 on another stream, then device 0": 0,
    "a constexpr given positionally, 32 then 64": 0,
    "an int of 17, then of 1, then of 17": 0,  # Triton compiles an int equal to 1 as a constant
    "an int of 17, then of 2**31 + 17, then of 17": 0,  # a 64-bit parameter
    "an int of 1, then True, then 1": 0,  # a bool is an i1 parameter, 1 a constant
}


@pytest.mark.slow
@pytest.mark.parametrize("scenario", DIFFERENT_KERNELS)
def test_the_middle_call_runs_other_compiled_kernels(report, scenario):
    index = DIFFERENT_KERNELS[scenario]
    calls = _hit_launches(report, scenario)
    first, middle = _compiled(calls[0][index]), _compiled(calls[1][index])
    assert first != middle, "the scenario does not exercise what it names"
    if len(calls) > 2:  # back to the first call's kind
        assert _compiled(calls[-1][index]) == first


@pytest.mark.slow
def test_two_bytes_and_eight_bytes_off_are_both_unaligned(report):
    calls = _hit_launches(report, "x 16-byte aligned, then 2 and 8 bytes off, then aligned")
    assert _compiled(calls[1][0]) == _compiled(calls[2][0])  # one specialization: not 16-byte aligned


@pytest.mark.slow
def test_a_layer_on_another_device_launches_there(report):
    calls = _hit_launches(report, "device 0, then device 1 on another stream, then device 0")
    assert all(launch[4].endswith(":cuda1") and launch[3] == 9 for launch in calls[1])
    assert all(launch[4].endswith(":cuda0") and launch[3] == 7 for launch in calls[0] + calls[2])


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
        q_w, s_w = int8mm.quantize_weight(torch.randn(8, 32).to(DEVICE))  # and a launch says so (interpreted too)
        with pytest.raises(ValueError, match="INT8MM_TRITON_LAUNCH"):
            int8mm.int8_linear(torch.randn(2, 32).to(DEVICE), q_w, s_w, backend="triton")
    finally:
        monkeypatch.delenv(triton_launch.LAUNCH_ENV_VAR)
        backends.refresh_from_environment()


def test_autotune_variable_is_read_once_and_checked(monkeypatch):
    from int8mm.backends import triton as triton_backend
    try:
        monkeypatch.setenv(triton_backend.AUTOTUNE_ENV_VAR, "0")
        backends.refresh_from_environment()
        assert triton_backend.autotuning() is False
        monkeypatch.setenv(triton_backend.AUTOTUNE_ENV_VAR, "1")
        assert triton_backend.autotuning() is False  # read once: no environment lookup per call
        backends.refresh_from_environment()
        assert triton_backend.autotuning() is True
        monkeypatch.setenv(triton_backend.AUTOTUNE_ENV_VAR, "yes")
        backends.refresh_from_environment()
        with pytest.raises(ValueError, match=r"INT8MM_AUTOTUNE must be one of '0', '1', got 'yes'"):
            triton_backend.autotuning()
    finally:
        monkeypatch.undo()
        backends.refresh_from_environment()


# ---- on a GPU: the direct path computes what the JIT path computes, eagerly, on other streams, in graphs ----
# the environment of each Triton path a call can take, every schedule variable set (a GPU run may export some);
# benchmarks/gpu_run.sh gates the direct launch on the classic cases and runs each candidate's cases with its tests
GPU_CASES = {
    "classic": ({"INT8MM_DECODE_PATH": "classic", "INT8MM_DECODE_GEMM": "classic", "INT8MM_PREFILL_QUANT": "classic"},
                [1, 4, 64]),
    "fused+splitk": ({"INT8MM_DECODE_PATH": "fused", "INT8MM_DECODE_GEMM": "splitk", "INT8MM_PREFILL_QUANT": "classic"},
                     [1, 4]),
    "rowwise": ({"INT8MM_DECODE_PATH": "classic", "INT8MM_DECODE_GEMM": "classic", "INT8MM_PREFILL_QUANT": "rowwise"},
                [64]),
    "resident": ({"INT8MM_DECODE_PATH": "classic", "INT8MM_DECODE_GEMM": "classic", "INT8MM_PREFILL_QUANT": "resident"},
                 [64]),
}


@functools.cache
def _gpu_layer(k=4096, n=4096):
    import torch
    from helpers import random_weight
    import int8mm
    q_w, s_w = int8mm.quantize_weight(random_weight(n, k).to("cuda"))
    return q_w, s_w, torch.randn(n, device="cuda", dtype=torch.float16)


def _gpu_input(m, seed, k=4096):
    import torch
    from helpers import planted_outliers
    return planted_outliers(m, k, torch.float16, n_outlier_cols=8, seed=seed).to("cuda")


def _gpu_linear(inputs):
    import int8mm
    q_w, s_w, bias = _gpu_layer()
    return int8mm.int8_linear(inputs, q_w, s_w, bias, backend="triton")


def _with_launch_mode(monkeypatch, mode, environment):
    for name, value in {**environment, triton_launch.LAUNCH_ENV_VAR: mode}.items():
        monkeypatch.setenv(name, value)
    backends.refresh_from_environment()


@requires_cuda
@pytest.mark.parametrize("path,m", [(path, m) for path, (_, rows) in GPU_CASES.items() for m in rows])
def test_gpu_direct_launch_equals_jit_launch(monkeypatch, path, m):
    import torch
    from gpu import assert_graphs_and_streams_agree
    x, other = _gpu_input(m, seed=0), _gpu_input(m, seed=3)
    try:
        _with_launch_mode(monkeypatch, "jit", GPU_CASES[path][0])
        expected = [_gpu_linear(x), _gpu_linear(other)]
        _with_launch_mode(monkeypatch, "direct", GPU_CASES[path][0])
        triton_launch.clear_cache()
        for _ in range(3):  # the first call fills the cache through the JIT; the others launch directly
            assert torch.equal(_gpu_linear(x), expected[0])
        assert triton_launch.cached_launches() > 0, "the direct path cached nothing"
        assert_graphs_and_streams_agree(_gpu_linear, [x, other], expected, rounds=5)
    finally:
        monkeypatch.undo()
        backends.refresh_from_environment()


@pytest.mark.slow
def test_bench_launch_host_script(tmp_path):
    """benchmarks/bench_launch_host.py runs end to end (its own process: it installs the stand-in driver) and
    writes its table and medians."""
    script = os.path.join(REPOSITORY, "benchmarks", "bench_launch_host.py")
    done = subprocess.run([sys.executable, script, "--rounds", "1", "--calls", "2", "--out", str(tmp_path)],
                          env=compiling_process_environment(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    medians = json.loads((tmp_path / "launch_host.json").read_text())["median_us"]
    calls = {name: row for name, row in medians.items() if not name.startswith(("one launch", "cuda backend"))}
    assert len(calls) == 9 and all(sorted(row) == ["direct", "direct+kept", "jit"] and min(row.values()) > 0
                                   for row in calls.values())
    assert sorted(name for name in medians if name.startswith("one launch")) == [
        f"one launch, {kind} GEMM, {way}" for kind in ("autotuned", "plain") for way in ("JIT", "direct")]
    assert "| 1 x 4096 -> 4096 | fused+splitk |" in (tmp_path / "launch_host.md").read_text()
    cuda_rows = [name for name in medians if name.startswith("cuda backend")]
    assert len(cuda_rows) == (6 if cpu_build.compiler() else 0) and all(medians[name] > 0 for name in cuda_rows)
