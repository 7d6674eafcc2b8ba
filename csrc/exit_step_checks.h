// Argument checks of branchynet::exit_step, shared by the CPU and the CUDA kernels so the
// two cannot drift apart.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>

namespace branchynet {

struct ExitStepShape {
  int64_t K;  // rows in flight
  int64_t C;  // classes
  int64_t B;  // rows of the output buffers (the original batch)
};

inline ExitStepShape check_exit_step_args(
    const at::Tensor& logits, const at::Tensor& rows, double threshold, int64_t criterion,
    const at::Tensor& out_logits, const at::Tensor& out_pred, const at::Tensor& out_exit,
    const at::Tensor& out_entropy) {
  TORCH_CHECK(logits.dim() == 2, "exit_step: logits must be [K, C], got rank ", logits.dim());
  const auto dtype = logits.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kDouble,
              "exit_step: logits must be float32, float16, bfloat16 or float64, got ", dtype);
  const int64_t K = logits.size(0);
  const int64_t C = logits.size(1);
  TORCH_CHECK(C >= 1, "exit_step: logits need at least one class");
  TORCH_CHECK(rows.scalar_type() == at::kLong && rows.dim() == 1 && rows.size(0) == K,
              "exit_step: rows must be int64 [", K, "], got ", rows.scalar_type(), " ", rows.sizes());
  TORCH_CHECK(out_logits.dim() == 2 && out_logits.size(1) == C && out_logits.scalar_type() == dtype,
              "exit_step: out_logits must be [B, ", C, "] of the logits' dtype, got ",
              out_logits.scalar_type(), " ", out_logits.sizes());
  TORCH_CHECK(out_logits.is_contiguous(), "exit_step: out_logits must be contiguous");
  const int64_t B = out_logits.size(0);
  TORCH_CHECK(out_pred.scalar_type() == at::kLong && out_pred.dim() == 1 && out_pred.size(0) == B,
              "exit_step: out_pred must be int64 [", B, "]");
  TORCH_CHECK(out_exit.scalar_type() == at::kLong && out_exit.dim() == 1 && out_exit.size(0) == B,
              "exit_step: out_exit must be int64 [", B, "]");
  TORCH_CHECK(out_entropy.scalar_type() == at::kFloat && out_entropy.dim() == 1 && out_entropy.size(0) == B,
              "exit_step: out_entropy must be float32 [", B, "]");
  for (const at::Tensor* t : {&rows, &out_logits, &out_pred, &out_exit, &out_entropy}) {
    TORCH_CHECK(t->device() == logits.device(), "exit_step: all tensors must be on ", logits.device(),
                ", got one on ", t->device());
  }
  TORCH_CHECK(criterion >= 0 && criterion <= 2, "exit_step: criterion must be 0, 1 or 2, got ", criterion);
  TORCH_CHECK(!std::isnan(threshold), "exit_step: threshold is NaN");
  return {K, C, B};
}

}  // namespace branchynet
