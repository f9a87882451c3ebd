#!/usr/bin/env bash
# The script a lent GPU machine runs, in one or two calls of at most 10 minutes each (a session has about 15
# minutes of device time in all, the machine's start included):
#   Every plan starts with the GPU tests of the direct Triton launch and of the kept decode buffers (a failure
#   turns that one off for the rest).
#   PLAN=first  (default; its stage limits add up to more than a call, so the last ones are cut to the deadline):
#               the GPU tests of what never ran on a GPU, the candidate benchmarks (two-kernel and one-kernel
#               decode, split-K decode GEMM, rowwise and resident prefill quantization, persistent prefill GEMM),
#               benchmarks/gpu_choose.py picking the winners, then the per-layer benchmark at M = 1 and 16 with them.
#   PLAN=second (~9 min): compute-sanitizer, the remaining Triton tests, the host-time suite, the decode benchmark
#               without PDL (INT8MM_PDL=0), the per-layer benchmark at M = 512 and 2048, the end-to-end model
#               benchmark. Pass the first call's choices
#               (choices.txt in the archive) as environment variables, e.g. PLAN=second INT8MM_DECODE_PATH=fused.
#               After a machine start and PLAN=first, a 15-minute session rarely has the time left for it:
#               plan it for the next session that draws a GPU.
#   PLAN=first+model  first, then the end-to-end model benchmark in whatever time is left (one call, when a
#               session can afford only one).
#   PLAN=tests+model  first's tests and choices, then the end-to-end model benchmark, then the per-layer benchmark
#               in what is left (with PREFILL_RESULTS_FROM, when the prefill candidates were measured before).
#   PLAN=model+first  what users get first, with the defaults (AUTO): after the tests of the CUDA library AUTO
#               sends single rows to (a failure sends every later stage to Triton), the end-to-end model benchmark,
#               the per-layer benchmark (BENCH_ARGS), the host-time suite; then first's tests and choices in what is
#               left, and the per-layer benchmark again with the choices if any passed and time is left. For a
#               session that can afford one call and has never measured the model (issue 11's end-to-end table).
#               With run 4's stage durations the measurements end about 6 minutes in.
#   PREFILL_RESULTS_FROM=DIR (any plan that runs first): skip the prefill GEMM candidates' benchmark and choose
#               the GEMM from the JSON an earlier run left in DIR (a committed benchmarks/results/<date>-<card>/),
#               still gated by this run's tests; the decode candidates and the quantization passes are measured
#               anyway (cheaper, and changed more often; QUANT_BENCH_ARGS, e.g. "--m 2048", narrows the latter).
#   PLAN=all    both, one after the other (over 10 minutes: for a machine without the per-call limit).
#   SKIP_STAGES="NAME ..." (any plan): stages to leave out (a skipped test stage gates its candidates off;
#               guard_tests gates them all). Skipping single_tests or splitk_tests also leaves that candidate out
#               of the shared test stages and of the decode benchmark.
# Here, first: bash benchmarks/gpu_site.sh .devsite; make cuda. Carry .devsite, kernels/cuda/libint8mm_cuda.so
# and its stamp kernels/cuda/libint8mm_cuda.so.source-hash. There: bash benchmarks/gpu_run.sh (timeout_s 600).
#
# What comes back: a lent machine returns at most 8 files, so every stage writes into a work folder that is
# packed into $OUT/results.tgz after each stage (a stage killed at its limit still leaves the earlier ones), and
# the tail of each stage's log is appended to $OUT/summary.log. A stage at its limit gets SIGINT first: pytest
# then still prints its failures and summary (a plain kill lost them on 2026-11-30), a benchmark its traceback.
set -uo pipefail
export PYTHONPATH="$PWD/.devsite:$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT="${OUT:-$PWD/.out}"; mkdir -p "$OUT"
PLAN="${PLAN:-first}"
case "$PLAN" in first|first+model|tests+model|model+first|second|all) ;;
  *) echo "PLAN must be first, first+model, tests+model, model+first, second or all, got '$PLAN'"; exit 2 ;; esac
