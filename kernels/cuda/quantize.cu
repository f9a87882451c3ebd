// Activation quantization with outlier columns (docs/SPEC.md), two passes, no host sync.
//
// Pass 1, activation_stats: blocks of kStatsRows rows x a run of columns fold into a zero-filled int32
// workspace with atomics: row_max_bits[M] (fp32 bits of each row's absmax below the threshold; for
// non-negative floats and +NaN the int order is the float order, NaN above Inf, so atomicMax reduces and
// NaN wins), col_flags[K] (1 = outlier column) and block_counts[K / kCompactBlock] (outlier columns per
// compaction block, counted once by the thread whose atomicExch raised the flag).
// Pass 2, quantize_rows: int8 rows with outlier columns zeroed, the fp32 row scales, and the ascending
// outlier list: each compaction block writes its slice after the counts of the blocks before it.
//
// One row (a sequence's decode step, what AUTO sends to this library) takes quantize_one_row instead: one block
// holds the row in registers, so one kernel with no workspace and no fill replaces the fill and the two passes
// (a decode call is then two kernels: this and the GEMV). 2-16 rows of up to 131072 elements in all take
// quantize_few_rows, likewise one block and one kernel, which reads x twice.
//
// The kernel a GEMV follows (quantize_rows, quantize_one_row or quantize_few_rows) lets it launch at once
// (allow_dependent_launch, common.cuh): on sm_90+ the GEMV is launched with programmatic dependent launch and waits
// for it on the GPU.
#include <algorithm>

#include "common.cuh"
#include "int8mm.h"

namespace int8mm {

// NaN-aware max: NaN wins (fmaxf would drop it)
__device__ __forceinline__ float max_keeping_nan(float a, float b) { return (a != a || b != b) ? NAN : fmaxf(a, b); }

// the max_keeping_nan of a value over the 32 lanes of a warp, in every lane
__device__ __forceinline__ float warp_max_keeping_nan(float v) {
  for (int offset = 16; offset > 0; offset /= 2) v = max_keeping_nan(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

constexpr int kStatsRows = 8;
constexpr int kThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kThreads) activation_stats_kernel(
    const T* __restrict__ x, int64_t M, int64_t K, int64_t stride_xm, int64_t stride_xk, float threshold,
    int64_t cols_per_block, int32_t* __restrict__ row_max_bits, int32_t* __restrict__ col_flags,
    int32_t* __restrict__ block_counts) {
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kStatsRows;
  const int64_t k_begin = static_cast<int64_t>(blockIdx.y) * cols_per_block;
  const int64_t k_end = min(k_begin + cols_per_block, K);
  float row_max[kStatsRows];
  bool row_nan[kStatsRows];
#pragma unroll
  for (int r = 0; r < kStatsRows; ++r) { row_max[r] = 0.0f; row_nan[r] = false; }

  for (int64_t k = k_begin + threadIdx.x; k < k_end; k += kThreads) {
    bool outlier_col = false;
#pragma unroll
    for (int r = 0; r < kStatsRows; ++r) {
      if (m0 + r < M) {
        float v = to_float(x[(m0 + r) * stride_xm + k * stride_xk]);
        float a = fabsf(v);
        bool outlier = threshold > 0.0f && a >= threshold;
        outlier_col |= outlier;
        row_nan[r] |= (v != v);
        if (!outlier) row_max[r] = fmaxf(row_max[r], a);
      }
    }
    if (outlier_col && atomicExch(&col_flags[k], 1) == 0) atomicAdd(&block_counts[k / kCompactBlock], 1);
  }

  // block reduction of each row's max (and NaN flag): warp shuffles, then one value per warp
  __shared__ float warp_max[kThreads / 32][kStatsRows];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int r = 0; r < kStatsRows; ++r) {
    const float v = warp_max_keeping_nan(row_nan[r] ? NAN : row_max[r]);
    if (lane == 0) warp_max[warp][r] = v;
  }
  __syncthreads();
  if (threadIdx.x < kStatsRows && m0 + threadIdx.x < M) {
    float v = 0.0f;
    for (int w = 0; w < kThreads / 32; ++w) v = max_keeping_nan(v, warp_max[w][threadIdx.x]);
    if (v != v) v = NAN;  // canonical +NaN: its bits sort above +Inf
    atomicMax(&row_max_bits[m0 + threadIdx.x], __float_as_int(v));
  }
}

// inclusive scan of one int per thread across the block (any size; warp_totals: one int per warp)
__device__ int block_inclusive_scan(int value, int* warp_totals) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int offset = 1; offset < 32; offset *= 2) {
    int other = __shfl_up_sync(0xffffffffu, value, offset);
    if (lane >= offset) value += other;
  }
  if (lane == 31) warp_totals[warp] = value;
  __syncthreads();
  int before = 0;
  for (int w = 0; w < warp; ++w) before += warp_totals[w];
  return value + before;
}

