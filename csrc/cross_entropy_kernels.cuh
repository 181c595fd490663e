// Fused shifted cross-entropy: the CUDA kernels of the row and split paths, their parameters and the writers every
// path shares (device code only; the cluster path is in cluster_kernel.cuh, launch policy and checks in
// cross_entropy.cu, the arithmetic of a row in row_math.cuh).
//
// The contract is the one in fastce/kernels/__init__.py. In short, for every row r = (b, t) of logits [B, T, V]:
//   (max, sum) = the row's max and sum(exp(x - max)), accumulated in float32 online (the sum is rescaled when the
//                max grows) as the row streams by;
//   losses_r   = (max - x[target]) + log(sum) = logsumexp(x) - x[target]  (0 if target == ignore_index, NaN if
//                target is outside [0, V));
//   grad_r     = (exp(x - max) / sum - onehot(target)) / divisor, in the logits' dtype (0 on ignored rows).
// Both are taken relative to the max, not to logsumexp: a float32 logsumexp carries the rounding of the logits'
// magnitude, which would swamp small losses and the gradient of a target whose probability is close to 1.
// With options (softcap, label smoothing, z-loss, row statistics: every kernel's kOptions variant), the same two
// phases over x' with the contract's loss and gradient; see row_math.cuh.
//
// Three paths (the host picks one, see try_cluster_path and choose_splits in cross_entropy.cu):
//   cluster path (sm_90 and newer, the default there): one thread-block cluster per row, the row held in registers
//              and read once; see cluster_kernel.cuh. Forward only, its blocks write partial stats instead, which
//              the split path's kernel B merges.
//   row path   (many rows): a persistent grid, one block per row at a time. Pass 1 reads the row for the running
//              (max, sum); pass 2 re-reads it, mostly from L2 (the grid is sized from the L2 size, and gradient
//              stores are evict-first), and writes the gradient. A block touches only its own row, so grad may be
//              logits itself.
//   split path (few rows): the vocabulary is cut into S splits. Kernel A writes a float32 (max, sum) per
//              (row, split) and the target logit per row into a small workspace; kernel B merges the S partials of
//              its row in split order (every block of a row gets the same bits), then writes the gradient of its
//              split; split 0 writes the loss. Kernel A has read everything before kernel B writes anything.
// The shard ops take the same kernels: shard_stats is a forward-only launch that writes a range's statistics
// instead of losses (CrossEntropyParams::shard_stats), shard_grad is kernel B alone, given each row's (max, sum,
// scale) (CrossEntropyParams::row_in).
//
// Memory access: 16-byte vectors (8 bf16/fp16 or 4 fp32) between scalar heads and tails, so any row start (a slice
// such as logits[:, 1:], an odd V) keeps the bulk of the row vectorised; when logits and grad rows are misaligned
// differently, pass 2 falls back to scalar accesses. Offsets of rows are 64-bit; offsets within a row are int
// (V <= kMaxVocab is checked on the host). Determinism: every reduction has a fixed order (shuffle trees, warp
// order, split order).
#pragma once

#include <cmath>
#include <cstdint>

#include "elements.cuh"
#include "row_math.cuh"

namespace fastce {

// This thread's share of the stats of x[0, len) (with options: of x').
template <typename scalar_t, bool kOptions = false>
__device__ __forceinline__ RowStats<kOptions> thread_stats(const typename Elem<scalar_t>::Bits* x, int len,
                                                           const Spec& spec) {
  using E = Elem<scalar_t>;
  using V = Vec<scalar_t>;
  const Span<typename E::Bits> span(x, len);
  RowStats<kOptions> stats = empty_stats<RowStats<kOptions>>();
  if (span.scalar_index >= 0) {
    float value[1] = {E::to_float(x[span.scalar_index])};
    fold(stats, value, spec);
  }
  const uint4* vecs = reinterpret_cast<const uint4*>(x + span.head);
  int v = threadIdx.x;
  // Whole steps: kUnroll vectors, all loaded before any math (kUnroll x 16 bytes in flight), one rescale.
  for (; v + (kUnroll - 1) * kThreads < span.num_vecs; v += kUnroll * kThreads) {
    uint4 raw[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) raw[u] = vecs[v + u * kThreads];
    float values[kUnroll * V::kSize];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      float unpacked[V::kSize];
      V::unpack(raw[u], unpacked);
#pragma unroll
      for (int k = 0; k < V::kSize; ++k) values[u * V::kSize + k] = unpacked[k];
    }
    fold(stats, values, spec);
  }
  for (; v < span.num_vecs; v += kThreads) {  // the last, partial step
    float values[V::kSize];
    V::unpack(vecs[v], values);
    fold(stats, values, spec);
  }
  return stats;
}

