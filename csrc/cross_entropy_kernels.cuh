// Fused shifted cross-entropy: the CUDA kernels (device code only; launch policy and checks in cross_entropy.cu).
//
// The contract is the one in fastce/kernels/__init__.py. In short, for every row r = (b, t) of logits [B, T, V]:
//   (max, sum) = the row's max and sum(exp(x - max)), accumulated in float32 online (the sum is rescaled when the
//                max grows) as the row streams by;
//   losses_r   = (max - x[target]) + log(sum) = logsumexp(x) - x[target]  (0 if target == ignore_index, NaN if
//                target is outside [0, V));
//   grad_r     = (exp(x - max) / sum - onehot(target)) / divisor, in the logits' dtype (0 on ignored rows).
// Both are taken relative to the max, not to logsumexp: a float32 logsumexp carries the rounding of the logits'
// magnitude, which would swamp small losses and the gradient of a target whose probability is close to 1.
//
// Three paths (the host picks one, see try_cluster_path and choose_splits in cross_entropy.cu):
//   cluster path (sm_90 and newer, the default there): one thread-block cluster per row, the row held in registers
//              and read once; see "Cluster path" below. Forward only, its blocks write partial stats instead, which
//              the split path's kernel B merges.
//   row path   (many rows): a persistent grid, one block per row at a time. Pass 1 reads the row for the running
//              (max, sum); pass 2 re-reads it, mostly from L2 (the grid is sized from the L2 size, and gradient
//              stores are evict-first), and writes the gradient. A block touches only its own row, so grad may be
//              logits itself.
//   split path (few rows): the vocabulary is cut into S splits. Kernel A writes a float32 (max, sum) per
//              (row, split) and the target logit per row into a small workspace; kernel B merges the S partials of
//              its row in split order (every block of a row gets the same bits), then writes the gradient of its
//              split; split 0 writes the loss. Kernel A has read everything before kernel B writes anything.
//
// Memory access: 16-byte vectors (8 bf16/fp16 or 4 fp32) between scalar heads and tails, so any row start (a slice
// such as logits[:, 1:], an odd V) keeps the bulk of the row vectorised; when logits and grad rows are misaligned
// differently, pass 2 falls back to scalar accesses. Offsets of rows are 64-bit; offsets within a row are int
// (V <= kMaxVocab is checked on the host). Determinism: every reduction has a fixed order (shuffle trees, warp
// order, split order).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace fastce {

// FASTCE_CUDA_THREADS / FASTCE_CUDA_UNROLL exist for benchmarks/probe_cuda.py, which builds variants just in time;
// the package is always built with these defaults.
#ifndef FASTCE_CUDA_THREADS
#define FASTCE_CUDA_THREADS 512
#endif
#ifndef FASTCE_CUDA_UNROLL
#define FASTCE_CUDA_UNROLL 4
#endif
constexpr int kThreads = FASTCE_CUDA_THREADS;  // threads per block, in every kernel
constexpr int kWarps = kThreads / 32;
constexpr int kUnroll = FASTCE_CUDA_UNROLL;  // 16-byte vectors each thread has in flight per loop step
constexpr int kMaxVocab = 1 << 30;  // keeps int offsets within a row (and split * split_len) from overflowing
constexpr float kLog2e = 1.4426950408889634f;

static_assert(kThreads % 32 == 0 && kWarps <= 32, "block reduction assumes at most 32 warps");
static_assert(kThreads >= 16, "the scalar head and tail of a row take one element per thread (up to 2 x 8)");

// ---------------------------------------------------------------------------------------------------------------
// Elements as raw bits: vectors move as uint4 and are converted explicitly (float math, round to nearest even).

template <typename scalar_t>
struct Elem;

template <>
struct Elem<float> {
  using Bits = uint32_t;
  __device__ __forceinline__ static float to_float(Bits b) { return __uint_as_float(b); }
  __device__ __forceinline__ static Bits from_float(float f) { return __float_as_uint(f); }
};

