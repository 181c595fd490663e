// The loops of a row's elements that every streaming kernel shares (device code only): a thread's share of the row
// statistics, and the writers (the gradient, zeros, a rescale). 16-byte vectors between scalar heads and tails; see
// cross_entropy_kernels.cuh for the paths that call them.
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

}  // namespace fastce
