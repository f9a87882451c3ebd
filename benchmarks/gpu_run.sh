#!/usr/bin/env bash
# The one script a lent GPU machine runs: GPU tests, then the side-by-side benchmark; results under $OUT.
# Usage there: bash benchmarks/gpu_run.sh  (with .devsite carried: ../shared/tools/device-site.sh .devsite)
set -uo pipefail
export PYTHONPATH="$PWD/.devsite:$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT="${OUT:-$PWD/.out}"; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv | tee "$OUT/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/device.txt"
timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -q -x ${TESTS:-tests/test_triton_gpu.py tests/test_triton_backend.py} \
  2>&1 | tee "$OUT/gpu_tests.log" | tail -25
timeout "${BENCH_TIMEOUT:-300}" python3 benchmarks/bench_gpu.py --out "$OUT" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log" | tail -80
