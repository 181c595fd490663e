// Registers the fastce_cuda ops with the dispatcher (schemas here, CUDA kernels in cross_entropy.cu) and makes this
// library importable as the Python module fastce._C: importing it runs the registrations (see pytorch/extension-cpp).
// Fake (meta) implementations are registered from Python, in fastce/kernels/cuda_ce.py.
#include <Python.h>

#include <torch/library.h>

#include "cross_entropy.h"

extern "C" {
// A module without methods: the ops are reached through torch.ops.fastce_cuda, not through this module.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(fastce_cuda, m) {
  // Out-variants: they allocate nothing but small workspaces and return nothing; grad is None for a forward-only
  // call. skip: a 0-dim bool on the device; when it holds true the launch writes nothing (a validation that failed,
  // answered later). softcap, label_smoothing, z_loss: the loss options, 0 for none; row_stats: (lse, entropy,
  // correct) per row, when given.
  m.def(
      "cross_entropy_fwd(Tensor logits, Tensor targets, Tensor divisor, Tensor(a!) losses, Tensor(b!)? grad, "
      "int ignore_index, Tensor? skip=None, float softcap=0., float label_smoothing=0., float z_loss=0., "
      "Tensor(c!)? row_stats=None) -> ()");
  // The two phases on a column range of rows (lm_head vocabulary slabs, vocabulary shards): the range's statistics,
  // and the epilogue given each whole row's (max, sum, scale). grad may be the logits themselves.
  m.def(
      "shard_stats(Tensor logits, Tensor targets, int vocab_start, int ignore_index, Tensor(a!) stats, "
      "float softcap, float label_smoothing, float z_loss, bool want_entropy) -> ()");
  m.def(
      "shard_grad(Tensor logits, Tensor targets, int vocab_start, int vocab_size, int ignore_index, Tensor row, "
      "Tensor(a!) grad, float softcap, float label_smoothing, float z_loss) -> ()");
  m.def("scale_grad_(Tensor(a!) grad, Tensor grad_output) -> ()");
  // The eager default path's forward in one call (label shift, count, check, kernels, float64 loss): see
  // cross_entropy.h. Eager only (fastce/function.py, direct_cross_entropy); torch.compile traces the ops above.
  m.def(
      "causal_lm_fwd(Tensor(a!) logits, Tensor labels, bool shift, int ignore_index, Tensor? count, "
      "float count_value, bool count_targets, bool validate, bool compute_grad, bool inplace, bool stats=False, "
      "float softcap=0., float label_smoothing=0., float z_loss=0.) -> (Tensor, Tensor, Tensor, Tensor, int, int)");
  // The same forward with the gradient, for logits that need one, as an op with a C++ autograd node
  // (causal_lm_autograd.cpp): (loss, row_stats, divisor, code, row), the loss differentiable; its backward scales the
  // gradient the node saved (the logits themselves with inplace).
  m.def(
      "causal_lm_loss(Tensor(a!) logits, Tensor labels, bool shift, int ignore_index, Tensor? count, "
      "float count_value, bool count_targets, bool validate, bool inplace, bool stats=False, float softcap=0., "
      "float label_smoothing=0., float z_loss=0.) -> (Tensor, Tensor, Tensor, int, int)");
}

TORCH_LIBRARY_IMPL(fastce_cuda, CUDA, m) {
  m.impl("cross_entropy_fwd", &fastce::cross_entropy_fwd);
  m.impl("shard_stats", &fastce::shard_stats);
  m.impl("shard_grad", &fastce::shard_grad);
  m.impl("scale_grad_", &fastce::scale_grad_);
  m.impl("causal_lm_fwd", &fastce::causal_lm_fwd);
}
