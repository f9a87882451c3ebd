"""Numbers of the numerical contract (docs/SPEC.md), named once."""
import torch

INT8_MAX = 127
# int32 accumulation of K products of a quantized activation (within [-127, 127]) and any int8 weight value (-128
# included: a layer's q_w may come from a file) is exact while 127 * 128 * K < 2^31: K <= 132_104, the contract's
# figure (docs/SPEC.md)
MAX_EXACT_K = (2**31 - 1) // (127 * 128)  # 132_104
# int8_matmul takes any int8 operands, -128 included: 128^2 * K < 2^31 bounds K there
MAX_EXACT_K_FULL_RANGE = (2**31 - 1) // 128**2  # 131_071
DEFAULT_THRESHOLD = 6.0
ACTIVATION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
