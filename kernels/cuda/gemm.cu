// int8 x int8 -> int32 tensor-core GEMM (mma.sync m16n8k32, cp.async double buffering) with the
// LLM.int8() epilogue fused in: out = acc * s_x * s_w / 127^2 + sum_j x[:, c_j] * q_w[:, c_j] * s_w / 127 + b.
// The outlier columns c_j and their count are read from device memory. Runs on sm_80 and later.
#include "common.cuh"
#include "gemm.cuh"

namespace int8mm {

constexpr int kBM = 128, kBN = 128, kBK = 64;
constexpr int kWarpsM = 2, kWarpsN = 4, kGemmThreads = 32 * kWarpsM * kWarpsN;
constexpr int kWarpTileM = kBM / kWarpsM, kWarpTileN = kBN / kWarpsN;  // 64 x 32
constexpr int kMmaM = 16, kMmaN = 8, kMmaK = 32;
constexpr int kTilesM = kWarpTileM / kMmaM, kTilesN = kWarpTileN / kMmaN;  // 4 x 4
// a shared-memory row is BK bytes plus 16: fragment loads of the 8 row groups then hit distinct banks
constexpr int kSmemStride = kBK + 16;
constexpr int64_t kMaxGridY = 65535;  // CUDA's limit on a grid's second dimension

__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, int src_bytes) {
  unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all_but_one() { asm volatile("cp.async.wait_group 1;\n" ::); }

// rows x BK bytes of a row-major int8 matrix into shared memory, zero outside [rows_total, K)
template <bool kAligned>
__device__ __forceinline__ void load_tile(int8_t* smem, const int8_t* __restrict__ g, int64_t rows_total, int64_t row0,
                                          int64_t K, int64_t k0, int rows) {
  for (int chunk = threadIdx.x; chunk < rows * (kBK / 16); chunk += kGemmThreads) {
    const int r = chunk / (kBK / 16), c = (chunk % (kBK / 16)) * 16;
    const int64_t grow = row0 + r, gk = k0 + c;
    int8_t* dst = smem + r * kSmemStride + c;
    if (kAligned) {  // K % 16 == 0: a 16-byte chunk is wholly inside or outside
      const bool valid = grow < rows_total && gk < K;
      cp_async_16(dst, valid ? g + grow * K + gk : g, valid ? 16 : 0);
    } else {
#pragma unroll
      for (int b = 0; b < 16; ++b) dst[b] = (grow < rows_total && gk + b < K) ? g[grow * K + gk + b] : int8_t(0);
    }
  }
}

__device__ __forceinline__ uint32_t lds32(const int8_t* p) { return *reinterpret_cast<const uint32_t*>(p); }

// calls fn(i, j, v, row, col) for each accumulator element this thread holds that lies inside [M, N]:
// element (i, j, v) of an m16n8 tile sits at row + 16i + 8(v / 2), col + 8j + (v % 2)
template <typename Fn>
__device__ __forceinline__ void for_each_fragment_element(int64_t row_base, int64_t col_base, int64_t M, int64_t N,
                                                          Fn&& fn) {
#pragma unroll
  for (int i = 0; i < kTilesM; ++i)
#pragma unroll
    for (int j = 0; j < kTilesN; ++j)
#pragma unroll
      for (int v = 0; v < 4; ++v) {
        const int64_t r = row_base + i * kMmaM + (v / 2) * 8, c = col_base + j * kMmaN + (v % 2);
        if (r < M && c < N) fn(i, j, v, r, c);
      }
}

template <typename T, typename TBias, bool kFused, bool kAligned>
__global__ void __launch_bounds__(kGemmThreads) int8_gemm_kernel(GemmArgs args) {
  __shared__ __align__(16) int8_t smem_a[2][kBM * kSmemStride];
  __shared__ __align__(16) int8_t smem_b[2][kBN * kSmemStride];
  const int64_t M = args.M, N = args.N, K = args.K;
  // row tiles span grid.y and grid.z (launch_gemm_typed): a grid's y is at most 65535 blocks
  const int64_t m_tile = static_cast<int64_t>(blockIdx.z) * gridDim.y + blockIdx.y;
  const int64_t m0 = m_tile * kBM, n0 = static_cast<int64_t>(blockIdx.x) * kBN;
  if (m0 >= M) return;  // the last z slice's surplus tiles: the whole block leaves, before any barrier
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int warp_m = warp / kWarpsN, warp_n = warp % kWarpsN;
  const int group = lane / 4, thread_in_group = lane % 4;

  int32_t acc[kTilesM][kTilesN][4] = {};
  const int64_t num_k_tiles = ceil_div_device(K, kBK);
  load_tile<kAligned>(smem_a[0], args.a, M, m0, K, 0, kBM);
  load_tile<kAligned>(smem_b[0], args.b, N, n0, K, 0, kBN);
  cp_async_commit();
  for (int64_t kt = 0; kt < num_k_tiles; ++kt) {
    const int stage = kt % 2;
    if (kt + 1 < num_k_tiles) {  // prefetch the next tile while this one is multiplied
      load_tile<kAligned>(smem_a[stage ^ 1], args.a, M, m0, K, (kt + 1) * kBK, kBM);
      load_tile<kAligned>(smem_b[stage ^ 1], args.b, N, n0, K, (kt + 1) * kBK, kBN);
    }
    cp_async_commit();
    cp_async_wait_all_but_one();
    __syncthreads();
    const int8_t* tile_a = smem_a[stage] + (warp_m * kWarpTileM + group) * kSmemStride + thread_in_group * 4;
    const int8_t* tile_b = smem_b[stage] + (warp_n * kWarpTileN + group) * kSmemStride + thread_in_group * 4;
#pragma unroll
    for (int ks = 0; ks < kBK / kMmaK; ++ks) {
      uint32_t a[kTilesM][4], b[kTilesN][2];
#pragma unroll
      for (int i = 0; i < kTilesM; ++i) {
        const int8_t* p = tile_a + i * kMmaM * kSmemStride + ks * kMmaK;
        a[i][0] = lds32(p);
        a[i][1] = lds32(p + 8 * kSmemStride);
        a[i][2] = lds32(p + 16);
        a[i][3] = lds32(p + 8 * kSmemStride + 16);
      }
#pragma unroll
      for (int j = 0; j < kTilesN; ++j) {
        const int8_t* p = tile_b + j * kMmaN * kSmemStride + ks * kMmaK;
        b[j][0] = lds32(p);
        b[j][1] = lds32(p + 16);
      }
#pragma unroll
      for (int i = 0; i < kTilesM; ++i)
#pragma unroll
        for (int j = 0; j < kTilesN; ++j) mma_s8(acc[i][j], a[i], b[j]);
    }
    __syncthreads();  // this stage is refilled by the next iteration's prefetch
  }

  // element (i, j, h, e) of this thread: row m0 + warp_m*64 + i*16 + group + 8h, col n0 + warp_n*32 + j*8 + 2t + e
  const int64_t row_base = m0 + warp_m * kWarpTileM + group;
  const int64_t col_base = n0 + warp_n * kWarpTileN + thread_in_group * 2;
  if constexpr (!kFused) {
    int32_t* out = static_cast<int32_t*>(args.out);
    for_each_fragment_element(row_base, col_base, M, N, [&](int i, int j, int v, int64_t r, int64_t c) {
      out[r * N + c] = acc[i][j][v];
    });
    return;
  } else {
  float s_x[kTilesM][2], s_w[kTilesN][2], y[kTilesM][kTilesN][4];
#pragma unroll
  for (int i = 0; i < kTilesM; ++i)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t r = row_base + i * kMmaM + h * 8;
      s_x[i][h] = r < M ? args.s_x[r] : 0.0f;
    }
#pragma unroll
  for (int j = 0; j < kTilesN; ++j)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int64_t c = col_base + j * kMmaN + e;
      s_w[j][e] = c < N ? args.s_w[c] : 0.0f;
    }
#pragma unroll
  for (int i = 0; i < kTilesM; ++i)
#pragma unroll
    for (int j = 0; j < kTilesN; ++j)
#pragma unroll
      for (int v = 0; v < 4; ++v)
        y[i][j][v] = static_cast<float>(acc[i][j][v]) * s_x[i][v / 2] * (s_w[j][v % 2] * kInvInt8MaxSq);

  // outlier columns in fp32: a rank-1 update per column with the de-quantized weight column
  const T* x = static_cast<const T*>(args.x);
  const int num_outliers = *args.outlier_count;
  for (int o = 0; o < num_outliers; ++o) {
    const int64_t col = args.outlier_cols[o];
    float x_col[kTilesM][2], w_col[kTilesN][2];
#pragma unroll
    for (int i = 0; i < kTilesM; ++i)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t r = row_base + i * kMmaM + h * 8;
        x_col[i][h] = r < M ? to_float(x[r * args.stride_xm + col * args.stride_xk]) : 0.0f;
      }
#pragma unroll
    for (int j = 0; j < kTilesN; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int64_t c = col_base + j * kMmaN + e;
        w_col[j][e] = c < N ? static_cast<float>(args.b[c * K + col]) * (s_w[j][e] * kInvInt8Max) : 0.0f;
      }
#pragma unroll
    for (int i = 0; i < kTilesM; ++i)
#pragma unroll
      for (int j = 0; j < kTilesN; ++j)
#pragma unroll
        for (int v = 0; v < 4; ++v) y[i][j][v] += x_col[i][v / 2] * w_col[j][v % 2];
  }

  T* out = static_cast<T*>(args.out);
  const TBias* bias = static_cast<const TBias*>(args.bias);
  for_each_fragment_element(row_base, col_base, M, N, [&](int i, int j, int v, int64_t r, int64_t c) {
    out[r * N + c] = from_float<T>(y[i][j][v] + (bias ? to_float(bias[c]) : 0.0f));
  });
  }
}