// ---------------------------------------------------------------------------------------------------------------
// Writers. Gradient stores are streaming (evict-first in L2), so they do not push out rows still to be re-read.

// g[i] = grad_of(x[i], i == target) for i in [0, len) (target = -1 for none): the epilogue, a GradOf. g may be x
// itself: each element is read and then written by the same thread.
template <typename scalar_t, typename GradFn>
__device__ __forceinline__ void write_grad(const typename Elem<scalar_t>::Bits* x, typename Elem<scalar_t>::Bits* g,
                                           int len, int target, const GradFn& grad_of) {
  using E = Elem<scalar_t>;
  using V = Vec<scalar_t>;
  if (((reinterpret_cast<uintptr_t>(x) ^ reinterpret_cast<uintptr_t>(g)) & 15) != 0) {
    // Rows misaligned differently (e.g. a sliced logits and a fresh grad with odd V): scalar, still coalesced.
    for (int i = threadIdx.x; i < len; i += kThreads) g[i] = E::from_float(grad_of(E::to_float(x[i]), i == target));
    return;
  }
  const Span<typename E::Bits> span(x, len);
  if (span.scalar_index >= 0) {
    const int i = span.scalar_index;
    g[i] = E::from_float(grad_of(E::to_float(x[i]), i == target));
  }
  const uint4* x_vecs = reinterpret_cast<const uint4*>(x + span.head);
  uint4* g_vecs = reinterpret_cast<uint4*>(g + span.head);
  auto store = [&](int v, const uint4& raw) {
    const int target_lane = target - (span.head + v * V::kSize);  // in [0, kSize) iff the target is in this vector
    float values[V::kSize];
    V::unpack(raw, values);
#pragma unroll
    for (int k = 0; k < V::kSize; ++k) values[k] = grad_of(values[k], k == target_lane);
    __stcs(g_vecs + v, V::pack(values));
  };
  int v = threadIdx.x;
  for (; v + (kUnroll - 1) * kThreads < span.num_vecs; v += kUnroll * kThreads) {
    uint4 raw[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) raw[u] = __ldcs(x_vecs + v + u * kThreads);  // the last read of these logits
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) store(v + u * kThreads, raw[u]);
  }
  for (; v < span.num_vecs; v += kThreads) store(v, __ldcs(x_vecs + v));
}

// g[i] = 0 for i in [0, len), without reading anything.
template <typename scalar_t>
__device__ __forceinline__ void write_zeros(typename Elem<scalar_t>::Bits* g, int len) {
  const Span<typename Elem<scalar_t>::Bits> span(g, len);
  if (span.scalar_index >= 0) g[span.scalar_index] = 0;
  uint4* g_vecs = reinterpret_cast<uint4*>(g + span.head);
  for (int v = threadIdx.x; v < span.num_vecs; v += kThreads) __stcs(g_vecs + v, make_uint4(0u, 0u, 0u, 0u));
}

// g[i] *= factor for i in [0, len).
template <typename scalar_t>
__device__ __forceinline__ void scale_in_place(typename Elem<scalar_t>::Bits* g, int len, float factor) {
  using E = Elem<scalar_t>;
  using V = Vec<scalar_t>;
  const Span<typename E::Bits> span(g, len);
  if (span.scalar_index >= 0) g[span.scalar_index] = E::from_float(E::to_float(g[span.scalar_index]) * factor);
  uint4* g_vecs = reinterpret_cast<uint4*>(g + span.head);
  auto store = [&](int v, const uint4& raw) {
    float values[V::kSize];
    V::unpack(raw, values);
#pragma unroll
    for (int k = 0; k < V::kSize; ++k) values[k] *= factor;
    __stcs(g_vecs + v, V::pack(values));
  };
  int v = threadIdx.x;
  for (; v + (kUnroll - 1) * kThreads < span.num_vecs; v += kUnroll * kThreads) {
    uint4 raw[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) raw[u] = __ldcs(g_vecs + v + u * kThreads);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) store(v + u * kThreads, raw[u]);
  }
  for (; v < span.num_vecs; v += kThreads) store(v, __ldcs(g_vecs + v));
}

