// int8mm CPU kernels: the SPEC's activation quantization in two passes over x (AVX-512 on contiguous rows,
// rows in parallel for large inputs), a fused int8 GEMV + epilogue for decode-sized M, and the integer part of
// the epilogue for a GEMM done elsewhere (oneDNN's, or gemm.c's), behind a plain C ABI (called through ctypes;
// links no torch library).
//
// Exactness: the quantized values and scales are bit-identical to the reference backend (fp32 math without
// fast-math: one true division per row, x * r rounded half to even by rintf, clamped to [-127, 127]); the
// int8 dot products accumulate exactly in int32. Built with -ffp-contract=off so no FMA changes a rounding.
#include <math.h>
#include <stdlib.h>
#include <stdint.h>
#include <string.h>
#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define INT8MM_VNNI 1
#endif

#define INT8MM_CPU_ABI_VERSION 5
#define INT8_MAX_F 127.0f

enum { DTYPE_FP16 = 0, DTYPE_BF16 = 1, DTYPE_FP32 = 2 };
enum { OK = 0, ERR_ARGUMENT = 1, ERR_DTYPE = 2, ERR_MEMORY = 3 };

// fp16 values, read exactly and written rounded to nearest even. The C type _Float16 does both, but x86 GCC has it
// only from GCC 12 (clang from 15): with the gcc of Ubuntu 22.04, Debian 11 or RHEL 8/9 the library failed to build
// and CPU users got the reference backend. Without it, F16C's instructions (any AVX2 CPU) or else integer code: the
// same bits, NaNs included (quieted, the payload's top bits kept, as vcvtph2ps / vcvtps2ph do). -DINT8MM_NO_FLOAT16
// takes that path with any compiler: tests/test_backend_cpu.py compares it with _Float16's bit for bit.
#if defined(__FLT16_MAX__) && !defined(INT8MM_NO_FLOAT16)
static inline float load_half(const void* base, int64_t offset) { return (float)((const _Float16*)base)[offset]; }
static inline void store_half(void* base, int64_t offset, float value) { ((_Float16*)base)[offset] = (_Float16)value; }
#else
#if defined(__F16C__)
#include <immintrin.h>
static inline float half_to_float(uint16_t h) { return _cvtsh_ss(h); }
static inline uint16_t float_to_half(float value) { return _cvtss_sh(value, _MM_FROUND_TO_NEAREST_INT); }
#else
static inline float half_to_float(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000) << 16, exponent = (h >> 10) & 0x1F, mantissa = h & 0x3FF;
  if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24, exact in fp32
    const float magnitude = (float)mantissa * 0x1p-24f;
    return sign ? -magnitude : magnitude;
  }
  uint32_t bits = sign | (mantissa << 13);
  if (exponent == 0x1F) bits |= 0x7F800000u | (mantissa ? 0x400000u : 0);  // inf; a NaN quieted
  else bits |= (exponent + 127 - 15) << 23;
  float value;
  memcpy(&value, &bits, sizeof value);
  return value;
}

// value >> shift (1..31), rounded to nearest, ties to even
static inline uint32_t shift_round_even(uint32_t value, uint32_t shift) {
  const uint32_t half = 1u << (shift - 1), rest = value & ((half << 1) - 1), kept = value >> shift;
  return kept + (rest > half || (rest == half && (kept & 1)));
}

static inline uint16_t float_to_half(float value) {
  uint32_t bits;
  memcpy(&bits, &value, sizeof bits);
  const uint32_t sign = (bits >> 16) & 0x8000, magnitude = bits & 0x7FFFFFFF;
  if (magnitude > 0x7F800000u) return (uint16_t)(sign | 0x7E00 | ((magnitude >> 13) & 0x3FF));  // NaN: quiet
  if (magnitude <= 0x33000000u) return (uint16_t)sign;  // up to 2^-25 (half the smallest subnormal): zero
  if (magnitude < 0x38800000u)  // below 2^-14: a subnormal, the 24-bit significand shifted down to units of 2^-24
    return (uint16_t)(sign | shift_round_even(0x800000u | (magnitude & 0x7FFFFF), 126 - (magnitude >> 23)));
  // rebiased, 13 bits rounded off: a carry runs into the exponent; from 65520 up (inf too) that reaches inf
  const uint32_t h = shift_round_even(magnitude - ((127u - 15) << 23), 13);
  return (uint16_t)(sign | (h < 0x7C00 ? h : 0x7C00));
}
#endif
static inline float load_half(const void* base, int64_t offset) {
  return half_to_float(((const uint16_t*)base)[offset]);
}
static inline void store_half(void* base, int64_t offset, float value) {
  ((uint16_t*)base)[offset] = float_to_half(value);
}
#endif