constexpr int kQuantRows = 4;
constexpr int kColsPerThread = kCompactBlock / kThreads;  // 4

template <typename T>
__global__ void __launch_bounds__(kThreads) quantize_rows_kernel(
    const T* __restrict__ x, int64_t M, int64_t K, int64_t stride_xm, int64_t stride_xk,
    const int32_t* __restrict__ row_max_bits, const int32_t* __restrict__ col_flags,
    const int32_t* __restrict__ block_counts, int64_t num_compact_blocks, int8_t* __restrict__ q_x,
    float* __restrict__ s_x, int32_t* __restrict__ outlier_cols, int32_t* __restrict__ outlier_count) {
  allow_dependent_launch();  // the GEMV after it may start now: it waits for this kernel before reading its outputs
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kQuantRows;
  const int64_t k0 = static_cast<int64_t>(blockIdx.y) * kCompactBlock + threadIdx.x * kColsPerThread;
  int flags[kColsPerThread];
#pragma unroll
  for (int c = 0; c < kColsPerThread; ++c) flags[c] = (k0 + c < K) ? col_flags[k0 + c] : 0;

#pragma unroll
  for (int r = 0; r < kQuantRows; ++r) {
    const int64_t m = m0 + r;
    if (m >= M) break;
    const float scale = __int_as_float(row_max_bits[m]);
    if (blockIdx.y == 0 && threadIdx.x == 0) s_x[m] = scale;
    const float reciprocal = row_reciprocal(scale);
#pragma unroll
    for (int c = 0; c < kColsPerThread; ++c) {
      const int64_t k = k0 + c;
      if (k < K) {
        int8_t q = 0;
        if (!flags[c] && reciprocal != 0.0f)
          q = quantize_value(to_float(x[m * stride_xm + k * stride_xk]) * reciprocal);
        q_x[m * K + k] = q;
      }
    }
  }

  if (blockIdx.x == 0) {  // compaction of this block of columns
    __shared__ int warp_totals[kThreads / 32];
    __shared__ int start;
    if (threadIdx.x == 0) {
      int before = 0, total = 0;
      for (int64_t b = 0; b < num_compact_blocks; ++b) {
        if (b < blockIdx.y) before += block_counts[b];
        total += block_counts[b];
      }
      start = before;
      if (blockIdx.y == 0) outlier_count[0] = total;
    }
    int mine = 0;
#pragma unroll
    for (int c = 0; c < kColsPerThread; ++c) mine += flags[c];
    int slot = block_inclusive_scan(mine, warp_totals) - mine;  // has a __syncthreads: start is visible
    slot += start;
#pragma unroll
    for (int c = 0; c < kColsPerThread; ++c) {
      if (flags[c]) outlier_cols[slot++] = static_cast<int32_t>(k0 + c);
    }
  }
}

// ---- one row: one block, the row read once into registers ----
constexpr int kRowThreads = 1024;
constexpr int kRowPerThread = 32;                       // element i of a thread is column i * kRowThreads + thread
constexpr int64_t kRowMaxK = int64_t{kRowThreads} * kRowPerThread;  // 32768: every Llama row
constexpr int kRowWarps = kRowThreads / 32;
static_assert(kRowPerThread == 32, "a warp's lanes keep one slot's ballot each");