template <>
struct Elem<c10::Half> {
  using Bits = uint16_t;
  __device__ __forceinline__ static float to_float(Bits b) { return __half2float(__ushort_as_half(b)); }
  __device__ __forceinline__ static Bits from_float(float f) { return __half_as_ushort(__float2half_rn(f)); }
};

template <>
struct Elem<c10::BFloat16> {
  using Bits = uint16_t;
  __device__ __forceinline__ static float to_float(Bits b) { return __uint_as_float(static_cast<uint32_t>(b) << 16); }
  __device__ __forceinline__ static Bits from_float(float f) { return __bfloat16_as_ushort(__float2bfloat16_rn(f)); }
};

// One 16-byte vector of elements, unpacked to / packed from float32.
template <typename scalar_t>
struct Vec {
  using E = Elem<scalar_t>;
  using Bits = typename E::Bits;
  static constexpr int kSize = 16 / sizeof(Bits);

  __device__ __forceinline__ static void unpack(const uint4& raw, float (&out)[kSize]) {
    const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if constexpr (sizeof(Bits) == 4) {
        out[j] = E::to_float(words[j]);
      } else {
        out[2 * j] = E::to_float(static_cast<Bits>(words[j] & 0xffffu));
        out[2 * j + 1] = E::to_float(static_cast<Bits>(words[j] >> 16));
      }
    }
  }

  __device__ __forceinline__ static uint4 pack(const float (&in)[kSize]) {
    uint32_t words[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if constexpr (sizeof(Bits) == 4) {
        words[j] = E::from_float(in[j]);
      } else {
        words[j] = static_cast<uint32_t>(E::from_float(in[2 * j])) |
                   (static_cast<uint32_t>(E::from_float(in[2 * j + 1])) << 16);
      }
    }
    return make_uint4(words[0], words[1], words[2], words[3]);
  }
};

// How a span of `len` elements starting at `ptr` splits into a scalar head (up to the first 16-byte boundary),
// whole vectors, and a scalar tail. Head and tail are shorter than a vector each, so with kThreads >= 2 vectors
// every thread holds at most one of their elements: `scalar_index` (or -1).
template <typename Bits>
struct Span {
  static constexpr int kVecSize = 16 / sizeof(Bits);
  int head;          // scalar elements before the first vector
  int num_vecs;      // whole vectors from `head` on
  int scalar_index;  // this thread's head-or-tail element, or -1

  __device__ __forceinline__ Span(const void* ptr, int len) {
    const int misaligned_bytes = static_cast<int>((16 - (reinterpret_cast<uintptr_t>(ptr) & 15)) & 15);
    head = min(misaligned_bytes / static_cast<int>(sizeof(Bits)), len);
    num_vecs = (len - head) / kVecSize;
    const int tail = head + num_vecs * kVecSize;
    const int t = static_cast<int>(threadIdx.x);
    const int index = t < head ? t : tail + (t - head);
    scalar_index = index < len ? index : -1;
  }
};

// ---------------------------------------------------------------------------------------------------------------
// Online log-sum-exp. Exponentials are exp2 of (x - ref) * log2(e): the difference is taken first, so the rounding
// error of the exponent scales with |x - ref| (small for the terms that matter) rather than with |x|.

struct Stats {
  float max;  // running max (-inf while nothing finite has been seen)
  float sum;  // sum of exp(x - max)
};

__device__ __forceinline__ float exp2_approx(float x) {
#ifdef __CUDA_ARCH__
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));  // 2 ulp; exp2(-inf) = 0
  return y;
#else  // host compilers (this header also builds in host-side emulation tests)
  return exp2f(x);
#endif
}

// The point exponents are taken from: the max, or 0 while the max is -inf (keeps -inf - -inf = NaN out).
__device__ __forceinline__ float finite_ref(float max) { return max == -INFINITY ? 0.f : max; }

