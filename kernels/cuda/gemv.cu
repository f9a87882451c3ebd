// Decode (M <= 16): stream the int8 weight once at close to memory bandwidth.
//
// One row of x: int8_gemv_kernel. Each warp owns kRowsPerWarp weight rows; lanes walk K in 16-byte vectors
// (streaming loads that do not linger in L2), several steps' loads issued before any is used, multiply them with
// the quantized activation row (small, L1/L2-resident, reused across the warp's rows) by __dp4a, and reduce across
// the warp. Where K or the pointers are not 16-byte aligned, the same kernel reads element by element, compiled
// for 1, 4, 8 and 16 rows of x, so that a one-row decode step keeps few registers and no loop over rows it does not
// have.
//
// 2-16 rows, aligned: int8_gemv_mma_kernel, the same weight stream into the int8 tensor cores (its dp4a form
// needed 254 registers at 16 rows, one block per SM, and ran at half its one-row speed on an H200, 2026-11-30).
//
// The epilogue of both is the fused one of gemm.cu, in the same order of float operations.
//
// On sm_90+ both are launched with programmatic dependent launch (common.cuh) after the quantization kernel, which
// lets them start at its beginning: each block of the vector and tensor-core forms sends the first bytes of its
// weight rows towards L2 (the element-wise forms, for unaligned rows, do not), then every block waits on the GPU for
// the int8 rows, scales and outlier list. So the weight stream is under way, and the launch paid for, while the
// quantization still runs (with one row it is a single block: most of the GPU would otherwise idle).
#include "common.cuh"
#include "gemm.cuh"