// ---------------------------------------------------------------------------------------------------------------
// Parameters and the outputs of a row.

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

// ---------------------------------------------------------------------------------------------------------------
// Kernels. kOptions: the options of p.spec and the extra outputs (row_stats, shard_stats, row_in); without it, the
// plain path, which reads none of them.

// Resident blocks per SM the streaming kernels are compiled for: with options, 2 (without the cap their softcap
// and sums took up to 126 registers, one block per SM); the plain kernels none (0: no minimum, the launch bounds
// they always had; a minimum of 1 would change their code).
template <bool kOptions>
constexpr int streaming_min_blocks() {
  return kOptions ? 2 : 0;
}

// Row path: a persistent grid; each block takes rows blockIdx.x, blockIdx.x + gridDim.x, ...
template <typename scalar_t, typename target_t, bool WRITE_GRAD, bool kOptions>
__global__ void __launch_bounds__(kThreads, streaming_min_blocks<kOptions>())
    cross_entropy_rows_kernel(const CrossEntropyParams p) {
  using E = Elem<scalar_t>;
  __shared__ RowStats<kOptions> warp_stats[kWarps];
  if (skipped(p)) return;
  const float scale = WRITE_GRAD ? grad_scale(p.divisor) : 0.f;
  for (int64_t row = blockIdx.x; row < p.num_rows; row += gridDim.x) {
    const Row r = row_coords(row, p.seq_len);
    const int64_t target = read_target<target_t>(p, r);
    if (target == p.ignore_index) {  // the same for the whole block
      if (threadIdx.x == 0) write_ignored_row<kOptions>(p, row);
      if constexpr (WRITE_GRAD) write_zeros<scalar_t>(grad_row<scalar_t>(p, r), p.vocab);
      continue;
    }
    const auto* x = logits_row<scalar_t>(p, r);
    const int64_t column = target_column<kOptions>(p, target);
    const bool in_range = column >= 0 && column < p.vocab;
    // Read before block_merge's barriers, hence before pass 2 can overwrite it in place.
    const float target_logit =
        (threadIdx.x == 0 && in_range) ? capped<kOptions>(E::to_float(x[column]), p.spec) : NAN;
    const auto stats = block_merge(thread_stats<scalar_t, kOptions>(x, p.vocab, p.spec), warp_stats);
    if (threadIdx.x == 0) write_row<kOptions>(p, row, stats, in_range, target_logit);
    if constexpr (WRITE_GRAD) {
      with_softcap<kOptions>(p.spec, [&](auto softcap) {
        write_grad<scalar_t>(x, grad_row<scalar_t>(p, r), p.vocab, in_range ? static_cast<int>(column) : -1,
                             GradOf<kOptions, decltype(softcap)::value>(stats.max, stats.sum, scale, p.spec));
      });
    }
  }
}

// Split path, kernel A: block (row, split) writes the stats of its split; split 0 also saves the target logit.
template <typename scalar_t, typename target_t, bool kOptions>
__global__ void __launch_bounds__(kThreads, streaming_min_blocks<kOptions>())
    split_stats_kernel(const CrossEntropyParams p) {
  using E = Elem<scalar_t>;
  using S = RowStats<kOptions>;
  __shared__ S warp_stats[kWarps];
  if (skipped(p)) return;
  const int64_t row = blockIdx.x / p.num_splits;
  const int split = static_cast<int>(blockIdx.x % p.num_splits);
  const Row r = row_coords(row, p.seq_len);
  const int64_t target = read_target<target_t>(p, r);
  if (target == p.ignore_index) return;  // kernel B reads no partials for this row
  const auto* x = logits_row<scalar_t>(p, r);
  const int begin = split * p.split_len;
  const int len = min(p.split_len, p.vocab - begin);
  const S stats = block_merge(thread_stats<scalar_t, kOptions>(x + begin, len, p.spec), warp_stats);
  if (threadIdx.x == 0) {
    partials_of<S>(p)[row * p.num_splits + split] = stats;
    const int64_t column = target_column<kOptions>(p, target);
    if (split == 0) {
      const bool in_range = column >= 0 && column < p.vocab;
      p.target_logits[row] = in_range ? capped<kOptions>(E::to_float(x[column]), p.spec) : NAN;
    }
  }
}