static inline float load_value(const void* base, int dtype, int64_t offset) {
  switch (dtype) {
    case DTYPE_FP16: return load_half(base, offset);
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
    case DTYPE_FP16: store_half(base, offset, value); return;
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

// rows quantized in parallel may raise the same column's flag: a relaxed atomic store, no lock
static inline void set_flag(uint8_t* flag) { __atomic_store_n(flag, 1, __ATOMIC_RELAXED); }

static int valid_dtype(int dtype) { return dtype == DTYPE_FP16 || dtype == DTYPE_BF16 || dtype == DTYPE_FP32; }

#ifdef INT8MM_VNNI
// 16 values of a contiguous row as fp32 (exact conversions), the tail lanes (mask off) 0
static inline __m512 load16(const void* base, int dtype, int64_t offset, __mmask16 mask) {
  switch (dtype) {
    case DTYPE_FP16: return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, (const uint16_t*)base + offset));
    case DTYPE_BF16: {
      const __m512i wide = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, (const uint16_t*)base + offset));
      return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
    }
    default: return _mm512_maskz_loadu_ps(mask, (const float*)base + offset);
  }
}

static inline __mmask16 tail_mask16(int64_t left) {
  return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
}

// Pass 1 of one contiguous row, 16 lanes at a time; the same decisions as the scalar loop below, lane by lane
// (max is exact, so the order of the maxima does not matter).
static float row_stats_vector(const void* x, int dtype, int64_t row, int64_t K, float threshold, int split,
                              uint8_t* col_flags) {
  const __m512 abs_mask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7FFFFFFF));
  const __m512 t = _mm512_set1_ps(threshold);
  __m512 scale = _mm512_setzero_ps();
  __mmask16 saw_nan = 0;
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 lanes = tail_mask16(K - k);
    const __m512 a = _mm512_and_ps(load16(x, dtype, row + k, lanes), abs_mask);
    saw_nan |= _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q);
    const __mmask16 outlier = split ? _mm512_cmp_ps_mask(a, t, _CMP_GE_OQ) : 0;  // NaN >= t is false
    if (outlier)
      for (int i = 0; i < 16; ++i)
        if (outlier >> i & 1) set_flag(col_flags + k + i);
    // a NaN lane may poison this lane's maximum: the row's scale is NaN then anyway
    scale = _mm512_mask_max_ps(scale, (__mmask16)~outlier, scale, a);
  }
  return saw_nan ? NAN : _mm512_reduce_max_ps(scale);
}

// Pass 2 of one contiguous row: round_half_even(x * r) clamped to [-127, 127], NaN -> 0, as int8.
static void row_quantize_vector(const void* x, int dtype, int64_t row, int64_t K, float r, int8_t* q_row) {
  const __m512 r_vec = _mm512_set1_ps(r), hi = _mm512_set1_ps(INT8_MAX_F), lo = _mm512_set1_ps(-INT8_MAX_F);
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 lanes = tail_mask16(K - k);
    __m512 v = _mm512_mul_ps(load16(x, dtype, row + k, lanes), r_vec);
    v = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(v, v, _CMP_ORD_Q), v);  // NaN -> 0
    v = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);  // half to even, as rintf
    v = _mm512_min_ps(_mm512_max_ps(v, lo), hi);
    _mm_mask_storeu_epi8(q_row + k, lanes, _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(v)));
  }
}
#endif

// s_x = max |x[row, k]| over the elements below the threshold (all when t == 0), NaN if the row holds NaN;
// col_flags[k] = 1 where |x[row, k]| >= t.
static float row_stats(const void* x, int dtype, int64_t row, int64_t sxk, int64_t K, float threshold,
                       uint8_t* col_flags) {
  const int split = threshold > 0.0f;
#ifdef INT8MM_VNNI
  if (sxk == 1) return row_stats_vector(x, dtype, row, K, threshold, split, col_flags);
#endif
  float scale = 0.0f;
  int saw_nan = 0;
  for (int64_t k = 0; k < K; ++k) {
    float a = fabsf(load_value(x, dtype, row + k * sxk));
    if (a != a) {
      saw_nan = 1;
    } else if (split && a >= threshold) {
      set_flag(col_flags + k);
    } else if (a > scale) {
      scale = a;
    }
  }
  return saw_nan ? NAN : scale;
}

