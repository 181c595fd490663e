// Host entry points of the fastce_cuda ops; kernels in cross_entropy_kernels.cuh and cluster_kernel.cuh, launches in
// cross_entropy.cu, registration in ops.cpp. The contract (shapes, dtypes, what is written, the options) is the one
// in fastce/kernels/__init__.py.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace fastce {

// losses[b, t] = the loss of row (b, t) (0 if ignored, NaN if its target is out of range), and, when grad is given,
// grad[b, t] = its gradient / divisor (0 if ignored; NaN on the other rows when divisor is 0). grad may be logits.
// Options: softcap, label_smoothing, z_loss (0 for none); row_stats, when given, gets (lse, entropy, correct) per
// row. Nothing is written when skip (a 0-dim bool on the device) holds true.
void cross_entropy_fwd(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& divisor,
                       const at::Tensor& losses, const std::optional<at::Tensor>& grad, int64_t ignore_index,
                       const std::optional<at::Tensor>& skip, double softcap, double label_smoothing, double z_loss,
                       const std::optional<at::Tensor>& row_stats);

// stats[b, t] = (max, sum, x'_t, sum_x, sum_px) of the columns [vocab_start, vocab_start + Vs) of row (b, t), whose
// logits are logits[b, t]; (-inf, 0, 0, 0, 0) if ignored. sum_x only with label_smoothing, sum_px only want_entropy.
void shard_stats(const at::Tensor& logits, const at::Tensor& targets, int64_t vocab_start, int64_t ignore_index,
                 const at::Tensor& stats, double softcap, double label_smoothing, double z_loss, bool want_entropy);

// grad[b, t] = scale * the gradient of the columns [vocab_start, vocab_start + Vs) of row (b, t), a row of
// vocab_size columns, given row[b, t] = (max, sum, scale) of the whole row (0 if ignored). grad may be logits.
void shard_grad(const at::Tensor& logits, const at::Tensor& targets, int64_t vocab_start, int64_t vocab_size,
                int64_t ignore_index, const at::Tensor& row, const at::Tensor& grad, double softcap,
                double label_smoothing, double z_loss);

// grad[b, t] *= grad_output (0-dim, or [B, T]); rows whose factor is exactly 1 are not touched.
void scale_grad_(const at::Tensor& grad, const at::Tensor& grad_output);

// The eager default path's whole forward (causal_lm.cu): (loss, grad, row_stats, divisor, code, row). The targets are labels[b, t + 1]
// with shift (ignore_index at t = T - 1), else labels[b, t]. The divisor: count (a device tensor of one number), else
// count_value, else with count_targets the number of targets that are not ignored; a negative, NaN or infinite one is
// bad. grad is the gradient / divisor (empty without compute_grad; written into logits with inplace). With validate,
// the host waits for the label check only: code 0 (good), 1 (a bad target, the first at row b * T + t) or 2 (a bad
// count); a bad one makes the loss NaN (with inplace and validate, nothing is written). Options as cross_entropy_fwd;
// with stats, row_stats [B, T, 3] gets (lse, entropy, correct) per row (else it is empty). divisor: 0-dim float64.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, int64_t, int64_t> causal_lm_fwd(
    const at::Tensor& logits, const at::Tensor& labels, bool shift, int64_t ignore_index,
    const std::optional<at::Tensor>& count, double count_value, bool count_targets, bool validate, bool compute_grad,
    bool inplace, bool stats, double softcap, double label_smoothing, double z_loss);

// cross_entropy_fwd's launch for a caller that checked the arguments (causal_lm.cu): raw pointers on the logits'
// device; target_shift 1 reads row (b, t)'s target at targets[b, t + 1] (ignore_index at t = T - 1).
void launch_fwd(const at::Tensor& logits, const at::Tensor& targets, int target_shift, const double* divisor,
                float* losses, const std::optional<at::Tensor>& grad, int64_t ignore_index, const bool* skip,
                double softcap, double label_smoothing, double z_loss, float* row_stats);

}  // namespace fastce