WORK="$(mktemp -d)"
# written beside, then renamed: a call killed while packing keeps the previous archive whole
pack() { tar czf "$OUT/results.tgz.part" -C "$WORK" . 2>/dev/null && mv -f "$OUT/results.tgz.part" "$OUT/results.tgz"; }
# every stage ends by DEADLINE seconds after the start (a call is killed at its timeout_s, 600 at most): its
# limit shrinks to what is left, keeping a margin for packing and the kill grace; a stage with under 10 s left
# is skipped (its log says so). PLAN=all runs both plans in one call, on a machine without the 600 s limit.
if [ "$PLAN" = all ]; then DEADLINE="${DEADLINE:-1160}"; else DEADLINE="${DEADLINE:-580}"; fi
stage() {  # stage NAME SECONDS COMMAND...: run with a time limit, keep the log, summarise its tail, pack
  local name=$1 limit=$2; shift 2
  local left=$(( DEADLINE - SECONDS - 15 ))
  if skipping "$name"; then  # SKIP_STAGES="a b": stages a run can do without
    echo "== $name skipped: SKIP_STAGES" | tee -a "$OUT/summary.log" "$WORK/$name.log"
    echo "rc=skipped" >>"$WORK/$name.log"; return
  fi
  if [ "$left" -lt 10 ]; then
    echo "== $name skipped: ${left}s left before the deadline" | tee -a "$OUT/summary.log" "$WORK/$name.log"
    echo "rc=skipped" >>"$WORK/$name.log"; return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (limit ${limit}s, $(date -u +%H:%M:%S))" | tee -a "$OUT/summary.log"
  timeout -s INT -k 10 "$limit" "$@" >"$WORK/$name.log" 2>&1
  echo "rc=$?" >>"$WORK/$name.log"
  grep -v "^|" "$WORK/$name.log" | tail -15 | tee -a "$OUT/summary.log"
  pack
}
# int8mm.kernels.{triton,cuda} are kernels/ mapped by setup.py (package_dir): an editable install makes that
# mapping (nothing is compiled: INT8MM_BUILD_CUDA=0; the library is carried or built at first use).
# PIP_BREAK_SYSTEM_PACKAGES: the machine is thrown away afterwards, and its Python may be a distribution's.
# --use-pep517: without it pip runs the legacy `setup.py develop`, which the carried setuptools (84) turns into
# a nested pip call with build isolation, which needs an index the machine cannot reach (seen 2026-11-30).
if ! INT8MM_BUILD_CUDA=0 PIP_BREAK_SYSTEM_PACKAGES=1 PIP_NO_INDEX=1 python3 -m pip install --no-deps \
    --no-build-isolation --use-pep517 -e . \
    >"$WORK/install.log" 2>&1; then
  echo "pip install -e . failed:"; tail -20 "$WORK/install.log"; pack; exit 1
fi
# a carried prebuilt library: name it, since copying can leave the sources newer than it (it would rebuild), but
# only if it loads there (built elsewhere, it may not): otherwise the library is built there at first use (nvcc)
CARRIED_LIB="$PWD/kernels/cuda/libint8mm_cuda.so"
if [ -f "$CARRIED_LIB" ] \
  && python3 -c "import ctypes, sys; ctypes.CDLL(sys.argv[1])" "$CARRIED_LIB" 2>>"$WORK/install.log"
then
  export INT8MM_CUDA_LIB="$CARRIED_LIB"
  # named explicitly, it is loaded without the check of its stamp: say here if it was built from other sources
  # (carry kernels/cuda/libint8mm_cuda.so.source-hash too, which `make cuda` writes beside it)
  python3 -c "import pathlib, sys; from int8mm.backends import cuda_build as b
sys.exit(0 if b._fresh(pathlib.Path(sys.argv[1])) else 1)" "$CARRIED_LIB" 2>>"$WORK/install.log" \
    || echo "WARNING: the carried CUDA library was not built from these sources (or its .source-hash stamp was not" \
      "carried): its rows may time older kernels" >>"$WORK/device.txt.pre"