static void row_quantize(const void* x, int dtype, int64_t row, int64_t sxk, int64_t K, float r, int8_t* q_row) {
#ifdef INT8MM_VNNI
  if (sxk == 1) {
    row_quantize_vector(x, dtype, row, K, r, q_row);
    return;
  }
#endif
  for (int64_t k = 0; k < K; ++k) {
    float v = load_value(x, dtype, row + k * sxk) * r;
    v = (v != v) ? 0.0f : rintf(v);  // NaN (0 * inf, NaN * 0) -> 0; rintf rounds half to even
    v = v > INT8_MAX_F ? INT8_MAX_F : (v < -INT8_MAX_F ? -INT8_MAX_F : v);
    q_row[k] = (int8_t)v;
  }
}

// a thread team costs microseconds: rows are quantized, and [M, N] scaled, in parallel only past this many elements
#define PARALLEL_MIN_ELEMENTS 262144

static void quantize_row(const void* x, int dtype, int64_t row, int64_t sxk, int64_t K, float s, int32_t count,
                         const int32_t* outlier_cols, int8_t* q_row) {
  // 127 / s as one fp32 division; 0 for a zero or non-finite scale (that row quantizes to zeros)
  const float r = (s > 0.0f && isfinite(s)) ? INT8_MAX_F / s : 0.0f;
  row_quantize(x, dtype, row, sxk, K, r, q_row);
  for (int32_t i = 0; i < count; ++i) q_row[outlier_cols[i]] = 0;
}

// Pass 1 (per row): the row scales and column flags. Pass 2: the outlier list, then q_x (outlier columns 0).
// Rows run in parallel only when asked and worth it; the plain loops avoid entering OpenMP at all.
static void quantize(const void* x, int dtype, int64_t M, int64_t K, int64_t sxm, int64_t sxk, float threshold,
                     int8_t* q_x, float* s_x, int32_t* outlier_cols, int32_t* outlier_count, uint8_t* col_flags,
                     int num_threads) {
  const int parallel = M > 1 && M * K >= PARALLEL_MIN_ELEMENTS && num_threads > 1;
  memset(col_flags, 0, (size_t)K);
  if (parallel) {
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t m = 0; m < M; ++m) s_x[m] = row_stats(x, dtype, m * sxm, sxk, K, threshold, col_flags);
  } else {
    for (int64_t m = 0; m < M; ++m) s_x[m] = row_stats(x, dtype, m * sxm, sxk, K, threshold, col_flags);
  }
  int32_t count = 0;
  for (int64_t k = 0; k < K; ++k)
    if (col_flags[k]) outlier_cols[count++] = (int32_t)k;
  *outlier_count = count;
  // the unused tail is cleared: an op's outputs are a function of its inputs (opcheck compares runs)
  if (count < K) memset(outlier_cols + count, 0, sizeof(int32_t) * (size_t)(K - count));
  if (parallel) {
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t m = 0; m < M; ++m) quantize_row(x, dtype, m * sxm, sxk, K, s_x[m], count, outlier_cols, q_x + m * K);
  } else {
    for (int64_t m = 0; m < M; ++m) quantize_row(x, dtype, m * sxm, sxk, K, s_x[m], count, outlier_cols, q_x + m * K);
  }
}

// the fused GEMV serves at most this many rows of x per weight row (one accumulator each)
#define DECODE_MAX_M 16

#ifdef INT8MM_VNNI
// vpdpbusd multiplies unsigned by signed bytes. The weight takes the unsigned side: w + 128 (w ^ 0x80), and
// sum((w + 128) * a) - 128 * sum(a) = sum(a * w), with sum(a) per row of x computed once per call (exact for
// every int8 w, -128 included). The unsigned sums may pass 2^31 for large K: vpdpbusd wraps, so the result is
// finished modulo 2^32 (in unsigned, where C defines wrapping); the true result fits in int32 (K <= 132,104).
#define W_BLOCK 8  // weight rows per block: eight independent accumulator chains at M = 1, x's loads shared
#define X_BLOCK 4  // rows of x per sweep: at most 16 accumulators stay in registers

static inline __mmask64 tail_mask64(int64_t left) { return left >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << left) - 1); }

