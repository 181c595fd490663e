// Argument checks shared by the host entry points; see checks.h.
#include "checks.h"

#include <ATen/MemoryOverlap.h>
#include <c10/util/Exception.h>

namespace fastce {

// Numbers and shapes in error messages are formatted with std::to_string, never streamed: a toolchain that links its
// own copy of libstdc++ into the extension (the H100 image's /opt/gcc does) crashed streaming an integer into
// c10's message stream (a locale facet from the other copy). Strings and C strings stream safely.
std::string str(int64_t value) { return std::to_string(value); }

std::string str(double value) { return std::to_string(value); }

std::string str(c10::IntArrayRef values) {
  std::string out = "[";
  for (size_t i = 0; i < values.size(); ++i) out += (i ? ", " : "") + std::to_string(values[i]);
  return out + "]";
}

std::string str(const c10::Device& device) { return device.str(); }

// logits, or a gradient: a CUDA [B, T, V] float32/float16/bfloat16 tensor with unit stride over V.
void check_rows(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got ", str(t.device()));
  TORCH_CHECK(t.dim() == 3, op, ": ", name, " must be [B, T, V], got shape ", str(t.sizes()));
  const auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, op, ": ", name,
              " must be float32, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(t.stride(2) == 1, op, ": ", name, " must have stride(-1) == 1, got strides ", str(t.strides()));
  TORCH_CHECK(t.size(2) <= kMaxVocabSize, op, ": the vocabulary size must be at most 2^30, got ", str(t.size(2)));
}

void check_same_device(const at::Tensor& t, const at::Tensor& logits, const char* op, const char* name) {
  TORCH_CHECK(t.device() == logits.device(), op, ": ", name, " must be on ", str(logits.device()), " like the logits, got ",
              str(t.device()));
}

// logits [B, T, V] and targets [B, T] int32/int64, as every op takes them.
void check_logits_and_targets(const at::Tensor& logits, const at::Tensor& targets, const char* op) {
  check_rows(logits, op, "logits");
  check_same_device(targets, logits, op, "targets");
  TORCH_CHECK(targets.scalar_type() == at::kLong || targets.scalar_type() == at::kInt, op,
              ": targets must be int64 or int32, got ", targets.scalar_type());
  TORCH_CHECK(targets.dim() == 2 && targets.size(0) == logits.size(0) && targets.size(1) == logits.size(1), op,
              ": targets must be [B, T] = [", str(logits.size(0)), ", ", str(logits.size(1)), "], got ",
              str(targets.sizes()));
}

// A gradient for the logits: their dtype and shape, unit stride over V, the logits themselves or not overlapping them.
void check_grad(const at::Tensor& g, const at::Tensor& logits, const char* op) {
  check_same_device(g, logits, op, "grad");
  TORCH_CHECK(g.scalar_type() == logits.scalar_type(), op, ": grad must have the logits' dtype ", logits.scalar_type(),
              ", got ", g.scalar_type());
  TORCH_CHECK(g.sizes() == logits.sizes(), op, ": grad must have the logits' shape ", str(logits.sizes()), ", got ",
              str(g.sizes()));
  TORCH_CHECK(g.stride(2) == 1, op, ": grad must have stride(-1) == 1, got strides ", str(g.strides()));
  // In place means grad *is* the logits (same start, same strides); any other overlap would race.
  const bool same_view = g.data_ptr() == logits.data_ptr() && g.strides() == logits.strides();
  TORCH_CHECK(same_view || at::get_overlap_status(g, logits) != at::MemOverlapStatus::Partial, op,
              ": grad must be the logits themselves or not overlap them");
}

// A contiguous float32 [B, T, fields] tensor of per-row values (row_stats, stats, row) beside the logits.
void check_row_fields(const at::Tensor& t, const at::Tensor& logits, int64_t fields, const char* op, const char* name) {
  check_same_device(t, logits, op, name);
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 3 && t.size(0) == logits.size(0) && t.size(1) == logits.size(1) && t.size(2) == fields &&
                  t.is_contiguous(),
              op, ": ", name, " must be a contiguous [B, T, ", str(fields), "] = [", str(logits.size(0)), ", ",
              str(logits.size(1)), ", ", str(fields), "] tensor, got shape ", str(t.sizes()), " and strides ",
              str(t.strides()));
}

}  // namespace fastce
