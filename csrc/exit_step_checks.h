// Argument checks (and the gather's output plan) of the branchynet ops, shared by the CPU
// and the CUDA kernels so the two cannot drift apart.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

namespace branchynet {

// Criterion ids (branchynet.config): 0 entropy, 1 max_prob, 2 margin score a row and
// compare the score with the threshold; 3 is PABEE's patience, whose test reads and writes
// the per-row state below.
constexpr int64_t kPatience = 3;

struct ExitStepShape {
  int64_t K;  // rows in flight
  int64_t C;  // classes
  int64_t B;  // rows of the output buffers (the original batch)
};

// patience_state: [B, 2] int64, contiguous, indexed by original row like the out_*
// buffers: (prediction at the previous exit, streak). Given exactly when the criterion is
// patience: indexed by original row, it needs no gather when the survivors are compacted.
inline ExitStepShape check_exit_step_args(
    const at::Tensor& logits, const at::Tensor& rows, double threshold, int64_t criterion,
    const at::Tensor& out_logits, const at::Tensor& out_pred, const at::Tensor& out_exit,
    const at::Tensor& out_entropy, const std::optional<at::Tensor>& patience_state) {
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
  TORCH_CHECK(criterion >= 0 && criterion <= kPatience, "exit_step: criterion must be 0, 1, 2 or 3, got ",
              criterion);
  const bool has_state = patience_state.has_value() && patience_state->defined();
  TORCH_CHECK(has_state == (criterion == kPatience),
              criterion == kPatience ? "exit_step: criterion 3 (patience) needs patience_state [B, 2] int64"
                                     : "exit_step: patience_state is only for criterion 3 (patience)");
  if (has_state) {
    const at::Tensor& st = *patience_state;
    TORCH_CHECK(st.scalar_type() == at::kLong && st.dim() == 2 && st.size(0) == B && st.size(1) == 2,
                "exit_step: patience_state must be int64 [", B, ", 2], got ", st.scalar_type(), " ", st.sizes());
    TORCH_CHECK(st.is_contiguous(), "exit_step: patience_state must be contiguous");
    TORCH_CHECK(st.device() == logits.device(), "exit_step: all tensors must be on ", logits.device(),
                ", got one on ", st.device());
  }
  TORCH_CHECK(!std::isnan(threshold), "exit_step: threshold is NaN");
  return {K, C, B};
}

// The survivor gather's plan, shared by the CPU and CUDA kernels: argument checks and
// the output, which keeps channels_last 4-D features channels_last (the oracle's rule,
// gather_rows_torch) and is contiguous otherwise. Each sample's block is contiguous in
// both layouts, so the kernels copy `row_bytes` per index.
struct GatherPlan {
  at::Tensor src;  // features, made contiguous unless already contiguous or channels_last
  at::Tensor idx;  // index, contiguous
  at::Tensor out;  // [M, ...]
  int64_t M;
  int64_t K;
  int64_t row_bytes;
};

inline GatherPlan plan_gather(const at::Tensor& features, const at::Tensor& index) {
  TORCH_CHECK(features.dim() >= 1, "gather_rows: features need a batch dimension");
  TORCH_CHECK(index.scalar_type() == at::kLong && index.dim() == 1,
              "gather_rows: index must be a 1-D int64 tensor, got ", index.scalar_type(), " ", index.sizes());
  TORCH_CHECK(index.device() == features.device(), "gather_rows: index is on ", index.device(),
              " but features are on ", features.device());
  at::MemoryFormat fmt = at::MemoryFormat::Contiguous;
  at::Tensor src = features;
  if (!features.is_contiguous()) {
    if (features.dim() == 4 && features.is_contiguous(at::MemoryFormat::ChannelsLast)) {
      fmt = at::MemoryFormat::ChannelsLast;
    } else {
      src = features.contiguous();
    }
  }
  at::Tensor idx = index.contiguous();
  const int64_t M = idx.size(0);
  const int64_t K = src.size(0);
  std::vector<int64_t> sizes = src.sizes().vec();
  sizes[0] = M;
  at::Tensor out = at::empty(sizes, src.options().memory_format(fmt));
  int64_t inner = 1;
  for (size_t d = 1; d < sizes.size(); ++d) inner *= sizes[d];
  return {src, idx, out, M, K, inner * static_cast<int64_t>(src.element_size())};
}

}  // namespace branchynet
