// causal_lm_fwd: the whole forward of the eager default path as one op (fastce/function.py, direct_cross_entropy), so
// that a small batch costs the host one dispatcher call instead of some thirty small torch ops (with a gradient, through
// causal_lm_loss's autograd node: causal_lm_autograd.cpp). Three launches on the current stream:
//   1. prepare_kernel (one block): counts the targets that are not ignore_index (the shift is index arithmetic on
//      the labels), finds the first bad one, turns the count rule into the divisor (fastce/api.py, divisor_of) and
//      the skip flag, and with validation writes its answer straight into mapped pinned memory;
//   2. the cross-entropy kernels of cross_entropy.cu (launch_fwd), reading the labels with the shift;
//   3. finish_kernel (one block): the loss, sum(row losses) / divisor in float64 in a fixed order (deterministic),
//      with the zero-count rule of fastce/function.py's _sum_over.
// With validation the host then waits for the answer of launch 1 only (a few microseconds after it is queued), not
// for the kernels; without it nothing is read back, which keeps the op usable under CUDA-graph capture.
#include <ATen/ops/empty.h>
#include <ATen/ops/narrow.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <math_constants.h>

#include <atomic>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "checks.h"
#include "cross_entropy.h"

namespace fastce {
namespace {

constexpr int kPrepareThreads = 1024;  // one block: a batch has few targets (B * T integers)
constexpr int kFinishThreads = 1024;
constexpr int64_t kNoRow = std::numeric_limits<int64_t>::max();

// How the divisor is given (the count rule itself is applied in prepare_kernel).
enum CountMode : int { kCountTargets = 0, kCountValue = 1, kCountTensor = 2 };

// The label check's answer, written by prepare_kernel into mapped pinned memory, seq last.
struct HostStatus {
  int64_t seq;
  int64_t code;  // 0 good, 1 a target outside [0, V) that is not ignore_index, 2 a negative, NaN or infinite count
  int64_t row;   // the first bad target's row (b * T + t of the shifted targets), or -1
};

template <typename T>
__device__ __forceinline__ void reduce_count_and_first(T& count, int64_t& first) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    count += __shfl_down_sync(0xffffffffu, count, offset);
    first = min(first, static_cast<int64_t>(__shfl_down_sync(0xffffffffu, first, offset)));
  }
}

__device__ __forceinline__ double read_count(const void* count, int dtype) {
  switch (dtype) {
    case 0: return static_cast<double>(*static_cast<const int64_t*>(count));
    case 1: return static_cast<double>(*static_cast<const int32_t*>(count));
    case 2: return static_cast<double>(*static_cast<const float*>(count));
    default: return *static_cast<const double*>(count);
  }
}

struct PrepareParams {
  const void* labels;
  int64_t stride_b, stride_t, batch, seq_len, ignore_index, vocab;
  int shift;
  int mode;  // CountMode
  const void* count;
  int count_dtype;  // read_count's codes
  double count_value;
  double* divisor;  // out, on the device
  bool* skip;       // out, on the device: a bad target or count
  HostStatus* status;  // mapped pinned memory, or nullptr without validation
  int64_t seq;
};

template <typename index_t>
__global__ void __launch_bounds__(kPrepareThreads) prepare_kernel(PrepareParams p) {
  __shared__ int64_t counts[kPrepareThreads / 32];
  __shared__ int64_t firsts[kPrepareThreads / 32];
  const index_t* labels = static_cast<const index_t*>(p.labels);
  const int64_t rows = p.batch * p.seq_len;
  int64_t count = 0, first = kNoRow;
  for (int64_t r = threadIdx.x; r < rows; r += blockDim.x) {
    const int64_t b = r / p.seq_len;
    const int64_t t = r - b * p.seq_len + p.shift;
    if (t >= p.seq_len) continue;
    const auto target = static_cast<int64_t>(labels[b * p.stride_b + t * p.stride_t]);
    if (target == p.ignore_index) continue;
    ++count;
    if ((target < 0 || target >= p.vocab) && r < first) first = r;
  }
  reduce_count_and_first(count, first);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) {
    counts[warp] = count;
    firsts[warp] = first;
  }
  __syncthreads();
  if (warp != 0) return;
  const int warps = blockDim.x / 32;
  count = lane < warps ? counts[lane] : 0;
  first = lane < warps ? firsts[lane] : kNoRow;
  reduce_count_and_first(count, first);
  if (lane != 0) return;
  double divisor = p.mode == kCountTargets ? static_cast<double>(count)
                   : p.mode == kCountValue ? p.count_value
                                           : read_count(p.count, p.count_dtype);
  const bool bad_count = !(divisor >= 0.0 && divisor <= DBL_MAX);  // negative, NaN or infinite
  if (bad_count) divisor = CUDART_NAN;
  const bool bad_target = first != kNoRow;
  *p.divisor = divisor;
  *p.skip = bad_target || bad_count;
  if (p.status != nullptr) {
    volatile HostStatus* status = p.status;
    status->code = bad_target ? 1 : (bad_count ? 2 : 0);
    status->row = bad_target ? first : -1;
    __threadfence_system();  // the answer is visible to the host before the sequence number that announces it
    status->seq = p.seq;
  }
}

