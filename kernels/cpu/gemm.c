// int8mm CPU int8 GEMM: out[m, n] = sum_k a[m, k] * w[n, k], exact in int32, for the many-row path on CPUs where
// torch._int_mm is a scalar loop: torch 2.13 hands it to oneDNN only on CPUs with AVX-512 VNNI. Elsewhere it ran
// at 0.06x the speed of an fp32 matmul of the same shape (2-core AMD EPYC with AVX2, 2 threads: 1024 x 576 x 576,
// 185.9 against 11.7 ms; benchmarks/results/2026-12-01-cpu-epyc-avx2).
//
// AVX2: int8 values widened to int16, multiplied and summed in adjacent pairs into int32 (vpmaddwd). Exact: a
// product is at most 128 * 128 in magnitude, so every partial sum is at most the sum of the products' magnitudes,
// which fits int32 within the callers' K limits (127 * 128 * K, or 128 * 128 * K for int8_matmul's full range,
// below 2^31). Elsewhere plain loops, which the compiler vectorizes for the target it has.
//
// Two forms. int8mm_gemm_rows widens as it loads (vpmovsxbw) and serves the fused decode call (int8mm_cpu.c,
// few rows, the weight read once). int8mm_cpu_int8_gemm, for many rows, widens each operand once into packed
// int16 buffers and then only loads: widening on every load held it to 12-13 GMAC/s on one core of a Zen 1 EPYC,
// packed 3 x 3 tiles reach 18 (a vpmaddwd + add loop without loads peaks at 36 there, fp32 FMA at 20).
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

enum { GEMM_OK = 0, GEMM_ERR_ARGUMENT = 1, GEMM_ERR_MEMORY = 3 };  // int8mm_cpu.c's status codes

// A tile: GEMM_MR rows of a against GEMM_NR rows of w, nine int32 accumulators, which with the three weight
// vectors and one activation vector stay in AVX2's 16 registers (gcc spilled nine of twelve for 4 x 3 tiles).
#define GEMM_MR 3
#define GEMM_NR 3
// K per pass of the packed GEMM: a tile's six packed rows (12 KB) stay in L1
#define GEMM_KC 1024
// packed int16 weight rows of one block, kept in L2 while every row of a passes over them
#define GEMM_BLOCK_BYTES (192 * 1024)
// below this many multiply-adds a thread team costs more than it saves
#define GEMM_PARALLEL_MIN_MACS (1 << 21)

#ifdef __AVX2__
static inline __m256i widen16(const int8_t* p) { return _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)p)); }
static inline __m256i load16(const int16_t* p) { return _mm256_loadu_si256((const __m256i*)p); }

static inline int32_t sum8(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}
#endif

// mr (1 to GEMM_MR, a constant where it is inlined) rows of a against GEMM_NR rows of w, int8, widened on load
static inline __attribute__((always_inline)) void gemm_tile(int mr, const int8_t* const* a, const int8_t* const* w,
                                                            int64_t K, int32_t out[GEMM_MR][GEMM_NR]) {
  int64_t k = 0;
#ifdef __AVX2__
  __m256i acc[GEMM_MR][GEMM_NR];
  for (int i = 0; i < mr; ++i)
    for (int j = 0; j < GEMM_NR; ++j) acc[i][j] = _mm256_setzero_si256();
  for (; k + 16 <= K; k += 16) {
    __m256i wv[GEMM_NR];
    for (int j = 0; j < GEMM_NR; ++j) wv[j] = widen16(w[j] + k);
    for (int i = 0; i < mr; ++i) {
      const __m256i av = widen16(a[i] + k);
      for (int j = 0; j < GEMM_NR; ++j) acc[i][j] = _mm256_add_epi32(acc[i][j], _mm256_madd_epi16(av, wv[j]));
    }
  }
  for (int i = 0; i < mr; ++i)
    for (int j = 0; j < GEMM_NR; ++j) out[i][j] = sum8(acc[i][j]);
#else
  for (int i = 0; i < mr; ++i)
    for (int j = 0; j < GEMM_NR; ++j) out[i][j] = 0;
#endif
  for (int i = 0; i < mr; ++i)  // what the vector loop left (all of K without AVX2)
    for (int j = 0; j < GEMM_NR; ++j) {
      int32_t sum = 0;
      for (int64_t kk = k; kk < K; ++kk) sum += (int32_t)a[i][kk] * (int32_t)w[j][kk];
      out[i][j] += sum;
    }
}

