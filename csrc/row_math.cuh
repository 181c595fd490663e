// The arithmetic of a row, shared by every kernel (contract: fastce/kernels/__init__.py). Device code only.
//
// Phase 1, statistics: (max, sum of exp(x - max)), accumulated online in float32 (the sum is rescaled when the max
// grows); parts of a row merge exactly (merge), in a fixed order. Phase 2, the epilogue (GradOf): each element's
// gradient from the whole row's (max, sum).
//
// Options (kOptions kernels; LossSpec as Spec, below): the statistics are taken of x' = softcap * tanh(x / softcap),
// and carry two more sums, of x' (label smoothing) and of exp(x' - max)(x' - max) (the entropy): StatsX instead of
// Stats. The plain kernels use Stats and the code paths they always had; `if constexpr (kOptions)` keeps the options
// out of them entirely, and inside the kOptions kernels each option is a run-time test that is the same for every
// thread (Spec is a kernel argument).
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "elements.cuh"

namespace fastce {

constexpr float kLog2e = 1.4426950408889634f;

__device__ __forceinline__ float exp2_approx(float x) {
#ifdef __CUDA_ARCH__
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));  // 2 ulp; exp2(-inf) = 0
  return y;
#else
  return exp2f(x);
#endif
}

// 1 / x to about 1 ulp (x is in [1, 2] where it is used: no subnormals to flush).
__device__ __forceinline__ float rcp_approx(float x) {
#ifdef __CUDA_ARCH__
  float y;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return 1.f / x;
#endif
}

// ---------------------------------------------------------------------------------------------------------------
// Options.

// fastce.spec.LossSpec as the kOptions kernels read it, made once on the host (make_spec in cross_entropy.cu): each
// field computed in float64, then rounded to float. V is the whole row's length, e the label smoothing.
struct Spec {
  float softcap;             // 0 for none
  float softcap_exp2_scale;  // -2 log2(e) / softcap: exp(-2|x| / softcap) = exp2(|x| * softcap_exp2_scale)
  float smoothing;           // e
  float keep;                // 1 - e: the weight of the target's term in the loss
  float vocab;               // V: the mean of a row's logits is sum_x / V
  float smoothing_per_class; // e / V: subtracted from every element's gradient but the target's
  float target_coef;         // 1 - e + e / V, subtracted from the target's, as one constant (exactly 1 when V = 1)
  float z_loss;              // z: z * lse^2 is added to the loss
  bool sum_x;                // accumulate sum_j x'_j (label smoothing)
  bool sum_px;               // accumulate sum_j exp(x'_j - max)(x'_j - max) (the entropy)
};

// x' = softcap * tanh(x / softcap) and its slope d x'/dx = 1 - tanh^2, both from one e = exp(-2|x| / softcap):
// tanh = (1 - e) / (1 + e) with x's sign, 1 - tanh^2 = 4e / (1 + e)^2. The slope is accurate to a few ulp also
// where tanh saturates (1 - tanh * tanh would cancel); x' to a few ulp of softcap, plenty for a softmax.
// tanh.approx.f32 would be one instruction, but only 2^-11 accurate. x = -inf gives -softcap; NaN stays NaN.
struct Softcapped {
  float value;  // x'
  float slope;  // d x'/dx (the compiler drops it where it is not read)
};

__device__ __forceinline__ Softcapped softcap_of(float x, const Spec& spec) {
  const float e = exp2_approx(fabsf(x) * spec.softcap_exp2_scale);
  const float q = rcp_approx(1.f + e);
  return {copysignf(spec.softcap * ((1.f - e) * q), x), 4.f * e * (q * q)};
}

// x' of one logit: x itself in the plain kernels and without a softcap.
template <bool kOptions>
__device__ __forceinline__ float capped(float x, const Spec& spec) {
  if constexpr (kOptions) {
    if (spec.softcap != 0.f) return softcap_of(x, spec).value;
  }
  return x;
}

// ---------------------------------------------------------------------------------------------------------------
// Statistics. Exponentials are exp2 of (x - ref) * log2(e): the difference is taken first, so the rounding error of
// the exponent scales with |x - ref| (small for the terms that matter) rather than with |x|.

struct Stats {
  float max;  // running max (-inf while nothing finite has been seen)
  float sum;  // sum of exp(x - max)
};

// With options: also sum_j x'_j and sum_j exp(x'_j - max)(x'_j - max), each left 0 unless the spec asks for it.
// 16-byte aligned: one vector load from another block's shared memory (cluster path).
struct alignas(16) StatsX {
  float max;
  float sum;
  float sum_x;
  float sum_px;
};

template <bool kOptions>
using RowStats = std::conditional_t<kOptions, StatsX, Stats>;

// The stats of nothing: the identity of merge.
template <typename S>
__device__ __forceinline__ S empty_stats() {
  if constexpr (std::is_same_v<S, StatsX>) {
    return {-INFINITY, 0.f, 0.f, 0.f};
  } else {
    return {-INFINITY, 0.f};
  }
}