__global__ void __launch_bounds__(kFinishThreads) finish_kernel(const float* losses, int64_t rows,
                                                                const double* divisor, float* loss) {
  __shared__ double partial[kFinishThreads];
  double sum = 0.0;
  for (int64_t i = threadIdx.x; i < rows; i += blockDim.x) sum += static_cast<double>(losses[i]);
  partial[threadIdx.x] = sum;
  __syncthreads();
  for (int width = blockDim.x / 2; width > 0; width >>= 1) {  // a fixed order: the same sum on every run
    if (threadIdx.x < width) partial[threadIdx.x] += partial[threadIdx.x + width];
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    const double total = partial[0], d = *divisor;
    // A zero divisor: 0 when nothing was summed (every target ignored), else NaN (README, "Semantics").
    const double quotient = d == 0.0 ? (total == 0.0 ? 0.0 : CUDART_NAN) : total / d;
    *loss = static_cast<float>(quotient);
  }
}

// One mapped pinned HostStatus per thread and device, allocated once: its host address and the address kernels
// write it at.
struct PinnedStatus {
  HostStatus* host = nullptr;
  HostStatus* device = nullptr;
};

PinnedStatus pinned_status(int device) {
  thread_local std::vector<PinnedStatus> slots;
  if (static_cast<int>(slots.size()) <= device) slots.resize(device + 1);
  PinnedStatus& slot = slots[device];
  if (slot.host == nullptr) {
    void* host = nullptr;
    C10_CUDA_CHECK(cudaHostAlloc(&host, sizeof(HostStatus), cudaHostAllocMapped | cudaHostAllocPortable));
    void* mapped = nullptr;
    C10_CUDA_CHECK(cudaHostGetDevicePointer(&mapped, host, 0));
    slot.host = static_cast<HostStatus*>(host);
    slot.host->seq = 0;
    slot.device = static_cast<HostStatus*>(mapped);
  }
  return slot;
}

// Waits until prepare_kernel has announced `seq`; raises if the stream finished without it (a failed launch).
int64_t wait_for_answer(HostStatus* host, int64_t seq, cudaStream_t stream) {
  const volatile HostStatus* status = host;
  for (int64_t spins = 1; status->seq != seq; ++spins) {
    if (spins % 4096 != 0) continue;
    const cudaError_t state = cudaStreamQuery(stream);
    if (state == cudaErrorNotReady) continue;
    C10_CUDA_CHECK(state);
    TORCH_CHECK(status->seq == seq, "fastce_cuda::causal_lm_fwd: the label check finished without an answer");
  }
  std::atomic_thread_fence(std::memory_order_acquire);
  return status->code;
}

