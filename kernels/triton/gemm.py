"""int8 x int8 -> int32 tensor-core GEMM with the LLM.int8() epilogue fused in.

``out[m, n] = acc[m, n] * s_x[m] * s_w[n] / 127^2 + sum_j x[m, c_j] * q_w[n, c_j] * s_w[n] / 127 + b[n]``
where ``acc = q_x @ q_w.T`` (int32, exact) and ``c_j`` are the outlier columns, read from device memory
(index list + count), so the kernel never needs the host to know how many there are.
With ``FUSED=False`` it writes ``acc`` itself (the ``int8_matmul`` op).

``grouped_tile`` and ``store_dequantized_tile`` are shared with the persistent kernel (gemm_persistent.py), so
both schedules compute one epilogue.
"""
import triton
import triton.language as tl

INV_INT8_MAX = tl.constexpr(1.0 / 127.0)
INV_INT8_MAX_SQ = tl.constexpr(1.0 / (127.0 * 127.0))


@triton.jit
def grouped_tile(tile_id, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """(row block, column block) of output tile ``tile_id``: GROUP_M row blocks sweep the same weight columns
    while they sit in L2."""
    pids_per_group = GROUP_M * num_pid_n
    first_pid_m = (tile_id // pids_per_group) * GROUP_M
    group_rows = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (tile_id % pids_per_group) % group_rows
    pid_n = (tile_id % pids_per_group) // group_rows
    return pid_m, pid_n


@triton.jit
def store_dequantized_tile(
    acc,                  # [BLOCK_M, BLOCK_N] int32 sums q_x @ q_w.T of this tile
    offs_m, offs_n,       # [BLOCK_M], [BLOCK_N] int32 row and column indices of the tile
    M, N,
    b_ptr, out_ptr, s_x_ptr, s_w_ptr, x_ptr, outlier_cols_ptr, outlier_count_ptr, bias_ptr,  # as in the kernel
    stride_bn, stride_bk, stride_om, stride_on, stride_xm, stride_xk,
    FUSED: tl.constexpr, HAS_BIAS: tl.constexpr,
    OUTLIER_UNROLL: tl.constexpr = 1,  # outlier columns per loop step (their loads issue together)
):
    """Writes ``acc`` (FUSED=False) or the de-quantized output with the outlier term and bias (FUSED=True).

    The outlier columns are added one at a time in list order (the same fp32 sums whatever OUTLIER_UNROLL is);
    with OUTLIER_UNROLL > 1 each step handles that many, masked past the count, so that their gathers of x and
    of weight columns (stride K apart) wait on memory once per step rather than once per column.
    """
    in_m = offs_m < M
    in_n = offs_n < N
    # element offsets of rows are int64: [M, K], [M, N] and [N, K] may hold more than 2^31 elements (a long
    # prefill, a large vocabulary)
    rows = offs_m.to(tl.int64)
    cols = offs_n.to(tl.int64)
    out_ptrs = out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on
    out_mask = in_m[:, None] & in_n[None, :]
    if FUSED:
        s_x = tl.load(s_x_ptr + offs_m, mask=in_m, other=0.0)
        s_w = tl.load(s_w_ptr + offs_n, mask=in_n, other=0.0)
        y = acc.to(tl.float32) * s_x[:, None] * (s_w * INV_INT8_MAX_SQ)[None, :]
        # outlier columns in fp32: a rank-1 update per column, each weight column de-quantized
        w_scale = s_w * INV_INT8_MAX
        num_outliers = tl.load(outlier_count_ptr)
        for first in range(0, num_outliers, OUTLIER_UNROLL):
            for step in tl.static_range(OUTLIER_UNROLL):
                j = first + step
                listed = j < num_outliers
                # x may be a strided view: int64 offsets
                col = tl.load(outlier_cols_ptr + j, mask=listed, other=0).to(tl.int64)
                x_col = tl.load(x_ptr + rows * stride_xm + col * stride_xk, mask=in_m & listed, other=0.0)
                w_col = tl.load(b_ptr + cols * stride_bn + col * stride_bk, mask=in_n & listed, other=0)
                y += x_col.to(tl.float32)[:, None] * (w_col.to(tl.float32) * w_scale)[None, :]
        if HAS_BIAS:
            y += tl.load(bias_ptr + offs_n, mask=in_n, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        tl.store(out_ptrs, acc, mask=out_mask)


@triton.jit
def _int8_gemm_dequant_kernel(
    # pointers
    a_ptr,                # [M, K] int8 quantized activations
    b_ptr,                # [N, K] int8 quantized weight (nn.Linear layout)
    out_ptr,              # [M, N] out: x's dtype when FUSED, else int32
    s_x_ptr,              # [M] fp32 row scales of a
    s_w_ptr,              # [N] fp32 row scales of b
    x_ptr,                # [M, K] float activations: the outlier columns are read from here
    outlier_cols_ptr,     # [K] int32 outlier column indices, the first `count` valid
    outlier_count_ptr,    # [1] int32
    bias_ptr,             # [N] float bias (ignored unless HAS_BIAS)
    # sizes
    M, N, K,
    M_BUCKET,             # only an autotune key: M rounded to a power of two
    # strides
    stride_am, stride_ak,
    stride_bn, stride_bk,
    stride_om, stride_on,
    stride_xm, stride_xk,
    # meta-parameters
    FUSED: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    in_m = offs_m < M
    in_n = offs_n < N
    # int64 row offsets (see store_dequantized_tile); the launcher passes a and b with unit K stride
    rows = offs_m.to(tl.int64)
    cols = offs_n.to(tl.int64)
    a_ptrs = a_ptr + rows[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + cols[None, :] * stride_bn + offs_k[:, None] * stride_bk  # [BLOCK_K, BLOCK_N] = b.T tile

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=in_m[:, None] & (offs_k[None, :] < k_left), other=0)
        b = tl.load(b_ptrs, mask=(offs_k[:, None] < k_left) & in_n[None, :], other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    store_dequantized_tile(acc, offs_m, offs_n, M, N,
                           b_ptr, out_ptr, s_x_ptr, s_w_ptr, x_ptr, outlier_cols_ptr, outlier_count_ptr, bias_ptr,
                           stride_bn, stride_bk, stride_om, stride_on, stride_xm, stride_xk, FUSED, HAS_BIAS)
