#!/usr/bin/env bash
# The one script a lent GPU machine runs: GPU tests, compute-sanitizer on the CUDA backend, the side-by-side
# benchmark; everything lands under $OUT as it goes (one log per stage).
# Here, first: bash benchmarks/gpu_site.sh .devsite; make cuda. Carry .devsite and
# kernels/cuda/libint8mm_cuda.so. There: bash benchmarks/gpu_run.sh
set -uo pipefail
export PYTHONPATH="$PWD/.devsite:$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT="${OUT:-$PWD/.out}"; mkdir -p "$OUT"
# int8mm.kernels.{triton,cuda} are kernels/ mapped by setup.py (package_dir): an editable install makes that
# mapping (nothing is compiled: INT8MM_BUILD_CUDA=0; the library is carried or built at first use).
# PIP_BREAK_SYSTEM_PACKAGES: the machine is thrown away afterwards, and its Python may be a distribution's.
if ! INT8MM_BUILD_CUDA=0 PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --no-deps --no-build-isolation -e . \
    >"$OUT/install.log" 2>&1; then
  echo "pip install -e . failed:"; tail -20 "$OUT/install.log"; exit 1
fi
# a carried prebuilt library: name it, since copying can leave the sources newer than it (it would rebuild)
[ -f kernels/cuda/libint8mm_cuda.so ] && export INT8MM_CUDA_LIB="$PWD/kernels/cuda/libint8mm_cuda.so"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv | tee "$OUT/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/device.txt"
# What has never run on a GPU goes first (the CUDA backend's tests, compute-sanitizer, the integration GPU
# flows), then the Triton tests and the benchmark; each stage has its own time limit, so one slow stage
# cannot starve the rest. Tests use fixed Triton schedules (autotuning every ragged test shape costs
# minutes; the benchmark autotunes and reports each row's error against float64).
stage() {  # stage NAME SECONDS COMMAND...: run with a time limit, keep the log, show its tail
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log" | grep -v "^|" | tail -15
}
KERNEL_TESTS="tests/test_backend_gpu.py tests/test_backend_kernels.py"
export INT8MM_AUTOTUNE=0
# Stage limits add up to 550 s, under the 600 s a lent-GPU command may run (start-up and nvidia-smi fit in the
# rest). New code paths first: the eager direct launch (Int8Linear without the custom op, inside a CUDA graph
# too), opcheck on CUDA tensors, the CPU-side host time per call on the GPU.
stage new_paths "${NEW_PATHS_TIMEOUT:-60}" python3 -m pytest -q -p no:cacheprovider \
  tests/test_host_path.py tests/test_ops.py tests/test_backend_gpu.py tests/test_backward_kernel.py
stage cuda_tests "${CUDA_TEST_TIMEOUT:-75}" python3 -m pytest -q -p no:cacheprovider -k cuda $KERNEL_TESTS
if [ "${MEMCHECK:-1}" = 1 ]; then
  stage memcheck "${MEMCHECK_TIMEOUT:-60}" compute-sanitizer --tool memcheck --error-exitcode 1 \
    python3 tests/cuda_memcheck.py
fi
if [ "${INTEGRATION:-0}" = 1 ]; then  # loading/accelerate/transformers flows on the GPU (opt-in: time)
  stage integration_tests "${INTEGRATION_TEST_TIMEOUT:-90}" python3 -m pytest -q -p no:cacheprovider \
    tests/test_loading.py tests/test_integrations_accelerate.py tests/test_integrations_transformers.py
fi
stage triton_tests "${TRITON_TEST_TIMEOUT:-100}" python3 -m pytest -q -p no:cacheprovider -k "not cuda" $KERNEL_TESTS
unset INT8MM_AUTOTUNE
stage host_bench "${HOST_BENCH_TIMEOUT:-25}" python3 -m int8mm.cli bench --suite host --device cuda --out "$OUT"
stage bench "${BENCH_TIMEOUT:-110}" python3 benchmarks/bench_gpu.py --out "$OUT" \
  ${BENCH_ARGS:---m 1 16 --models Llama-3-8B Llama-3-70B}
# last: whatever it prints before its limit is kept (8B-shaped random Llama, fp16 / bnb / int8mm side by side)
stage model_bench "${MODEL_BENCH_TIMEOUT:-120}" python3 -m int8mm.cli bench --suite model --device cuda \
  --out "$OUT" ${MODEL_BENCH_ARGS:---layers 8 --batch-sizes 1 8}