// the four sums of four vectors, in one 128-bit vector (a shorter tree than four separate reductions)
static inline __m128i reduce4(__m512i a, __m512i b, __m512i c, __m512i d) {
  const __m512i ab = _mm512_add_epi32(_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b));
  const __m512i cd = _mm512_add_epi32(_mm512_unpacklo_epi32(c, d), _mm512_unpackhi_epi32(c, d));
  const __m512i abcd = _mm512_add_epi32(_mm512_unpacklo_epi64(ab, cd), _mm512_unpackhi_epi64(ab, cd));
  const __m256i half = _mm256_add_epi32(_mm512_castsi512_si256(abcd), _mm512_extracti64x4_epi64(abcd, 1));
  return _mm_add_epi32(_mm256_castsi256_si128(half), _mm256_extracti128_si256(half, 1));
}

// sum_k a[m, k] for each row of x (a row-major [M, K])
static void row_sums(const int8_t* a, int64_t M, int64_t K, int32_t* sums) {
  const __m512i ones = _mm512_set1_epi8(1);
  for (int64_t m = 0; m < M; ++m) {
    __m512i s = _mm512_setzero_si512();
    for (int64_t k = 0; k < K; k += 64)
      s = _mm512_dpbusd_epi32(s, ones, _mm512_maskz_loadu_epi8(tail_mask64(K - k), a + m * K + k));
    sums[m] = _mm512_reduce_add_epi32(s);
  }
}

// Weight rows of a small layer are short streams (576 bytes: nine cache lines) that the hardware prefetchers
// hardly pick up; each step also asks for the same bytes of the rows two blocks ahead, into L2 (T1: more misses
// in flight than L1 allows). On the 2-core AMD EPYC, weights not in cache (what a model's layers see), median
// of 5 against T0 prefetches: 576 x 576 16.5 -> 10.8 us, 4096 x 4096 645 -> 533 us; a 576 x 576 weight already
// in L2 pays 5.7 -> 6.7 us (benchmarks/cpu_gemv_timer.c; results/2026-11-30-cpu-epyc-c/gemv-prefetch/).
// The address is computed as an integer: past the weight's end it is never a pointer C would call out of
// bounds, and a prefetch of it cannot fault.
#define PREFETCH_AHEAD (2 * W_BLOCK * K)

// One 64-byte step of a tile: W weight vectors (flipped to unsigned), each multiplied into X rows of x.
// masked-off lanes load 0 from x, so whatever w holds there does not count.
#define DOT_STEP(k, mask)                                                                                      \
  do {                                                                                                         \
    __m512i wv[W_BLOCK];                                                                                       \
    for (int j = 0; j < W; ++j) {                                                                              \
      wv[j] = _mm512_xor_si512(_mm512_maskz_loadu_epi8(mask, w[j] + (k)), flip);                               \
      _mm_prefetch((const char*)((uintptr_t)(w[j] + (k)) + PREFETCH_AHEAD), _MM_HINT_T1);                      \
    }                                                                                                          \
    for (int i = 0; i < X; ++i) {                                                                              \
      const __m512i av = _mm512_maskz_loadu_epi8(mask, a + i * K + (k));                                       \
      for (int j = 0; j < W; ++j) s[i][j] = _mm512_dpbusd_epi32(s[i][j], wv[j], av);                          \
    }                                                                                                          \
  } while (0)

// sums[i][j] = sum_k (w_j[k] + 128) * a_i[k] for X rows of a and W (4 or 8) weight rows w_j; X and W are
// compile-time constants once inlined, so the X * W <= 16 accumulators live in registers
static inline __attribute__((always_inline)) void dot_tile(const int8_t* a, int64_t K, const int8_t* const* w,
                                                           const int X, const int W, int32_t sums[X_BLOCK][W_BLOCK]) {
  const __m512i flip = _mm512_set1_epi8((char)0x80);
  __m512i s[X_BLOCK][W_BLOCK];
  for (int i = 0; i < X; ++i)
    for (int j = 0; j < W; ++j) s[i][j] = _mm512_setzero_si512();
  int64_t k = 0;
  for (; k + 64 <= K; k += 64) DOT_STEP(k, ~(__mmask64)0);  // full steps: plain loads
  if (k < K) DOT_STEP(k, tail_mask64(K - k));
  for (int i = 0; i < X; ++i)
    for (int j = 0; j < W; j += 4)
      _mm_storeu_si128((__m128i*)(sums[i] + j), reduce4(s[i][j], s[i][j + 1], s[i][j + 2], s[i][j + 3]));
}
#undef DOT_STEP