// The point exponents are taken from: the max, or 0 while the max is -inf (keeps -inf - -inf = NaN out).
__device__ __forceinline__ float finite_ref(float max) { return max == -INFINITY ? 0.f : max; }

__device__ __forceinline__ Stats merge(const Stats& a, const Stats& b) {
  const float max = fmaxf(a.max, b.max);
  const float ref = finite_ref(max);
  return {max, a.sum * exp2_approx((a.max - ref) * kLog2e) + b.sum * exp2_approx((b.max - ref) * kLog2e)};
}

// sum exp(x - ref)(x - ref) of a part whose sums are relative to its own max, rescaled to ref: w (sum_px + d sum)
// with d = max - ref, w = exp(d). A part that adds nothing to the sum (w = 0: empty, or d = -inf) adds nothing here.
__device__ __forceinline__ float rescaled_sum_px(const StatsX& part, float d, float w) {
  return w > 0.f ? w * fmaf(d, part.sum, part.sum_px) : 0.f;
}

__device__ __forceinline__ StatsX merge(const StatsX& a, const StatsX& b) {
  const float max = fmaxf(a.max, b.max);
  const float ref = finite_ref(max);
  const float da = a.max - ref, db = b.max - ref;
  const float wa = exp2_approx(da * kLog2e), wb = exp2_approx(db * kLog2e);
  return {max, a.sum * wa + b.sum * wb, a.sum_x + b.sum_x, rescaled_sum_px(a, da, wa) + rescaled_sum_px(b, db, wb)};
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

// The same with the options' sums, of values x that are x' already. exp(x - m)(x - m) is taken as 0 where the
// exponential is 0 (for x = -inf it would be 0 * -inf).
template <int N>
__device__ __forceinline__ void accumulate(StatsX& stats, float (&x)[N], const Spec& spec) {
  static_assert((N & (N - 1)) == 0, "tree sum of a power of two");
  float chunk_max = -INFINITY;
  float sum_x = 0.f;
#pragma unroll
  for (int k = 0; k < N; ++k) chunk_max = fmaxf(chunk_max, x[k]);
  if (spec.sum_x) {
#pragma unroll
    for (int k = 0; k < N; ++k) sum_x += x[k];
  }
  const float max = fmaxf(stats.max, chunk_max);
  const float ref = finite_ref(max);
  float sum_px = 0.f;
#pragma unroll
  for (int k = 0; k < N; ++k) {
    const float d = x[k] - ref;
    x[k] = exp2_approx(d * kLog2e);
    if (spec.sum_px && x[k] > 0.f) sum_px = fmaf(x[k], d, sum_px);
  }
#pragma unroll
  for (int width = N / 2; width > 0; width /= 2) {
#pragma unroll
    for (int k = 0; k < width; ++k) x[k] += x[k + width];
  }
  const float d = stats.max - ref;
  const float w = exp2_approx(d * kLog2e);
  stats = {max, fmaf(stats.sum, w, x[0]), stats.sum_x + sum_x, rescaled_sum_px(stats, d, w) + sum_px};
}

// Folds N raw logits (as floats) into the running stats: with options, of their x'.
template <int N>
__device__ __forceinline__ void fold(Stats& stats, float (&x)[N], const Spec&) {
  accumulate(stats, x);
}

// With options, 8 values at a time: x' and the sums of a longer chunk at once would need registers for all of their
// temporaries (the streaming kernels fold kUnroll vectors, up to 32 values, per step).
template <int N>
__device__ __forceinline__ void fold(StatsX& stats, float (&x)[N], const Spec& spec) {
  if (spec.softcap == 0.f && !spec.sum_px) {
    // z-loss and label smoothing alone: (max, sum) of the raw logits as the plain kernels take them (one rescale per
    // N values, not per 8), and the plain sum of x for label smoothing. A test that is the same for every thread.
    if (spec.sum_x) {
      float sum_x = 0.f;
#pragma unroll
      for (int k = 0; k < N; ++k) sum_x += x[k];
      stats.sum_x += sum_x;
    }
    Stats plain{stats.max, stats.sum};
    accumulate(plain, x);
    stats.max = plain.max;
    stats.sum = plain.sum;
    return;
  }
  constexpr int kPart = N < 8 ? N : 8;
#pragma unroll
  for (int part = 0; part < N; part += kPart) {
    float(&values)[kPart] = *reinterpret_cast<float(*)[kPart]>(x + part);
    if (spec.softcap != 0.f) {
#pragma unroll
      for (int k = 0; k < kPart; ++k) values[k] = softcap_of(values[k], spec).value;
    }
    accumulate(stats, values, spec);
  }
}

__device__ __forceinline__ Stats shuffle_xor(const Stats& s, int offset) {
  return {__shfl_xor_sync(0xffffffffu, s.max, offset), __shfl_xor_sync(0xffffffffu, s.sum, offset)};
}

__device__ __forceinline__ StatsX shuffle_xor(const StatsX& s, int offset) {
  return {__shfl_xor_sync(0xffffffffu, s.max, offset), __shfl_xor_sync(0xffffffffu, s.sum, offset),
          __shfl_xor_sync(0xffffffffu, s.sum_x, offset), __shfl_xor_sync(0xffffffffu, s.sum_px, offset)};
}

__device__ __forceinline__ Stats shuffle(const Stats& s, int lane) {
  return {__shfl_sync(0xffffffffu, s.max, lane), __shfl_sync(0xffffffffu, s.sum, lane)};
}

__device__ __forceinline__ StatsX shuffle(const StatsX& s, int lane) {
  return {__shfl_sync(0xffffffffu, s.max, lane), __shfl_sync(0xffffffffu, s.sum, lane),
          __shfl_sync(0xffffffffu, s.sum_x, lane), __shfl_sync(0xffffffffu, s.sum_px, lane)};
}

// Stats of this warp's threads, returned to every lane: a butterfly, then lane 0's result (lanes may round the
// butterfly differently; taking one lane's keeps every reader on the same bits).
template <typename S>
__device__ __forceinline__ S warp_merge(S stats) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) stats = merge(stats, shuffle_xor(stats, offset));
  return shuffle(stats, 0);
}

