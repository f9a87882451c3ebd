"""The one place that decides whether GPU-only tests run, and GPU checks shared by the test files."""
import contextlib

import pytest
import torch

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU (CUDA); none here")
requires_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2,
                                       reason="needs an NVIDIA GPU, two of them (CUDA); fewer here")


@contextlib.contextmanager
def host_syncs_refused():
    """Inside, any CUDA call that waits for the device raises (torch's sync debug mode "error")."""
    torch.cuda.synchronize()  # what came before may sync (autotuning, compiling, loading): not counted
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")
