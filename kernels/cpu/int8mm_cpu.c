// int8mm CPU kernels: the SPEC's activation quantization in two passes over x, and for decode-sized M a
// fused int8 GEMV + epilogue, behind a plain C ABI (called through ctypes; links no torch library).
//
// Exactness: the quantized values and scales are bit-identical to the reference backend (fp32 math without
// fast-math: one true division per row, x * r rounded half to even by rintf, clamped to [-127, 127]); the
// int8 dot products accumulate exactly in int32. Built with -ffp-contract=off so no FMA changes a rounding.
#include <math.h>
#include <stdlib.h>
#include <stdint.h>
#include <string.h>
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#include <immintrin.h>
#define INT8MM_VNNI 1
#endif

#define INT8MM_CPU_ABI_VERSION 1
#define INT8_MAX_F 127.0f

enum { DTYPE_FP16 = 0, DTYPE_BF16 = 1, DTYPE_FP32 = 2 };
enum { OK = 0, ERR_ARGUMENT = 1, ERR_DTYPE = 2, ERR_MEMORY = 3 };

static inline float load_value(const void* base, int dtype, int64_t offset) {
  switch (dtype) {
    case DTYPE_FP16: return (float)((const _Float16*)base)[offset];
    case DTYPE_BF16: {
      uint32_t bits = (uint32_t)((const uint16_t*)base)[offset] << 16;
      float value;
      memcpy(&value, &bits, sizeof value);
      return value;
    }
    default: return ((const float*)base)[offset];
  }
}

static inline void store_value(void* base, int dtype, int64_t offset, float value) {
  switch (dtype) {
    case DTYPE_FP16: ((_Float16*)base)[offset] = (_Float16)value; return;  // round to nearest even
    case DTYPE_BF16: {
      uint32_t bits;
      memcpy(&bits, &value, sizeof bits);
      uint16_t out = (value != value) ? (uint16_t)((bits >> 16) | 0x40)  // a quiet NaN stays NaN
                                      : (uint16_t)((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
      ((uint16_t*)base)[offset] = out;
      return;
    }
    default: ((float*)base)[offset] = value;
  }
}

static int valid_dtype(int dtype) { return dtype == DTYPE_FP16 || dtype == DTYPE_BF16 || dtype == DTYPE_FP32; }

// Pass 1 (per row): s_x[m] = max |x[m,k]| over the elements below the threshold (all when t == 0), NaN if
// the row holds NaN; col_flags[k] |= (|x[m,k]| >= t). Pass 2: the outlier list, then q_x.
static void quantize(const void* x, int dtype, int64_t M, int64_t K, int64_t sxm, int64_t sxk, float threshold,
                     int8_t* q_x, float* s_x, int32_t* outlier_cols, int32_t* outlier_count, uint8_t* col_flags) {
  const int split = threshold > 0.0f;
  memset(col_flags, 0, (size_t)K);
  for (int64_t m = 0; m < M; ++m) {
    float scale = 0.0f;
    int saw_nan = 0;
    for (int64_t k = 0; k < K; ++k) {
      float a = fabsf(load_value(x, dtype, m * sxm + k * sxk));
      if (a != a) {
        saw_nan = 1;
      } else if (split && a >= threshold) {
        col_flags[k] = 1;
      } else if (a > scale) {
        scale = a;
      }
    }
    s_x[m] = saw_nan ? NAN : scale;
  }
  int32_t count = 0;
  for (int64_t k = 0; k < K; ++k)
    if (col_flags[k]) outlier_cols[count++] = (int32_t)k;
  *outlier_count = count;
  // the unused tail is cleared: an op's outputs are a function of its inputs (opcheck compares runs)
  if (count < K) memset(outlier_cols + count, 0, sizeof(int32_t) * (size_t)(K - count));
  for (int64_t m = 0; m < M; ++m) {
    const float s = s_x[m];
    // 127 / s as one fp32 division; 0 for a zero or non-finite scale (that row quantizes to zeros)
    const float r = (s > 0.0f && isfinite(s)) ? INT8_MAX_F / s : 0.0f;
    int8_t* q_row = q_x + m * K;
    for (int64_t k = 0; k < K; ++k) {
      float v = load_value(x, dtype, m * sxm + k * sxk) * r;
      v = (v != v) ? 0.0f : rintf(v);  // NaN (0 * inf, NaN * 0) -> 0; rintf rounds half to even
      v = v > INT8_MAX_F ? INT8_MAX_F : (v < -INT8_MAX_F ? -INT8_MAX_F : v);
      q_row[k] = (int8_t)v;
    }
    for (int32_t i = 0; i < count; ++i) q_row[outlier_cols[i]] = 0;
  }
}

// the fused GEMV serves at most this many rows of x per weight row (one accumulator each)
#define DECODE_MAX_M 16

// acc[m] = sum_k a[m, k] * w[k] (exact in int32) for the M <= DECODE_MAX_M rows of a (row-major [M, K]).
#ifdef INT8MM_VNNI
// vpdpbusd multiplies unsigned by signed bytes: a + 128 (a ^ 0x80) is unsigned, and
// sum((a + 128) * w) - 128 * sum(w) = sum(a * w), with sum(w) from the same instruction on a vector of ones.
#define ROW_BLOCK 4  // rows of x per sweep over a weight row: their accumulators stay in registers
static void dot_rows(const int8_t* a, int64_t M, const int8_t* w, int64_t K, int32_t* acc) {
  const __m512i ones = _mm512_set1_epi8(1), flip = _mm512_set1_epi8((char)0x80);
  __m512i w_sum = _mm512_setzero_si512();
  for (int64_t k = 0; k < K; k += 64) {
    const __mmask64 mask = K - k >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << (K - k)) - 1);
    w_sum = _mm512_dpbusd_epi32(w_sum, ones, _mm512_maskz_loadu_epi8(mask, w + k));
  }
  // the unsigned sums may pass 2^31 for large K: vpdpbusd wraps, so finish modulo 2^32 (in unsigned, where C
  // defines wrapping); the true result fits in int32 (K <= 133,143)
  const uint32_t offset = 128u * (uint32_t)_mm512_reduce_add_epi32(w_sum);
  for (int64_t m0 = 0; m0 < M; m0 += ROW_BLOCK) {
    const int64_t rows = M - m0 < ROW_BLOCK ? M - m0 : ROW_BLOCK;
    __m512i s0 = _mm512_setzero_si512(), s1 = s0, s2 = s0, s3 = s0;
    const int8_t* a0 = a + m0 * K;
    for (int64_t k = 0; k < K; k += 64) {
      const __mmask64 mask = K - k >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << (K - k)) - 1);
      const __m512i wv = _mm512_maskz_loadu_epi8(mask, w + k);  // masked-off lanes: w is 0 there
#define ROW(r, sum) \
      if (rows > r) sum = _mm512_dpbusd_epi32(sum, _mm512_xor_si512(_mm512_maskz_loadu_epi8(mask, a0 + r * K + k), flip), wv)
      ROW(0, s0); ROW(1, s1); ROW(2, s2); ROW(3, s3);
#undef ROW
    }
    const __m512i sums[ROW_BLOCK] = {s0, s1, s2, s3};
    for (int64_t r = 0; r < rows; ++r) acc[m0 + r] = (int32_t)((uint32_t)_mm512_reduce_add_epi32(sums[r]) - offset);
  }
}
#else
static void dot_rows(const int8_t* a, int64_t M, const int8_t* w, int64_t K, int32_t* acc) {
  for (int64_t m = 0; m < M; ++m) {
    const int8_t* row = a + m * K;
    int32_t sum = 0;
    for (int64_t k = 0; k < K; ++k) sum += (int32_t)row[k] * (int32_t)w[k];
    acc[m] = sum;
  }
}
#endif

