// int8mm CUDA library: the C ABI that Python (ctypes) calls. Links no torch library.
//
// Every function takes device pointers and the CUDA stream to launch on, returns 0 on success or a
// cudaError_t value (int8mm_error_string() describes it), and never synchronises with the host, so the
// calls can be captured in a CUDA graph. Math: docs/SPEC.md (LLM.int8() with fp16 outlier decomposition).
#pragma once
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define INT8MM_ABI_VERSION 3
// the library is built with hidden visibility: only these functions are exported
#define INT8MM_API __attribute__((visibility("default")))

// x / bias / out element types
enum int8mm_dtype { INT8MM_FP16 = 0, INT8MM_BF16 = 1, INT8MM_FP32 = 2 };

INT8MM_API int int8mm_abi_version(void);
INT8MM_API const char* int8mm_error_string(int code);

// How many int32 of scratch the activation passes need for an [M, K] input (zeroed by the library).
INT8MM_API int64_t int8mm_workspace_ints(int64_t M, int64_t K);

// q_x int8 [M, K] (contiguous), s_x fp32 [M], outlier_cols int32 [K] (ascending, first *count valid),
// outlier_count int32 [1]. x is [M, K] with strides (elements). Its last kernel lets a kernel launched after it with
// programmatic dependent launch start early (griddepcontrol.launch_dependents): such a kernel must execute
// griddepcontrol.wait before it reads these outputs. Plain launches after it are unaffected.
INT8MM_API int int8mm_quantize_activations(const void* x, int x_dtype, int64_t M, int64_t K, int64_t stride_xm,
                                int64_t stride_xk, float threshold, int32_t* workspace, int8_t* q_x, float* s_x,
                                int32_t* outlier_cols, int32_t* outlier_count, void* stream);

// out int32 [M, N] = a [M, K] @ b [N, K]^T (both int8, row-major contiguous), exact.
INT8MM_API int int8mm_int8_matmul(const int8_t* a, const int8_t* b, int32_t* out, int64_t M, int64_t N, int64_t K,
                       void* stream);

// The fused forward: out [M, N] (x's dtype, contiguous) = int8 part * s_x * s_w / 127^2
// + x[:, O] @ (q_w[:, O] * s_w / 127)^T + bias. Uses the same buffers as int8mm_quantize_activations.
// Its arguments come packed in one struct, every field 8 bytes, in this order: ctypes converts each argument of
// a call on its own, 1.6 us for nineteen of them against 0.5 us packed (2-core AMD EPYC), on every call.
struct int8mm_linear_call {
  int64_t x, x_dtype, M, K, stride_xm, stride_xk;  // activations [M, K] with element strides, int8mm_dtype
  int64_t q_w, s_w, N, bias, bias_dtype;           // the layer: int8 [N, K] contiguous, fp32 [N], bias [N] or 0
  int64_t workspace, q_x, s_x, outlier_cols, outlier_count;  // as int8mm_quantize_activations takes them
  int64_t out, stream;                             // [M, N] in x's dtype; a cudaStream_t
  int64_t flags;                                   // INT8MM_CALL_* bits; any other bit set is refused
  double threshold;
};
// Decode (M <= 16, K > 0): launch the GEMV with programmatic dependent launch after the quantization kernel (it
// starts early and waits for that kernel on the GPU). Ignored below compute capability 9.0.
#define INT8MM_CALL_PROGRAMMATIC 1
INT8MM_API int int8mm_linear_call_size(void);
INT8MM_API int int8mm_int8_linear(const struct int8mm_linear_call* call);

#ifdef __cplusplus
}
#endif
