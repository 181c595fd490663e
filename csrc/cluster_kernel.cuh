// Fused shifted cross-entropy, cluster path (sm_90 and newer): every row read once, from memory into registers.
// Device code only; parameters, writers and the other paths in cross_entropy_kernels.cuh.
//
// A row is cut into `cluster` slices of kVecs x kThreads 16-byte vectors; block `rank` of a thread-block cluster of
// that many blocks holds slice `rank` in registers. Each block reduces its slice to (max, sum) and publishes it in its
// shared memory; after a cluster barrier every thread merges the stats of all the blocks, read through distributed
// shared memory in rank order (so every block gets the same bits). The gradient is then computed from the registers
// and written: one read and one write per logit, 4 bytes per bf16 logit. One cluster per row: grid = rows x cluster.
//
// Vectors are 16-byte aligned in memory, not relative to the row: with `shift` the misalignment of the row start in
// elements, vector k holds row elements [k * kSize - shift, (k + 1) * kSize - shift). The first and the last vector
// of a row may be partial; they are read and written element by element (no byte outside the row is touched), and
// their elements outside the row are -inf, which adds nothing to the stats (with options they are also left out by
// position: a softcap maps -inf to -softcap, and the sum of the logits must not see them).
#pragma once

#include <cmath>
#include <cstdint>

#include "cross_entropy_kernels.cuh"