template <typename T>
__global__ void __launch_bounds__(kRowThreads) quantize_one_row_kernel(
    const T* __restrict__ x, int64_t K, int64_t stride_xk, float threshold, int8_t* __restrict__ q_x,
    float* __restrict__ s_x, int32_t* __restrict__ outlier_cols, int32_t* __restrict__ outlier_count) {
  // slot_masks[w][i], bit l: lane l of warp w holds an outlier in slot i (column i * kRowThreads + 32w + l);
  // indexed [warp][slot] so that the one warp summing a slot per lane reads distinct banks
  __shared__ unsigned slot_masks[kRowWarps][kRowPerThread];
  __shared__ int slot_start[kRowPerThread + 1];  // outliers in the slots before slot i; [kRowPerThread]: all
  __shared__ float warp_max[kRowWarps];
  allow_dependent_launch();  // as in quantize_rows_kernel
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  T raw[kRowPerThread];
#pragma unroll
  for (int i = 0; i < kRowPerThread; ++i) {  // every load issued before any value is converted or used
    const int64_t k = int64_t{i} * kRowThreads + threadIdx.x;
    raw[i] = k < K ? x[k * stride_xk] : T(0.0f);
  }
  float v[kRowPerThread];
  float row_max = 0.0f;
  bool row_nan = false;
  unsigned mine = 0;  // bit i: element i is an outlier (padding is 0, never one)
#pragma unroll
  for (int i = 0; i < kRowPerThread; ++i) {
    v[i] = to_float(raw[i]);
    const float a = fabsf(v[i]);
    if (threshold > 0.0f && a >= threshold) mine |= 1u << i;
    else row_max = fmaxf(row_max, a);
    row_nan |= v[i] != v[i];
  }
  unsigned my_slot = 0;  // lane l keeps the warp's ballot of slot l
#pragma unroll
  for (int i = 0; i < kRowPerThread; ++i) {
    const unsigned ballot = __ballot_sync(0xffffffffu, (mine >> i) & 1u);
    if (lane == i) my_slot = ballot;
  }
  slot_masks[warp][lane] = my_slot;
  const float m = warp_max_keeping_nan(row_nan ? NAN : row_max);
  if (lane == 0) warp_max[warp] = m;
  __syncthreads();  // the warps' maxima and slot masks
  if (warp == 0) {  // lane i: where slot i's outliers start in the list (an exclusive scan over the slots)
    int in_slot = 0;
    for (int w = 0; w < kRowWarps; ++w) in_slot += __popc(slot_masks[w][lane]);
    int inclusive = in_slot;
    for (int offset = 1; offset < 32; offset *= 2) {
      const int other = __shfl_up_sync(0xffffffffu, inclusive, offset);
      if (lane >= offset) inclusive += other;
    }
    slot_start[lane] = inclusive - in_slot;
    if (lane == 31) slot_start[kRowPerThread] = inclusive;
  }
  float scale = 0.0f;
  for (int w = 0; w < kRowWarps; ++w) scale = max_keeping_nan(scale, warp_max[w]);
  if (scale != scale) scale = NAN;  // canonical +NaN, as the two-pass path stores it
  if (threadIdx.x == 0) s_x[0] = scale;
  const float reciprocal = row_reciprocal(scale);
#pragma unroll
  for (int i = 0; i < kRowPerThread; ++i) {  // with one row, its outlier elements are the outlier columns
    const int64_t k = int64_t{i} * kRowThreads + threadIdx.x;
    if (k < K) q_x[k] = ((mine >> i) & 1u) || reciprocal == 0.0f ? int8_t{0} : quantize_value(v[i] * reciprocal);
  }
  __syncthreads();  // slot_start
  if (threadIdx.x == 0) outlier_count[0] = slot_start[kRowPerThread];
  // the ascending list: slot by slot, then by thread (columns i * kRowThreads + thread ascend in that order)
  for (unsigned left = mine; left != 0; left &= left - 1) {
    const int i = __ffs(left) - 1;
    int before = slot_start[i] + __popc(slot_masks[warp][i] & ((1u << lane) - 1u));
    for (int w = 0; w < warp; ++w) before += __popc(slot_masks[w][i]);
    outlier_cols[before] = static_cast<int32_t>(int64_t{i} * kRowThreads + threadIdx.x);
  }
}

// ---- 2-16 rows: one block, the rows spread over its warps, x read twice (the second time from L1 or L2) ----
// A decode batch of a few rows takes this kernel instead of the fill and the two passes (a decode call is then two
// kernels, as with one row). The warps split into equal groups, as many as the power of two at or above M, and
// group g sweeps row g: a thread of the group takes every group-size-th column, in batches of kFewRowsBatch loads
// all issued before any is used. Sweep one finds the row maxima (per warp, then per row) and sets the outlier
// columns' bits in shared memory; sweep two quantizes every element; then the outlier columns are zeroed in every
// row over what sweep two stored. The ascending list comes from the bits: thread t owns word t (columns 32t to
// 32t + 31) and a block scan of the words' counts places them.
constexpr int kFewRowsMaxM = 16;
// M * K up to this: a 70B input of 8192 columns at 16 rows (256 KB in fp16, read again by the second sweep from L1
// or L2); more, and one block's sweeps would take longer than the two passes spread over the GPU (a guess until
// measured)
constexpr int64_t kFewRowsMaxElements = int64_t{16} * 8192;
constexpr int kFewRowsBatch = 16;
constexpr int kColumnWords = static_cast<int>(kRowMaxK / 32);  // one bit per column of a row of up to 32768
static_assert(kColumnWords == kRowThreads, "thread t lists the outlier columns of word t");