__device__ __forceinline__ Stats merge(const Stats& a, const Stats& b) {
  const float max = fmaxf(a.max, b.max);
  const float ref = finite_ref(max);
  return {max, a.sum * exp2_approx((a.max - ref) * kLog2e) + b.sum * exp2_approx((b.max - ref) * kLog2e)};
}

// Folds N values into the running stats with a single rescale; their exponentials are summed as a tree first (fewer
// roundings in a row than adding each to the running sum, and independent adds). -inf values add nothing; NaN
// values make the sum NaN (fmaxf drops them from the max, the sum keeps them), as torch's logsumexp does.
template <int N>
__device__ __forceinline__ void accumulate(Stats& stats, float (&x)[N]) {
  static_assert((N & (N - 1)) == 0, "tree sum of a power of two");
  float chunk_max = -INFINITY;
#pragma unroll
  for (int k = 0; k < N; ++k) chunk_max = fmaxf(chunk_max, x[k]);
  const float max = fmaxf(stats.max, chunk_max);
  const float ref = finite_ref(max);
#pragma unroll
  for (int k = 0; k < N; ++k) x[k] = exp2_approx((x[k] - ref) * kLog2e);
#pragma unroll
  for (int width = N / 2; width > 0; width /= 2) {
#pragma unroll
    for (int k = 0; k < width; ++k) x[k] += x[k + width];
  }
  stats = {max, fmaf(stats.sum, exp2_approx((stats.max - ref) * kLog2e), x[0])};
}

// Stats of this warp's threads, returned to every lane: a butterfly, then lane 0's result (lanes may round the
// butterfly differently; taking one lane's keeps every reader on the same bits).
__device__ __forceinline__ Stats warp_merge(Stats stats) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    const Stats other{__shfl_xor_sync(0xffffffffu, stats.max, offset), __shfl_xor_sync(0xffffffffu, stats.sum, offset)};
    stats = merge(stats, other);
  }
  return {__shfl_sync(0xffffffffu, stats.max, 0), __shfl_sync(0xffffffffu, stats.sum, 0)};
}

// Stats of the whole block, returned to every thread. Every warp merges the per-warp results in the same order,
// so all threads get the same bits without a third barrier.
__device__ __forceinline__ Stats block_merge(Stats stats, Stats* warp_stats /* shared, [kWarps] */) {
  stats = warp_merge(stats);
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  __syncthreads();  // warp_stats may still be read for the previous row
  if (lane == 0) warp_stats[warp] = stats;
  __syncthreads();
  return warp_merge(lane < kWarps ? warp_stats[lane] : Stats{-INFINITY, 0.f});
}

// logsumexp(row) - target_logit, as (max - target_logit) + log(sum): exact-ish for small losses. NaN when the
// target logit is (out of range, hence) NaN.
__device__ __forceinline__ float row_loss(const Stats& row, float target_logit) {
  return (row.max - target_logit) + logf(row.sum);
}

// This thread's share of the stats of x[0, len).
template <typename scalar_t>
__device__ __forceinline__ Stats thread_stats(const typename Elem<scalar_t>::Bits* x, int len) {
  using E = Elem<scalar_t>;
  using V = Vec<scalar_t>;
  const Span<typename E::Bits> span(x, len);
  Stats stats{-INFINITY, 0.f};
  if (span.scalar_index >= 0) {
    float value[1] = {E::to_float(x[span.scalar_index])};
    accumulate(stats, value);
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
    accumulate(stats, values);
  }
  for (; v < span.num_vecs; v += kThreads) {  // the last, partial step
    float values[V::kSize];
    V::unpack(vecs[v], values);
    accumulate(stats, values);
  }
  return stats;
}

// ---------------------------------------------------------------------------------------------------------------
// Writers. Gradient stores are streaming (evict-first in L2), so they do not push out rows still to be re-read.

