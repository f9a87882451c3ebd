"""The input gradient of the int8 linear through the de-quantized weight, tile by tile.

``grad_x[m, k] = sum_n grad_y[m, n] * (q_w[n, k] * (s_w[n] / 127))``: each program owns one [BLOCK_M, BLOCK_K]
tile of grad_x and walks N in BLOCK_N steps, de-quantizing only the [BLOCK_N, BLOCK_K] weight tile it needs,
so the fp32 weight ([N, K], 4 bytes an element) is never built in memory. fp32 products and accumulation
(``input_precision="ieee"``: TF32 would round the inputs to 10 mantissa bits).
"""
import triton
import triton.language as tl

INT8_MAX = tl.constexpr(127.0)


@triton.jit
def _dequant_matmul_kernel(
    # pointers
    g_ptr,                # [M, N] grad_y: fp16, bf16 or fp32
    q_ptr,                # [N, K] int8 quantized weight (nn.Linear layout)
    s_ptr,                # [N] fp32 row scales of q
    out_ptr,              # [M, K] fp32 grad_x
    # sizes
    M, N, K,
    # strides
    stride_gm, stride_gn,
    stride_qn, stride_qk,
    stride_om, stride_ok,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    # int64 element offsets: M * N or M * K may pass 2^31 (150k tokens at K = 14336)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_k = (pid_k * BLOCK_K + tl.arange(0, BLOCK_K)).to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        in_n = offs_n < N
        g = tl.load(g_ptr + offs_m[:, None] * stride_gm + offs_n[None, :] * stride_gn,
                    mask=(offs_m[:, None] < M) & in_n[None, :], other=0.0).to(tl.float32)
        q = tl.load(q_ptr + offs_n[:, None] * stride_qn + offs_k[None, :] * stride_qk,
                    mask=in_n[:, None] & (offs_k[None, :] < K), other=0)
        s = tl.load(s_ptr + offs_n, mask=in_n, other=0.0)
        w = q.to(tl.float32) * (s / INT8_MAX)[:, None]  # the reference's q * (s / 127), element for element
        acc += tl.dot(g, w, input_precision="ieee")
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_k[None, :] * stride_ok, acc,
             mask=(offs_m[:, None] < M) & (offs_k[None, :] < K))