// loads of one batch of a group's thread: element i is column k0 + i * group_threads; returns how many of them lie
// inside K (the rest are 0)
template <typename T>
__device__ __forceinline__ int load_batch(T (&raw)[kFewRowsBatch], const T* x_row, int64_t k0, int64_t K,
                                          int64_t stride_xk, int group_threads) {
  const int valid = static_cast<int>(min(int64_t{kFewRowsBatch}, (K - k0 + group_threads - 1) / group_threads));
  const T* first = x_row + k0 * stride_xk;
  const int64_t step = int64_t{group_threads} * stride_xk;
#pragma unroll
  for (int i = 0; i < kFewRowsBatch; ++i) raw[i] = i < valid ? first[i * step] : T(0.0f);
  return valid;
}

template <typename T>
__global__ void __launch_bounds__(kRowThreads) quantize_few_rows_kernel(
    const T* __restrict__ x, int64_t M, int64_t K, int64_t stride_xm, int64_t stride_xk, float threshold,
    int8_t* __restrict__ q_x, float* __restrict__ s_x, int32_t* __restrict__ outlier_cols,
    int32_t* __restrict__ outlier_count) {
  __shared__ unsigned column_bits[kColumnWords];  // bit b of word w: column 32w + b is an outlier column
  __shared__ float warp_max[kRowWarps];           // each warp's maximum of its row's elements below the threshold
  __shared__ float row_reciprocals[kFewRowsMaxM];
  __shared__ int warp_totals[kRowWarps];
  allow_dependent_launch();  // as in quantize_rows_kernel
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  int groups = 1;
  while (groups < M) groups *= 2;
  const int group_warps = kRowWarps / groups, group_threads = 32 * group_warps;
  const int row = warp / group_warps, first = threadIdx.x % group_threads;  // this thread's row and first column
  const bool has_row = row < M;
  const T* x_row = x + row * stride_xm;
  const int64_t batch_columns = int64_t{group_threads} * kFewRowsBatch;
  column_bits[threadIdx.x] = 0;
  __syncthreads();

  float row_max = 0.0f;
  bool row_nan = false;
  for (int64_t k0 = first; has_row && k0 < K; k0 += batch_columns) {
    T raw[kFewRowsBatch];
    load_batch(raw, x_row, k0, K, stride_xk, group_threads);
    unsigned outliers = 0;  // bit i: element i (padding is 0, never one)
#pragma unroll
    for (int i = 0; i < kFewRowsBatch; ++i) {
      const float v = to_float(raw[i]);
      const float a = fabsf(v);
      if (threshold > 0.0f && a >= threshold) outliers |= 1u << i;
      else row_max = fmaxf(row_max, a);
      row_nan |= v != v;
    }
    for (; outliers != 0; outliers &= outliers - 1) {  // rare: a few outlier features per token
      const int64_t k = k0 + int64_t{__ffs(outliers) - 1} * group_threads;
      atomicOr(&column_bits[k / 32], 1u << (k % 32));
    }
  }
  const float m = warp_max_keeping_nan(row_nan ? NAN : row_max);
  if (lane == 0) warp_max[warp] = m;
  __syncthreads();  // the warps' maxima and the column bits
  if (threadIdx.x < M) {  // thread r: row r's scale, from its group's warps
    float scale = 0.0f;
    for (int w = 0; w < group_warps; ++w) scale = max_keeping_nan(scale, warp_max[threadIdx.x * group_warps + w]);
    if (scale != scale) scale = NAN;  // canonical +NaN, as the two-pass path stores it
    s_x[threadIdx.x] = scale;
    row_reciprocals[threadIdx.x] = row_reciprocal(scale);
  }
  const unsigned word = column_bits[threadIdx.x];
  const int in_word = __popc(word);
  const int before = block_inclusive_scan(in_word, warp_totals) - in_word;  // its barrier publishes the reciprocals
  if (threadIdx.x == kRowThreads - 1) outlier_count[0] = before + in_word;

  const float reciprocal = has_row ? row_reciprocals[row] : 0.0f;
  int8_t* q_row = q_x + row * K;
  for (int64_t k0 = first; has_row && k0 < K; k0 += batch_columns) {
    T raw[kFewRowsBatch];
    const int valid = load_batch(raw, x_row, k0, K, stride_xk, group_threads);
#pragma unroll
    for (int i = 0; i < kFewRowsBatch; ++i)
      if (i < valid)
        q_row[k0 + i * group_threads] = reciprocal == 0.0f ? int8_t{0} : quantize_value(to_float(raw[i]) * reciprocal);
  }
  __syncthreads();  // every row stored before its outlier columns are zeroed over it (a later store of the block wins)
  int slot = before;
  for (unsigned left = word; left != 0; left &= left - 1) {
    const int col = 32 * threadIdx.x + __ffs(left) - 1;
    outlier_cols[slot++] = col;
    for (int64_t r = 0; r < M; ++r) q_x[r * K + col] = 0;
  }
}