// acc[m * W_BLOCK + j] = sum_k a[m, k] * w_j[k] for the weight rows w + j * K (j < rows_w) and the M rows of a
static void dot_block(const int8_t* a, int64_t M, const int32_t* a_sums, const int8_t* w, int64_t rows_w,
                      int64_t K, int32_t* acc) {
  // a short last block repeats its last weight row (its results are dropped): one code path, no branches
  const int8_t* rows[W_BLOCK];
  for (int j = 0; j < W_BLOCK; ++j) rows[j] = w + (j < rows_w ? j : rows_w - 1) * K;
  for (int64_t m0 = 0; m0 < M; m0 += X_BLOCK) {
    int32_t sums[X_BLOCK][W_BLOCK];
    const int8_t* a0 = a + m0 * K;
    const int64_t rows_x = M - m0 < X_BLOCK ? M - m0 : X_BLOCK;
    switch (rows_x) {  // constant row counts: each case compiles its own tile
      case 1: dot_tile(a0, K, rows, 1, 8, sums); break;
      case 2: dot_tile(a0, K, rows, 2, 8, sums); break;
      default: {  // 3 or 4 rows of x: two tiles of four weight rows
        int32_t half[X_BLOCK][W_BLOCK];
        if (rows_x == 3) {
          dot_tile(a0, K, rows, 3, 4, sums);
          dot_tile(a0, K, rows + 4, 3, 4, half);
        } else {
          dot_tile(a0, K, rows, 4, 4, sums);
          dot_tile(a0, K, rows + 4, 4, 4, half);
        }
        for (int64_t i = 0; i < rows_x; ++i) memcpy(sums[i] + 4, half[i], 4 * sizeof(int32_t));
      }
    }
    for (int64_t i = 0; i < rows_x; ++i) {
      const uint32_t offset = 128u * (uint32_t)a_sums[m0 + i];
      for (int64_t j = 0; j < rows_w; ++j) acc[(m0 + i) * W_BLOCK + j] = (int32_t)((uint32_t)sums[i][j] - offset);
    }
  }
}
#else
// Without VNNI the dot products are gemm.c's tiles (AVX2 where present): a row of x against one weight row at a
// time, as before, ran 16 rows of a 4096 x 4096 layer on one thread 2.2x slower than gemm.c's first form and
// 1.3x slower than fp32 (44.6 against 20.5 and 35.0 ms, Zen 1 EPYC).
#define W_BLOCK 6  // two of gemm.c's 3-row tiles, or at M = 1 its one-row tile of six (six independent sums)

void int8mm_gemm_rows(const int8_t* a, int64_t M, int64_t K, int64_t lda, const int8_t* w, int64_t rows,
                      int64_t ldw, int32_t* out, int64_t ldo);  // gemm.c

static void row_sums(const int8_t* a, int64_t M, int64_t K, int32_t* sums) {
  (void)a, (void)K;
  for (int64_t m = 0; m < M; ++m) sums[m] = 0;  // unused: the sums need no offset
}

static void dot_block(const int8_t* a, int64_t M, const int32_t* a_sums, const int8_t* w, int64_t rows_w,
                      int64_t K, int32_t* acc) {
  (void)a_sums;
  int8mm_gemm_rows(a, M, K, K, w, rows_w, K, acc, W_BLOCK);
  for (int64_t m = 0; m < M; ++m)  // a short last block: the lanes computed and dropped read zeros, not garbage
    for (int64_t j = rows_w; j < W_BLOCK; ++j) acc[m * W_BLOCK + j] = 0;
}
#endif

int int8mm_cpu_abi_version(void) { return INT8MM_CPU_ABI_VERSION; }

// workspace: K bytes (column flags)
int int8mm_cpu_quantize_activations(const void* x, int dtype, int64_t M, int64_t K, int64_t sxm, int64_t sxk,
                                    float threshold, int8_t* q_x, float* s_x, int32_t* outlier_cols,
                                    int32_t* outlier_count, uint8_t* workspace, int num_threads) {
  if (M < 0 || K < 0 || !(threshold >= 0.0f) || num_threads < 1) return ERR_ARGUMENT;
  if (!valid_dtype(dtype)) return ERR_DTYPE;
  quantize(x, dtype, M, K, sxm, sxk, threshold, q_x, s_x, outlier_cols, outlier_count, workspace, num_threads);
  return OK;
}

