// Host-side entry points of the GEMM and GEMV kernels (used by api.cu).
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

namespace int8mm {

__host__ __device__ inline int64_t ceil_div_device(int64_t a, int64_t b) { return (a + b - 1) / b; }

struct GemmArgs {
  const int8_t* a;        // [M, K] int8 quantized activations (contiguous)
  const int8_t* b;        // [N, K] int8 weight (contiguous)
  void* out;              // [M, N] contiguous: x's dtype when fused, else int32
  const float* s_x;       // [M]
  const float* s_w;       // [N]
  const void* x;          // [M, K] float activations (the outlier columns are read from here)
  int64_t stride_xm, stride_xk;
  const int32_t* outlier_cols;   // [K], the first *outlier_count valid
  const int32_t* outlier_count;  // [1]
  const void* bias;       // [N] or null
  int64_t M, N, K;
  // launched with programmatic dependent launch after the quantization kernel (the GEMV only): wait for it on the
  // GPU before reading a, s_x and the outlier list (common.cuh)
  bool programmatic;
};

int launch_int8_matmul(const GemmArgs& args, cudaStream_t stream);
int launch_int8_linear_gemm(const GemmArgs& args, int x_dtype, int bias_dtype, cudaStream_t stream);
int launch_int8_linear_gemv(const GemmArgs& args, int x_dtype, int bias_dtype, cudaStream_t stream);

// M at or below this takes the GEMV (weight streaming) schedule
constexpr int64_t kDecodeMaxM = 16;

}  // namespace int8mm