int int8mm_cpu_abi_version(void) { return INT8MM_CPU_ABI_VERSION; }

// workspace: K bytes (column flags)
int int8mm_cpu_quantize_activations(const void* x, int dtype, int64_t M, int64_t K, int64_t sxm, int64_t sxk,
                                    float threshold, int8_t* q_x, float* s_x, int32_t* outlier_cols,
                                    int32_t* outlier_count, uint8_t* workspace) {
  if (M < 0 || K < 0 || !(threshold >= 0.0f)) return ERR_ARGUMENT;
  if (!valid_dtype(dtype)) return ERR_DTYPE;
  quantize(x, dtype, M, K, sxm, sxk, threshold, q_x, s_x, outlier_cols, outlier_count, workspace);
  return OK;
}

// y[m, n] = acc * s_x[m] * (s_w[n] / 127^2) + sum_{c in O} x[m, c] * (q_w[n, c] * (s_w[n] / 127)) + b[n], with
// acc the exact int32 dot product, in fp32, stored in out_dtype. q_w is row-major [N, K]; out row-major [M, N].
// The weight is read once: each thread takes a run of weight rows and serves every row of x from them.
int int8mm_cpu_int8_linear(const void* x, int dtype, int64_t M, int64_t K, int64_t sxm, int64_t sxk,
                           const int8_t* q_w, const float* s_w, int64_t N, const void* bias, int bias_dtype,
                           float threshold, int8_t* q_x, float* s_x, int32_t* outlier_cols, int32_t* outlier_count,
                           uint8_t* workspace, void* out, int num_threads) {
  if (M < 0 || M > DECODE_MAX_M || N < 0 || K < 0 || !(threshold >= 0.0f) || num_threads < 1) return ERR_ARGUMENT;
  if (!valid_dtype(dtype) || (bias != NULL && !valid_dtype(bias_dtype))) return ERR_DTYPE;
  quantize(x, dtype, M, K, sxm, sxk, threshold, q_x, s_x, outlier_cols, outlier_count, workspace);
  const int32_t count = *outlier_count;
  const float int_scale = 1.0f / (INT8_MAX_F * INT8_MAX_F);
  const float outlier_scale = 1.0f / INT8_MAX_F;
#pragma omp parallel for num_threads(num_threads) schedule(static) if (N * K >= 65536)
  for (int64_t n = 0; n < N; ++n) {
    const int8_t* w_row = q_w + n * K;
    int32_t acc[DECODE_MAX_M];
    dot_rows(q_x, M, w_row, K, acc);
    const float row_scale = s_w[n] * int_scale;
    const float col_scale = s_w[n] * outlier_scale;
    const float b = bias != NULL ? load_value(bias, bias_dtype, n) : 0.0f;
    for (int64_t m = 0; m < M; ++m) {
      float y = (float)acc[m] * s_x[m] * row_scale;
      if (count > 0) {
        float extra = 0.0f;
        for (int32_t i = 0; i < count; ++i) {
          const int32_t c = outlier_cols[i];
          extra += load_value(x, dtype, m * sxm + c * sxk) * ((float)w_row[c] * col_scale);
        }
        y += extra;
      }
      store_value(out, dtype, m * N + n, y + b);
    }
  }
  return OK;
}