// g[i] = (exp(x[i] - max) / sum - (i == target)) * scale for i in [0, len), with (max, sum) = row_stats of the whole
// row; target = -1 for none. g may be x itself: each element is read and then written by the same thread.
template <typename scalar_t>
__device__ __forceinline__ void write_grad(const typename Elem<scalar_t>::Bits* x, typename Elem<scalar_t>::Bits* g,
                                           int len, int target, const Stats& row_stats, float scale) {
  using E = Elem<scalar_t>;
  using V = Vec<scalar_t>;
  const float prob_scale = scale / row_stats.sum;
  auto grad_of = [&](float logit, bool is_target) {
    return fmaf(exp2_approx((logit - row_stats.max) * kLog2e), prob_scale, is_target ? -scale : 0.f);
  };
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
// Kernels.

struct CrossEntropyParams {
  const void* logits;  // [B, T, V], element (b, t, v) at b * logits_stride_b + t * logits_stride_t + v
  int64_t logits_stride_b, logits_stride_t;
  const void* targets;  // [B, T] int32 or int64
  int64_t targets_stride_b, targets_stride_t;
  const double* divisor;  // 0-dim: grad is divided by it (by 1 where it is 0)
  float* losses;          // [B, T] contiguous: row r = b * T + t
  void* grad;             // [B, T, V] in the logits' dtype, or nullptr for forward only; may equal logits
  int64_t grad_stride_b, grad_stride_t;
  int64_t num_rows;  // B * T
  int64_t seq_len;   // T
  int64_t ignore_index;
  int vocab;  // V
  const bool* skip;  // 0-dim on the device, or nullptr: when it holds true, every kernel returns at once
  // Split path only.
  Stats* partials;       // [num_rows, num_splits]
  float* target_logits;  // [num_rows]: x[target], NaN when the target is out of range
  int num_splits;
  int split_len;  // elements per split (the last may be shorter)
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
  return static_cast<int64_t>(
      static_cast<const target_t*>(p.targets)[r.b * p.targets_stride_b + r.t * p.targets_stride_t]);
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

// The skip flag: the same for every thread of the launch, so a kernel may return on it before any barrier.
__device__ __forceinline__ bool skipped(const CrossEntropyParams& p) { return p.skip != nullptr && *p.skip; }

__device__ __forceinline__ float grad_scale(const double* divisor) {
  const double d = *divisor;
  return static_cast<float>(1.0 / (d == 0.0 ? 1.0 : d));
}

// Row path: a persistent grid; each block takes rows blockIdx.x, blockIdx.x + gridDim.x, ...
template <typename scalar_t, typename target_t, bool WRITE_GRAD>
__global__ void __launch_bounds__(kThreads) cross_entropy_rows_kernel(const CrossEntropyParams p) {
  using E = Elem<scalar_t>;
  __shared__ Stats warp_stats[kWarps];
  if (skipped(p)) return;
  const float scale = WRITE_GRAD ? grad_scale(p.divisor) : 0.f;
  for (int64_t row = blockIdx.x; row < p.num_rows; row += gridDim.x) {
    const Row r = row_coords(row, p.seq_len);
    const int64_t target = read_target<target_t>(p, r);
    if (target == p.ignore_index) {  // the same for the whole block
      if (threadIdx.x == 0) p.losses[row] = 0.f;
      if constexpr (WRITE_GRAD) write_zeros<scalar_t>(grad_row<scalar_t>(p, r), p.vocab);
      continue;
    }
    const auto* x = logits_row<scalar_t>(p, r);
    const bool in_range = target >= 0 && target < p.vocab;
    // Read before block_merge's barriers, hence before pass 2 can overwrite it in place.
    const float target_logit = (threadIdx.x == 0 && in_range) ? E::to_float(x[target]) : NAN;
    const Stats stats = block_merge(thread_stats<scalar_t>(x, p.vocab), warp_stats);
    if (threadIdx.x == 0) p.losses[row] = row_loss(stats, target_logit);
    if constexpr (WRITE_GRAD) {
      write_grad<scalar_t>(x, grad_row<scalar_t>(p, r), p.vocab, in_range ? static_cast<int>(target) : -1, stats,
                           scale);
    }
  }
}

// Split path, kernel A: block (row, split) writes the stats of its split; split 0 also saves the target logit.
template <typename scalar_t, typename target_t>
__global__ void __launch_bounds__(kThreads) split_stats_kernel(const CrossEntropyParams p) {
  using E = Elem<scalar_t>;
  __shared__ Stats warp_stats[kWarps];
  if (skipped(p)) return;
  const int64_t row = blockIdx.x / p.num_splits;
  const int split = static_cast<int>(blockIdx.x % p.num_splits);
  const Row r = row_coords(row, p.seq_len);
  const int64_t target = read_target<target_t>(p, r);
  if (target == p.ignore_index) return;  // kernel B reads no partials for this row
  const auto* x = logits_row<scalar_t>(p, r);
  const int begin = split * p.split_len;
  const int len = min(p.split_len, p.vocab - begin);
  const Stats stats = block_merge(thread_stats<scalar_t>(x + begin, len), warp_stats);
  if (threadIdx.x == 0) {
    p.partials[row * p.num_splits + split] = stats;
    if (split == 0) p.target_logits[row] = (target >= 0 && target < p.vocab) ? E::to_float(x[target]) : NAN;
  }
}

// Split path, kernel B: block (row, split) merges the row's partials and writes the gradient of its split (when
// WRITE_GRAD; otherwise one block per row); split 0 writes the loss. Blocks are numbered from the end, so the first
// to run re-read what kernel A read last, the part most likely still in L2.
template <typename scalar_t, typename target_t, bool WRITE_GRAD>
__global__ void __launch_bounds__(kThreads) split_finish_kernel(const CrossEntropyParams p) {
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
    if (split == 0 && threadIdx.x == 0) p.losses[row] = 0.f;
    if constexpr (WRITE_GRAD) write_zeros<scalar_t>(grad_row<scalar_t>(p, r) + begin, len);
    return;
  }
  // Every warp merges the partials in the same order: lane l takes splits l, l + 32, ... in turn, then the butterfly.
  Stats stats{-INFINITY, 0.f};
  for (int s = threadIdx.x % 32; s < p.num_splits; s += 32) stats = merge(stats, p.partials[row * p.num_splits + s]);
  stats = warp_merge(stats);
  if (split == 0 && threadIdx.x == 0) p.losses[row] = row_loss(stats, p.target_logits[row]);
  if constexpr (WRITE_GRAD) {
    const int target_here = (target >= begin && target < begin + len) ? static_cast<int>(target - begin) : -1;
    write_grad<scalar_t>(logits_row<scalar_t>(p, r) + begin, grad_row<scalar_t>(p, r) + begin, len, target_here, stats,
                         grad_scale(p.divisor));
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Cluster path (sm_90 and newer): every row read once, from memory into registers.
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
// their elements outside the row are -inf, which adds nothing to the stats.

template <typename scalar_t>
struct NegInf;
template <>
struct NegInf<float> {
  static constexpr uint32_t kBits = 0xff800000u;
};
template <>
struct NegInf<c10::Half> {
  static constexpr uint16_t kBits = 0xfc00u;
};
template <>
struct NegInf<c10::BFloat16> {
  static constexpr uint16_t kBits = 0xff80u;
};

// Element j of a 16-byte vector, as raw bits, and back.
template <typename Bits>
__device__ __forceinline__ Bits vec_get(const uint4& v, int j) {
  const uint32_t words[4] = {v.x, v.y, v.z, v.w};
  if constexpr (sizeof(Bits) == 4) {
    return words[j];
  } else {
    return static_cast<Bits>(words[j / 2] >> (16 * (j % 2)));
  }
}

template <typename Bits>
__device__ __forceinline__ void vec_set(uint4& v, int j, Bits bits) {
  uint32_t words[4] = {v.x, v.y, v.z, v.w};
  if constexpr (sizeof(Bits) == 4) {
    words[j] = bits;
  } else {
    const int s = 16 * (j % 2);
    words[j / 2] = (words[j / 2] & ~(0xffffu << s)) | (static_cast<uint32_t>(bits) << s);
  }
  v = make_uint4(words[0], words[1], words[2], words[3]);
}

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

// The max of packed elements, taken on the raw words: bf16x2 / half2 max instructions (exact; a NaN is dropped as
// fmaxf drops it), float max for float32. No float copy of the row is made, which would take registers.
template <typename scalar_t>
struct PackedMax;

template <>
struct PackedMax<float> {
  float max = -INFINITY;
  __device__ __forceinline__ void update(const uint4& v) {
    max = fmaxf(fmaxf(max, fmaxf(__uint_as_float(v.x), __uint_as_float(v.y))),
                fmaxf(__uint_as_float(v.z), __uint_as_float(v.w)));
  }
  __device__ __forceinline__ float result() const { return max; }
};

template <typename pair_t, uint32_t kNegInfPair>
struct PackedMax16 {
  pair_t max = bits_to_pair(kNegInfPair);
  __device__ __forceinline__ static pair_t bits_to_pair(uint32_t bits) {
    pair_t pair;
    static_assert(sizeof(pair) == 4, "a pair of 16-bit elements");
    memcpy(&pair, &bits, 4);
    return pair;
  }
  __device__ __forceinline__ void update(const uint4& v) {
    max = __hmax2(max, __hmax2(__hmax2(bits_to_pair(v.x), bits_to_pair(v.y)),
                               __hmax2(bits_to_pair(v.z), bits_to_pair(v.w))));
  }
  __device__ __forceinline__ float result() const { return fmaxf(__low2float(max), __high2float(max)); }
};

template <>
struct PackedMax<c10::BFloat16> : PackedMax16<__nv_bfloat162, 0xff80ff80u> {};
template <>
struct PackedMax<c10::Half> : PackedMax16<__half2, 0xfc00fc00u> {};

// Vec::unpack as volatile assembly, which the compiler cannot merge with an earlier unpack of the same vector: the
// gradient pass converts again rather than keep a float copy of the row live (in registers it does not have).
template <typename scalar_t>
__device__ __forceinline__ void unpack_opaque(const uint4& raw, float (&out)[Vec<scalar_t>::kSize]) {
  const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      asm volatile("shl.b32 %0, %2, 16;\n\tand.b32 %1, %2, 0xffff0000;\n"
                   : "=f"(out[2 * j]), "=f"(out[2 * j + 1]) : "r"(words[j]));
    } else if constexpr (std::is_same_v<scalar_t, c10::Half>) {
      asm volatile("{\n\t.reg .b16 lo, hi;\n\tmov.b32 {lo, hi}, %2;\n\tcvt.f32.f16 %0, lo;\n\tcvt.f32.f16 %1, hi;\n\t}\n"
                   : "=f"(out[2 * j]), "=f"(out[2 * j + 1]) : "r"(words[j]));
    } else {
      out[j] = __uint_as_float(words[j]);
    }
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

// The Stats at `local` (a shared-memory address of this block) in the shared memory of cluster block `rank`.
__device__ __forceinline__ Stats load_cluster_stats(const Stats* local, int rank) {
  Stats out{-INFINITY, 0.f};
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  const uint32_t address = static_cast<uint32_t>(__cvta_generic_to_shared(local));
  uint32_t remote;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(remote) : "r"(address), "r"(rank));
  asm volatile("ld.shared::cluster.v2.f32 {%0, %1}, [%2];\n" : "=f"(out.max), "=f"(out.sum) : "r"(remote) : "memory");
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
template <typename scalar_t, typename target_t, int kVecs, bool WRITE_GRAD, bool PARTIALS = false>
__global__ void __launch_bounds__(kThreads, (cluster_min_blocks<kVecs, WRITE_GRAD>()))
    cross_entropy_cluster_kernel(const CrossEntropyParams p, int cluster) {
  static_assert(!(PARTIALS && WRITE_GRAD), "the partials variant is forward only");
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  using E = Elem<scalar_t>;
  using V = Vec<scalar_t>;
  using Bits = typename E::Bits;
  __shared__ Stats warp_stats[kWarps];
  __shared__ Stats block_stats;  // read by the other blocks of the cluster
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
    if (rank == 0 && threadIdx.x == 0) p.losses[row] = 0.f;
    if constexpr (WRITE_GRAD) {
#pragma unroll
      for (int i = 0; i < kVecs; ++i) store_vec<scalar_t>(g, g_shift, x_shift, first_vec + i * kThreads, p.vocab, {});
    }
    return;
  }

  uint4 raw[kVecs];
#pragma unroll
  for (int i = 0; i < kVecs; ++i) raw[i] = load_vec<scalar_t>(x, x_shift, first_vec + i * kThreads, p.vocab);
  const bool in_range = target >= 0 && target < p.vocab;
  // Read before the cluster barrier, hence before any block of the cluster can overwrite it in place.
  const float target_logit = (rank == 0 && threadIdx.x == 0 && in_range) ? E::to_float(x[target]) : NAN;

  // This thread's stats: its max, then the sum of exponentials relative to it (a tree per vector, then over vectors).
  PackedMax<scalar_t> packed_max;
#pragma unroll
  for (int i = 0; i < kVecs; ++i) packed_max.update(raw[i]);
  const float max = packed_max.result();
  const float ref = finite_ref(max);
  float sums[kVecs];
#pragma unroll
  for (int i = 0; i < kVecs; ++i) {
    float values[V::kSize];
    V::unpack(raw[i], values);
#pragma unroll
    for (int j = 0; j < V::kSize; ++j) values[j] = exp2_approx((values[j] - ref) * kLog2e);
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
  Stats stats = block_merge({max, sums[0]}, warp_stats);

  if constexpr (PARTIALS) {
    if (threadIdx.x == 0) {
      p.partials[row * cluster + rank] = stats;
      if (rank == 0) p.target_logits[row] = target_logit;
    }
    return;
  }
  if (cluster > 1) {
    if (threadIdx.x == 0) block_stats = stats;
    cluster_arrive();  // release: this block's stats (and its reads of the row) are done
    cluster_wait();    // acquire: every block's stats are visible
    stats = {-INFINITY, 0.f};
    for (int q = 0; q < cluster; ++q) stats = merge(stats, load_cluster_stats(&block_stats, q));
    cluster_arrive();  // done reading the others' shared memory; each block waits for all before it exits
  }
  if (rank == 0 && threadIdx.x == 0) p.losses[row] = row_loss(stats, target_logit);

  if constexpr (WRITE_GRAD) {
    const float scale = grad_scale(p.divisor);
    const float prob_scale = scale / stats.sum;
    const int target_vec = in_range ? static_cast<int>((target + x_shift) / V::kSize) : -1;
    const int target_lane = static_cast<int>((target + x_shift) % V::kSize);
#pragma unroll
    for (int i = 0; i < kVecs; ++i) {
      const int k = first_vec + i * kThreads;
      float values[V::kSize];
      unpack_opaque<scalar_t>(raw[i], values);
#pragma unroll
      for (int j = 0; j < V::kSize; ++j) {
        const bool is_target = k == target_vec && j == target_lane;
        values[j] = fmaf(exp2_approx((values[j] - stats.max) * kLog2e), prob_scale, is_target ? -scale : 0.f);
      }
      store_vec<scalar_t>(g, g_shift, x_shift, k, p.vocab, V::pack(values));
    }
  }
  if (cluster > 1) cluster_wait();
#else
  __trap();  // launched on sm_90 or newer only (see launch_cross_entropy)
#endif
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
