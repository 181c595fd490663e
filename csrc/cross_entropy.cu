// Fused shifted cross-entropy: host entry points of the fastce_cuda ops. They check the arguments, choose the
// launch (cluster path on sm_90 and newer, else row path or split path: the planning is in launch_plan.cuh, the
// kernels in cross_entropy_kernels.cuh and cluster_kernel.cuh) and launch on the current stream. Plain
// cross-entropy runs the kernels' plain variants; options, row statistics and the shard ops run their kOptions
// variants, on the same paths.
#include "cross_entropy.h"
#include "checks.h"

#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>

#include "cluster_kernel.cuh"
#include "cross_entropy_kernels.cuh"
#include "launch_plan.cuh"

static_assert(fastce::kMaxVocab == fastce::kMaxVocabSize, "checks.h and elements.cuh disagree on the vocabulary limit");

namespace fastce {
namespace {

// float32, float16 and bfloat16 (AT_DISPATCH_FLOATING_TYPES_AND2 without float64, which the contract excludes).
#define FASTCE_DISPATCH_FLOAT_TYPES(TYPE, NAME, ...)                                             \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)                         \
                         AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__) AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

// Launches the cluster kernel; false (and nothing launched) when clusters of that size cannot be resident.
template <typename scalar_t, typename target_t, int kVecs, bool WRITE_GRAD, bool kOptions, int kSums = kSumX | kSumPx>
bool launch_cluster(const CrossEntropyParams& p, int cluster, cudaStream_t stream) {
  if constexpr (kOptions && WRITE_GRAD && kSums == (kSumX | kSumPx)) {
    // The gradient kernels, the hot ones: a variant with only the per-element sums the options need (label
    // smoothing: of x'; the entropy: of exp(x' - max)(x' - max)), so that each pays for its own alone and z-loss and
    // softcap for none (benchmarks/NOTES.md, rows 27-28).
    if (!p.spec.sum_x && !p.spec.sum_px) {
      return launch_cluster<scalar_t, target_t, kVecs, WRITE_GRAD, kOptions, 0>(p, cluster, stream);
    }
    if (!p.spec.sum_px) {
      return launch_cluster<scalar_t, target_t, kVecs, WRITE_GRAD, kOptions, kSumX>(p, cluster, stream);
    }
    if (!p.spec.sum_x) {
      return launch_cluster<scalar_t, target_t, kVecs, WRITE_GRAD, kOptions, kSumPx>(p, cluster, stream);
    }
  }
  auto* kernel = cross_entropy_cluster_kernel<scalar_t, target_t, kVecs, WRITE_GRAD, false, kOptions, kSums>;
  static std::atomic<int> resident[kMaxCluster + 1];  // per cluster size: 0 not asked yet, 1 yes, -1 no
  cudaLaunchAttribute attribute{};
  attribute.id = cudaLaunchAttributeClusterDimension;
  attribute.val.clusterDim.x = static_cast<unsigned int>(cluster);
  attribute.val.clusterDim.y = 1;
  attribute.val.clusterDim.z = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(static_cast<unsigned int>(p.num_rows * cluster));
  config.blockDim = dim3(kThreads);
  config.dynamicSmemBytes = 0;
  config.stream = stream;
  config.attrs = &attribute;
  config.numAttrs = 1;
  if (cluster > 8) C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
  if (resident[cluster].load() == 0) {
    int clusters = 0;
    if (cudaOccupancyMaxActiveClusters(&clusters, kernel, &config) != cudaSuccess) {
      (void)cudaGetLastError();  // an unsupported size is an answer, not an error to leave pending
      clusters = 0;
    }
    resident[cluster].store(clusters > 0 ? 1 : -1);
  }
  if (resident[cluster].load() < 0) return false;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, p, cluster));
  return true;
}

