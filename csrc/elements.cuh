// Elements and vectors: the launch constants, logits as raw bits, 16-byte vectors, and the spans a row splits into.
// Device code only; the arithmetic of a row is in row_math.cuh, the kernels in cross_entropy_kernels.cuh (row and
// split paths) and cluster_kernel.cuh (cluster path).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

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
// Vectors held in registers (the cluster path): element access on the raw words, the max without conversion, and
// an unpack the compiler cannot merge with an earlier one.

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

}  // namespace fastce