else echo "the carried CUDA library does not load: built at first use"; fi
{
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  date -u; git rev-parse HEAD 2>/dev/null; echo "PLAN=$PLAN"; env | grep '^INT8MM_' | sort
  cat "$WORK/device.txt.pre" 2>/dev/null
} | tee "$WORK/device.txt" | tee -a "$OUT/summary.log"

skipping() { [[ " ${SKIP_STAGES:-} " == *" $1 "* ]]; }
# A candidate whose own test stage is skipped (SKIP_STAGES) is left out of the stages it shares with the others too
# (its failure there would gate the others off, and its untested kernels are not run): pytest -k terms, and
# bench_decode.py's --leave-out. test_bench_decode_script runs every decode candidate: left out with any of them.
EXCLUDED="" LEFT_OUT=""
if skipping single_tests; then EXCLUDED+=" and not single"; LEFT_OUT+=" single"; fi
if skipping splitk_tests; then EXCLUDED+=" and not splitk"; LEFT_OUT+=" fused+splitk"; fi

first() {  # the tests and the choices, then the per-layer benchmark
  tests_and_choices
  layer_bench
}

tests_and_choices() {
  # Tests use fixed Triton schedules (autotuning every ragged test shape costs minutes); benchmarks autotune.
  # New code paths first: the eager direct launch, opcheck on CUDA tensors, the CUDA backend's packed call,
  # the tiled backward; then each candidate's own tests, whose result gates that candidate (with the guard bands).
  # (their CPU-sized cases run in CI; of all 128, 17 ran in the 55 s this stage had on the H200, 2026-11-30)
  INT8MM_AUTOTUNE=0 stage new_paths "${NEW_PATHS_TIMEOUT:-90}" python3 -m pytest -q -p no:cacheprovider \
    -k "not test_model_sized_shapes_match_reference and not without_a_gpu and (gpu or graph or compile or syncs \
        or backward_kernel)" \
    tests/test_host_path.py tests/test_ops.py tests/test_backend_gpu.py tests/test_backward_kernel.py
  INT8MM_AUTOTUNE=0 stage decode_tests "${DECODE_TEST_TIMEOUT:-80}" python3 -m pytest -q -p no:cacheprovider \
    -k "${EXCLUDED:+not bench_decode_script}" tests/test_decode_kernels.py
  INT8MM_AUTOTUNE=0 stage single_tests "${SINGLE_TEST_TIMEOUT:-60}" python3 -m pytest -q -p no:cacheprovider \
    tests/test_decode_single.py
  # split-K's GPU tests only (Llama shapes, graphs, streams; the small shapes ran under the interpreter), on the
  # classic quantization, the fused+split-K path launched directly against the JIT, and compiled into CUDA graphs
  # beside eager calls with kept buffers: their result gates split-K
  INT8MM_AUTOTUNE=0 stage splitk_tests "${SPLITK_TEST_TIMEOUT:-45}" python3 -m pytest -q -p no:cacheprovider \
    -k "gpu and (splitk or not (gpu_direct_launch or scratch))" tests/test_decode_splitk.py \
    tests/test_triton_launch.py tests/test_scratch.py
  # the benchmarks' dry runs are interpreter tests (CI runs them under Triton 3.7.1; 3.6's interpreter cannot
  # take a tl.minimum loop bound): not here
  # the rowwise pass and the tests both row schemes share, then the resident pass's own, each gating its scheme
  # (run 4: 94 tests in 29 s, mostly compiling; each stage now has about as many)
  INT8MM_AUTOTUNE=0 stage quantize_tests "${QUANTIZE_TEST_TIMEOUT:-60}" python3 -m pytest -q -p no:cacheprovider \
    -k "not dry_run and not resident and (not test_triton_launch or gpu_direct_launch and rowwise)" \
    tests/test_prefill_quantize.py tests/test_triton_launch.py
  INT8MM_AUTOTUNE=0 stage resident_tests "${RESIDENT_TEST_TIMEOUT:-60}" python3 -m pytest -q -p no:cacheprovider \
    -k "not dry_run and resident and (not test_triton_launch or gpu_direct_launch)" \
    tests/test_prefill_quantize.py tests/test_triton_launch.py
  INT8MM_AUTOTUNE=0 stage prefill_gemm_tests "${PREFILL_GEMM_TEST_TIMEOUT:-70}" python3 -m pytest -q \
    -p no:cacheprovider -k "not dry_run" tests/test_prefill_gemm.py
  [ -f "$WORK/cuda_tests.log" ] || cuda_tests  # model+first ran them already
  # the guard bands around the Triton schedules' buffers, every candidate's included: one stage, which gates every
  # candidate (a schedule writing out of bounds keeps all the defaults; its test names it)
  INT8MM_AUTOTUNE=0 stage guard_tests "${GUARD_TEST_TIMEOUT:-45}" python3 -m pytest -q -p no:cacheprovider \
    -k "not cuda and not cpu$EXCLUDED" tests/test_guard_bands.py
  # the candidates against the classic paths, side by side (each compares its outputs with classic); the prefill
  # ones from an earlier run if one is named
  # shellcheck disable=SC2086
  stage decode_bench "${DECODE_BENCH_TIMEOUT:-80}" python3 benchmarks/bench_decode.py --out "$WORK" \
    ${LEFT_OUT:+--leave-out $LEFT_OUT}
  # shellcheck disable=SC2086
  stage quantize_bench "${QUANTIZE_BENCH_TIMEOUT:-55}" python3 benchmarks/bench_quantize_pass.py --out "$WORK" \
    ${QUANT_BENCH_ARGS:-}
  if [ -z "${PREFILL_RESULTS_FROM:-}" ]; then
    stage prefill_gemm_bench "${PREFILL_GEMM_BENCH_TIMEOUT:-65}" python3 benchmarks/bench_prefill_gemm.py \
      --out "$WORK" --forward
  else  # in a folder of their own, so that the archive does not pass them off as this run's
    mkdir -p "$WORK/earlier"
    cp "$PREFILL_RESULTS_FROM/prefill_gemm.json" "$WORK/earlier/" 2>&1 | tee -a "$OUT/summary.log"
    echo "prefill GEMM candidates' results from $PREFILL_RESULTS_FROM" | tee -a "$OUT/summary.log" "$WORK/device.txt"
  fi
  # the winners serve the per-layer benchmark that follows: each only if its own tests passed
  python3 benchmarks/gpu_choose.py "$WORK" "$WORK/earlier" >"$WORK/choices.all" 2>"$WORK/choices.txt"
  : >"$WORK/choices.sh"
  # VARIABLE=VALUE:STAGE[+STAGE]: a winner is kept only if every stage named passed (split-K was measured with the
  # fused quantization, so it needs both)
  gates="INT8MM_DECODE_PATH=fused:decode_tests+guard_tests INT8MM_DECODE_PATH=single:single_tests+guard_tests
         INT8MM_DECODE_GEMM=splitk:decode_tests+splitk_tests+guard_tests
         INT8MM_PREFILL_QUANT=rowwise:quantize_tests+guard_tests
         INT8MM_PREFILL_QUANT=resident:quantize_tests+resident_tests+guard_tests
         INT8MM_PREFILL_GEMM=persistent:prefill_gemm_tests+guard_tests"
  while read -r _ assignment; do  # "export VARIABLE=VALUE"
    tests="" passed=1 outcomes=""
    for gate in $gates; do [ "${gate%%:*}" = "$assignment" ] && tests=${gate##*:}; done
    [ -n "$tests" ] || passed=0
    for name in ${tests//+/ }; do
      grep -q "^rc=0$" "$WORK/$name.log" 2>/dev/null || passed=0
      outcomes+="${outcomes:+, }$name $(stage_outcome "$name")"
    done
    if [ "$passed" = 1 ]; then echo "export $assignment" >>"$WORK/choices.sh"
    else echo "$assignment won, but its tests did not all pass (${outcomes:-none named}): kept the default" \
      >>"$WORK/choices.txt"; fi
  done <"$WORK/choices.all"
  cat "$WORK/choices.sh" >>"$WORK/choices.txt"
  # shellcheck disable=SC1091
  . "$WORK/choices.sh"
  tee -a "$OUT/summary.log" <"$WORK/choices.txt"
  pack
}

stage_outcome() {  # "passed", "failed (rc=N)", "cut at its time limit", "skipped" or "not run", from its log
  local rc
  rc=$(grep -o "^rc=.*" "$WORK/$1.log" 2>/dev/null | tail -1); rc=${rc#rc=}
  case "$rc" in
    0) echo passed ;; 124|137) echo "cut at its time limit" ;; skipped) echo skipped ;; "") echo "not run" ;;
    *) echo "failed (rc=$rc)" ;;
  esac
}