// One row of a against GEMM_ROW_NR rows of w: a decode step's single row is widened once per six weight rows
// instead of three, and six independent sums hide the multiply-add's latency. Each 64-byte step also asks for the
// same bytes of the rows two tiles ahead (ldw apart), into L2: a short weight row (576 bytes) is a stream the
// hardware prefetchers hardly pick up, as int8mm_cpu.c's VNNI tile measured. Zen 1 EPYC, weights not in cache,
// best of 7 (benchmarks/cpu_gemv_timer.c): 576 x 576 on 1 thread 75-80 -> 50-52 us; on 2 threads 576 x 3072
// 261-266 -> 163-167, 1536 x 576 103-111 -> 78-94, 4096 x 4096 1111-1135 -> 1015-1045 us. A weight already in
// cache (not a model's case: its layers evict each other) pays for the extra instructions: 576 x 576 on 1 thread
// 31 -> 33 us, 1536 x 576 on 2 threads 42 -> 50 us. One or four tiles ahead measured the same. The address is an
// integer: past the weight's end it is never a pointer C would call out of bounds, and a prefetch of it cannot
// fault.
#define GEMM_ROW_NR 6
static void row_tile(const int8_t* a, const int8_t* const* w, int64_t K, int64_t ldw, int32_t out[GEMM_ROW_NR]) {
  int64_t k = 0;
#ifdef __AVX2__
  const uintptr_t ahead = (uintptr_t)(2 * GEMM_ROW_NR * ldw);
  __m256i acc[GEMM_ROW_NR];
  for (int j = 0; j < GEMM_ROW_NR; ++j) acc[j] = _mm256_setzero_si256();
  for (; k + 64 <= K; k += 64) {  // a cache line of each row per step: one prefetch each
    for (int j = 0; j < GEMM_ROW_NR; ++j) _mm_prefetch((const char*)((uintptr_t)(w[j] + k) + ahead), _MM_HINT_T1);
    for (int64_t kk = k; kk < k + 64; kk += 16) {
      const __m256i av = widen16(a + kk);
      for (int j = 0; j < GEMM_ROW_NR; ++j)
        acc[j] = _mm256_add_epi32(acc[j], _mm256_madd_epi16(av, widen16(w[j] + kk)));
    }
  }
  for (; k + 16 <= K; k += 16) {
    const __m256i av = widen16(a + k);
    for (int j = 0; j < GEMM_ROW_NR; ++j) acc[j] = _mm256_add_epi32(acc[j], _mm256_madd_epi16(av, widen16(w[j] + k)));
  }
  for (int j = 0; j < GEMM_ROW_NR; ++j) out[j] = sum8(acc[j]);
#else
  (void)ldw;
  for (int j = 0; j < GEMM_ROW_NR; ++j) out[j] = 0;
#endif
  for (int j = 0; j < GEMM_ROW_NR; ++j) {
    int32_t sum = 0;
    for (int64_t kk = k; kk < K; ++kk) sum += (int32_t)a[kk] * (int32_t)w[j][kk];
    out[j] += sum;
  }
}