// Forward only, rows of several blocks: the blocks write partial stats that split_finish_kernel merges (no cluster
// to co-schedule). FASTCE_CUDA_FWD_PARTIALS=0 uses the cluster kernel instead.
template <typename scalar_t, typename target_t, int kVecs, bool kOptions>
void launch_partials(CrossEntropyParams p, int blocks_per_row, const at::Tensor& logits, cudaStream_t stream) {
  p.num_splits = blocks_per_row;
  const at::Tensor workspace = attach_split_workspace<RowStats<kOptions>>(p, logits);
  const auto blocks = static_cast<unsigned int>(p.num_rows * blocks_per_row);
  cross_entropy_cluster_kernel<scalar_t, target_t, kVecs, false, true, kOptions>
      <<<blocks, kThreads, 0, stream>>>(p, blocks_per_row);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  split_finish_kernel<scalar_t, target_t, false, kOptions>
      <<<static_cast<unsigned int>(p.num_rows), kThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename target_t, bool kOptions>
bool try_cluster_path(const CrossEntropyParams& p, const DeviceInfo& dev, const at::Tensor& logits,
                      cudaStream_t stream) {
  const bool write_grad = p.grad != nullptr;
  constexpr int64_t kElem = sizeof(typename Elem<scalar_t>::Bits);
  const bool rows_aligned = reinterpret_cast<uintptr_t>(p.logits) % 16 == 0 && (p.logits_stride_b * kElem) % 16 == 0 &&
                            (p.logits_stride_t * kElem) % 16 == 0;
  const ClusterPlan plan = choose_cluster(p.num_rows, p.vocab, Vec<scalar_t>::kSize, rows_aligned, dev.major);
  if (!write_grad && plan.cluster > 1 && !env_off("FASTCE_CUDA_FWD_PARTIALS")) {
    if (plan.vecs == 2) launch_partials<scalar_t, target_t, 2, kOptions>(p, plan.cluster, logits, stream);
    if (plan.vecs == 8) launch_partials<scalar_t, target_t, 8, kOptions>(p, plan.cluster, logits, stream);
    return true;
  }
  switch (plan.vecs) {
    case 2:
      return write_grad ? launch_cluster<scalar_t, target_t, 2, true, kOptions>(p, plan.cluster, stream)
                        : launch_cluster<scalar_t, target_t, 2, false, kOptions>(p, plan.cluster, stream);
    case 8:
      return write_grad ? launch_cluster<scalar_t, target_t, 8, true, kOptions>(p, plan.cluster, stream)
                        : launch_cluster<scalar_t, target_t, 8, false, kOptions>(p, plan.cluster, stream);
    default:
      return false;
  }
}

// Both phases of every row (the gradient too where p.grad is set): cross_entropy_fwd, and shard_stats (forward only,
// writing p.shard_stats).
template <typename scalar_t, typename target_t, bool kOptions>
void launch_cross_entropy(CrossEntropyParams p, const at::Tensor& logits, cudaStream_t stream) {
  const bool write_grad = p.grad != nullptr;
  const DeviceInfo dev = device_info(logits.get_device());
  if (try_cluster_path<scalar_t, target_t, kOptions>(p, dev, logits, stream)) return;

  // Row path: blocks per SM, from the L2 budget when there is a pass 2 (FASTCE_CUDA_ROW_BLOCKS_PER_SM=n forces n).
  const int64_t rows_occupancy =
      write_grad ? max_blocks_per_sm<cross_entropy_rows_kernel<scalar_t, target_t, true, kOptions>>()
                 : max_blocks_per_sm<cross_entropy_rows_kernel<scalar_t, target_t, false, kOptions>>();
  int64_t row_blocks_per_sm = env_override("FASTCE_CUDA_ROW_BLOCKS_PER_SM");
  if (row_blocks_per_sm == 0) {
    const int64_t row_bytes = static_cast<int64_t>(p.vocab) * sizeof(typename Elem<scalar_t>::Bits);
    const int64_t fitting_in_l2 = static_cast<int64_t>(dev.l2_bytes * kL2Share) / (dev.num_sms * row_bytes);
    row_blocks_per_sm = write_grad ? std::max<int64_t>(fitting_in_l2, kMinRowBlocksPerSm) : rows_occupancy;
  }
  const int64_t row_slots = dev.num_sms * std::min(row_blocks_per_sm, rows_occupancy);
  const int64_t split_slots = dev.num_sms * max_blocks_per_sm<split_stats_kernel<scalar_t, target_t, kOptions>>();
  const SplitPlan plan = choose_splits(p.num_rows, p.vocab, row_slots, split_slots, Vec<scalar_t>::kSize);

  if (plan.num_splits == 1) {
    const auto grid = static_cast<unsigned int>(std::min(p.num_rows, row_slots));
    if (write_grad) {
      cross_entropy_rows_kernel<scalar_t, target_t, true, kOptions><<<grid, kThreads, 0, stream>>>(p);
    } else {
      cross_entropy_rows_kernel<scalar_t, target_t, false, kOptions><<<grid, kThreads, 0, stream>>>(p);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  p.num_splits = plan.num_splits;
  p.split_len = plan.split_len;
  TORCH_INTERNAL_ASSERT(static_cast<int64_t>(p.split_len) * (p.num_splits - 1) < p.vocab &&
                            static_cast<int64_t>(p.split_len) * p.num_splits >= p.vocab,
                        "vocabulary splits do not tile the row");
  const at::Tensor workspace = attach_split_workspace<RowStats<kOptions>>(p, logits);

  const auto split_blocks = static_cast<unsigned int>(p.num_rows * p.num_splits);
  split_stats_kernel<scalar_t, target_t, kOptions><<<split_blocks, kThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (write_grad) {
    split_finish_kernel<scalar_t, target_t, true, kOptions><<<split_blocks, kThreads, 0, stream>>>(p);
  } else {
    split_finish_kernel<scalar_t, target_t, false, kOptions>
        <<<static_cast<unsigned int>(p.num_rows), kThreads, 0, stream>>>(p);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// shard_grad: the epilogue alone, given each row's (max, sum, scale) in p.row_in: the split path's kernel B over
// blocks of (row, split), each split one loop step of write_grad (kUnroll vectors per thread) by default; a single
// pass, elementwise. FASTCE_CUDA_NUM_SPLITS=n cuts each row into about n splits instead.
template <typename scalar_t, typename target_t>
void launch_shard_grad(CrossEntropyParams p, cudaStream_t stream) {
  const int64_t step = static_cast<int64_t>(kThreads) * Vec<scalar_t>::kSize * kUnroll;
  int64_t splits = env_override("FASTCE_CUDA_NUM_SPLITS");
  if (splits == 0) splits = ceil_div(p.vocab, step);
  splits = std::clamp<int64_t>(splits, 1, std::max<int64_t>(INT32_MAX / p.num_rows, 1));  // the grid limit
  const int64_t split_len = ceil_div(ceil_div(p.vocab, splits), kSplitAlign) * kSplitAlign;
  p.num_splits = static_cast<int>(ceil_div(p.vocab, split_len));
  p.split_len = static_cast<int>(split_len);
  const auto blocks = static_cast<unsigned int>(p.num_rows * p.num_splits);
  split_finish_kernel<scalar_t, target_t, true, true><<<blocks, kThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The options as the kernels read them: each value computed in float64, then rounded once to float. vocab_size is V,
// the whole row's length (its e / V terms are used by the gradient only).
Spec make_spec(double softcap, double label_smoothing, double z_loss, int64_t vocab_size, bool want_entropy,
               const char* op) {
  TORCH_CHECK(std::isfinite(softcap) && softcap >= 0.0, op, ": softcap must be 0 (none) or a finite number > 0, got ",
              str(softcap));
  TORCH_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0, op, ": label_smoothing must be in [0, 1], got ",
              str(label_smoothing));
  TORCH_CHECK(std::isfinite(z_loss) && z_loss >= 0.0, op, ": z_loss must be a finite number >= 0, got ", str(z_loss));
  const double e = label_smoothing;
  const double vocab = static_cast<double>(std::max<int64_t>(vocab_size, 1));
  Spec spec{};
  spec.softcap = static_cast<float>(softcap);
  spec.softcap_exp2_scale = softcap > 0.0 ? static_cast<float>(-2.0 / (softcap * std::log(2.0))) : 0.f;
  spec.smoothing = static_cast<float>(e);
  spec.keep = static_cast<float>(1.0 - e);
  spec.vocab = static_cast<float>(vocab);
  spec.smoothing_per_class = static_cast<float>(e / vocab);
  spec.target_coef = static_cast<float>(1.0 - e + e / vocab);  // rounds to exactly 1 for V = 1
  spec.z_loss = static_cast<float>(z_loss);
  spec.sum_x = e != 0.0;
  spec.sum_px = want_entropy;
  return spec;
}

// The fields every op fills alike.
CrossEntropyParams row_params(const at::Tensor& logits, const at::Tensor& targets, int64_t ignore_index) {
  CrossEntropyParams p{};
  p.logits = logits.data_ptr();
  p.logits_stride_b = logits.stride(0);
  p.logits_stride_t = logits.stride(1);
  p.targets = targets.data_ptr();
  p.targets_stride_b = targets.stride(0);
  p.targets_stride_t = targets.stride(1);
  p.num_rows = logits.size(0) * logits.size(1);
  p.seq_len = logits.size(1);
  p.ignore_index = ignore_index;
  p.vocab = static_cast<int>(logits.size(2));
  return p;
}

template <bool kOptions>
void dispatch_cross_entropy(const CrossEntropyParams& p, const at::Tensor& logits, const at::Tensor& targets) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  FASTCE_DISPATCH_FLOAT_TYPES(logits.scalar_type(), "fastce_cross_entropy", [&] {
    AT_DISPATCH_INDEX_TYPES(targets.scalar_type(), "fastce_cross_entropy_targets",
                            [&] { launch_cross_entropy<scalar_t, index_t, kOptions>(p, logits, stream); });
  });
}

}  // namespace

void cross_entropy_fwd(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& divisor,
                       const at::Tensor& losses, const std::optional<at::Tensor>& grad, int64_t ignore_index,
                       const std::optional<at::Tensor>& skip, double softcap, double label_smoothing, double z_loss,
                       const std::optional<at::Tensor>& row_stats) {
  constexpr const char* op = "fastce_cuda::cross_entropy_fwd";
  check_logits_and_targets(logits, targets, op);
  const int64_t batch = logits.size(0), seq_len = logits.size(1), vocab = logits.size(2);
  TORCH_CHECK(vocab > 0, op, ": the vocabulary is empty");
  check_same_device(divisor, logits, op, "divisor");
  TORCH_CHECK(divisor.dim() == 0 && divisor.scalar_type() == at::kDouble, op,
              ": divisor must be a 0-dim float64 tensor, got ", divisor.scalar_type(), " of shape ", str(divisor.sizes()));
  check_same_device(losses, logits, op, "losses");
  TORCH_CHECK(losses.scalar_type() == at::kFloat, op, ": losses must be float32, got ", losses.scalar_type());
  TORCH_CHECK(losses.dim() == 2 && losses.size(0) == batch && losses.size(1) == seq_len && losses.is_contiguous(), op,
              ": losses must be a contiguous [B, T] = [", str(batch), ", ", str(seq_len), "] tensor, got shape ",
              str(losses.sizes()), " and strides ", str(losses.strides()));
  if (grad.has_value()) check_grad(*grad, logits, op);
  if (skip.has_value()) {
    check_same_device(*skip, logits, op, "skip");
    TORCH_CHECK(skip->dim() == 0 && skip->scalar_type() == at::kBool, op, ": skip must be a 0-dim bool tensor, got ",
                skip->scalar_type(), " of shape ", str(skip->sizes()));
  }
  if (row_stats.has_value()) check_row_fields(*row_stats, logits, kRowStatsFields, op, "row_stats");
  make_spec(softcap, label_smoothing, z_loss, vocab, row_stats.has_value(), op);  // checks the options
  launch_fwd(logits, targets, 0, divisor.data_ptr<double>(), losses.data_ptr<float>(), grad, ignore_index,
             skip.has_value() ? skip->data_ptr<bool>() : nullptr, softcap, label_smoothing, z_loss,
             row_stats.has_value() ? row_stats->data_ptr<float>() : nullptr);
}

void launch_fwd(const at::Tensor& logits, const at::Tensor& targets, int target_shift, const double* divisor,
                float* losses, const std::optional<at::Tensor>& grad, int64_t ignore_index, const bool* skip,
                double softcap, double label_smoothing, double z_loss, float* row_stats) {
  if (logits.size(0) * logits.size(1) == 0) return;
  const c10::cuda::CUDAGuard device_guard(logits.device());
  CrossEntropyParams p = row_params(logits, targets, ignore_index);
  p.target_shift = target_shift;
  p.divisor = divisor;
  p.losses = losses;
  p.grad = grad.has_value() ? grad->data_ptr() : nullptr;
  p.grad_stride_b = grad.has_value() ? grad->stride(0) : 0;
  p.grad_stride_t = grad.has_value() ? grad->stride(1) : 0;
  p.skip = skip;
  // Plain cross-entropy takes the plain kernels, which read nothing of the options.
  if (softcap == 0.0 && label_smoothing == 0.0 && z_loss == 0.0 && row_stats == nullptr) {
    dispatch_cross_entropy<false>(p, logits, targets);
    return;
  }
  p.spec = make_spec(softcap, label_smoothing, z_loss, logits.size(2), row_stats != nullptr, "fastce_cuda");
  p.row_stats = row_stats;
  dispatch_cross_entropy<true>(p, logits, targets);
}

void shard_stats(const at::Tensor& logits, const at::Tensor& targets, int64_t vocab_start, int64_t ignore_index,
                 const at::Tensor& stats, double softcap, double label_smoothing, double z_loss, bool want_entropy) {
  constexpr const char* op = "fastce_cuda::shard_stats";
  check_logits_and_targets(logits, targets, op);
  check_row_fields(stats, logits, kShardStatsFields, op, "stats");
  TORCH_CHECK(vocab_start >= 0, op, ": vocab_start must be >= 0, got ", str(vocab_start));
  const Spec spec = make_spec(softcap, label_smoothing, z_loss, logits.size(2), want_entropy, op);
  if (logits.size(0) * logits.size(1) == 0) return;

  const c10::cuda::CUDAGuard device_guard(logits.device());
  if (logits.size(2) == 0) {  // no columns: every row's statistics are the identity of the merge
    stats.select(2, 0).fill_(-INFINITY);
    stats.narrow(2, 1, kShardStatsFields - 1).zero_();
    return;
  }
  CrossEntropyParams p = row_params(logits, targets, ignore_index);
  p.spec = spec;
  p.vocab_start = vocab_start;
  p.shard_stats = stats.data_ptr<float>();
  dispatch_cross_entropy<true>(p, logits, targets);
}

void shard_grad(const at::Tensor& logits, const at::Tensor& targets, int64_t vocab_start, int64_t vocab_size,
                int64_t ignore_index, const at::Tensor& row, const at::Tensor& grad, double softcap,
                double label_smoothing, double z_loss) {
  constexpr const char* op = "fastce_cuda::shard_grad";
  check_logits_and_targets(logits, targets, op);
  check_row_fields(row, logits, kRowInFields, op, "row");
  check_grad(grad, logits, op);
  TORCH_CHECK(vocab_start >= 0, op, ": vocab_start must be >= 0, got ", str(vocab_start));
  TORCH_CHECK(vocab_size >= 1, op, ": vocab_size must be >= 1, got ", str(vocab_size));
  const Spec spec = make_spec(softcap, label_smoothing, z_loss, vocab_size, false, op);
  const int64_t num_rows = logits.size(0) * logits.size(1);
  if (num_rows == 0 || logits.size(2) == 0) return;
  TORCH_CHECK(num_rows <= INT32_MAX, op, ": at most 2^31 - 1 rows, got ", str(num_rows));

  const c10::cuda::CUDAGuard device_guard(logits.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  CrossEntropyParams p = row_params(logits, targets, ignore_index);
  p.grad = grad.data_ptr();
  p.grad_stride_b = grad.stride(0);
  p.grad_stride_t = grad.stride(1);
  p.spec = spec;
  p.vocab_start = vocab_start;
  p.row_in = row.data_ptr<float>();
  FASTCE_DISPATCH_FLOAT_TYPES(logits.scalar_type(), "fastce_shard_grad", [&] {
    AT_DISPATCH_INDEX_TYPES(targets.scalar_type(), "fastce_shard_grad_targets",
                            [&] { launch_shard_grad<scalar_t, index_t>(p, stream); });
  });
}

void scale_grad_(const at::Tensor& grad, const at::Tensor& grad_output) {
  constexpr const char* op = "fastce_cuda::scale_grad_";
  check_rows(grad, op, "grad");
  const int64_t batch = grad.size(0), seq_len = grad.size(1), vocab = grad.size(2);
  check_same_device(grad_output, grad, op, "grad_output");
  TORCH_CHECK(grad_output.scalar_type() == at::kFloat, op, ": grad_output must be float32, got ",
              grad_output.scalar_type());
  const bool per_row = grad_output.dim() == 2;
  TORCH_CHECK(grad_output.dim() == 0 || (per_row && grad_output.size(0) == batch && grad_output.size(1) == seq_len),
              op, ": grad_output must be 0-dim or [B, T] = [", str(batch), ", ", str(seq_len), "], got ",
              str(grad_output.sizes()));
  const int64_t num_rows = batch * seq_len;
  if (num_rows == 0 || vocab == 0) return;

  const c10::cuda::CUDAGuard device_guard(grad.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const DeviceInfo dev = device_info(grad.get_device());
  ScaleParams p{};
  p.grad = grad.data_ptr();
  p.grad_stride_b = grad.stride(0);
  p.grad_stride_t = grad.stride(1);
  p.grad_output = grad_output.data_ptr<float>();
  p.grad_output_stride_b = per_row ? grad_output.stride(0) : 0;
  p.grad_output_stride_t = per_row ? grad_output.stride(1) : 0;
  p.num_rows = num_rows;
  p.seq_len = seq_len;
  p.vocab = static_cast<int>(vocab);
  FASTCE_DISPATCH_FLOAT_TYPES(grad.scalar_type(), "fastce_scale_grad_", [&] {
    const int64_t slots = static_cast<int64_t>(dev.num_sms) * max_blocks_per_sm<scale_grad_kernel<scalar_t>>();
    const auto grid = static_cast<unsigned int>(std::min(num_rows, slots));
    scale_grad_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace fastce