cuda_tests() {
  # the CUDA backend alone, as its result gates AUTO's single rows: its kernels, the guard bands around its buffers
  # (out-of-bounds writes, which compute-sanitizer may not be allowed to check), its calls compiled into CUDA graphs
  # beside eager ones (the model benchmark's compiled batch-1 rows), and the reference the tests compare with
  INT8MM_AUTOTUNE=0 stage cuda_tests "${CUDA_TEST_TIMEOUT:-90}" python3 -m pytest -q -p no:cacheprovider \
    -k "cuda and not triton and not cpu or on_the_gpu or empty_operands" tests/test_backend_kernels.py \
    tests/test_guard_bands.py tests/test_scratch.py tests/test_reference.py
}

model_first() {  # what users get first: the CUDA library's tests gate AUTO's single rows, then the model benchmark
  cuda_tests
  if ! grep -q "^rc=0$" "$WORK/cuda_tests.log"; then
    export INT8MM_BACKEND=triton
    echo "cuda_tests did not pass: every later stage runs on Triton (INT8MM_BACKEND=triton)" \
      | tee -a "$OUT/summary.log" "$WORK/device.txt"
  fi
  MODEL_BENCH_TIMEOUT="${MODEL_BENCH_TIMEOUT:-170}" model
  layer_bench  # with the defaults (and AUTO) users get: the README's GPU table
  host_bench  # issue 11 part 1 asks for the host time per call on the GPU too: never measured there
  tests_and_choices  # in what is left (run 4's durations leave about 3 minutes): the candidates' tests and timings
  if [ -s "$WORK/choices.sh" ]; then  # a candidate won and passed its tests: the per-layer rows with it, if time
    mkdir -p "$WORK/chosen"
    # shellcheck disable=SC2086
    stage bench_chosen "${BENCH_TIMEOUT:-120}" python3 benchmarks/bench_gpu.py --out "$WORK/chosen" \
      ${BENCH_ARGS:---m 1 16 --models Llama-3-8B Llama-3-70B}
  fi
}

