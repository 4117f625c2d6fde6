// Fused InfoNCE: host-side input checks shared by the CPU and CUDA entry points (the Python face
// checks first with friendlier messages; these guard direct torch.ops.sparkct calls).
#pragma once

#include <ATen/ATen.h>

#include <cmath>

namespace sparkct {
namespace nce {

inline void check_inputs(const at::Tensor& z0, const at::Tensor& z1, const c10::optional<at::Tensor>& cols,
                  const c10::optional<at::Tensor>& bank, double temperature, int64_t col_offset, int64_t impl) {
  TORCH_CHECK(z0.dim() == 2 && z1.dim() == 2, "info_nce: z0 and z1 must be 2-D (N, D), got ", z0.sizes(), " and ",
              z1.sizes());
  TORCH_CHECK(z0.sizes() == z1.sizes(), "info_nce: z0 and z1 must have the same shape, got ", z0.sizes(), " and ",
              z1.sizes());
  TORCH_CHECK(z0.size(0) >= 1, "info_nce: empty batch (N = 0)");
  TORCH_CHECK(z0.size(1) >= 1, "info_nce: empty embedding dimension (D = 0)");
  TORCH_CHECK(z0.scalar_type() == z1.scalar_type(), "info_nce: z0 and z1 must have the same dtype");
  TORCH_CHECK(at::isFloatingType(z0.scalar_type()), "info_nce: embeddings must be floating point, got ",
              z0.scalar_type());
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0, "info_nce: temperature must be finite and > 0, got ",
              temperature);
  TORCH_CHECK(!(cols.has_value() && bank.has_value()), "info_nce: pass gathered columns or a bank, not both");
  TORCH_CHECK(impl == 0 || impl == 1, "info_nce: impl must be 0 (fast) or 1 (simple), got ", impl);
  for (const auto* o : {&cols, &bank}) {
    if (!o->has_value()) continue;
    const at::Tensor& t = o->value();
    const char* what = o == &cols ? "cols" : "bank";
    TORCH_CHECK(t.dim() == 2 && t.size(1) == z0.size(1), "info_nce: ", what, " must be 2-D (K, D) with D = ",
                z0.size(1), ", got ", t.sizes());
    TORCH_CHECK(t.scalar_type() == z0.scalar_type(), "info_nce: ", what, " dtype ", t.scalar_type(),
                " differs from the embeddings' ", z0.scalar_type());
    TORCH_CHECK(t.device() == z0.device(), "info_nce: ", what, " is on ", t.device(), ", embeddings on ",
                z0.device());
  }
  TORCH_CHECK(z1.device() == z0.device(), "info_nce: z0 and z1 are on different devices");
  if (cols.has_value()) {
    TORCH_CHECK(col_offset >= 0 && col_offset + 2 * z0.size(0) <= cols->size(0),
                "info_nce: rows [col_offset, col_offset + 2N) = [", col_offset, ", ", col_offset + 2 * z0.size(0),
                ") must lie inside the ", cols->size(0), " gathered columns");
  }
}

// Rows of the problem: [z0; z1] (2N) without a bank, z0 (N) with one.
inline int64_t num_rows(const at::Tensor& z0, const c10::optional<at::Tensor>& bank) {
  return bank.has_value() ? z0.size(0) : 2 * z0.size(0);
}

// float for fp16/bf16/fp32, double for fp64: the accumulation and LSE dtype.
inline at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

inline void check_backward(const at::Tensor& grad, const at::Tensor& lse, const at::Tensor& z0, int64_t rows) {
  TORCH_CHECK(grad.numel() == 1, "info_nce_backward: grad must be a scalar, got ", grad.sizes());
  TORCH_CHECK(grad.device() == z0.device() && lse.device() == z0.device(),
              "info_nce_backward: grad and lse must be on the embeddings' device ", z0.device());
  const auto ct = acc_type(z0.scalar_type());
  TORCH_CHECK(lse.dim() == 1 && lse.size(0) == rows && lse.scalar_type() == ct, "info_nce_backward: lse must be (",
              rows, ",) ", ct, ", got ", lse.sizes(), " ", lse.scalar_type());
}

}  // namespace nce
}  // namespace sparkct
