"""A few CUDA-backend calls for compute-sanitizer (not a pytest module):
    compute-sanitizer --tool memcheck --error-exitcode 1 python3 tests/cuda_memcheck.py
Ragged shapes exercise the unaligned paths, M <= 16 the GEMV, larger M the GEMM."""
import torch

import int8mm

SHAPES = [(1, 123, 7), (5, 4096, 33), (16, 256, 1024), (17, 499, 65), (130, 1024, 300)]

for m, k, n in SHAPES:
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    x[:, 3 % k] = 30.0
    q_w, s_w = int8mm.quantize_weight(torch.randn(n, k, device="cuda"))
    bias = torch.randn(n, device="cuda", dtype=torch.float16)
    y = int8mm.int8_linear(x, q_w, s_w, bias, backend="cuda")
    ref = int8mm.int8_linear(x, q_w, s_w, bias, backend="reference")
    q_x = int8mm.quantize_activations(x, backend="cuda")[0]
    acc = int8mm.int8_matmul(q_x, q_w, backend="cuda")
    torch.cuda.synchronize()
    print(f"M={m} K={k} N={n}: max |y - ref| {(y.float() - ref.float()).abs().max().item():.3g}, "
          f"int8_matmul exact: {torch.equal(acc, int8mm.int8_matmul(q_x, q_w, backend='reference'))}")