namespace int8mm {

constexpr int kGemvWarps = 8, kGemvThreads = 32 * kGemvWarps, kRowsPerWarp = 4;
constexpr int kMaxM = static_cast<int>(kDecodeMaxM);
constexpr int64_t kWarpStep = 32 * 16;  // bytes of K a warp covers per step: 16 per lane

// K steps whose weight loads a lane issues before using any: the bytes in flight per warp (a decode GEMV is bound
// by them: N = 4096 gives only about 8 warps per SM). The vector path runs one row of x (launch_gemv_rows).
constexpr int kStepsInFlight = 4;

// Bytes of weight the blocks of one GEMV prefetch to L2 before they wait, in all: about what an H100/H200 reads from
// DRAM in the two microseconds a one-row quantization kernel runs (3.35-4.8 TB/s), and a sixth of their 50 MB L2
constexpr int64_t kPrefetchBudget = int64_t{8} << 20;

// the bulk prefetch's size field holds under 1 MiB; a row's share is at most kPrefetchBudget / 32 (one block)
static_assert(kPrefetchBudget / 32 < (int64_t{1} << 20), "a prefetch of 1 MiB or more would wrap");

// Under PDL: the first bytes of weight row `row` (when `mine`) head for L2. Every block takes an equal share of
// kPrefetchBudget, spread over the kRows rows it owns, as each row's first bytes: the kernels walk K from 0 in all
// their rows at once. kPrefetch: rows 16-byte aligned (the vector and tensor-core paths) only. Then, always, the
// wait for the quantization kernel (at once after a plain launch: the device code does not trust the flag alone).
template <bool kPrefetch, int kRows>
__device__ __forceinline__ void start_after_quantization(const GemmArgs& args, int64_t row, bool mine) {
  if (kPrefetch && args.programmatic && mine) {
    const uint32_t share = static_cast<uint32_t>(kPrefetchBudget / kRows) / gridDim.x / 16 * 16;
    const int64_t bytes = min(args.K, static_cast<int64_t>(share));  // K % 16 == 0 on these paths
    if (bytes > 0) prefetch_to_l2(args.b + row * args.K, static_cast<uint32_t>(bytes));
  }
  wait_for_prior_grid();
}

__device__ __forceinline__ int dot16(const int4& w, const int4& x, int acc) {
  acc = __dp4a(w.x, x.x, acc);
  acc = __dp4a(w.y, x.y, acc);
  acc = __dp4a(w.z, x.z, acc);
  return __dp4a(w.w, x.w, acc);
}

// out[m, n] from the exact int32 sum of row m of q_x and row n of q_w: de-quantized, plus the outlier columns in fp32
// and the bias, the operations of gemm.cu's epilogue in its order
template <typename T, typename TBias>
__device__ __forceinline__ void store_output(const GemmArgs& args, int64_t m, int64_t n, int32_t sum,
                                             int num_outliers) {
  const T* x = static_cast<const T*>(args.x);
  const TBias* bias = static_cast<const TBias*>(args.bias);
  const float s_w = args.s_w[n];
  float y = static_cast<float>(sum) * args.s_x[m] * (s_w * kInvInt8MaxSq);
  for (int o = 0; o < num_outliers; ++o) {
    const int64_t col = args.outlier_cols[o];
    y += to_float(x[m * args.stride_xm + col * args.stride_xk]) *
         (static_cast<float>(args.b[n * args.K + col]) * (s_w * kInvInt8Max));
  }
  if (bias) y += to_float(bias[n]);
  static_cast<T*>(args.out)[m * args.N + n] = from_float<T>(y);
}

// kM: rows of x the kernel is compiled for (M <= kM); its loops are fully unrolled, without a branch per row
template <typename T, typename TBias, bool kAligned, int kM>
__global__ void __launch_bounds__(kGemvThreads) int8_gemv_kernel(GemmArgs args) {
  const int64_t M = args.M, N = args.N, K = args.K;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t n0 = (static_cast<int64_t>(blockIdx.x) * kGemvWarps + warp) * kRowsPerWarp;
  if (n0 >= N) return;
  start_after_quantization<kAligned, kGemvWarps * kRowsPerWarp>(args, n0 + lane, lane < kRowsPerWarp && n0 + lane < N);
  int acc[kRowsPerWarp][kM] = {};

  if (kAligned) {  // K % 16 == 0 and 16-byte aligned rows
    // weight rows past N read row N - 1 and x rows past M read row M - 1: valid memory, sums dropped below
    const int8_t* w_rows[kRowsPerWarp];
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) w_rows[r] = args.b + min(n0 + r, N - 1) * K;
    auto x_at = [&](int m, int64_t k) {
      return *reinterpret_cast<const int4*>(args.a + min(static_cast<int64_t>(m), M - 1) * K + k);
    };
    constexpr int kSteps = kStepsInFlight;
    int64_t k = static_cast<int64_t>(lane) * 16;
    for (; k + (kSteps - 1) * kWarpStep < K; k += kSteps * kWarpStep) {
      int4 w[kSteps][kRowsPerWarp];
#pragma unroll
      for (int s = 0; s < kSteps; ++s)
#pragma unroll
        for (int r = 0; r < kRowsPerWarp; ++r)
          w[s][r] = __ldcs(reinterpret_cast<const int4*>(w_rows[r] + k + s * kWarpStep));
#pragma unroll
      for (int s = 0; s < kSteps; ++s)
#pragma unroll
        for (int m = 0; m < kM; ++m) {
          const int4 xv = x_at(m, k + s * kWarpStep);
#pragma unroll
          for (int r = 0; r < kRowsPerWarp; ++r) acc[r][m] = dot16(w[s][r], xv, acc[r][m]);
        }
    }
    for (; k < K; k += kWarpStep) {  // the last steps, fewer than kSteps
      int4 w[kRowsPerWarp];
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) w[r] = __ldcs(reinterpret_cast<const int4*>(w_rows[r] + k));
#pragma unroll
      for (int m = 0; m < kM; ++m) {
        const int4 xv = x_at(m, k);
#pragma unroll
        for (int r = 0; r < kRowsPerWarp; ++r) acc[r][m] = dot16(w[r], xv, acc[r][m]);
      }
    }
  } else {
    for (int64_t k = lane; k < K; k += 32) {
#pragma unroll
      for (int m = 0; m < kM; ++m) {
        if (m < M) {
          const int xv = args.a[m * K + k];
#pragma unroll
          for (int r = 0; r < kRowsPerWarp; ++r)
            if (n0 + r < N) acc[r][m] += xv * static_cast<int>(args.b[(n0 + r) * K + k]);
        }
      }
    }
  }
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r)
#pragma unroll
    for (int m = 0; m < kM; ++m)
#pragma unroll
      for (int offset = 16; offset > 0; offset /= 2) acc[r][m] += __shfl_xor_sync(0xffffffffu, acc[r][m], offset);

  // every lane now holds every sum; lane l finishes outputs l, l + 32, ... of the warp's rows x kM
  const int num_outliers = *args.outlier_count;
  constexpr int kOutputs = kRowsPerWarp * kM;
#pragma unroll
  for (int pass = 0; pass < (kOutputs + 31) / 32; ++pass) {
    const int idx = pass * 32 + lane, r = idx / kM, m = idx % kM;
    const int64_t n = n0 + r;
    if (idx >= kOutputs || m >= M || n >= N) continue;
    int mine = 0;
#pragma unroll
    for (int rr = 0; rr < kRowsPerWarp; ++rr)  // constant indices keep acc in registers
#pragma unroll
      for (int mm = 0; mm < kM; ++mm)
        if (rr == r && mm == m) mine = acc[rr][mm];
    store_output<T, TBias>(args, m, n, mine, num_outliers);
  }
}

