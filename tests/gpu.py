"""The one place that decides whether GPU-only tests run."""
import pytest
import torch

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (CUDA); none here")
requires_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2,
                                       reason="needs an NVIDIA GPU, two of them (CUDA); fewer here")
