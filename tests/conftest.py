"""Session-wide test setup.

Without a GPU, the Triton kernels run on CPU tensors through Triton's interpreter; the variable must be
set before any kernel is defined, so it is set here, before int8mm is imported by any test module.
"""
import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
