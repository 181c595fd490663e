// Argument checks and message formatting shared by the host entry points (cross_entropy.cu, causal_lm.cu): each
// raises a c10::Error naming the op and the argument.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>

namespace fastce {

constexpr int64_t kMaxVocabSize = int64_t{1} << 30;  // elements.cuh's kMaxVocab: int offsets within a row

std::string str(int64_t value);
std::string str(double value);
std::string str(c10::IntArrayRef values);
std::string str(const c10::Device& device);

// logits, or a gradient: a CUDA [B, T, V] float32/float16/bfloat16 tensor with unit stride over V.
void check_rows(const at::Tensor& t, const char* op, const char* name);
void check_same_device(const at::Tensor& t, const at::Tensor& logits, const char* op, const char* name);
// logits [B, T, V] and targets [B, T] int32/int64, as every op takes them.
void check_logits_and_targets(const at::Tensor& logits, const at::Tensor& targets, const char* op);
// A gradient for the logits: their dtype and shape, unit stride over V, the logits themselves or not overlapping them.
void check_grad(const at::Tensor& g, const at::Tensor& logits, const char* op);
// A contiguous float32 [B, T, fields] tensor of per-row values (row_stats, stats, row) beside the logits.
void check_row_fields(const at::Tensor& t, const at::Tensor& logits, int64_t fields, const char* op, const char* name);

}  // namespace fastce