namespace fastce {

// Vector k of the row x (misaligned by `shift` elements), -inf outside [0, len).
template <typename scalar_t>
__device__ __forceinline__ uint4 load_vec(const typename Elem<scalar_t>::Bits* x, int shift, int k, int len) {
  using Bits = typename Elem<scalar_t>::Bits;
  constexpr int kSize = Vec<scalar_t>::kSize;
  const int begin = k * kSize - shift;
  if (begin >= 0 && begin + kSize <= len) return __ldcs(reinterpret_cast<const uint4*>(x - shift) + k);
  uint4 v;
#pragma unroll
  for (int j = 0; j < kSize; ++j) {
    const int i = begin + j;
    vec_set<Bits>(v, j, (i >= 0 && i < len) ? x[i] : static_cast<Bits>(NegInf<scalar_t>::kBits));
  }
  return v;
}

// Stores the elements of vector k (of a row misaligned by x_shift) that lie in [0, len) into g, a row misaligned by
// g_shift: one 16-byte store when the vector is whole and the misalignments agree, else element by element.
template <typename scalar_t>
__device__ __forceinline__ void store_vec(typename Elem<scalar_t>::Bits* g, int g_shift, int x_shift, int k, int len,
                                          const uint4& v) {
  using Bits = typename Elem<scalar_t>::Bits;
  constexpr int kSize = Vec<scalar_t>::kSize;
  const int begin = k * kSize - x_shift;
  if (g_shift == x_shift && begin >= 0 && begin + kSize <= len) {
    __stcs(reinterpret_cast<uint4*>(g - g_shift) + k, v);
    return;
  }
#pragma unroll
  for (int j = 0; j < kSize; ++j) {
    const int i = begin + j;
    if (i >= 0 && i < len) g[i] = vec_get<Bits>(v, j);
  }
}

constexpr int kSumX = 1, kSumPx = 2;  // register_stats' kSums: which of the options' sums a row needs

// This thread's stats of the vectors it holds: raw[i] is vector first_vec + i * kThreads of a row of `len` elements
// misaligned by `shift`. Its max first (on the raw words), then the sum of exponentials relative to it: a tree per
// vector, then over vectors. With options, also the sums that kSums names: of x' (kSumX) and of exp(x' - max)(x' - max)
// (kSumPx); without a softcap the row's bounds are tested once a vector (benchmarks/NOTES.md, row 27), with one a
// select per element. With kSoftcap, the stats of x' (tanh is increasing, so the max of x' is x' of the max: -inf for
// a thread that holds none of the row's elements). Elements outside the row are masked out, without branches in
// the loops over elements.

template <typename scalar_t, int kVecs, bool kOptions, bool kSoftcap, int kSums>
__device__ __forceinline__ RowStats<kOptions> register_stats(const uint4 (&raw)[kVecs], int first_vec, int shift,
                                                             int len, const Spec& spec) {
  using V = Vec<scalar_t>;
  PackedMax<scalar_t> packed_max;
#pragma unroll
  for (int i = 0; i < kVecs; ++i) packed_max.update(raw[i]);
  float max = packed_max.result();
  if constexpr (kSoftcap) {
    const float capped_max = softcap_of(max, spec).value;
    max = (first_vec * V::kSize - shift < len) ? capped_max : -INFINITY;
  }
  const float ref = finite_ref(max);
  float sums[kVecs];
  float sum_x = 0.f, sum_px = 0.f;  // options only
#pragma unroll
  for (int i = 0; i < kVecs; ++i) {
    float values[V::kSize];
    V::unpack(raw[i], values);
    if constexpr (kOptions && !kSoftcap) {
      // Without a softcap: the position test once per vector. Elements outside the row are -inf already (load_vec);
      // only sum_x must leave them out, and only the first and the last vector of a row can hold any.
      const int begin = (first_vec + i * kThreads) * V::kSize - shift;  // the row element of values[0]
      const bool whole = begin >= 0 && begin + V::kSize <= len;
      if constexpr ((kSums & kSumX) != 0) {
        float vx[V::kSize];
#pragma unroll
        for (int j = 0; j < V::kSize; ++j) vx[j] = values[j];
#pragma unroll
        for (int width = V::kSize / 2; width > 0; width /= 2) {
#pragma unroll
          for (int j = 0; j < width; ++j) vx[j] += vx[j + width];
        }
        if (!whole) {  // rare
          vx[0] = 0.f;
#pragma unroll
          for (int j = 0; j < V::kSize; ++j) {
            if (static_cast<unsigned>(begin + j) < static_cast<unsigned>(len)) vx[0] += values[j];
          }
        }
        sum_x += vx[0];
      }
#pragma unroll
      for (int j = 0; j < V::kSize; ++j) {
        const float d = values[j] - ref;
        const float e = exp2_approx(d * kLog2e);
        // e * d, with d clamped to a finite value: 0 rather than 0 * -inf = NaN where x = -inf; NaN stays NaN (e).
        if constexpr ((kSums & kSumPx) != 0) sum_px = fmaf(e, fmaxf(d, -3.402823466e38f), sum_px);
        values[j] = e;
      }
    } else if constexpr (kOptions) {
      const int begin = (first_vec + i * kThreads) * V::kSize - shift;  // the row element of values[0]
#pragma unroll
      for (int j = 0; j < V::kSize; ++j) {
        const bool in_row = static_cast<unsigned>(begin + j) < static_cast<unsigned>(len);
        float x = values[j];
        if constexpr (kSoftcap) {
          const float capped_x = softcap_of(x, spec).value;
          x = in_row ? capped_x : -INFINITY;
        }
        const float d = x - ref;
        const float e = exp2_approx(d * kLog2e);
        if constexpr ((kSums & kSumX) != 0) sum_x += in_row ? x : 0.f;
        if constexpr ((kSums & kSumPx) != 0) sum_px += e > 0.f ? e * d : 0.f;
        values[j] = e;
      }
    } else {
#pragma unroll
      for (int j = 0; j < V::kSize; ++j) values[j] = exp2_approx((values[j] - ref) * kLog2e);
    }
#pragma unroll
    for (int width = V::kSize / 2; width > 0; width /= 2) {
#pragma unroll
      for (int j = 0; j < width; ++j) values[j] += values[j + width];
    }
    sums[i] = values[0];
  }
#pragma unroll
  for (int width = kVecs / 2; width > 0; width /= 2) {
#pragma unroll
    for (int i = 0; i < width; ++i) sums[i] += sums[i + width];
  }
  if constexpr (kOptions) {
    return {max, sums[0], sum_x, sum_px};
  } else {
    return {max, sums[0]};
  }
}

__device__ __forceinline__ void cluster_arrive() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("barrier.cluster.arrive.release.aligned;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void cluster_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("barrier.cluster.wait.acquire.aligned;\n" ::: "memory");
#endif
}

// The address of `local` (a shared-memory variable of this block) in the shared memory of cluster block `rank`.
__device__ __forceinline__ uint32_t cluster_address(const void* local, int rank) {
  uint32_t remote = 0;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  const uint32_t address = static_cast<uint32_t>(__cvta_generic_to_shared(local));
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(remote) : "r"(address), "r"(rank));
#endif
  return remote;
}