int count_dtype_code(at::ScalarType dtype) {
  switch (dtype) {
    case at::kLong: return 0;
    case at::kInt: return 1;
    case at::kFloat: return 2;
    case at::kDouble: return 3;
    default: TORCH_CHECK(false, "fastce_cuda::causal_lm_fwd: count must be int64, int32, float32 or float64, got ", dtype);
  }
  return 3;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, int64_t, int64_t> causal_lm_fwd(
    const at::Tensor& logits, const at::Tensor& labels, bool shift, int64_t ignore_index,
    const std::optional<at::Tensor>& count, double count_value, bool count_targets, bool validate, bool compute_grad,
    bool inplace, bool stats, double softcap, double label_smoothing, double z_loss) {
  constexpr const char* op = "fastce_cuda::causal_lm_fwd";
  check_logits_and_targets(logits, labels, op);
  const int64_t batch = logits.size(0), seq_len = logits.size(1), vocab = logits.size(2);
  TORCH_CHECK(vocab > 0, op, ": the vocabulary is empty");
  TORCH_CHECK(!inplace || compute_grad, op, ": inplace needs compute_grad");
  if (count.has_value()) {
    check_same_device(*count, logits, op, "count");
    TORCH_CHECK(count->numel() == 1, op, ": count must hold one number, got shape ", str(count->sizes()));
  }
  const c10::cuda::CUDAGuard device_guard(logits.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  if (validate) {
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
    TORCH_CHECK(capture == cudaStreamCaptureStatusNone, op,
                ": validate=True reads the label check back to the host, which CUDA-graph capture cannot do; "
                "pass validate=False");
  }

  const auto options = logits.options();
  at::Tensor workspace = at::empty({16}, options.dtype(at::kByte));  // (divisor float64, skip bool)
  auto* divisor = reinterpret_cast<double*>(workspace.data_ptr<uint8_t>());
  auto* skip = reinterpret_cast<bool*>(workspace.data_ptr<uint8_t>() + 8);
  at::Tensor losses = at::empty({batch, seq_len}, options.dtype(at::kFloat));
  at::Tensor loss = at::empty({}, options.dtype(at::kFloat));
  at::Tensor grad = compute_grad && !inplace ? at::empty(logits.sizes(), options) : at::empty({0}, options);
  at::Tensor row_stats = stats ? at::empty({batch, seq_len, 3}, options.dtype(at::kFloat))
                               : at::empty({0}, options.dtype(at::kFloat));

  PrepareParams p{};
  p.labels = labels.data_ptr();
  p.stride_b = labels.stride(0);
  p.stride_t = labels.stride(1);
  p.batch = batch;
  p.seq_len = seq_len;
  p.ignore_index = ignore_index;
  p.vocab = vocab;
  p.shift = shift ? 1 : 0;
  p.mode = count.has_value() ? kCountTensor : (count_targets ? kCountTargets : kCountValue);
  p.count = count.has_value() ? count->data_ptr() : nullptr;
  p.count_dtype = count.has_value() ? count_dtype_code(count->scalar_type()) : 0;
  p.count_value = count_value;
  p.divisor = divisor;
  p.skip = skip;
  static thread_local int64_t last_seq = 0;
  PinnedStatus status{};
  if (validate) {
    status = pinned_status(logits.get_device());
    p.status = status.device;
    p.seq = ++last_seq;
  }
  if (labels.scalar_type() == at::kLong) {
    prepare_kernel<int64_t><<<1, kPrepareThreads, 0, stream>>>(p);
  } else {
    prepare_kernel<int32_t><<<1, kPrepareThreads, 0, stream>>>(p);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  const std::optional<at::Tensor> grad_out =
      !compute_grad ? std::nullopt : std::optional<at::Tensor>(inplace ? logits : grad);
  // In place, a bad target or count (validated) leaves the logits untouched: the kernels read the skip flag.
  launch_fwd(logits, labels, p.shift, divisor, losses.data_ptr<float>(), grad_out, ignore_index,
             inplace && validate ? skip : nullptr, softcap, label_smoothing, z_loss,
             stats ? row_stats.data_ptr<float>() : nullptr);
  finish_kernel<<<1, kFinishThreads, 0, stream>>>(losses.data_ptr<float>(), batch * seq_len, divisor,
                                                   loss.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  int64_t code = 0, row = -1;
  if (validate) {
    code = wait_for_answer(status.host, p.seq, stream);
    row = static_cast<const volatile HostStatus*>(status.host)->row;
  }
  // The divisor as a 0-dim float64 view of the workspace (the z-loss term of return_stats is normalised by it).
  return {loss, grad, row_stats, workspace.narrow(0, 0, 8).view(at::kDouble).reshape({}), code, row};
}

}  // namespace fastce
