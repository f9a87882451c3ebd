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

// What a call needs to know of the current device, asked of the driver once per device (a forward needs it on
// every call): its multiprocessor count and compute capability (major). A failed query is reported, never replaced
// by a guess: returns the CUDA error, or 0 with *sms and *major set.
constexpr int kMaxDevices = 64;
static std::atomic<int> sm_counts[kMaxDevices];  // 0: not asked yet
static std::atomic<int> majors[kMaxDevices];     // stored before the device's count (release), read after it

static int device_facts(int* sms, int* major) {
  int device = 0;
  cudaError_t status = cudaGetDevice(&device);
  if (status != cudaSuccess) return static_cast<int>(status);
  const bool cacheable = device >= 0 && device < kMaxDevices;
  if (cacheable) {
    int cached = sm_counts[device].load(std::memory_order_acquire);
    if (cached > 0) {
      *sms = cached;
      *major = majors[device].load(std::memory_order_relaxed);
      return 0;
    }
  }
  int queried_sms = 0, queried_major = 0;
  status = cudaDeviceGetAttribute(&queried_sms, cudaDevAttrMultiProcessorCount, device);
  if (status == cudaSuccess) status = cudaDeviceGetAttribute(&queried_major, cudaDevAttrComputeCapabilityMajor, device);
  if (status != cudaSuccess) return static_cast<int>(status);
  if (queried_sms <= 0) return static_cast<int>(cudaErrorInvalidDevice);
  if (cacheable) {
    majors[device].store(queried_major, std::memory_order_relaxed);
    sm_counts[device].store(queried_sms, std::memory_order_release);
  }
  *sms = queried_sms;
  *major = queried_major;
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
  int num_sms = 0, major = 0;
  if (int status = device_facts(&num_sms, &major)) return status;
  return quantize_activations_impl(x, x_dtype, M, K, stride_xm, stride_xk, threshold, workspace, q_x, s_x,
                                   outlier_cols, outlier_count, static_cast<cudaStream_t>(stream), num_sms);
}

int int8mm_int8_matmul(const int8_t* a, const int8_t* b, int32_t* out, int64_t M, int64_t N, int64_t K,
                       void* stream) {
  if (M < 0 || N < 0 || K < 0) return static_cast<int>(cudaErrorInvalidValue);
  if (M == 0 || N == 0) return 0;
  GemmArgs args{a, b, out, nullptr, nullptr, nullptr, 0, 0, nullptr, nullptr, nullptr, M, N, K, false};
  return launch_int8_matmul(args, static_cast<cudaStream_t>(stream));
}

int int8mm_linear_call_size(void) { return static_cast<int>(sizeof(int8mm_linear_call)); }

int int8mm_int8_linear(const int8mm_linear_call* call) {
  if (call == nullptr) return static_cast<int>(cudaErrorInvalidValue);
  const int64_t M = call->M, N = call->N, K = call->K;
  const float threshold = static_cast<float>(call->threshold);
  if (M < 0 || N < 0 || K < 0 || !(threshold >= 0.0f) || (call->flags & ~int64_t{INT8MM_CALL_PROGRAMMATIC}) != 0)
    return static_cast<int>(cudaErrorInvalidValue);
  if (M == 0 || N == 0) return 0;
  auto pointer = [](int64_t address) { return reinterpret_cast<void*>(static_cast<intptr_t>(address)); };
  const void* x = pointer(call->x);
  auto* q_x = static_cast<int8_t*>(pointer(call->q_x));
  auto* s_x = static_cast<float*>(pointer(call->s_x));
  auto* outlier_cols = static_cast<int32_t*>(pointer(call->outlier_cols));
  auto* outlier_count = static_cast<int32_t*>(pointer(call->outlier_count));
  const int x_dtype = static_cast<int>(call->x_dtype), bias_dtype = static_cast<int>(call->bias_dtype);
  cudaStream_t s = static_cast<cudaStream_t>(pointer(call->stream));
  int num_sms = 0, major = 0;
  int status = device_facts(&num_sms, &major);
  if (status != 0) return status;
  status = quantize_activations_impl(x, x_dtype, M, K, call->stride_xm, call->stride_xk, threshold,
                                     static_cast<int32_t*>(pointer(call->workspace)), q_x, s_x, outlier_cols,
                                     outlier_count, s, num_sms);
  if (status != 0) return status;
  GemmArgs args{q_x, static_cast<const int8_t*>(pointer(call->q_w)), pointer(call->out), s_x,
                static_cast<const float*>(pointer(call->s_w)), x, call->stride_xm, call->stride_xk, outlier_cols,
                outlier_count, pointer(call->bias), M, N, K, false};
  // PDL from sm_90 (asked for below, the flag is ignored); K == 0 launched no quantization kernel (memsets only)
  // for the GEMV to follow programmatically. The quantization's first operation stays a plain launch: it must not
  // start before the previous call's GEMV has read the buffers it rewrites (int8mm/backends/scratch.py).
  if (M <= kDecodeMaxM) {
    args.programmatic = (call->flags & INT8MM_CALL_PROGRAMMATIC) != 0 && K > 0 && major >= 9;
    return launch_int8_linear_gemv(args, x_dtype, bias_dtype, s);
  }
  return launch_int8_linear_gemm(args, x_dtype, bias_dtype, s);
}

}  // extern "C"
