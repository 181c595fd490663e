// Host entry points of the fastce_cuda ops; kernels in cross_entropy_kernels.cuh and cluster_kernel.cuh, launches in
// cross_entropy.cu, registration in ops.cpp. The contract (shapes, dtypes, what is written, the options) is the one
// in fastce/kernels/__init__.py.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

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

}  // namespace fastce