// ---- 2-16 rows on the int8 tensor cores ----
// A block owns kMmaBlockN weight rows (kMmaTilesN m16n8k32 tiles of 8) and all of K, split among its warps: warp w
// takes the 64-byte chunks of K numbered w, w + kMmaWarps, ... In a chunk, lane (g, q) = (lane / 4, lane % 4) loads
// 16 bytes at offset 16q of weight row 8t + g for each tile t, and the same 16 bytes of x rows g and g + 8 (rows past
// M read row M - 1; their sums are dropped). Those 16 bytes feed two mma steps: words 0-1 the first, words 2-3 the
// second. The PTX fragments place, in each step, the k positions 4q..4q+3 and 16+4q..16+4q+3 in a thread's two
// words of b (and of a, rows g and g + 8); here those words hold other k positions of the chunk, but the same ones
// for x and the weight, and every k position of the chunk lands in exactly one (step, word, lane): the int32 sum is
// the same sum in another order, so exact. The warps' sums meet in shared memory, then every thread finishes two
// outputs.
constexpr int kMmaWarps = 8, kMmaThreads = 32 * kMmaWarps, kMmaTilesN = 4, kMmaBlockN = 8 * kMmaTilesN;
constexpr int kMmaRows = 16;                   // rows of x an m16n8k32 tile holds
constexpr int64_t kMmaChunk = 64;              // bytes of K per lane group per step: 4 lanes x 16
// chunks whose loads a warp issues before its first product: 12 weight and 6 x loads of 16 bytes a lane (192 bytes of
// weight in flight a lane, 48 KB a block); 110-116 registers, two blocks per SM (4 chunks with x loaded up front
// spilled at the 128 registers two blocks allow, and without two blocks ptxas interleaved loads and products)
constexpr int kMmaChunksInFlight = 3;

template <typename T, typename TBias>
__global__ void __launch_bounds__(kMmaThreads, 2) int8_gemv_mma_kernel(GemmArgs args) {
  __shared__ int32_t sums[kMmaWarps][kMmaRows][kMmaBlockN];
  const int64_t M = args.M, N = args.N, K = args.K;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, q = lane % 4;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kMmaBlockN;
  start_after_quantization<true, kMmaBlockN>(args, n0 + threadIdx.x, threadIdx.x < kMmaBlockN && n0 + threadIdx.x < N);
  const int8_t* w_rows[kMmaTilesN];
#pragma unroll
  for (int t = 0; t < kMmaTilesN; ++t) w_rows[t] = args.b + min(n0 + 8 * t + g, N - 1) * K + 16 * q;
  const int8_t* x_lo = args.a + min(static_cast<int64_t>(g), M - 1) * K + 16 * q;
  const int8_t* x_hi = args.a + min(static_cast<int64_t>(g + 8), M - 1) * K + 16 * q;

  int32_t acc[kMmaTilesN][4] = {};
  const int64_t chunks = ceil_div_device(K, kMmaChunk);
  for (int64_t c0 = warp; c0 < chunks; c0 += kMmaWarps * kMmaChunksInFlight) {
    // chunk s starts at byte kc(s) of K; this lane's 16 bytes lie wholly inside K or wholly past it (K % 16 == 0).
    // Every load of the step is issued before the first product (an mma waits for its operands, and the warp
    // issues in order); chunks past K multiply zeros rather than branch.
    int4 w[kMmaChunksInFlight][kMmaTilesN], lo[kMmaChunksInFlight], hi[kMmaChunksInFlight];
#pragma unroll
    for (int s = 0; s < kMmaChunksInFlight; ++s) {
      const int64_t kc = (c0 + s * kMmaWarps) * kMmaChunk;
      const bool inside = kc + 16 * q < K;
#pragma unroll
      for (int t = 0; t < kMmaTilesN; ++t)
        w[s][t] = inside ? __ldcs(reinterpret_cast<const int4*>(w_rows[t] + kc)) : make_int4(0, 0, 0, 0);
    }
#pragma unroll
    for (int s = 0; s < kMmaChunksInFlight; ++s) {
      const int64_t kc = (c0 + s * kMmaWarps) * kMmaChunk;
      const bool inside = kc + 16 * q < K;
      lo[s] = inside ? *reinterpret_cast<const int4*>(x_lo + kc) : make_int4(0, 0, 0, 0);
      hi[s] = inside ? *reinterpret_cast<const int4*>(x_hi + kc) : make_int4(0, 0, 0, 0);
    }
#pragma unroll
    for (int s = 0; s < kMmaChunksInFlight; ++s) {
      const uint32_t a_first[4] = {static_cast<uint32_t>(lo[s].x), static_cast<uint32_t>(hi[s].x),
                                   static_cast<uint32_t>(lo[s].y), static_cast<uint32_t>(hi[s].y)};
      const uint32_t a_second[4] = {static_cast<uint32_t>(lo[s].z), static_cast<uint32_t>(hi[s].z),
                                    static_cast<uint32_t>(lo[s].w), static_cast<uint32_t>(hi[s].w)};
#pragma unroll
      for (int t = 0; t < kMmaTilesN; ++t) {
        const uint32_t b_first[2] = {static_cast<uint32_t>(w[s][t].x), static_cast<uint32_t>(w[s][t].y)};
        const uint32_t b_second[2] = {static_cast<uint32_t>(w[s][t].z), static_cast<uint32_t>(w[s][t].w)};
        mma_s8(acc[t], a_first, b_first);
        mma_s8(acc[t], a_second, b_second);
      }
    }
  }
  // accumulator v of tile t: x row g + 8 (v / 2), weight row 8t + 2q + (v % 2) of the block
#pragma unroll
  for (int t = 0; t < kMmaTilesN; ++t)
#pragma unroll
    for (int v = 0; v < 4; ++v) sums[warp][g + 8 * (v / 2)][8 * t + 2 * q + (v % 2)] = acc[t][v];
  __syncthreads();
  const int num_outliers = *args.outlier_count;
  for (int idx = threadIdx.x; idx < kMmaRows * kMmaBlockN; idx += kMmaThreads) {
    const int m = idx / kMmaBlockN, col = idx % kMmaBlockN;
    const int64_t n = n0 + col;
    if (m >= M || n >= N) continue;
    int32_t sum = 0;
#pragma unroll
    for (int w8 = 0; w8 < kMmaWarps; ++w8) sum += sums[w8][m][col];
    store_output<T, TBias>(args, m, n, sum, num_outliers);
  }
}

