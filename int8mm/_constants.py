"""Numbers of the numerical contract (docs/SPEC.md), named once."""
import torch

INT8_MAX = 127
# int32 accumulation of K products of two values in [-127, 127] is exact while 127^2 * K < 2^31.
# docs/SPEC.md states the bound as K <= 133_143; that figure is the contract.
MAX_EXACT_K = 133_143
# int8_matmul takes any int8 operands, -128 included: 128^2 * K < 2^31 bounds K there
MAX_EXACT_K_FULL_RANGE = (2**31 - 1) // 128**2  # 131_071
DEFAULT_THRESHOLD = 6.0
ACTIVATION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
