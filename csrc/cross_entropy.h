// Host entry points of the fastce_cuda ops; kernels in cross_entropy.cu, registration in ops.cpp.
// The contract (shapes, dtypes, what is written) is the one in fastce/kernels/__init__.py.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

namespace fastce {

// losses[b, t] = logsumexp(logits[b, t]) - logits[b, t, targets[b, t]] (0 if ignored, NaN if out of range), and,
// when grad is given, grad[b, t] = (softmax(logits[b, t]) - onehot) / divisor (0 if ignored). grad may be logits.
// Nothing is written when skip (a 0-dim bool on the device) holds true.
void cross_entropy_fwd(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& divisor,
                       const at::Tensor& losses, const std::optional<at::Tensor>& grad, int64_t ignore_index,
                       const std::optional<at::Tensor>& skip);

// grad[b, t] *= grad_output (0-dim, or [B, T]); rows whose factor is exactly 1 are not touched.
void scale_grad_(const at::Tensor& grad, const at::Tensor& grad_output);

}  // namespace fastce