// The stats at `local` in the shared memory of cluster block `rank` (one vector load).
__device__ __forceinline__ Stats load_cluster_stats(const Stats* local, int rank) {
  Stats out{-INFINITY, 0.f};
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("ld.shared::cluster.v2.f32 {%0, %1}, [%2];\n"
               : "=f"(out.max), "=f"(out.sum) : "r"(cluster_address(local, rank)) : "memory");
#endif
  return out;
}

__device__ __forceinline__ StatsX load_cluster_stats(const StatsX* local, int rank) {
  StatsX out{-INFINITY, 0.f, 0.f, 0.f};
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("ld.shared::cluster.v4.f32 {%0, %1, %2, %3}, [%4];\n"
               : "=f"(out.max), "=f"(out.sum), "=f"(out.sum_x), "=f"(out.sum_px)
               : "r"(cluster_address(local, rank)) : "memory");
#endif
  return out;
}

// Resident blocks per SM the cluster kernel is compiled for (it caps the registers per thread): 2 when threads hold
// 8 vectors (32 registers of logits) or compute a gradient; 4 for 2 vectors without one.
template <int kVecs, bool WRITE_GRAD>
constexpr int cluster_min_blocks() {
  return (kVecs >= 8 || WRITE_GRAD) ? 2 : 4;
}

// One cluster of `cluster` blocks per row; launched with cluster dimensions (cluster, 1, 1) on sm_90 or newer only.
// PARTIALS (forward only): no cluster; each block writes its slice's stats to p.partials[row, rank] (and rank 0 the
// target logit to p.target_logits), for split_finish_kernel to merge: blocks of a row need not be co-scheduled.
// kOptions: the options of p.spec and the extra outputs (see cross_entropy_kernels.cuh).
// kSums (kOptions only): the options' per-element sums this launch takes (register_stats), as a template argument
// rather than a test in the kernel: variants inlined side by side made the row's registers spill.
template <typename scalar_t, typename target_t, int kVecs, bool WRITE_GRAD, bool PARTIALS, bool kOptions,
          int kSums = kSumX | kSumPx>
