// Launch planning of the fastce_cuda kernels (used by cross_entropy.cu only): the device's facts, occupancy, the
// split path's splits and workspace, the cluster path's blocks per row, and the environment switches for tests and
// tuning. Host code; the kernels are in cluster_kernel.cuh and cross_entropy_kernels.cuh.
#pragma once

#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "cross_entropy_kernels.cuh"

namespace fastce {
namespace {

// Row path with a gradient: blocks per SM are chosen so that the rows in flight (grid size x row bytes) take at most
// this share of the L2 cache, for pass 2 to re-read from L2 rather than from memory; but never fewer than
// kMinRowBlocksPerSm, which keeps enough loads in flight to hide memory latency.
constexpr double kL2Share = 0.5;
constexpr int kMinRowBlocksPerSm = 2;
// The row path is kept while its rows fill at least this share of the block slots over all their waves
// (N / (waves x slots)); below it, each row's vocabulary is split over several blocks, as few as fill this share.
constexpr double kMinWaveFill = 0.75;
// A split holds at least this many 16-byte vectors per thread (fewer would make each block mostly start-up).
constexpr int kMinSplitVecsPerThread = 2;
constexpr int kMaxSplits = 1024;
// Split lengths are multiples of this many elements (128 bytes or more), so every split of a row starts with the
// same 16-byte alignment as the row itself.
constexpr int kSplitAlign = 64;
// Cluster path: blocks per cluster at most (8 is portable; 9 to 16 need the non-portable attribute, which the H100
// grants; the launch falls back to the row and split paths where a cluster size cannot be resident).
constexpr int kMaxCluster = 16;

struct DeviceInfo {
  int num_sms;
  int l2_bytes;
  int major;  // compute capability
};

DeviceInfo device_info(int device) {
  DeviceInfo info{};
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&info.major, cudaDevAttrComputeCapabilityMajor, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&info.num_sms, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&info.l2_bytes, cudaDevAttrL2CacheSize, device));
  return info;
}

// Resident blocks per SM of `kernel` (at kThreads threads), asked once per kernel: only launch sizes depend on it.
template <auto kernel>
int max_blocks_per_sm() {
  static const int blocks = [] {
    int n = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, kThreads, 0));
    return std::max(n, 1);
  }();
  return blocks;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The share of `slots` that `blocks` use over the waves they take.
double wave_fill(int64_t blocks, int64_t slots) {
  return static_cast<double>(blocks) / static_cast<double>(ceil_div(blocks, slots) * slots);
}

// A positive integer from the environment, or 0 when unset or empty. Read at every launch (a getenv), so tests
// and tuning sessions can change it between calls.
int64_t env_override(const char* name) {
  const char* value = std::getenv(name);
  return (value != nullptr && *value != '\0') ? std::max<int64_t>(std::atoll(value), 1) : 0;
}

// True when the environment variable is exactly "0" (a switch turned off; env_override reads 0 as unset).
bool env_off(const char* name) {
  const char* value = std::getenv(name);
  return value != nullptr && std::string(value) == "0";
}

// The split path's float32 workspace, from the caching allocator: the stats S (Stats, or StatsX with options) per
// (row, split), then the target logit per row; p.partials and p.target_logits point into it, for p.num_splits
// splits. Dropping the tensor once the launches are queued is safe: the caching allocator reuses its memory only in
// stream order.
template <typename S>
at::Tensor attach_split_workspace(CrossEntropyParams& p, const at::Tensor& logits) {
  constexpr int64_t kFloats = sizeof(S) / sizeof(float);
  at::Tensor workspace = at::empty({p.num_rows * (kFloats * p.num_splits + 1)}, logits.options().dtype(at::kFloat));
  p.partials = workspace.data_ptr<float>();  // the allocator's blocks are aligned far beyond S's 8 or 16 bytes
  p.target_logits = workspace.data_ptr<float>() + p.num_rows * kFloats * p.num_splits;
  return workspace;
}