host_bench() {
  stage host_bench "${HOST_BENCH_TIMEOUT:-25}" python3 -m int8mm.cli bench --suite host --device cuda --out "$WORK"
}

layer_bench() {  # the per-layer benchmark, with the choices above in the environment
  # shellcheck disable=SC2086
  stage bench "${BENCH_TIMEOUT:-120}" python3 benchmarks/bench_gpu.py --out "$WORK" \
    ${BENCH_ARGS:---m 1 16 --models Llama-3-8B Llama-3-70B}
}

second() {
  if [ "${MEMCHECK:-1}" = 1 ]; then  # compute-sanitizer has refused this GPU before: its own short stage
    stage memcheck "${MEMCHECK_TIMEOUT:-60}" compute-sanitizer --tool memcheck --error-exitcode 1 \
      python3 tests/cuda_memcheck.py
  fi
  INT8MM_AUTOTUNE=0 stage triton_tests "${TRITON_TEST_TIMEOUT:-100}" python3 -m pytest -q -p no:cacheprovider \
    -k "not cuda" tests/test_backend_kernels.py
  if [ "${INTEGRATION:-0}" = 1 ]; then  # loading/accelerate/transformers flows on the GPU (opt-in: time)
    stage integration_tests "${INTEGRATION_TEST_TIMEOUT:-90}" python3 -m pytest -q -p no:cacheprovider \
      tests/test_loading.py tests/test_integrations_accelerate.py tests/test_integrations_transformers.py
  fi
  host_bench
  # the decode candidates again without programmatic dependent launch: what PDL itself is worth (TUNING.md)
  mkdir -p "$WORK/no_pdl"
  # shellcheck disable=SC2086
  INT8MM_PDL=0 stage decode_bench_no_pdl "${DECODE_BENCH_TIMEOUT:-80}" python3 benchmarks/bench_decode.py \
    --out "$WORK/no_pdl" ${LEFT_OUT:+--leave-out $LEFT_OUT}
  mkdir -p "$WORK/prefill"
  stage prefill_bench "${PREFILL_BENCH_TIMEOUT:-130}" python3 benchmarks/bench_gpu.py --out "$WORK/prefill" \
    ${PREFILL_BENCH_ARGS:---m 512 2048 --models Llama-3-8B Llama-3-70B}
  model
}