__global__ void __launch_bounds__(kThreads, (cluster_min_blocks<kVecs, WRITE_GRAD>()))
    cross_entropy_cluster_kernel(const CrossEntropyParams p, int cluster) {
  static_assert(!(PARTIALS && WRITE_GRAD), "the partials variant is forward only");
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  using E = Elem<scalar_t>;
  using V = Vec<scalar_t>;
  using Bits = typename E::Bits;
  using S = RowStats<kOptions>;
  __shared__ S warp_stats[kWarps];
  __shared__ S block_stats;  // read by the other blocks of the cluster
  if (skipped(p)) return;  // every block of every cluster: no barrier is left waiting
  const int64_t row = blockIdx.x / cluster;
  const int rank = static_cast<int>(blockIdx.x - row * cluster);  // the block's rank in its cluster
  const Row r = row_coords(row, p.seq_len);
  const int64_t target = read_target<target_t>(p, r);
  const int first_vec = rank * kVecs * kThreads + static_cast<int>(threadIdx.x);  // vectors first_vec + i * kThreads
  const Bits* x = logits_row<scalar_t>(p, r);
  const int x_shift = static_cast<int>((reinterpret_cast<uintptr_t>(x) & 15) / sizeof(Bits));
  Bits* g = WRITE_GRAD ? grad_row<scalar_t>(p, r) : nullptr;
  const int g_shift = static_cast<int>((reinterpret_cast<uintptr_t>(g) & 15) / sizeof(Bits));

  if (target == p.ignore_index) {  // the same for the whole cluster: no block touches shared memory of another
    if (rank == 0 && threadIdx.x == 0) write_ignored_row<kOptions>(p, row);
    if constexpr (WRITE_GRAD) {
#pragma unroll
      for (int i = 0; i < kVecs; ++i) store_vec<scalar_t>(g, g_shift, x_shift, first_vec + i * kThreads, p.vocab, {});
    }
    return;
  }

  uint4 raw[kVecs];
#pragma unroll
  for (int i = 0; i < kVecs; ++i) raw[i] = load_vec<scalar_t>(x, x_shift, first_vec + i * kThreads, p.vocab);
  const int64_t column = target_column<kOptions>(p, target);
  const bool in_range = column >= 0 && column < p.vocab;
  // Read before the cluster barrier, hence before any block of the cluster can overwrite it in place.
  const float target_logit =
      (rank == 0 && threadIdx.x == 0 && in_range) ? capped<kOptions>(E::to_float(x[column]), p.spec) : NAN;
  // The thread that holds the target's vector reads the target logit too (also before the barrier: grad may be x),
  // for its gradient to be written apart: the vectors' loop then has no per-element target test.
  const int target_vec = in_range ? static_cast<int>((column + x_shift) / V::kSize) : -1;
  bool owns_target = false;
#pragma unroll
  for (int i = 0; i < kVecs; ++i) owns_target |= (first_vec + i * kThreads == target_vec);
  float raw_target = 0.f;
  if (WRITE_GRAD && owns_target) raw_target = E::to_float(x[column]);

  const auto stats_of_registers = [&](auto softcap) {
    return register_stats<scalar_t, kVecs, kOptions, decltype(softcap)::value, kSums>(raw, first_vec, x_shift,
                                                                                       p.vocab, p.spec);
  };
  S stats = block_merge(with_softcap<kOptions>(p.spec, stats_of_registers), warp_stats);

  if constexpr (PARTIALS) {
    if (threadIdx.x == 0) {
      partials_of<S>(p)[row * cluster + rank] = stats;
      if (rank == 0) p.target_logits[row] = target_logit;
    }
    return;
  }
  if (cluster > 1) {
    if (threadIdx.x == 0) block_stats = stats;
    cluster_arrive();  // release: this block's stats (and its reads of the row) are done
    cluster_wait();    // acquire: every block's stats are visible
    stats = empty_stats<S>();
    for (int q = 0; q < cluster; ++q) stats = merge(stats, load_cluster_stats(&block_stats, q));
    cluster_arrive();  // done reading the others' shared memory; each block waits for all before it exits
  }
  if (rank == 0 && threadIdx.x == 0) write_row<kOptions>(p, row, stats, in_range, target_logit);

  if constexpr (WRITE_GRAD) {
    with_softcap<kOptions>(p.spec, [&](auto softcap) {
      const GradOf<kOptions, decltype(softcap)::value> grad_of(stats.max, stats.sum, grad_scale(p.divisor), p.spec);
#pragma unroll
      for (int i = 0; i < kVecs; ++i) {
        const int k = first_vec + i * kThreads;
        float values[V::kSize];
        unpack_opaque<scalar_t>(raw[i], values);
#pragma unroll
        for (int j = 0; j < V::kSize; ++j) values[j] = grad_of(values[j], false);
        store_vec<scalar_t>(g, g_shift, x_shift, k, p.vocab, V::pack(values));
      }
      // The target's own gradient, over the value just stored (same thread, same address: program order).
      if (owns_target) g[column] = E::from_float(grad_of(raw_target, true));
    });
  }
  if (cluster > 1) cluster_wait();
#else
  __trap();  // launched on sm_90 or newer only (see launch_cross_entropy)
#endif
}

}  // namespace fastce