struct SplitPlan {
  int num_splits;  // vocabulary splits per row; 1 is the row path
  int split_len;   // elements per split, a multiple of kSplitAlign (the last split may be shorter)
};

// Splits per row: 1 (the row path) while the rows fill the row path's block slots well, else the fewest splits
// that fill the split kernels' slots well (or the best filling). FASTCE_CUDA_NUM_SPLITS=n forces about n (1 forces
// the row path), for tests and tuning.
SplitPlan choose_splits(int64_t num_rows, int vocab, int64_t row_slots, int64_t split_slots, int vec_size) {
  int64_t splits = env_override("FASTCE_CUDA_NUM_SPLITS");
  if (splits == 0) {
    if (wave_fill(num_rows, row_slots) >= kMinWaveFill) return {1, vocab};
    const int64_t min_split_len = static_cast<int64_t>(kThreads) * vec_size * kMinSplitVecsPerThread;
    const int64_t max_splits = std::clamp<int64_t>(vocab / min_split_len, 1, kMaxSplits);
    splits = 1;
    for (int64_t s = 2; s <= max_splits && wave_fill(num_rows * splits, split_slots) < kMinWaveFill; ++s) {
      if (wave_fill(num_rows * s, split_slots) > wave_fill(num_rows * splits, split_slots)) splits = s;
    }
  }
  // Splits of a whole number of kSplitAlign elements, none of them empty.
  const int64_t split_len = ceil_div(ceil_div(vocab, splits), kSplitAlign) * kSplitAlign;
  splits = ceil_div(vocab, split_len);
  if (splits == 1 || num_rows * splits > INT32_MAX) return {1, vocab};  // the grid limit: plenty of rows anyway
  return {static_cast<int>(splits), static_cast<int>(split_len)};
}

struct ClusterPlan {
  int vecs;     // 16-byte vectors per thread (a kernel template argument: 2 or 8); 0 when the path does not apply
  int cluster;  // blocks per row
};

// The cluster path on sm_90 and newer: 2 vectors per thread while one block holds a row (short rows, more blocks per
// SM), else 8, in as many blocks as the row needs, up to kMaxCluster. 4 was measured slower than 8, with a gradient
// and without (0.91 vs 0.70 ms forward only at 8192 x 128256, benchmarks/NOTES.md): clusters twice as large cost more
// than the extra blocks in flight gain. FASTCE_CUDA_CLUSTER=0 turns the path off (the row and split paths then run,
// as on older GPUs); =2 or =8 forces that many vectors per thread where they fit (for tests: =2 makes multi-block
// clusters out of small vocabularies).
ClusterPlan choose_cluster(int64_t num_rows, int vocab, int vec_size, bool rows_aligned, int major) {
  if (major < 9 || env_off("FASTCE_CUDA_CLUSTER")) return {0, 0};
  const int64_t forced = env_override("FASTCE_CUDA_CLUSTER");
  // The most 16-byte vectors a row touches: V / vec_size when every row starts 16-byte aligned, else one more may be
  // needed (65536 bf16 logits fill 2 blocks of 8 x 512 vectors exactly when aligned; a third block otherwise).
  const int64_t vectors = ceil_div(static_cast<int64_t>(vocab) + (rows_aligned ? 0 : vec_size - 1), vec_size);
  auto blocks = [&](int vecs) { return ceil_div(vectors, static_cast<int64_t>(vecs) * kThreads); };
  int vecs = (forced == 2 || forced == 8) ? static_cast<int>(forced) : blocks(2) == 1 ? 2 : 8;
  if (blocks(vecs) > kMaxCluster) vecs = 8;
  const int64_t cluster = blocks(vecs);
  if (cluster > kMaxCluster || num_rows * cluster > INT32_MAX) return {0, 0};
  return {vecs, static_cast<int>(cluster)};
}

}  // namespace
}  // namespace fastce
