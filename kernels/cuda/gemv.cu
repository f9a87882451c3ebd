// Decode (M <= 16): stream the int8 weight once at close to memory bandwidth.
//
// Each warp owns kRowsPerWarp weight rows; lanes walk K in 16-byte vectors (streaming loads that do not
// linger in L2), several steps' loads issued before any is used, multiply them with the quantized activation
// rows (small, L1/L2-resident, reused across the warp's rows) by __dp4a, and reduce across the warp. The kernel
// is compiled for 1, 4, 8 and 16 rows of x, so that a one-row decode step keeps few registers and no loop over rows
// it does not have. The epilogue is the fused one of gemm.cu.
#include "common.cuh"
#include "gemm.cuh"

namespace int8mm {

constexpr int kGemvWarps = 8, kGemvThreads = 32 * kGemvWarps, kRowsPerWarp = 4;
constexpr int kMaxM = static_cast<int>(kDecodeMaxM);
constexpr int64_t kWarpStep = 32 * 16;  // bytes of K a warp covers per step: 16 per lane

// K steps whose weight loads a lane issues before using any: the bytes in flight per warp (a decode GEMV is bound
// by them: N = 4096 gives only about 8 warps per SM). Fewer when each step also multiplies many activation rows,
// whose sums take the registers.
template <int kM>
constexpr int kStepsInFlight = kM <= 4 ? 4 : 2;

__device__ __forceinline__ int dot16(const int4& w, const int4& x, int acc) {
  acc = __dp4a(w.x, x.x, acc);
  acc = __dp4a(w.y, x.y, acc);
  acc = __dp4a(w.z, x.z, acc);
  return __dp4a(w.w, x.w, acc);
}

// kM: rows of x the kernel is compiled for (M <= kM); its loops are fully unrolled, without a branch per row
template <typename T, typename TBias, bool kAligned, int kM>
__global__ void __launch_bounds__(kGemvThreads) int8_gemv_kernel(GemmArgs args) {
  const int64_t M = args.M, N = args.N, K = args.K;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t n0 = (static_cast<int64_t>(blockIdx.x) * kGemvWarps + warp) * kRowsPerWarp;
  if (n0 >= N) return;
  int acc[kRowsPerWarp][kM] = {};

  if (kAligned) {  // K % 16 == 0 and 16-byte aligned rows
    // weight rows past N read row N - 1 and x rows past M read row M - 1: valid memory, sums dropped below
    const int8_t* w_rows[kRowsPerWarp];
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) w_rows[r] = args.b + min(n0 + r, N - 1) * K;
    auto x_at = [&](int m, int64_t k) {
      return *reinterpret_cast<const int4*>(args.a + min(static_cast<int64_t>(m), M - 1) * K + k);
    };
    constexpr int kSteps = kStepsInFlight<kM>;
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
  const float* s_x = args.s_x;
  const T* x = static_cast<const T*>(args.x);
  const TBias* bias = static_cast<const TBias*>(args.bias);
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
    const float s_w = args.s_w[n];
    float y = static_cast<float>(mine) * s_x[m] * (s_w * kInvInt8MaxSq);
    for (int o = 0; o < num_outliers; ++o) {
      const int64_t col = args.outlier_cols[o];
      y += to_float(x[m * args.stride_xm + col * args.stride_xk]) *
           (static_cast<float>(args.b[n * K + col]) * (s_w * kInvInt8Max));
    }
    if (bias) y += to_float(bias[n]);
    static_cast<T*>(args.out)[m * N + n] = from_float<T>(y);
  }
}

template <typename T, typename TBias, int kM>
int launch_gemv_rows(const GemmArgs& args, cudaStream_t stream) {
  const unsigned blocks = static_cast<unsigned>(ceil_div(args.N, kGemvWarps * kRowsPerWarp));
  const bool aligned = args.K % 16 == 0 && reinterpret_cast<uintptr_t>(args.a) % 16 == 0 &&
                       reinterpret_cast<uintptr_t>(args.b) % 16 == 0;
  if (aligned)
    int8_gemv_kernel<T, TBias, true, kM><<<blocks, kGemvThreads, 0, stream>>>(args);
  else
    int8_gemv_kernel<T, TBias, false, kM><<<blocks, kGemvThreads, 0, stream>>>(args);
  return static_cast<int>(cudaGetLastError());
}

// the smallest compiled row count that holds M: one row (the usual decode step), 4, 8 or kMaxM
template <typename T, typename TBias>
int launch_gemv_typed(const GemmArgs& args, cudaStream_t stream) {
  if (args.M <= 1) return launch_gemv_rows<T, TBias, 1>(args, stream);
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