// out[m, n] = acc[m, n] * s_x[m] * (s_w[n] * (1 / 127^2)) (+ b[n]) in fp32, stored in out_dtype: the integer part
// of the epilogue for a GEMM done elsewhere, in the reference's order of operations (so its results are the
// reference's bit for bit), in one pass over [M, N] instead of torch's two or three. acc and out are row-major.
int int8mm_cpu_scale_int32(const int32_t* acc, int64_t M, int64_t N, const float* s_x, const float* s_w,
                           const void* bias, int bias_dtype, void* out, int out_dtype, int num_threads) {
  if (M < 0 || N < 0 || num_threads < 1) return ERR_ARGUMENT;
  if (!valid_dtype(out_dtype) || (bias != NULL && !valid_dtype(bias_dtype))) return ERR_DTYPE;
  const float int_scale = 1.0f / (INT8_MAX_F * INT8_MAX_F);
#pragma omp parallel for num_threads(num_threads) schedule(static) if (M * N >= PARALLEL_MIN_ELEMENTS)
  for (int64_t m = 0; m < M; ++m) {
    const float sx = s_x[m];
    for (int64_t n = 0; n < N; ++n) {
      float y = (float)acc[m * N + n] * sx * (s_w[n] * int_scale);
      if (bias != NULL) y += load_value(bias, bias_dtype, n);
      store_value(out, out_dtype, m * N + n, y);
    }
  }
  return OK;
}

// y[m, n] = acc * s_x[m] * (s_w[n] / 127^2) + sum_{c in O} x[m, c] * (q_w[n, c] * (s_w[n] / 127)) + b[n], with
// acc the exact int32 dot product, in fp32, stored in out_dtype. q_w is row-major [N, K]; out row-major [M, N].
// The weight is read once: each thread takes runs of W_BLOCK weight rows and serves every row of x from them.
struct linear_args {
  const void* x;
  int dtype;
  int64_t M, K, sxm, sxk, N;
  const int8_t* q_w;
  const float* s_w;
  const void* bias;
  int bias_dtype;
  const int8_t* q_x;
  const float* s_x;
  const int32_t* x_sums;
  const int32_t* outlier_cols;
  int32_t count;
  void* out;
};

// out[offset + j] = y[j] for j < count, in dtype (the switch taken once per run, not per value)
static void store_run(void* out, int dtype, int64_t offset, const float* y, int64_t count) {
  switch (dtype) {
    case DTYPE_FP16:
      for (int64_t j = 0; j < count; ++j) store_half(out, offset + j, y[j]);
      return;
    case DTYPE_FP32:
      memcpy((float*)out + offset, y, sizeof(float) * (size_t)count);
      return;
    default:
      for (int64_t j = 0; j < count; ++j) store_value(out, dtype, offset + j, y[j]);
  }
}

// The outputs of weight rows n0 .. n0 + W_BLOCK - 1 (fewer at the end) for every row of x: per output the scalar
// formula above, in this order: acc * s_x * row scale, + the outlier term (summed over the columns in their order,
// from 0), + the bias (0 without one).
#ifdef INT8MM_VNNI
// the outlier term of row m of x for the eight weight rows w_rows, one lane each
static inline __m256 outlier_term(const struct linear_args* p, int64_t m, const int8_t* const* w_rows,
                                  __m256 col_scale) {
  __m256 sum = _mm256_setzero_ps();
  for (int32_t i = 0; i < p->count; ++i) {
    const int32_t c = p->outlier_cols[i];
    const __m256 x_c = _mm256_set1_ps(load_value(p->x, p->dtype, m * p->sxm + c * p->sxk));
    const __m256i w = _mm256_setr_epi32(w_rows[0][c], w_rows[1][c], w_rows[2][c], w_rows[3][c], w_rows[4][c],
                                        w_rows[5][c], w_rows[6][c], w_rows[7][c]);
    sum = _mm256_add_ps(sum, _mm256_mul_ps(x_c, _mm256_mul_ps(_mm256_cvtepi32_ps(w), col_scale)));
  }
  return sum;
}

