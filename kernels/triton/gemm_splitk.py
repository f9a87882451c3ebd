"""Decode GEMM (M <= 16 rows) split along K, so that a narrow layer still gives every SM several programs.

A decode GEMM reads the weight once and does little else: its speed is how many bytes are in flight. With one
program per 16 x BLOCK_N output tile, a layer of N = 4096 outputs is 128 programs, one per SM, each streaming
its whole K alone (Llama-3-8B o_proj ran at 0.84 TB/s that way on an H200, while gate_up, 896 programs, ran at
3.5). Here SPLIT_K programs share each output tile, each summing one slice of K:

1. every program computes the int32 sums ``q_x @ q_w.T`` of its K slice for its tile;
2. with SPLIT_K > 1 it stores them in ``partials[split]`` and takes a ticket on its tile's counter (the ticket
   pattern of decode.py's ``_take_ticket``: the program that draws SPLIT_K - 1 arrives last and sees every
   other program's stores);
3. the last program adds the other slices' sums to its own, resets the counter to 0 for the next launch, and
   writes the tile through the same epilogue as the classic kernel (``store_dequantized_tile``).

The sums are integers, so adding the slices in any order gives the classic kernel's int32 result exactly, and the
output equals the classic path's bit for bit. On sm_90+ the launcher starts it with programmatic dependent launch
(PDL): its programs are scheduled while the quantization kernel before it finishes, and wait for that grid
(``gdc_wait``) before their first read, which hides the launch gap between the two kernels. Only the counters must
be 0 when a launch starts; the launcher keeps them per (device, stream) or per captured call
(int8mm/backends/triton_splitk.py).
"""
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_wait

from .decode import _take_ticket
from .gemm import store_dequantized_tile


@triton.jit
def _int8_gemm_splitk_kernel(
    # pointers
    a_ptr,                # [M, K] int8 quantized activations, M <= BLOCK_M
    b_ptr,                # [N, K] int8 quantized weight (nn.Linear layout)
    out_ptr,              # [M, N] out: x's dtype when FUSED, else int32
    s_x_ptr,              # [M] fp32 row scales of a
    s_w_ptr,              # [N] fp32 row scales of b
    x_ptr,                # [M, K] float activations: the outlier columns are read from here
    outlier_cols_ptr,     # [K] int32 outlier column indices, the first `count` valid
    outlier_count_ptr,    # [1] int32
    bias_ptr,             # [N] float bias (ignored unless HAS_BIAS)
    partials_ptr,         # [SPLIT_K, M, N] int32 scratch, any content (unused when SPLIT_K == 1)
    tickets_ptr,          # [cdiv(N, BLOCK_N)] int32, 0 at launch; each tile's last program resets its own
    # sizes
    M, N, K,
    K_PER_SPLIT,          # columns of K each split sums (the last split: what is left); any value works, the
                          # last step of a slice is masked
    SPLIT_K,              # programs per output tile
    M_BUCKET,             # only an autotune key: M rounded to a power of two
    # strides
    stride_am, stride_ak,
    stride_bn, stride_bk,
    stride_om, stride_on,
    stride_xm, stride_xk,
    # meta-parameters
    FUSED: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    WAIT_FOR_PRIOR_GRID: tl.constexpr = False,  # launched with PDL (sm_90+): wait before reading any input
):
    if WAIT_FOR_PRIOR_GRID:
        # programmatic dependent launch: this grid may start while the quantization kernel before it still runs;
        # nothing that kernel writes (q_x, s_x, the outlier list) is read before this returns
        gdc_wait()
    pid = tl.program_id(0)
    # the splits of one tile are neighbours in launch order: they run at the same time and finish together. Which
    # slice a program sums rotates with the tile, so that programs run one after another (Triton's interpreter)
    # still see every slice arrive last on some tile, as any may on a GPU
    pid_n = pid // SPLIT_K
    split = (pid % SPLIT_K + pid_n) % SPLIT_K

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    in_m = offs_m < M
    in_n = offs_n < N
    # int64 row offsets: [N, K] and [M, N] may hold more than 2^31 elements; the launcher passes a and b with
    # unit K stride
    rows = offs_m.to(tl.int64)
    cols = offs_n.to(tl.int64)
    k_start = split * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, K)
    a_ptrs = a_ptr + rows[:, None] * stride_am + (k_start + offs_k)[None, :].to(tl.int64) * stride_ak
    b_ptrs = b_ptr + cols[None, :] * stride_bn + (k_start + offs_k)[:, None].to(tl.int64) * stride_bk

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(k_start, k_end, BLOCK_K):
        k_left = k_end - k0
        a = tl.load(a_ptrs, mask=in_m[:, None] & (offs_k[None, :] < k_left), other=0)
        b = tl.load(b_ptrs, mask=(offs_k[:, None] < k_left) & in_n[None, :], other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    writes_tile = pid >= 0  # with one split, every program writes its tile
    if SPLIT_K > 1:
        tile_mask = in_m[:, None] & in_n[None, :]
        slice_rows = (split * M + offs_m).to(tl.int64)
        tl.store(partials_ptr + slice_rows[:, None] * N + cols[None, :], acc, mask=tile_mask)
        writes_tile = _take_ticket(tickets_ptr + pid_n) == SPLIT_K - 1
        if writes_tile:
            # the other slices' sums, read from L2 (.cg: never a stale L1 line); integer sums, so any order
            for other in range(0, SPLIT_K):
                other_rows = (other * M + offs_m).to(tl.int64)
                acc += tl.load(partials_ptr + other_rows[:, None] * N + cols[None, :],
                               mask=tile_mask & (other != split), other=0, cache_modifier=".cg")
            # every split of this tile has drawn its ticket: the counter is free for the next launch
            tl.atomic_xchg(tickets_ptr + pid_n, 0, sem="relaxed", scope="gpu")
    if writes_tile:
        store_dequantized_tile(acc, offs_m, offs_n, M, N,
                               b_ptr, out_ptr, s_x_ptr, s_w_ptr, x_ptr, outlier_cols_ptr, outlier_count_ptr,
                               bias_ptr, stride_bn, stride_bk, stride_om, stride_on, stride_xm, stride_xk,
                               FUSED, HAS_BIAS)
