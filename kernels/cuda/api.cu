// The C ABI (int8mm.h): argument checks, buffer layout, and the choice of GEMM or GEMV schedule.
#include <algorithm>
#include <atomic>

#include "common.cuh"
#include "gemm.cuh"
#include "int8mm.h"

namespace int8mm {
int quantize_activations_impl(const void* x, int x_dtype, int64_t M, int64_t K, int64_t stride_xm,
                              int64_t stride_xk, float threshold, int32_t* workspace, int8_t* q_x, float* s_x,
                              int32_t* outlier_cols, int32_t* outlier_count, cudaStream_t stream, int num_sms);

// The current device's multiprocessor count, asked of the driver once per device (a forward needs it on every
// call). A failed query is reported, never replaced by a guess: returns the CUDA error, or 0 with *count set.
constexpr int kMaxDevices = 64;
static std::atomic<int> sm_counts[kMaxDevices];  // 0: not asked yet

static int multiprocessors(int* count) {
  int device = 0;
  cudaError_t status = cudaGetDevice(&device);
  if (status != cudaSuccess) return static_cast<int>(status);
  if (device >= 0 && device < kMaxDevices) {
    int cached = sm_counts[device].load(std::memory_order_relaxed);
    if (cached > 0) {
      *count = cached;
      return 0;
    }
  }
  int queried = 0;
  status = cudaDeviceGetAttribute(&queried, cudaDevAttrMultiProcessorCount, device);
  if (status != cudaSuccess) return static_cast<int>(status);
  if (queried <= 0) return static_cast<int>(cudaErrorInvalidDevice);
  if (device >= 0 && device < kMaxDevices) sm_counts[device].store(queried, std::memory_order_relaxed);
  *count = queried;
  return 0;
}
}  // namespace int8mm

using namespace int8mm;

extern "C" {

int int8mm_abi_version(void) { return INT8MM_ABI_VERSION; }

const char* int8mm_error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

int64_t int8mm_workspace_ints(int64_t M, int64_t K) { return M + K + ceil_div(K, kCompactBlock); }

int int8mm_quantize_activations(const void* x, int x_dtype, int64_t M, int64_t K, int64_t stride_xm,
                                int64_t stride_xk, float threshold, int32_t* workspace, int8_t* q_x, float* s_x,
                                int32_t* outlier_cols, int32_t* outlier_count, void* stream) {
  if (M < 0 || K < 0 || !(threshold >= 0.0f)) return static_cast<int>(cudaErrorInvalidValue);
  int num_sms = 0;
  if (int status = multiprocessors(&num_sms)) return status;
  return quantize_activations_impl(x, x_dtype, M, K, stride_xm, stride_xk, threshold, workspace, q_x, s_x,
                                   outlier_cols, outlier_count, static_cast<cudaStream_t>(stream), num_sms);
}

int int8mm_int8_matmul(const int8_t* a, const int8_t* b, int32_t* out, int64_t M, int64_t N, int64_t K,
                       void* stream) {
  if (M < 0 || N < 0 || K < 0) return static_cast<int>(cudaErrorInvalidValue);
  if (M == 0 || N == 0) return 0;
  GemmArgs args{a, b, out, nullptr, nullptr, nullptr, 0, 0, nullptr, nullptr, nullptr, M, N, K};
  return launch_int8_matmul(args, static_cast<cudaStream_t>(stream));
}

int int8mm_linear_call_size(void) { return static_cast<int>(sizeof(int8mm_linear_call)); }

int int8mm_int8_linear(const int8mm_linear_call* call) {
  if (call == nullptr) return static_cast<int>(cudaErrorInvalidValue);
  const int64_t M = call->M, N = call->N, K = call->K;
  const float threshold = static_cast<float>(call->threshold);
  if (M < 0 || N < 0 || K < 0 || !(threshold >= 0.0f)) return static_cast<int>(cudaErrorInvalidValue);
  if (M == 0 || N == 0) return 0;
  auto pointer = [](int64_t address) { return reinterpret_cast<void*>(static_cast<intptr_t>(address)); };
  const void* x = pointer(call->x);
  auto* q_x = static_cast<int8_t*>(pointer(call->q_x));
  auto* s_x = static_cast<float*>(pointer(call->s_x));
  auto* outlier_cols = static_cast<int32_t*>(pointer(call->outlier_cols));
  auto* outlier_count = static_cast<int32_t*>(pointer(call->outlier_count));
  const int x_dtype = static_cast<int>(call->x_dtype), bias_dtype = static_cast<int>(call->bias_dtype);
  cudaStream_t s = static_cast<cudaStream_t>(pointer(call->stream));
  int num_sms = 0;
  int status = multiprocessors(&num_sms);
  if (status != 0) return status;
  status = quantize_activations_impl(x, x_dtype, M, K, call->stride_xm, call->stride_xk, threshold,
                                     static_cast<int32_t*>(pointer(call->workspace)), q_x, s_x, outlier_cols,
                                     outlier_count, s, num_sms);
  if (status != 0) return status;
  GemmArgs args{q_x, static_cast<const int8_t*>(pointer(call->q_w)), pointer(call->out), s_x,
                static_cast<const float*>(pointer(call->s_w)), x, call->stride_xm, call->stride_xk, outlier_cols,
                outlier_count, pointer(call->bias), M, N, K};
  if (M <= kDecodeMaxM) return launch_int8_linear_gemv(args, x_dtype, bias_dtype, s);
  return launch_int8_linear_gemm(args, x_dtype, bias_dtype, s);
}

}  // extern "C"