// The eight outputs of a block in one AVX vector: the same fp32 operations, lane by lane, as the portable loop
// below (the same bits), which the compiler had turned into scalar loads, a vgatherqps of x's value per outlier
// column and a memcpy per block: 8 outlier columns of a 576 x 576 layer cost 2.1 us a call that way, ~1 us this way
// (2-core AMD EPYC).
static void linear_block(const struct linear_args* p, int64_t n0) {
  const int64_t rows_w = p->N - n0 < W_BLOCK ? p->N - n0 : W_BLOCK;
  const __mmask8 lanes = (__mmask8)((1u << rows_w) - 1);  // a short block's other lanes are computed and dropped
  int32_t acc[DECODE_MAX_M * W_BLOCK];
  dot_block(p->q_x, p->M, p->x_sums, p->q_w + n0 * p->K, rows_w, p->K, acc);
  const __m256 s_w = _mm256_maskz_loadu_ps(lanes, p->s_w + n0);
  const __m256 row_scale = _mm256_mul_ps(s_w, _mm256_set1_ps(1.0f / (INT8_MAX_F * INT8_MAX_F)));
  const __m256 col_scale = _mm256_mul_ps(s_w, _mm256_set1_ps(1.0f / INT8_MAX_F));
  float b[W_BLOCK] = {0.0f};
  if (p->bias != NULL)
    for (int64_t j = 0; j < rows_w; ++j) b[j] = load_value(p->bias, p->bias_dtype, n0 + j);
  const __m256 bias = _mm256_loadu_ps(b);
  const int8_t* w_rows[W_BLOCK];  // a short block repeats its last row
  for (int j = 0; j < W_BLOCK; ++j) w_rows[j] = p->q_w + (n0 + (j < rows_w ? j : rows_w - 1)) * p->K;
  for (int64_t m = 0; m < p->M; ++m) {
    const __m256 sums = _mm256_cvtepi32_ps(_mm256_maskz_loadu_epi32(lanes, acc + m * W_BLOCK));
    __m256 y = _mm256_mul_ps(_mm256_mul_ps(sums, _mm256_set1_ps(p->s_x[m])), row_scale);
    if (p->count > 0) y = _mm256_add_ps(y, outlier_term(p, m, w_rows, col_scale));
    y = _mm256_add_ps(y, bias);
    if (p->dtype == DTYPE_FP32) {
      _mm256_mask_storeu_ps((float*)p->out + m * p->N + n0, lanes, y);
    } else {
      float values[W_BLOCK];
      _mm256_storeu_ps(values, y);
      store_run(p->out, p->dtype, m * p->N + n0, values, rows_w);
    }
  }
}
#else
static void linear_block(const struct linear_args* p, int64_t n0) {
  const int64_t rows_w = p->N - n0 < W_BLOCK ? p->N - n0 : W_BLOCK;
  int32_t acc[DECODE_MAX_M * W_BLOCK];
  dot_block(p->q_x, p->M, p->x_sums, p->q_w + n0 * p->K, rows_w, p->K, acc);
  const float int_scale = 1.0f / (INT8_MAX_F * INT8_MAX_F);
  const float outlier_scale = 1.0f / INT8_MAX_F;
  float row_scale[W_BLOCK], col_scale[W_BLOCK], b[W_BLOCK];
  const int8_t* w_rows[W_BLOCK];
  for (int j = 0; j < W_BLOCK; ++j) {
    const int64_t n = n0 + (j < rows_w ? j : rows_w - 1);  // a short block repeats its last row, unused
    w_rows[j] = p->q_w + n * p->K;
    row_scale[j] = p->s_w[n] * int_scale;
    col_scale[j] = p->s_w[n] * outlier_scale;
    b[j] = p->bias != NULL ? load_value(p->bias, p->bias_dtype, n) : 0.0f;
  }
  for (int64_t m = 0; m < p->M; ++m) {
    float y[W_BLOCK];
    const float s_x = p->s_x[m];
    for (int j = 0; j < W_BLOCK; ++j) y[j] = (float)acc[m * W_BLOCK + j] * s_x * row_scale[j];
    if (p->count > 0) {
      float extra[W_BLOCK] = {0.0f};
      for (int32_t i = 0; i < p->count; ++i) {
        const int32_t c = p->outlier_cols[i];
        const float x_c = load_value(p->x, p->dtype, m * p->sxm + c * p->sxk);
        for (int j = 0; j < W_BLOCK; ++j) extra[j] += x_c * ((float)w_rows[j][c] * col_scale[j]);
      }
      for (int j = 0; j < W_BLOCK; ++j) y[j] += extra[j];
    }
    for (int j = 0; j < W_BLOCK; ++j) y[j] += b[j];
    store_run(p->out, p->dtype, m * p->N + n0, y, rows_w);
  }
}
#endif

