"""benchmarks/gpu_run.sh, the script a lent GPU machine runs, with every command it calls stood in for.

A GPU session has about 15 minutes: a slip in the script's shell logic (a gate that never opens, a fallback that
never fires, an unset variable under ``set -u``) costs a whole run. Here ``python3`` and ``nvidia-smi`` are small
fakes on PATH: each command line is logged with the INT8MM_ variables it ran under, a call holding one of
FAIL_MATCHING's ";"-separated texts exits 1, the decode benchmark writes rows in which the fused path wins, and
gpu_choose.py runs for real. No GPU, no pytest, no benchmark actually runs.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_run.sh"

FAKE_PYTHON = r"""#!/usr/bin/env bash
env_of_call=$(env | grep '^INT8MM_' | sort | tr '\n' ' ')
echo "$* || $env_of_call" >>"$FAKE_LOG"
case "$*" in
  *"-m pip install"*) exit 0 ;;
  *"import ctypes"*) exit 1 ;;  # the carried library does not load here: built at first use
  *"import torch, triton"*) echo "torch fake triton fake"; exit 0 ;;
  *gpu_choose.py*) exec "$REAL_PYTHON" "$@" ;;
  *bench_decode.py*)  # --out DIR: rows in which the fused path beats classic and agrees with it
    previous=""; for arg in "$@"; do [ "$previous" = --out ] && out=$arg; previous=$arg; done
    cp "$DECODE_ROWS" "$out/decode_bench.json"; exit 0 ;;
