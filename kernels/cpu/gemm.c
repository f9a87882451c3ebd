// int8mm CPU int8 GEMM: out[m, n] = sum_k a[m, k] * w[n, k], exact in int32, for the many-row path on CPUs where
// torch._int_mm has no vector kernel. Without AVX-512 it runs a scalar loop: 0.06-0.10x the speed of an fp32
// matmul of the same shape on a 2-core AMD EPYC with AVX2 (1024 x 576 x 576: 305 ms against 29 ms).
//
// AVX2: 16 int8 values widened to int16 (vpmovsxbw), multiplied and summed in adjacent pairs into int32
// (vpmaddwd). Exact: a product is at most 128 * 128 in magnitude, a pair fits int32 easily, and every partial
// sum is bounded by the whole dot product's, which fits int32 for K <= 132,104 (the library's limit).
// Elsewhere a plain loop, which the compiler vectorizes for the target it has.
#include <stdint.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

enum { GEMM_OK = 0, GEMM_ERR_ARGUMENT = 1 };  // int8mm_cpu.c's status codes

// a tile: GEMM_MR rows of a against GEMM_NR rows of w, 12 int32 accumulators; with the 3 weight vectors and one
// activation vector that is AVX2's 16 registers
#define GEMM_MR 4
#define GEMM_NR 3
// a block of weight rows is kept in L2 (at most this many bytes) while every row of a passes over it
#define GEMM_BLOCK_BYTES (192 * 1024)
// below this many multiply-adds a thread team costs more than it saves
#define GEMM_PARALLEL_MIN_MACS (1 << 21)

#ifdef __AVX2__
static inline __m256i widen16(const int8_t* p) { return _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)p)); }

static inline int32_t sum8(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}
#endif

// mr (1 to GEMM_MR, a constant where it is inlined) rows of a against GEMM_NR rows of w
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

// Rows [0, rows) of w against every row of a: out[m * ldo + n]. Single-threaded: the fused decode call of
// int8mm_cpu.c (without VNNI) takes its blocks of weight rows through here too. Rows of a go in tiles of
// GEMM_MR, the last tile as short as it is (a decode step's single row does no work for three); a tile past the
// last row of w reads that row again (no branch in the tile) and its extra results are not stored.
void int8mm_gemm_rows(const int8_t* a, int64_t M, int64_t K, int64_t lda, const int8_t* w, int64_t rows,
                      int64_t ldw, int32_t* out, int64_t ldo) {
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
        case 3: gemm_tile(3, a_rows, w_rows, K, tile); break;
        default: gemm_tile(GEMM_MR, a_rows, w_rows, K, tile);
      }
      for (int i = 0; i < mr; ++i)
        for (int j = 0; j < GEMM_NR && n + j < rows; ++j) out[(m0 + i) * ldo + n + j] = tile[i][j];
    }
  }
}

// a [M, K] and w [N, K] with unit stride along K and row strides lda, ldw (in elements); out [M, N] row-major.
// The weight rows are split into blocks that fit GEMM_BLOCK_BYTES, at least one per thread; threads take blocks.
int int8mm_cpu_int8_gemm(const int8_t* a, int64_t M, int64_t K, int64_t lda, const int8_t* w, int64_t N,
                         int64_t ldw, int32_t* out, int num_threads) {
  if (M < 0 || N < 0 || K < 0 || lda < 0 || ldw < 0 || num_threads < 1) return GEMM_ERR_ARGUMENT;
  if (M == 0 || N == 0) return GEMM_OK;
  int64_t rows = GEMM_BLOCK_BYTES / (K > 0 ? K : 1);
  const int64_t per_thread = (N + num_threads - 1) / num_threads;
  if (rows > per_thread) rows = per_thread;
  rows = rows < GEMM_NR ? GEMM_NR : rows - rows % GEMM_NR;
  const int64_t blocks = (N + rows - 1) / rows;
  const int parallel = num_threads > 1 && blocks > 1 && M * N * K >= GEMM_PARALLEL_MIN_MACS;
#pragma omp parallel for num_threads(num_threads) schedule(dynamic, 1) if (parallel)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t n0 = b * rows, n1 = n0 + rows < N ? n0 + rows : N;
    int8mm_gemm_rows(a, M, K, lda, w + n0 * ldw, n1 - n0, ldw, out + n0, N);
  }
  return GEMM_OK;
}
