"""A few CUDA-backend calls for compute-sanitizer (not a pytest module):
    compute-sanitizer --tool memcheck --error-exitcode 1 python3 tests/cuda_memcheck.py
Ragged shapes exercise the unaligned paths, M <= 16 the GEMV, larger M the GEMM. Besides what memcheck finds,
the script exits with status 1 when a result breaks the contract (docs/SPEC.md): the int32 GEMM must equal
the reference exactly, the fused output must lie within 1 fp16 ulp + 1e-5 * RMS of the reference."""
import sys

import torch

import int8mm

# (1, 2576, N): the one-row GEMV through its unrolled loop, some lanes past it; (4 | 7, 2576, N): the tensor-core
# GEMV with a last chunk of K that only some lanes hold (2576 = 40 chunks of 64 + 16 bytes); (5 | 16, aligned K):
# the same kernel at other row counts, (2 | 9, 16 | 48, N) with one chunk of K that only some lanes hold;
# (1, 123, N): the element-wise GEMV; M > 16: the GEMM
SHAPES = [(1, 123, 7), (5, 4096, 33), (16, 256, 1024), (17, 499, 65), (130, 1024, 300), (1, 2576, 70), (4, 2576, 70),
          (7, 2576, 33), (2, 16, 33), (9, 48, 70)]


def fp16_ulp(values: torch.Tensor) -> torch.Tensor:
    """The spacing of fp16 numbers at each value (|v| = m * 2^e with m in [0.5, 1): ulp = 2^(e-1) * eps)."""
    _, exponent = torch.frexp(values.float().abs().clamp_min(torch.finfo(torch.float16).tiny))
    return torch.ldexp(torch.full_like(values.float(), torch.finfo(torch.float16).eps), exponent - 1)


failures = []
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
    exact = torch.equal(acc, int8mm.int8_matmul(q_x, q_w, backend="reference"))
    error = (y.float() - ref.float()).abs()
    bound = fp16_ulp(ref) + 1e-5 * ref.float().pow(2).mean().sqrt()
    within = bool((error <= bound).all())
    print(f"M={m} K={k} N={n}: max |y - ref| {error.max().item():.3g}, within tolerance: {within}, "
          f"int8_matmul exact: {exact}")
    if not (exact and within):
        failures.append((m, k, n))

if failures:
    print(f"contract broken at (M, K, N) = {failures}")
    sys.exit(1)
