from setuptools import setup

setup(
    name="int8mm",
    version="0.1.0",
    description="LLM.int8()-style 8-bit inference kernels for PyTorch (Triton/CUDA, CPU reference)",
    python_requires=">=3.10",
    # kernels/ holds the kernel sources; it ships inside the package as int8mm.kernels
    packages=["int8mm", "int8mm.backends", "int8mm.integrations", "int8mm.kernels", "int8mm.kernels.triton"],
    package_dir={"int8mm": "int8mm", "int8mm.kernels": "kernels"},
    package_data={"int8mm.kernels": ["cuda/*.cu", "cuda/*.h", "README.md"]},
    install_requires=["torch>=2.5", "numpy", "packaging", "tqdm"],
    extras_require={
        "triton": ["triton>=3.0"],
        "test": ["pytest", "bitsandbytes==0.50.2", "transformers>=5,<6", "accelerate", "safetensors", "gguf",
                 "matplotlib"],
    },
)