// K % 16 == 0 and 16-byte aligned q_x and q_w: rows of both can be read in 16-byte vectors
inline bool gemv_aligned(const GemmArgs& args) {
  return args.K % 16 == 0 && reinterpret_cast<uintptr_t>(args.a) % 16 == 0 &&
         reinterpret_cast<uintptr_t>(args.b) % 16 == 0;
}

template <typename T, typename TBias, int kM>
int launch_gemv_rows(const GemmArgs& args, cudaStream_t stream) {
  const unsigned blocks = static_cast<unsigned>(ceil_div(args.N, kGemvWarps * kRowsPerWarp));
  if constexpr (kM == 1) {  // aligned rows of 2-16 take the tensor cores: only one row needs the vector form
    if (gemv_aligned(args))
      return static_cast<int>(launch_kernel(int8_gemv_kernel<T, TBias, true, kM>, blocks, kGemvThreads, stream,
                                            args.programmatic, args));
  }
  return static_cast<int>(launch_kernel(int8_gemv_kernel<T, TBias, false, kM>, blocks, kGemvThreads, stream,
                                        args.programmatic, args));
}

// one row (the usual decode step): the dp4a kernel (vector or element-wise); 2-16 aligned rows: the tensor cores;
// 2-16 rows otherwise: the element-wise kernel compiled for the smallest row count that holds M (4, 8 or kMaxM)
template <typename T, typename TBias>
int launch_gemv_typed(const GemmArgs& args, cudaStream_t stream) {
  if (args.M <= 1) return launch_gemv_rows<T, TBias, 1>(args, stream);
  if (gemv_aligned(args)) {
    const unsigned blocks = static_cast<unsigned>(ceil_div(args.N, kMmaBlockN));
    return static_cast<int>(launch_kernel(int8_gemv_mma_kernel<T, TBias>, blocks, kMmaThreads, stream,
                                          args.programmatic, args));
  }
  if (args.M <= 4) return launch_gemv_rows<T, TBias, 4>(args, stream);
  if (args.M <= 8) return launch_gemv_rows<T, TBias, 8>(args, stream);
  return launch_gemv_rows<T, TBias, kMaxM>(args, stream);
}

int launch_int8_linear_gemv(const GemmArgs& args, int x_dtype, int bias_dtype, cudaStream_t stream) {
  INT8MM_DISPATCH_FLOAT(x_dtype, {
    using out_t = scalar_t;
    INT8MM_DISPATCH_FLOAT(bias_dtype, { return launch_gemv_typed<out_t, scalar_t>(args, stream); });
  });
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace int8mm
