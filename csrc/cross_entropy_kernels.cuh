// Fused shifted cross-entropy: the CUDA kernels of the row and split paths (device code only; their parameters in
// kernel_params.cuh, the element loops they share in row_loops.cuh, the cluster path in cluster_kernel.cuh, launch
// policy in launch_plan.cuh and cross_entropy.cu, checks in checks.cpp, the arithmetic of a row in row_math.cuh).
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
#include "kernel_params.cuh"
#include "row_loops.cuh"
#include "row_math.cuh"

namespace fastce {

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