# whatever it prints before its limit is kept (8B-shaped random Llama, fp16 / int8mm / bnb side by side; run 4's
# took about 14 s a run, 10 runs: bitsandbytes last, the comparison a cut can best spare)
model() {
  # shellcheck disable=SC2086
  stage model_bench "${MODEL_BENCH_TIMEOUT:-110}" python3 -m int8mm.cli bench --suite model --device cuda \
    --out "$WORK" ${MODEL_BENCH_ARGS:---layers 8 --batch-sizes 1 8 --providers float int8mm bnb}
}

# First of all: the direct launch of compiled Triton kernels (the default; int8mm/backends/triton_launch.py) against
# the JIT's launches, on the GPU, on the classic paths (the candidates' cases run with their own tests, so that a
# candidate's failure does not turn direct launches off). Every later stage runs on it: if it fails, they launch
# through the JIT, and device.txt says so.
INT8MM_AUTOTUNE=0 stage launch_tests "${LAUNCH_TEST_TIMEOUT:-40}" python3 -m pytest -q -p no:cacheprovider \
  -k "gpu_direct_launch and classic" tests/test_triton_launch.py
if ! grep -q "^rc=0$" "$WORK/launch_tests.log"; then
  export INT8MM_TRITON_LAUNCH=jit
  echo "launch_tests did not pass: every later stage launches through the JIT (INT8MM_TRITON_LAUNCH=jit)" \
    | tee -a "$OUT/summary.log" "$WORK/device.txt"
fi

# Then the decode buffers kept from call to call (the default; int8mm/backends/scratch.py): two threads issuing on
# one stream, and a layer compiled with CUDA graphs (mode="reduce-overhead"; classic here, fused+split-K in
# splitk_tests, so that an optional path's failure does not turn kept buffers off) beside eager calls, on Triton
# (the graph and stream tests of decode_tests run with them too; the CUDA library's run in cuda_tests, so that its
# failure does not turn kept buffers off for Triton).
# If this fails, every later stage allocates per call, and device.txt says so.
INT8MM_AUTOTUNE=0 stage keep_tests "${KEEP_TEST_TIMEOUT:-60}" python3 -m pytest -q -p no:cacheprovider \
  -k "(gpu and triton or inference_mode) and not splitk" tests/test_scratch.py
if ! grep -q "^rc=0$" "$WORK/keep_tests.log"; then
  export INT8MM_KEEP_BUFFERS=0
  echo "keep_tests did not pass: every later stage allocates its decode buffers per call (INT8MM_KEEP_BUFFERS=0)" \
    | tee -a "$OUT/summary.log" "$WORK/device.txt"
fi

case "$PLAN" in
  first) first ;;
  first+model) first; model ;;
  tests+model) tests_and_choices; model; layer_bench ;;
  model+first) model_first ;;
  second) second ;;
  all) first; second ;;
esac
pack
echo "== done $(date -u +%H:%M:%S); results in $OUT/results.tgz" | tee -a "$OUT/summary.log"
