// Times the CPU library's fused decode call (int8mm_cpu_int8_linear, M = 1, fp32 x, no outliers) from C, with no
// Python around it, over COPIES distinct weights taken in turn: COPIES = 1 keeps the weight in cache, enough
// copies to exceed the caches make every call read its weight from memory, as a model's layers do.
//
//   cc -O3 -march=native -ffp-contract=off -fopenmp -o /tmp/gemv_timer benchmarks/cpu_gemv_timer.c
//      kernels/cpu/*.c -lm      (one command line; without VNNI the call's dot products are gemm.c's)
//   /tmp/gemv_timer K N COPIES [THREADS]   # prints the best of 7 rounds of 2000 calls, in us per call (1 thread
//                                          # unless THREADS says more)
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

struct int8mm_cpu_linear_call {  // kernels/cpu/int8mm_cpu.c: every field 8 bytes, in this order
  int64_t x, dtype, M, K, sxm, sxk, q_w, s_w, N, bias, bias_dtype, out, num_threads;
  double threshold;
};
int int8mm_cpu_int8_linear(const struct int8mm_cpu_linear_call* call);

static double seconds(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

int main(int argc, char** argv) {
  if (argc != 4 && argc != 5) {
    fprintf(stderr, "usage: %s K N COPIES [THREADS]\n", argv[0]);
    return 2;
  }
  const int64_t K = atoll(argv[1]), N = atoll(argv[2]);
  const int copies = atoi(argv[3]), threads = argc == 5 ? atoi(argv[4]) : 1;
  float* x = malloc(sizeof(float) * K);
  for (int64_t i = 0; i < K; ++i) x[i] = (float)(rand() % 1000) / 100.0f - 5.0f;
  int8_t** weights = malloc(sizeof(int8_t*) * copies);
  for (int c = 0; c < copies; ++c) {
    weights[c] = aligned_alloc(64, (size_t)(N * K));
    for (int64_t i = 0; i < N * K; ++i) weights[c][i] = (int8_t)(rand() % 255 - 127);
  }
  float* s_w = malloc(sizeof(float) * N);
  for (int64_t i = 0; i < N; ++i) s_w[i] = 1.0f;
  float* out = malloc(sizeof(float) * N);
  struct int8mm_cpu_linear_call call = {(int64_t)x, 2, 1, K, K, 1, 0, (int64_t)s_w, N, 0, 0, (int64_t)out,
                                        threads, 0.0};
  double best = 1e30;
  for (int round = 0; round < 7; ++round) {
    const double start = seconds();
    for (int i = 0; i < 2000; ++i) {
      call.q_w = (int64_t)weights[i % copies];
      if (int8mm_cpu_int8_linear(&call) != 0) return 1;
    }
    const double per_call = (seconds() - start) / 2000 * 1e6;
    if (per_call < best) best = per_call;
  }
  printf("K=%lld N=%lld copies=%d threads=%d: %.2f us per call\n", (long long)K, (long long)N, copies, threads,
         best);
  return 0;
}
