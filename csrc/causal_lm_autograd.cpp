// causal_lm_loss: the eager default path's forward and backward as one op with a C++ autograd node, for calls whose
// logits need a gradient. A Python torch.autograd.Function cost the host more than the op itself at small shapes (its
// apply and context, and a backward called from the autograd engine's thread under the GIL); this node runs no
// Python. Forward: causal_lm_fwd (causal_lm.cu) with the gradient, which the node saves (the logits themselves in
// place); backward: scale_grad_ (cross_entropy.cu) on it, as fastce/function.py's FusedCrossEntropy does.
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/grad_mode.h>
#include <ATen/ops/zeros.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "cross_entropy.h"

namespace fastce {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// fastce/function.py's _scaled_grad raises the same on the general path.
constexpr const char* kBackwardTwice =
    "fastce's fused cross-entropy gradient is scaled in place: backward can run only once";
constexpr const char* kDifferentiateTwice =
    "trying to differentiate twice fastce's fused cross-entropy, whose backward is not differentiable";

// causal_lm_fwd's arguments other than the tensors, and the label check's answer, which the op returns beside the
// node's outputs (an autograd Function returns tensors only).
struct Call {
  bool shift;
  int64_t ignore_index;
  double count_value;
  bool count_targets, validate, inplace, stats;
  double softcap, label_smoothing, z_loss;
  int64_t code = 0, row = -1;
};

class CausalLmLoss : public torch::autograd::Function<CausalLmLoss> {
 public:
  // (loss, row_stats, divisor): the loss differentiable, the others not.
  static variable_list forward(AutogradContext* ctx, const at::Tensor& logits, const at::Tensor& labels,
                               const std::optional<at::Tensor>& count, Call* call) {
    at::Tensor loss, grad, row_stats, divisor;
    {
      // The op's own tensors (outputs, workspace, views of it) need no autograd or view tracking.
      const at::AutoDispatchBelowADInplaceOrView below_autograd;
      std::tie(loss, grad, row_stats, divisor, call->code, call->row) =
          causal_lm_fwd(logits, labels, call->shift, call->ignore_index, count, call->count_value,
                        call->count_targets, call->validate, /*compute_grad=*/true, call->inplace, call->stats,
                        call->softcap, call->label_smoothing, call->z_loss);
    }
    if (call->inplace) {
      grad = logits;
      // What the Python path's torch.autograd.graph.increment_version did: anything that saved the logits for its
      // own backward now fails autograd's version check instead of reading a gradient. Not when the check failed:
      // the kernels then wrote nothing, and the caller raises. (mark_dirty would make the logits an output.)
      if (call->code == 0) torch::autograd::impl::bump_version(logits);
    }
    ctx->save_for_backward({grad});
    ctx->mark_non_differentiable({row_stats, divisor});
    // The non-differentiable outputs get no gradient: leave theirs undefined rather than allocate zeros for them.
    ctx->set_materialize_grads(false);
    return {loss, row_stats, divisor};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    TORCH_CHECK(!ctx->saved_data.count("scaled"), kBackwardTwice);
    ctx->saved_data["scaled"] = true;
    at::Tensor grad = ctx->get_saved_variables()[0];
    const at::Tensor& grad_output = grad_outputs[0];
    {
      const at::AutoDispatchBelowADInplaceOrView below_autograd;
      // Undefined when nothing reached the loss (a grad_output of zeros, as materialised grads would have been).
      scale_grad_(grad, grad_output.defined() ? grad_output.to(grad.device(), at::kFloat)
                                              : at::zeros({}, grad.options().dtype(at::kFloat)));
    }
    // As Python's @once_differentiable: under create_graph, with a grad_output that needs a gradient, the result gets
    // a node that raises if it is differentiated (its dependence on grad_output is not recorded).
    if (at::GradMode::is_enabled() && grad_output.defined() && grad_output.requires_grad()) {
      grad = torch::autograd::DelayedError(kDifferentiateTwice, 1).apply({grad.detach().requires_grad_()})[0];
    }
    return {grad, at::Tensor(), at::Tensor(), at::Tensor()};  // one per forward argument
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, int64_t, int64_t> causal_lm_loss(
    const at::Tensor& logits, const at::Tensor& labels, bool shift, int64_t ignore_index,
    const std::optional<at::Tensor>& count, double count_value, bool count_targets, bool validate, bool inplace,
    bool stats, double softcap, double label_smoothing, double z_loss) {
  Call call{shift, ignore_index, count_value, count_targets, validate, inplace, stats, softcap, label_smoothing,
            z_loss};
  const variable_list out = CausalLmLoss::apply(logits, labels, count, &call);
  return {out[0], out[1], out[2], call.code, call.row};
}

}  // namespace
}  // namespace fastce

// Autograd only: the op is called for logits that need a gradient (fastce/function.py, direct_cross_entropy).
TORCH_LIBRARY_IMPL(fastce_cuda, Autograd, m) { m.impl("causal_lm_loss", &fastce::causal_lm_loss); }