esac
IFS=";" read -ra patterns <<<"$FAIL_MATCHING"
for pattern in "${patterns[@]}"; do [[ -n "$pattern" && "$*" == *"$pattern"* ]] && exit 1; done
exit 0
"""


def _decode_rows() -> dict:
    rows = []
    for mode in ("graph", "eager"):
        rows += [{"shape": "o_proj", "m": 1, "mode": mode, "provider": "int8mm classic", "median_us": 30.0},
                 {"shape": "o_proj", "m": 1, "mode": mode, "provider": "int8mm fused", "median_us": 20.0,
                  "matches_classic": True}]
    return {"meta": {}, "rows": rows}


@pytest.fixture
def run_script(tmp_path):
    if shutil.which("bash") is None or shutil.which("timeout") is None:
        pytest.skip("needs bash and coreutils' timeout")  # the GPU machine has both
    fakes = tmp_path / "bin"
    fakes.mkdir()
    (fakes / "python3").write_text(FAKE_PYTHON)
    (fakes / "nvidia-smi").write_text("#!/usr/bin/env bash\necho 'name, driver_version'\necho 'Fake GPU, 0'\n")
    for fake in fakes.iterdir():
        fake.chmod(0o755)
    rows = tmp_path / "decode_rows.json"
    rows.write_text(json.dumps(_decode_rows()))

    def run(plan: str, fail_matching: str = "", **extra) -> tuple[list[str], str]:
        out, log = tmp_path / f"out-{plan}", tmp_path / f"calls-{plan}.log"
        env = {key: value for key, value in os.environ.items() if not key.startswith("INT8MM_")}
        env.update(PATH=f"{fakes}{os.pathsep}{env['PATH']}", PLAN=plan, OUT=str(out), FAKE_LOG=str(log),
                   REAL_PYTHON=sys.executable, DECODE_ROWS=str(rows), FAIL_MATCHING=fail_matching,
                   TMPDIR=str(tmp_path), **extra)  # the script's work folder (mktemp -d) under tmp_path
        done = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert "unbound variable" not in done.stderr, done.stderr[-3000:]
        return log.read_text().splitlines(), (out / "summary.log").read_text()

    return run


def _calls_of(calls: list[str], marker: str) -> list[str]:
    return [call for call in calls if marker in call]


def test_model_first_runs_the_stages_in_order_and_packs_them(run_script, tmp_path):
    calls, summary = run_script("model+first", PREFILL_RESULTS_FROM=str(tmp_path))
    order = [name for call in calls for name in ("test_triton_launch.py", "test_scratch.py", "--suite model",
                                                 "--suite host", "test_decode_kernels.py", "bench_gpu.py")
             if name in call.split(" || ")[0]]
    # launch tests, keep tests, cuda_tests (which holds test_scratch.py too), then what users get: the model suite,
    # the per-layer benchmark and the host suite; then the candidates' tests, and the per-layer benchmark again
    assert order[:6] == ["test_triton_launch.py", "test_scratch.py", "test_scratch.py", "--suite model",
                         "bench_gpu.py", "--suite host"]
    assert order[-1] == "bench_gpu.py" and "test_decode_kernels.py" in order[6:]
    assert "== done" in summary and (tmp_path / "out-model+first" / "results.tgz").stat().st_size > 0
    # the first per-layer benchmark has the defaults; every stage passed, so the winning decode path reaches the
    # second (in chosen/), and AUTO is left alone
    defaults, chosen = _calls_of(calls, "bench_gpu.py")
    assert "INT8MM_DECODE_PATH" not in defaults and "INT8MM_BACKEND" not in defaults
    assert "INT8MM_DECODE_PATH=fused" in chosen and "/chosen" in chosen and "INT8MM_BACKEND" not in chosen


def test_model_first_runs_no_second_benchmark_without_a_choice(run_script, tmp_path):
    calls, summary = run_script("model+first", "test_decode_kernels.py", PREFILL_RESULTS_FROM=str(tmp_path))
    assert len(_calls_of(calls, "bench_gpu.py")) == 1 and "== bench_chosen" not in summary


def test_a_failing_cuda_stage_sends_the_model_benchmark_to_triton(run_script, tmp_path):
    calls, summary = run_script("model+first", "test_backend_kernels.py", PREFILL_RESULTS_FROM=str(tmp_path))
    assert "cuda_tests did not pass: every later stage runs on Triton" in summary
    assert "INT8MM_BACKEND=triton" in _calls_of(calls, "--suite model")[0]
    assert "INT8MM_BACKEND" not in _calls_of(calls, "test_triton_launch.py")[0]  # earlier stages: untouched


def test_a_candidate_is_chosen_only_with_its_tests_and_the_guard_bands(run_script, tmp_path):
    guard_tests = "not cuda and not cpu tests/test_guard_bands.py"
    calls, summary = run_script("first", guard_tests, PREFILL_RESULTS_FROM=str(tmp_path))
    assert ("INT8MM_DECODE_PATH=fused won, but its tests did not all pass (decode_tests passed, guard_tests failed "
            "(rc=1)): kept the default") in summary
    assert "INT8MM_DECODE_PATH" not in _calls_of(calls, "bench_gpu.py")[0]
    calls, summary = run_script("first", "test_decode_kernels.py", PREFILL_RESULTS_FROM=str(tmp_path))
    assert "INT8MM_DECODE_PATH" not in _calls_of(calls, "bench_gpu.py")[0]


def test_failed_launch_and_keep_tests_turn_their_paths_off(run_script, tmp_path):
    calls, summary = run_script("first", "test_triton_launch.py;test_scratch.py", PREFILL_RESULTS_FROM=str(tmp_path))
    assert "every later stage launches through the JIT" in summary
    assert "every later stage allocates its decode buffers per call" in summary
    later = _calls_of(calls, "bench_gpu.py")[0]
    assert "INT8MM_TRITON_LAUNCH=jit" in later and "INT8MM_KEEP_BUFFERS=0" in later


def test_skipped_stages_are_logged_and_gate_their_candidates_off(run_script, tmp_path):
    calls, summary = run_script("first", SKIP_STAGES="decode_tests bench", PREFILL_RESULTS_FROM=str(tmp_path))
    assert "== decode_tests skipped: SKIP_STAGES" in summary and "== bench skipped: SKIP_STAGES" in summary
    assert not _calls_of(calls, "test_decode_kernels.py") and not _calls_of(calls, "bench_gpu.py")
    assert "INT8MM_DECODE_PATH=fused won, but its tests" in summary


def test_a_candidate_whose_tests_are_skipped_is_left_out_of_the_shared_stages(run_script, tmp_path):
    """Its failure there would gate the others off, and its untested kernels must not run in the benchmark."""
    calls, summary = run_script("first", SKIP_STAGES="single_tests splitk_tests", PREFILL_RESULTS_FROM=str(tmp_path))
    guard_tests = _calls_of(calls, "-k not cuda and not cpu")
    assert len(guard_tests) == 1 and "and not single and not splitk tests/test_guard_bands.py" in guard_tests[0]
    assert "-k not bench_decode_script tests/test_decode_kernels.py" in _calls_of(calls, "test_decode_kernels.py")[0]
    assert "--leave-out single fused+splitk" in _calls_of(calls, "bench_decode.py")[0]
    assert "(gpu and triton or inference_mode) and not splitk" in _calls_of(calls, "test_scratch.py")[0]
    (tmp_path / "calls-first.log").unlink()
    calls, _ = run_script("first", PREFILL_RESULTS_FROM=str(tmp_path))  # nothing skipped: nothing left out
    assert len(_calls_of(calls, "-k not cuda and not cpu tests/test_guard_bands.py")) == 1
    assert "not bench_decode_script" not in _calls_of(calls, "test_decode_kernels.py")[0]
    assert "--leave-out" not in _calls_of(calls, "bench_decode.py")[0]
    assert "gpu and (splitk or not (gpu_direct_launch or scratch))" in _calls_of(calls, "test_decode_splitk.py")[0]
