// Shared device helpers: element conversions, the numbers of docs/SPEC.md, checked launches.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "int8mm.h"

namespace int8mm {

constexpr float kInt8Max = 127.0f;
constexpr float kInvInt8Max = 1.0f / 127.0f;
constexpr float kInvInt8MaxSq = 1.0f / (127.0f * 127.0f);
// columns per block of the outlier-column compaction (and of its per-block counts)
constexpr int kCompactBlock = 1024;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// 127 / s as one IEEE division; 0 where s is zero, NaN or Inf, which quantizes the whole row to 0
__device__ __forceinline__ float row_reciprocal(float s) {
  bool usable = s > 0.0f && s < INFINITY;  // NaN compares false
  return usable ? __fdiv_rn(kInt8Max, s) : 0.0f;
}

// round half to even, clamped to [-127, 127]; NaN is 0, as in the reference: a zero times the infinite reciprocal of a
// row whose scale is below 127 / FLT_MAX (fmaxf would return -127 for it)
__device__ __forceinline__ int8_t quantize_value(float v) {
  if (v != v) return 0;
  float r = fminf(fmaxf(rintf(v), -kInt8Max), kInt8Max);
  return static_cast<int8_t>(__float2int_rn(r));
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---- programmatic dependent launch (PDL, sm_90+) ----
// A kernel launched with it (launch_kernel(..., programmatic = true)) may be scheduled while the kernel before it in
// the stream still runs, once that kernel's blocks have all called allow_dependent_launch() (or ended). It must call
// wait_for_prior_grid() before it reads anything that kernel writes: the wait returns once that kernel has finished
// and its writes are visible. Below sm_90 both compile to nothing (api.cu never asks for PDL there), and after a
// plain launch the wait returns at once.
__device__ __forceinline__ void allow_dependent_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void wait_for_prior_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

// Starts reading `bytes` (a multiple of 16) at a 16-byte aligned global address into L2, without waiting and
// without registers to hold it (sm_90's bulk prefetch; nothing below sm_90). A hint: what it fetches is read later
// by ordinary loads, which find it in L2.
__device__ __forceinline__ void prefetch_to_l2(const void* address, uint32_t bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;\n" ::"l"(__cvta_generic_to_global(address)), "r"(bytes)
               : "memory");
#endif
}

// kernel<<<grid, block, 0, stream>>>(args...), with programmatic dependent launch when `programmatic` (see above)
template <typename... Params, typename... Args>
cudaError_t launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, cudaStream_t stream, bool programmatic,
                          Args&&... args) {
  cudaLaunchAttribute attribute{};
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = 0;
  config.stream = stream;
  config.attrs = &attribute;
  config.numAttrs = programmatic ? 1 : 0;
  const cudaError_t launched = cudaLaunchKernelEx(&config, kernel, static_cast<Args&&>(args)...);
  const cudaError_t last = cudaGetLastError();  // cleared, as after the <<<>>> launches elsewhere
  return launched != cudaSuccess ? launched : last;
}

// c += a * b on the int8 tensor cores (sm_80+), one m16n8k32 tile: a is 16 x 32 (row-major fragment), b 32 x 8
// (column-major fragment), c 16 x 8 int32; the fragment layouts are the PTX ISA's for .s8
__device__ __forceinline__ void mma_s8(int32_t (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

}  // namespace int8mm

// dispatch an element type code to a C++ type, as `scalar_t`
#define INT8MM_DISPATCH_FLOAT(code, ...)                                   \
  switch (code) {                                                          \
    case INT8MM_FP16: { using scalar_t = __half; __VA_ARGS__; break; }     \
    case INT8MM_BF16: { using scalar_t = __nv_bfloat16; __VA_ARGS__; break; } \
    case INT8MM_FP32: { using scalar_t = float; __VA_ARGS__; break; }      \
    default: return static_cast<int>(cudaErrorInvalidValue);               \
  }

#define INT8MM_RETURN_IF_ERROR(expr)                          \
  do {                                                        \
    cudaError_t err_ = (expr);                                \
    if (err_ != cudaSuccess) return static_cast<int>(err_);   \
  } while (0)