template <typename T, typename TBias, bool kFused>
int launch_gemm_typed(const GemmArgs& args, cudaStream_t stream) {
  // CUDA caps grid.y at 65535 blocks (8,388,480 rows of 128): more row tiles continue in grid.z
  const int64_t m_tiles = ceil_div(args.M, kBM);
  const int64_t grid_y = m_tiles < kMaxGridY ? m_tiles : kMaxGridY;
  dim3 grid(static_cast<unsigned>(ceil_div(args.N, kBN)), static_cast<unsigned>(grid_y),
            static_cast<unsigned>(ceil_div(m_tiles, grid_y)));
  const bool aligned = args.K % 16 == 0 && reinterpret_cast<uintptr_t>(args.a) % 16 == 0 &&
                       reinterpret_cast<uintptr_t>(args.b) % 16 == 0;
  if (aligned)
    int8_gemm_kernel<T, TBias, kFused, true><<<grid, kGemmThreads, 0, stream>>>(args);
  else
    int8_gemm_kernel<T, TBias, kFused, false><<<grid, kGemmThreads, 0, stream>>>(args);
  return static_cast<int>(cudaGetLastError());
}

int launch_int8_matmul(const GemmArgs& args, cudaStream_t stream) {
  return launch_gemm_typed<int32_t, float, false>(args, stream);
}

int launch_int8_linear_gemm(const GemmArgs& args, int x_dtype, int bias_dtype, cudaStream_t stream) {
  INT8MM_DISPATCH_FLOAT(x_dtype, {
    using out_t = scalar_t;
    INT8MM_DISPATCH_FLOAT(bias_dtype, { return launch_gemm_typed<out_t, scalar_t, true>(args, stream); });
  });
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace int8mm
