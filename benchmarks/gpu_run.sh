#!/usr/bin/env bash
# The one script a lent GPU machine runs: GPU tests, the side-by-side benchmark, compute-sanitizer on the
# CUDA backend; everything lands under $OUT as it goes.
# Here, first: ../shared/tools/device-site.sh .devsite; make cuda. Carry .devsite and
# kernels/cuda/libint8mm_cuda.so. There: bash benchmarks/gpu_run.sh
set -uo pipefail
export PYTHONPATH="$PWD/.devsite:$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT="${OUT:-$PWD/.out}"; mkdir -p "$OUT"
# a carried prebuilt library: name it, since copying can leave the sources newer than it (it would rebuild)
[ -f kernels/cuda/libint8mm_cuda.so ] && export INT8MM_CUDA_LIB="$PWD/kernels/cuda/libint8mm_cuda.so"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv | tee "$OUT/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/device.txt"
# correctness first, with fixed Triton schedules (autotuning every ragged test shape costs minutes;
# the benchmark below autotunes and reports each row's error against float64)
INT8MM_AUTOTUNE=0 timeout "${TEST_TIMEOUT:-150}" python3 -m pytest -q -p no:cacheprovider \
  ${TESTS:-tests/test_backend_gpu.py tests/test_backend_kernels.py tests/test_loading.py tests/test_integrations_accelerate.py} 2>&1 | tee "$OUT/gpu_tests.log" | tail -15
timeout "${BENCH_TIMEOUT:-150}" python3 benchmarks/bench_gpu.py --out "$OUT" ${BENCH_ARGS:-} 2>&1 \
  | tee "$OUT/bench.log" | grep -v "^|" | tail -40
if [ "${MEMCHECK:-1}" = 1 ]; then
  timeout "${MEMCHECK_TIMEOUT:-120}" compute-sanitizer --tool memcheck --error-exitcode 1 python3 tests/cuda_memcheck.py \
    2>&1 | tee "$OUT/memcheck.log" | tail -8
fi