// Stats of the whole block, returned to every thread. Every warp merges the per-warp results in the same order,
// so all threads get the same bits without a third barrier.
template <typename S>
__device__ __forceinline__ S block_merge(S stats, S* warp_stats /* shared, [kWarps] */) {
  stats = warp_merge(stats);
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  __syncthreads();  // warp_stats may still be read for the previous row
  if (lane == 0) warp_stats[warp] = stats;
  __syncthreads();
  return warp_merge(lane < kWarps ? warp_stats[lane] : empty_stats<S>());
}

// logsumexp(row) - target_logit, as (max - target_logit) + log(sum): exact-ish for small losses. NaN when the
// target logit is (out of range, hence) NaN.
__device__ __forceinline__ float row_loss(const Stats& row, float target_logit) {
  return (row.max - target_logit) + logf(row.sum);
}

// ---------------------------------------------------------------------------------------------------------------
// The epilogue: the gradient of one element, times `scale`, from the whole row's (max, sum); is_target says whether
// the element is the row's target. kSoftcap (kOptions only): whether spec.softcap is set, as a compile-time constant
// (see with_softcap).

template <bool kOptions, bool kSoftcap = false>
struct GradOf;

// (exp(x - max) / sum - [target]) * scale.
template <>
struct GradOf<false, false> {
  float max, prob_scale, scale;
  __device__ __forceinline__ GradOf(float row_max, float row_sum, float grad_scale, const Spec&)
      : max(row_max), prob_scale(grad_scale / row_sum), scale(grad_scale) {}
  __device__ __forceinline__ float operator()(float x, bool is_target) const {
    return fmaf(exp2_approx((x - max) * kLog2e), prob_scale, is_target ? -scale : 0.f);
  }
};

// ((1 + 2 z lse) p - c) * slope * scale, with p = exp(x' - max) / sum, c = 1 - e + e / V at the target and e / V
// elsewhere, and the slope of the softcap (none without one). x' and the slope are recomputed from the raw logit.
template <bool kSoftcap>
struct GradOf<true, kSoftcap> {
  const Spec& spec;
  float max, prob_scale, target_term, other_term;
  __device__ __forceinline__ GradOf(float row_max, float row_sum, float grad_scale, const Spec& options)
      : spec(options), max(row_max), prob_scale(grad_scale / row_sum) {
    if (spec.z_loss != 0.f) prob_scale *= fmaf(2.f * spec.z_loss, row_max + logf(row_sum), 1.f);
    target_term = -grad_scale * spec.target_coef;
    other_term = -grad_scale * spec.smoothing_per_class;
  }
  __device__ __forceinline__ float operator()(float x, bool is_target) const {
    const float term = is_target ? target_term : other_term;
    if constexpr (kSoftcap) {
      const Softcapped c = softcap_of(x, spec);
      return fmaf(exp2_approx((c.value - max) * kLog2e), prob_scale, term) * c.slope;
    } else {
      return fmaf(exp2_approx((x - max) * kLog2e), prob_scale, term);
    }
  }
};

// fn(std::bool_constant<kOptions && spec.softcap != 0>()): whether there is a softcap, as a compile-time constant
// for fn's loops, tested once here (the compiler does not hoist the test out of unrolled loops by itself, and a
// branch per element costs registers and instructions). The plain kernels get false without a test.
template <bool kOptions, typename Fn>
__device__ __forceinline__ auto with_softcap(const Spec& spec, Fn&& fn) {
  if constexpr (kOptions) {
    if (spec.softcap != 0.f) return fn(std::true_type{});
  }
  return fn(std::false_type{});
}

}  // namespace fastce