// Split path, kernel B: block (row, split) merges the row's partials and writes the gradient of its split (when
// WRITE_GRAD; otherwise one block per row); split 0 writes the loss. Blocks are numbered from the end, so the first
// to run re-read what kernel A read last, the part most likely still in L2. With p.row_in (shard_grad) it merges
// nothing: each row's (max, sum) and gradient scale are given, and only the gradient is written.
template <typename scalar_t, typename target_t, bool WRITE_GRAD, bool kOptions>
__global__ void __launch_bounds__(kThreads, streaming_min_blocks<kOptions>())
    split_finish_kernel(const CrossEntropyParams p) {
  using S = RowStats<kOptions>;
  if (skipped(p)) return;
  const int splits_launched = WRITE_GRAD ? p.num_splits : 1;
  const int64_t block = static_cast<int64_t>(gridDim.x) - 1 - blockIdx.x;
  const int64_t row = block / splits_launched;
  const int split = static_cast<int>(block % splits_launched);
  const Row r = row_coords(row, p.seq_len);
  const int64_t target = read_target<target_t>(p, r);
  const int begin = split * p.split_len;
  const int len = min(p.split_len, p.vocab - begin);
  if (target == p.ignore_index) {
    if (split == 0 && threadIdx.x == 0) write_ignored_row<kOptions>(p, row);
    if constexpr (WRITE_GRAD) write_zeros<scalar_t>(grad_row<scalar_t>(p, r) + begin, len);
    return;
  }
  const int64_t column = target_column<kOptions>(p, target);
  const bool given = kOptions && p.row_in != nullptr;  // shard_grad: each row's (max, sum, scale)
  S stats = empty_stats<S>();
  if (given) {
    stats.max = p.row_in[row * kRowInFields];
    stats.sum = p.row_in[row * kRowInFields + 1];
  } else {
    // Every warp merges the partials in the same order: lane l takes splits l, l + 32, ... in turn, then the
    // butterfly.
    for (int s = threadIdx.x % 32; s < p.num_splits; s += 32) {
      stats = merge(stats, partials_of<S>(p)[row * p.num_splits + s]);
    }
    stats = warp_merge(stats);
    if (split == 0 && threadIdx.x == 0) {
      write_row<kOptions>(p, row, stats, column >= 0 && column < p.vocab, p.target_logits[row]);
    }
  }
  if constexpr (WRITE_GRAD) {
    const int target_here = (column >= begin && column < begin + len) ? static_cast<int>(column - begin) : -1;
    const float scale = given ? p.row_in[row * kRowInFields + 2] : grad_scale(p.divisor);
    with_softcap<kOptions>(p.spec, [&](auto softcap) {
      write_grad<scalar_t>(logits_row<scalar_t>(p, r) + begin, grad_row<scalar_t>(p, r) + begin, len, target_here,
                           GradOf<kOptions, decltype(softcap)::value>(stats.max, stats.sum, scale, p.spec));
    });
  }
}

struct ScaleParams {
  void* grad;  // [B, T, V]
  int64_t grad_stride_b, grad_stride_t;
  const float* grad_output;  // element (b, t) at b * stride_b + t * stride_t (both 0 for a 0-dim factor)
  int64_t grad_output_stride_b, grad_output_stride_t;
  int64_t num_rows, seq_len;
  int vocab;
};

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) scale_grad_kernel(const ScaleParams p) {
  for (int64_t row = blockIdx.x; row < p.num_rows; row += gridDim.x) {
    const Row r = row_coords(row, p.seq_len);
    const float factor = p.grad_output[r.b * p.grad_output_stride_b + r.t * p.grad_output_stride_t];
    if (factor == 1.f) continue;  // decided here, on the device: no host synchronisation
    auto* g = static_cast<typename Elem<scalar_t>::Bits*>(p.grad) + r.b * p.grad_stride_b + r.t * p.grad_stride_t;
    scale_in_place<scalar_t>(g, p.vocab, factor);
  }
}

}  // namespace fastce
