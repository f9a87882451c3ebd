"""Persistent int8 GEMM for prefill on Hopper (sm_90+): TMA tensor-descriptor loads, the LLM.int8() epilogue.

Computes exactly what ``_int8_gemm_dequant_kernel`` (gemm.py) computes, with the same epilogue
(``store_dequantized_tile``): exact int32 ``q_x @ q_w.T`` when ``FUSED=False``, else the de-quantized output
plus the fp32 outlier term and the bias. Three things differ:

- Persistent schedule: the launcher starts at most PROGRAMS_PER_SM programs per SM (1, or 2 where two fit);
  each walks the output tiles ``pid, pid + num_programs, ...`` in the grouped order of gemm.py. No tail of
  short-lived programs; with two per SM one program's epilogue overlaps the other's K loop. The int32 form's
  tile loop is flattened into its K loop (the next tile's loads start during the epilogue); the fused form's
  is not (its outlier loop is a nested loop, which the flattening pass does not take).
- The epilogue gathers the outlier columns two at a time (``OUTLIER_UNROLL``), the same sums in the same order.
- Operand tiles arrive by TMA (``cp.async.bulk.tensor``) through host-built tensor descriptors: one
  instruction per tile instead of per-thread address arithmetic and masks; out-of-range rows and K columns
  are filled with zeros by the hardware, which keeps the int32 sum exact on ragged shapes.

Host-side descriptors (``triton.tools.tensor_descriptor.TensorDescriptor``, built by the launcher) rather than
``tl.make_tensor_descriptor``: device-side descriptors need a global-memory workspace from
``triton.set_allocator``, a process-wide setting this library must not take over from its users, whereas a
host descriptor is encoded at launch into the kernel's parameters (a CUDA graph captures it by value).
"""
import triton
import triton.language as tl

from .gemm import grouped_tile, store_dequantized_tile

# outlier columns the epilogue gathers per step: their loads (x columns, and weight columns K bytes apart) wait
# on memory together, where one at a time each tile's epilogue waited once per column. 2, not more: at 4 the
# fused fp16 epilogue of the 128x256 tile spills registers (AOT, sm_90), at 2 it does not
OUTLIER_UNROLL = tl.constexpr(2)


@triton.jit
def _int8_gemm_dequant_persistent_kernel(
    # operands
    a_desc,               # TensorDescriptor of [M, K] int8 quantized activations, block [BLOCK_M, BLOCK_K]
    b_desc,               # TensorDescriptor of [N, K] int8 quantized weight, block [BLOCK_N, BLOCK_K]
    # pointers
    b_ptr,                # [N, K] int8 the same weight: the epilogue reads the outlier columns from here
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
    stride_bn, stride_bk,
    stride_om, stride_on,
    stride_xm, stride_xk,
    # meta-parameters
    FUSED: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    PROGRAMS_PER_SM: tl.constexpr,  # read by the launcher only: programs started per SM (2 when two fit)
):
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_tiles = num_pid_m * num_pid_n
    k_tiles = tl.cdiv(K, BLOCK_K)
    # flatten: the K loops of consecutive tiles become one pipelined loop, so the next tile's first loads are
    # in flight while this tile's epilogue runs
    for tile_id in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0), flatten=True):
        pid_m, pid_n = grouped_tile(tile_id, num_pid_m, num_pid_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for k in range(0, k_tiles):
            a = a_desc.load([off_m, k * BLOCK_K])
            b = b_desc.load([off_n, k * BLOCK_K])  # [BLOCK_N, BLOCK_K]: K-major, as int8 wgmma wants b
            acc = tl.dot(a, b.T, acc, out_dtype=tl.int32)
        offs_m = off_m + tl.arange(0, BLOCK_M)
        if FUSED:
            offs_n = off_n + tl.arange(0, BLOCK_N)
            store_dequantized_tile(acc, offs_m, offs_n, M, N,
                                   b_ptr, out_ptr, s_x_ptr, s_w_ptr, x_ptr, outlier_cols_ptr, outlier_count_ptr,
                                   bias_ptr, stride_bn, stride_bk, stride_om, stride_on, stride_xm, stride_xk,
                                   FUSED, HAS_BIAS, OUTLIER_UNROLL)
        else:
            # int32 out in two column halves: the flattened loop keeps the operand buffers in shared memory during
            # the epilogue, and the store's layout change through shared memory needs half as much per half tile
            # (a whole 128 x 256 int32 tile would not fit next to them). The fused epilogue is not flattened (its
            # outlier loop is a nested loop) and stays whole: split, it used more registers, not fewer (AOT, sm_90)
            halves = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
            for h in tl.static_range(2):
                offs_n = off_n + h * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
                store_dequantized_tile(halves[h], offs_m, offs_n, M, N,
                                       b_ptr, out_ptr, s_x_ptr, s_w_ptr, x_ptr, outlier_cols_ptr, outlier_count_ptr,
                                       bias_ptr, stride_bn, stride_bk, stride_om, stride_on, stride_xm, stride_xk,
                                       FUSED, HAS_BIAS)