// y[m, n] = acc * s_x[m] * (s_w[n] / 127^2) + sum_{c in O} x[m, c] * (q_w[n, c] * (s_w[n] / 127)) + b[n], with
// acc the exact int32 dot product, in fp32, stored in x's dtype. q_w is row-major [N, K]; out row-major [M, N].
// The weight is read once: each thread takes runs of W_BLOCK weight rows and serves every row of x from them.
//
// The arguments come packed in one struct (every field 8 bytes, in this order): ctypes converts each argument
// of a call on its own, 1.6 us for nineteen of them against 0.5 us packed (2-core AMD EPYC), on every call.
struct int8mm_cpu_linear_call {
  int64_t x, dtype, M, K, sxm, sxk;             // activations [M, K] with element strides, DTYPE_*
  int64_t q_w, s_w, N, bias, bias_dtype;        // the layer: int8 [N, K] row-major, fp32 [N], bias [N] or 0
  int64_t out, num_threads;                     // [M, N] in x's dtype
  double threshold;
};

// The call's scratch (q_x [M, K] int8, s_x [M], the outlier columns [K] int32 and flags [K]) lives on the stack
// up to this size (M = 1 up to K = 5,460; M = 16 up to K = 1,557), else in one malloc for the call: a stack that
// every call reuses is in cache, where buffers kept by the caller were not (and looking them up per thread cost
// the Python side 1.4 us a call with a cold cache, 2-core AMD EPYC).
#define STACK_SCRATCH_BYTES 32768

int int8mm_cpu_linear_call_size(void) { return (int)sizeof(struct int8mm_cpu_linear_call); }

#define PTR(type, field) ((type)(intptr_t)call->field)
int int8mm_cpu_int8_linear(const struct int8mm_cpu_linear_call* call) {
  const int64_t M = call->M, K = call->K, N = call->N;
  const int dtype = (int)call->dtype, bias_dtype = (int)call->bias_dtype, num_threads = (int)call->num_threads;
  const float threshold = (float)call->threshold;
  const void* bias = PTR(const void*, bias);
  if (M < 0 || M > DECODE_MAX_M || N < 0 || K < 0 || !(threshold >= 0.0f) || num_threads < 1) return ERR_ARGUMENT;
  if (!valid_dtype(dtype) || (bias != NULL && !valid_dtype(bias_dtype))) return ERR_DTYPE;
  // 4-byte arrays first: every part stays aligned for its type
  const size_t scratch_bytes = sizeof(int32_t) * (size_t)K + sizeof(float) * (size_t)M + (size_t)(M * K) + (size_t)K;
  _Alignas(64) unsigned char on_stack[STACK_SCRATCH_BYTES];
  unsigned char* scratch = scratch_bytes <= sizeof on_stack ? on_stack : malloc(scratch_bytes);
  if (scratch == NULL) return ERR_MEMORY;
  int32_t* outlier_cols = (int32_t*)scratch;
  float* s_x = (float*)(outlier_cols + K);
  int8_t* q_x = (int8_t*)(s_x + M);
  uint8_t* col_flags = (uint8_t*)(q_x + M * K);
  int32_t count;
  quantize(PTR(const void*, x), dtype, M, K, call->sxm, call->sxk, threshold, q_x, s_x, outlier_cols, &count,
           col_flags, 1);
  int32_t x_sums[DECODE_MAX_M];
  row_sums(q_x, M, K, x_sums);
  const struct linear_args args = {PTR(const void*, x), dtype, M, K, call->sxm, call->sxk, N,
                                   PTR(const int8_t*, q_w), PTR(const float*, s_w), bias, bias_dtype, q_x, s_x,
                                   x_sums, outlier_cols, count, PTR(void*, out)};
  const int64_t blocks = (N + W_BLOCK - 1) / W_BLOCK;
  if (num_threads > 1 && N * K >= 65536) {
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t block = 0; block < blocks; ++block) linear_block(&args, block * W_BLOCK);
  } else {
    for (int64_t block = 0; block < blocks; ++block) linear_block(&args, block * W_BLOCK);
  }
  if (scratch != on_stack) free(scratch);
  return OK;
}
#undef PTR
