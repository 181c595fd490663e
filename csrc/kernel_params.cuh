// The kernels' parameters (CrossEntropyParams, filled on the host in cross_entropy.cu and causal_lm.cu), a row's
// coordinates and target, and the writers of a row's outputs (loss, statistics), shared by every path (device code
// only, but for the parameter struct).
#pragma once

#include <cmath>
#include <cstdint>

#include "elements.cuh"
#include "row_math.cuh"

namespace fastce {

constexpr int kRowStatsFields = 3;    // (lse, entropy, correct)
constexpr int kShardStatsFields = 5;  // (max, sum, x'_t, sum_x, sum_px): fastce/stats.py
constexpr int kRowInFields = 3;       // (max, sum, scale)

struct CrossEntropyParams {
  const void* logits;  // [B, T, V], element (b, t, v) at b * logits_stride_b + t * logits_stride_t + v
  int64_t logits_stride_b, logits_stride_t;
  const void* targets;  // [B, T] int32 or int64
  int64_t targets_stride_b, targets_stride_t;
  const double* divisor;  // 0-dim: grad is divided by it (NaN where it is 0)
  float* losses;          // [B, T] contiguous: row r = b * T + t (nullptr in the shard ops)
  void* grad;             // [B, T, V] in the logits' dtype, or nullptr for forward only; may equal logits
  int64_t grad_stride_b, grad_stride_t;
  int64_t num_rows;  // B * T
  int64_t seq_len;   // T
  int64_t ignore_index;
  int vocab;  // V: the columns of these logits (a range of the whole row in the shard ops)
  int target_shift;  // 0, or 1 for the causal shift: row (b, t) takes targets[b, t + 1], ignore_index at t = T - 1
  const bool* skip;  // 0-dim on the device, or nullptr: when it holds true, every kernel returns at once
  // Split path only.
  void* partials;        // [num_rows, num_splits] Stats (StatsX with options)
  float* target_logits;  // [num_rows]: x[target] (x' with options), NaN when the target is out of range
  int num_splits;
  int split_len;  // elements per split (the last may be shorter)
  // kOptions kernels only.
  Spec spec;
  int64_t vocab_start;  // these columns start at column vocab_start of the whole row: targets are taken relative to it
  float* row_stats;     // [num_rows, 3] (lse, entropy, correct), or nullptr
  float* shard_stats;   // [num_rows, 5] (shard_stats), written instead of losses; or nullptr
  const float* row_in;  // [num_rows, 3] (max, sum, scale) of whole rows (shard_grad): kernel B takes them, or nullptr
};

struct Row {
  int64_t b, t;
};

__device__ __forceinline__ Row row_coords(int64_t row, int64_t seq_len) {
  const int64_t b = row / seq_len;
  return {b, row - b * seq_len};
}

template <typename target_t>
__device__ __forceinline__ int64_t read_target(const CrossEntropyParams& p, Row r) {
  const int64_t t = r.t + p.target_shift;
  if (t >= p.seq_len) return p.ignore_index;
  return static_cast<int64_t>(static_cast<const target_t*>(p.targets)[r.b * p.targets_stride_b + t * p.targets_stride_t]);
}

// The target's column among these logits (the shard ops' logits start at column vocab_start of the row).
template <bool kOptions>
__device__ __forceinline__ int64_t target_column(const CrossEntropyParams& p, int64_t target) {
  if constexpr (kOptions) {
    return target - p.vocab_start;
  } else {
    return target;
  }
}

template <typename scalar_t>
__device__ __forceinline__ const typename Elem<scalar_t>::Bits* logits_row(const CrossEntropyParams& p, Row r) {
  return static_cast<const typename Elem<scalar_t>::Bits*>(p.logits) + r.b * p.logits_stride_b +
         r.t * p.logits_stride_t;
}

template <typename scalar_t>
__device__ __forceinline__ typename Elem<scalar_t>::Bits* grad_row(const CrossEntropyParams& p, Row r) {
  return static_cast<typename Elem<scalar_t>::Bits*>(p.grad) + r.b * p.grad_stride_b + r.t * p.grad_stride_t;
}

template <typename S>
__device__ __forceinline__ S* partials_of(const CrossEntropyParams& p) {
  return static_cast<S*>(p.partials);
}

// The skip flag: the same for every thread of the launch, so a kernel may return on it before any barrier.
__device__ __forceinline__ bool skipped(const CrossEntropyParams& p) { return p.skip != nullptr && *p.skip; }

// 1 / divisor; NaN for a zero divisor, which makes the gradient of every row that is not ignored NaN (a zero count
// with targets that are not ignored contradicts itself). Ignored rows get zeros, written without it.
__device__ __forceinline__ float grad_scale(const double* divisor) {
  const double d = *divisor;
  return d == 0.0 ? NAN : static_cast<float>(1.0 / d);
}

// The outputs of an ignored row (one thread writes them): loss 0 (and row statistics 0), or for shard_stats the
// identity of the merge, (-inf, 0, 0, 0, 0). shard_grad writes none.
template <bool kOptions>
__device__ __forceinline__ void write_ignored_row(const CrossEntropyParams& p, int64_t row) {
  if constexpr (!kOptions) {
    p.losses[row] = 0.f;
  } else {
    if (p.losses != nullptr) p.losses[row] = 0.f;
    if (p.row_stats != nullptr) {
#pragma unroll
      for (int i = 0; i < kRowStatsFields; ++i) p.row_stats[row * kRowStatsFields + i] = 0.f;
    }
    if (p.shard_stats != nullptr) {
      float* out = p.shard_stats + row * kShardStatsFields;
      out[0] = -INFINITY;
#pragma unroll
      for (int i = 1; i < kShardStatsFields; ++i) out[i] = 0.f;
    }
  }
}

// The outputs of a row from its merged stats (one thread writes them): the loss (and with options its row
// statistics), or for shard_stats the statistics of these columns. target_logit: x'[target], NaN when the target
// is not among these columns (in_range false), which makes the loss NaN.
template <bool kOptions>
__device__ __forceinline__ void write_row(const CrossEntropyParams& p, int64_t row, const RowStats<kOptions>& stats,
                                          bool in_range, float target_logit) {
  if constexpr (!kOptions) {
    p.losses[row] = row_loss(stats, target_logit);
  } else {
    const Spec& spec = p.spec;
    if (p.shard_stats != nullptr) {
      float* out = p.shard_stats + row * kShardStatsFields;
      out[0] = stats.max;
      out[1] = stats.sum;
      out[2] = in_range ? target_logit : 0.f;
      out[3] = spec.sum_x ? stats.sum_x : 0.f;
      out[4] = spec.sum_px ? stats.sum_px : 0.f;
      return;
    }
    const float log_sum = logf(stats.sum);
    float loss = (stats.max - target_logit) + log_sum;
    if (spec.smoothing != 0.f) {
      loss = spec.keep * loss + spec.smoothing * ((stats.max - stats.sum_x / spec.vocab) + log_sum);
    }
    const float lse = stats.max + log_sum;
    if (spec.z_loss != 0.f) loss += spec.z_loss * lse * lse;
    if (p.losses != nullptr) p.losses[row] = loss;
    if (p.row_stats != nullptr) {
      float* out = p.row_stats + row * kRowStatsFields;
      out[0] = lse;
      out[1] = log_sum - stats.sum_px / stats.sum;
      out[2] = (in_range && target_logit >= stats.max) ? 1.f : 0.f;
    }
  }
}

}  // namespace fastce