// Rows [0, rows) of w against every row of a: out[m * ldo + n]. Single-threaded: the fused decode call of
// int8mm_cpu.c (without VNNI) takes its blocks of weight rows through here too. Rows of a go in tiles of
// GEMM_MR, the last tile as short as it is (a decode step's single row does no work for three); a tile past the
// last row of w reads that row again (no branch in the tile) and its extra results are not stored.
void int8mm_gemm_rows(const int8_t* a, int64_t M, int64_t K, int64_t lda, const int8_t* w, int64_t rows,
                      int64_t ldw, int32_t* out, int64_t ldo) {
  if (M == 1) {
    for (int64_t n = 0; n < rows; n += GEMM_ROW_NR) {
      const int8_t* w_rows[GEMM_ROW_NR];
      for (int j = 0; j < GEMM_ROW_NR; ++j) w_rows[j] = w + (n + j < rows ? n + j : rows - 1) * ldw;
      int32_t sums[GEMM_ROW_NR];
      row_tile(a, w_rows, K, ldw, sums);
      for (int j = 0; j < GEMM_ROW_NR && n + j < rows; ++j) out[n + j] = sums[j];
    }
    return;
  }
  for (int64_t m0 = 0; m0 < M; m0 += GEMM_MR) {
    const int mr = M - m0 < GEMM_MR ? (int)(M - m0) : GEMM_MR;
    const int8_t* a_rows[GEMM_MR];
    for (int i = 0; i < mr; ++i) a_rows[i] = a + (m0 + i) * lda;
    for (int64_t n = 0; n < rows; n += GEMM_NR) {
      const int8_t* w_rows[GEMM_NR];
      for (int j = 0; j < GEMM_NR; ++j) w_rows[j] = w + (n + j < rows ? n + j : rows - 1) * ldw;
      int32_t tile[GEMM_MR][GEMM_NR];
      switch (mr) {  // each a tile specialized for its row count
        case 1: gemm_tile(1, a_rows, w_rows, K, tile); break;
        case 2: gemm_tile(2, a_rows, w_rows, K, tile); break;
        default: gemm_tile(GEMM_MR, a_rows, w_rows, K, tile);
      }
      for (int i = 0; i < mr; ++i)
        for (int j = 0; j < GEMM_NR && n + j < rows; ++j) out[(m0 + i) * ldo + n + j] = tile[i][j];
    }
  }
}

// ---- the packed GEMM (many rows) ----

// src[0 .. len) as int16 into dst[0 .. padded), zeros after len (a padded tail adds nothing to a sum)
static void widen_row(const int8_t* src, int64_t len, int16_t* dst, int64_t padded) {
  int64_t k = 0;
#ifdef __AVX2__
  for (; k + 16 <= len; k += 16) _mm256_storeu_si256((__m256i*)(dst + k), widen16(src + k));
#endif
  for (; k < len; ++k) dst[k] = src[k];
  for (; k < padded; ++k) dst[k] = 0;
}

// mr rows of packed a (row stride lda16) against GEMM_NR rows of packed w (row stride ldw16), over kc16 values
// (a multiple of 16), added to out (or stored, when first)
static inline __attribute__((always_inline)) void packed_tile(int mr, const int16_t* a, int64_t lda16,
                                                              const int16_t* w, int64_t ldw16, int64_t kc16,
                                                              int32_t out[GEMM_MR][GEMM_NR]) {
#ifdef __AVX2__
  __m256i acc[GEMM_MR][GEMM_NR];
  for (int i = 0; i < mr; ++i)
    for (int j = 0; j < GEMM_NR; ++j) acc[i][j] = _mm256_setzero_si256();
  for (int64_t k = 0; k < kc16; k += 16) {
    __m256i wv[GEMM_NR];
    for (int j = 0; j < GEMM_NR; ++j) wv[j] = load16(w + j * ldw16 + k);
    for (int i = 0; i < mr; ++i) {
      const __m256i av = load16(a + i * lda16 + k);
      for (int j = 0; j < GEMM_NR; ++j) acc[i][j] = _mm256_add_epi32(acc[i][j], _mm256_madd_epi16(av, wv[j]));
    }
  }
  for (int i = 0; i < mr; ++i)
    for (int j = 0; j < GEMM_NR; ++j) out[i][j] = sum8(acc[i][j]);
#else
  for (int i = 0; i < mr; ++i)
    for (int j = 0; j < GEMM_NR; ++j) {
      int32_t sum = 0;
      for (int64_t k = 0; k < kc16; ++k) sum += (int32_t)a[i * lda16 + k] * (int32_t)w[j * ldw16 + k];
      out[i][j] = sum;
    }
#endif
}