int quantize_activations_impl(const void* x, int x_dtype, int64_t M, int64_t K, int64_t stride_xm,
                              int64_t stride_xk, float threshold, int32_t* workspace, int8_t* q_x, float* s_x,
                              int32_t* outlier_cols, int32_t* outlier_count, cudaStream_t stream,
                              int num_sms) {
  if (M == 1 && K > 0 && K <= kRowMaxK) {  // needs neither the workspace nor its fill
    INT8MM_DISPATCH_FLOAT(x_dtype, {
      quantize_one_row_kernel<scalar_t><<<1, kRowThreads, 0, stream>>>(
          static_cast<const scalar_t*>(x), K, stride_xk, threshold, q_x, s_x, outlier_cols, outlier_count);
    });
    return static_cast<int>(cudaGetLastError());
  }
  if (M >= 2 && M <= kFewRowsMaxM && K > 0 && K <= kRowMaxK && M * K <= kFewRowsMaxElements) {  // likewise
    INT8MM_DISPATCH_FLOAT(x_dtype, {
      quantize_few_rows_kernel<scalar_t><<<1, kRowThreads, 0, stream>>>(
          static_cast<const scalar_t*>(x), M, K, stride_xm, stride_xk, threshold, q_x, s_x, outlier_cols,
          outlier_count);
    });
    return static_cast<int>(cudaGetLastError());
  }
  const int64_t num_compact_blocks = ceil_div(K, kCompactBlock);
  int32_t* row_max_bits = workspace;
  int32_t* col_flags = workspace + M;
  int32_t* block_counts = workspace + M + K;
  INT8MM_RETURN_IF_ERROR(cudaMemsetAsync(workspace, 0, sizeof(int32_t) * (M + K + num_compact_blocks), stream));
  if (M == 0 || K == 0) {  // no pass runs: rows without elements have scale 0, and there are no outliers
    INT8MM_RETURN_IF_ERROR(cudaMemsetAsync(s_x, 0, sizeof(float) * M, stream));
    INT8MM_RETURN_IF_ERROR(cudaMemsetAsync(outlier_count, 0, sizeof(int32_t), stream));
    return 0;
  }
  // enough blocks to cover the GPU twice, each sweeping a run of columns
  const int64_t row_blocks = ceil_div(M, kStatsRows);
  const int64_t col_chunks = ceil_div(K, kThreads);
  const int64_t splits = std::max<int64_t>(1, std::min<int64_t>(col_chunks, ceil_div(2 * num_sms, row_blocks)));
  const int64_t cols_per_block = ceil_div(col_chunks, splits) * kThreads;
  dim3 stats_grid(static_cast<unsigned>(row_blocks), static_cast<unsigned>(ceil_div(K, cols_per_block)));
  dim3 quant_grid(static_cast<unsigned>(ceil_div(M, kQuantRows)), static_cast<unsigned>(num_compact_blocks));
  INT8MM_DISPATCH_FLOAT(x_dtype, {
    const scalar_t* xt = static_cast<const scalar_t*>(x);
    activation_stats_kernel<scalar_t><<<stats_grid, kThreads, 0, stream>>>(
        xt, M, K, stride_xm, stride_xk, threshold, cols_per_block, row_max_bits, col_flags, block_counts);
    quantize_rows_kernel<scalar_t><<<quant_grid, kThreads, 0, stream>>>(
        xt, M, K, stride_xm, stride_xk, row_max_bits, col_flags, block_counts, num_compact_blocks, q_x, s_x,
        outlier_cols, outlier_count);
  });
  return static_cast<int>(cudaGetLastError());
}

}  // namespace int8mm
