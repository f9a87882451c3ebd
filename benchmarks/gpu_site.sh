#!/usr/bin/env bash
# Prepare, on a machine with PyPI, the packages a GPU machine without a package index lacks for
# benchmarks/gpu_run.sh: bitsandbytes (the baseline), peft and setuptools (for the editable install), fetched as
# wheels for that machine's Python (3.12, x86-64 Linux) into one folder that travels with the checkout.
# Usage, from the repository root:  bash benchmarks/gpu_site.sh [.devsite] [EXTRA==VERSION ...]
# gpu_run.sh puts the folder first on PYTHONPATH. bitsandbytes keeps only its CUDA 13 and CPU libraries (~5 MB).
set -euo pipefail
dest=${1:-.devsite}; shift || true
packages=("bitsandbytes==0.50.2" "peft==0.21.2" "setuptools==84.2.1" "$@")
rm -rf "$dest" && mkdir -p "$dest"
python3 -m pip install -q --no-deps --only-binary=:all: --target "$dest" --implementation cp --python-version 3.12 \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 \
  --platform any "${packages[@]}"
find "$dest/bitsandbytes" -maxdepth 1 -name 'libbitsandbytes_*.so' \
  ! -name 'libbitsandbytes_cuda130.so' ! -name 'libbitsandbytes_cpu.so' -delete
du -sh "$dest"