// Rows [0, rows) of packed w (rows a multiple of GEMM_NR, padded with copies) against every row of packed a,
// one pass of K: out[m * ldo + n] = the pass's sum, or += it after the first pass.
static void packed_block(const int16_t* a, int64_t M, const int16_t* w, int64_t rows, int64_t valid_rows,
                         int64_t kc16, int first, int32_t* out, int64_t ldo) {
  for (int64_t m0 = 0; m0 < M; m0 += GEMM_MR) {
    const int mr = M - m0 < GEMM_MR ? (int)(M - m0) : GEMM_MR;
    for (int64_t n = 0; n < rows; n += GEMM_NR) {
      int32_t tile[GEMM_MR][GEMM_NR];
      const int16_t* a_tile = a + m0 * kc16;
      switch (mr) {
        case 1: packed_tile(1, a_tile, kc16, w + n * kc16, kc16, kc16, tile); break;
        case 2: packed_tile(2, a_tile, kc16, w + n * kc16, kc16, kc16, tile); break;
        default: packed_tile(GEMM_MR, a_tile, kc16, w + n * kc16, kc16, kc16, tile);
      }
      for (int i = 0; i < mr; ++i)
        for (int j = 0; j < GEMM_NR && n + j < valid_rows; ++j) {
          int32_t* o = out + (m0 + i) * ldo + n + j;
          *o = first ? tile[i][j] : (int32_t)((uint32_t)*o + (uint32_t)tile[i][j]);  // the true sum fits int32
        }
    }
  }
}

// a [M, K] and w [N, K] with unit stride along K and row strides lda, ldw (in elements); out [M, N] row-major.
// K goes in passes of GEMM_KC: each pass widens its columns of a (all rows, shared) and, per block of weight rows
// that fits GEMM_BLOCK_BYTES (at least one block per thread; threads take blocks), those of w, then runs the tiles.
int int8mm_cpu_int8_gemm(const int8_t* a, int64_t M, int64_t K, int64_t lda, const int8_t* w, int64_t N,
                         int64_t ldw, int32_t* out, int num_threads) {
  if (M < 0 || N < 0 || K < 0 || lda < 0 || ldw < 0 || num_threads < 1) return GEMM_ERR_ARGUMENT;
  if (M == 0 || N == 0) return GEMM_OK;
  if (K == 0) {
    memset(out, 0, sizeof(int32_t) * (size_t)(M * N));
    return GEMM_OK;
  }
  const int64_t kc_max = K < GEMM_KC ? (K + 15) / 16 * 16 : GEMM_KC;
  int64_t rows = GEMM_BLOCK_BYTES / (2 * kc_max);
  const int64_t per_thread = (N + num_threads - 1) / num_threads;
  if (rows > per_thread) rows = per_thread;
  rows = rows < GEMM_NR ? GEMM_NR : (rows + GEMM_NR - 1) / GEMM_NR * GEMM_NR;
  const int64_t blocks = (N + rows - 1) / rows;
  const int threads = num_threads > 1 && blocks > 1 && M * N * K >= GEMM_PARALLEL_MIN_MACS ? num_threads : 1;
  int16_t* a16 = malloc(sizeof(int16_t) * (size_t)(M * kc_max));
  int16_t* w16 = malloc(sizeof(int16_t) * (size_t)(threads * rows * kc_max));  // one block per thread
  if (a16 == NULL || w16 == NULL) {
    free(a16), free(w16);
    return GEMM_ERR_MEMORY;
  }
  for (int64_t k0 = 0; k0 < K; k0 += GEMM_KC) {
    const int64_t kc = K - k0 < GEMM_KC ? K - k0 : GEMM_KC, kc16 = (kc + 15) / 16 * 16;
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
      for (int64_t m = 0; m < M; ++m) widen_row(a + m * lda + k0, kc, a16 + m * kc16, kc16);
      int16_t* mine = w16;
#ifdef _OPENMP
      mine += (int64_t)omp_get_thread_num() * rows * kc_max;
#endif
#pragma omp for schedule(dynamic, 1)
      for (int64_t b = 0; b < blocks; ++b) {
        const int64_t n0 = b * rows, valid = N - n0 < rows ? N - n0 : rows;
        const int64_t padded = (valid + GEMM_NR - 1) / GEMM_NR * GEMM_NR;
        for (int64_t j = 0; j < padded; ++j)  // a short block repeats its last row; those results are dropped
          widen_row(w + (n0 + (j < valid ? j : valid - 1)) * ldw + k0, kc, mine + j * kc16, kc16);
        packed_block(a16, M, mine, padded, valid, kc16, k0 == 0, out + n0, N);
      }
    }
  }
  free(a16), free(w16);
  return GEMM_OK;
}
