// Fused prototype cross-entropy: host-side input checks shared by the CPU and CUDA entry points
// (the Python face checks first with friendlier messages; these guard direct torch.ops.sparkct calls).
#pragma once

#include <ATen/ATen.h>

#include <cmath>

namespace sparkct {
namespace pce {

inline void check_inputs(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& w_student,
                         const at::Tensor& w_teacher, const c10::optional<at::Tensor>& bias, double student_temp,
                         double teacher_temp, int64_t impl) {
  TORCH_CHECK(student.dim() == 3 && teacher.dim() == 3, "prototype_cross_entropy: student and teacher must be 3-D ",
              "(crops, B, D), got ", student.sizes(), " and ", teacher.sizes());
  TORCH_CHECK(w_student.dim() == 2 && w_teacher.dim() == 2, "prototype_cross_entropy: w_student and w_teacher must ",
              "be 2-D (K, D), got ", w_student.sizes(), " and ", w_teacher.sizes());
  const int64_t B = student.size(1), D = student.size(2), K = w_student.size(0);
  TORCH_CHECK(student.size(0) >= 1 && teacher.size(0) >= 1, "prototype_cross_entropy: no crops (S or T is 0)");
  TORCH_CHECK(B >= 1 && D >= 1 && K >= 1, "prototype_cross_entropy: empty batch, dimension or prototype set (B = ",
              B, ", D = ", D, ", K = ", K, ")");
  TORCH_CHECK(teacher.size(1) == B && teacher.size(2) == D, "prototype_cross_entropy: teacher must be (T, ", B, ", ",
              D, ") like the student, got ", teacher.sizes());
  TORCH_CHECK(w_student.size(1) == D && w_teacher.size(0) == K && w_teacher.size(1) == D,
              "prototype_cross_entropy: w_student and w_teacher must both be (K, ", D, "), got ", w_student.sizes(),
              " and ", w_teacher.sizes());
  const auto dt = student.scalar_type();
  TORCH_CHECK(at::isFloatingType(dt), "prototype_cross_entropy: inputs must be floating point, got ", dt);
  for (const at::Tensor* t : {&teacher, &w_student, &w_teacher}) {
    TORCH_CHECK(t->scalar_type() == dt, "prototype_cross_entropy: all inputs must share the student's dtype ", dt,
                ", got ", t->scalar_type());
    TORCH_CHECK(t->device() == student.device(), "prototype_cross_entropy: inputs on different devices (",
                t->device(), " and ", student.device(), ")");
  }
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == K, "prototype_cross_entropy: teacher_bias must be (", K,
                ",), got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == dt, "prototype_cross_entropy: teacher_bias dtype ", bias->scalar_type(),
                " differs from the inputs' ", dt);
    TORCH_CHECK(bias->device() == student.device(), "prototype_cross_entropy: teacher_bias is on ", bias->device(),
                ", inputs on ", student.device());
  }
  TORCH_CHECK(std::isfinite(student_temp) && student_temp > 0 && std::isfinite(teacher_temp) && teacher_temp > 0,
              "prototype_cross_entropy: temperatures must be finite and > 0, got ", student_temp, " and ",
              teacher_temp);
  TORCH_CHECK(impl == 0 || impl == 1, "prototype_cross_entropy: impl must be 0 (fast) or 1 (simple), got ", impl);
}

inline void check_pairs(int64_t S, int64_t T, bool skip_same) {
  const int64_t n = S * T - (skip_same ? (S < T ? S : T) : 0);
  TORCH_CHECK(n >= 1, "prototype_cross_entropy: no (teacher, student) pair left (S = ", S, ", T = ", T,
              ", skip_same = ", skip_same, ")");
}

// float for fp16/bf16/fp32, double for fp64: the accumulation and statistics dtype.
inline at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

inline void check_backward(const at::Tensor& grad, const at::Tensor& lse_s, const at::Tensor& lse_t,
                           const at::Tensor& student, const at::Tensor& teacher) {
  TORCH_CHECK(grad.numel() == 1, "prototype_cross_entropy_backward: grad must be a scalar, got ", grad.sizes());
  const auto ct = acc_type(student.scalar_type());
  TORCH_CHECK(lse_s.dim() == 2 && lse_s.size(0) == student.size(0) && lse_s.size(1) == student.size(1) &&
                  lse_s.scalar_type() == ct && lse_s.device() == student.device(),
              "prototype_cross_entropy_backward: lse_student must be (S, B) ", ct, ", got ", lse_s.sizes(), " ",
              lse_s.scalar_type());
  TORCH_CHECK(lse_t.dim() == 2 && lse_t.size(0) == teacher.size(0) && lse_t.size(1) == teacher.size(1) &&
                  lse_t.scalar_type() == ct && lse_t.device() == student.device(),
              "prototype_cross_entropy_backward: lse_teacher must be (T, B) ", ct, ", got ", lse_t.sizes(), " ",
              lse_t.scalar_type());
  TORCH_CHECK(grad.device() == student.device(), "prototype_cross_entropy_backward: grad is on ", grad.device(),
              ", inputs on ", student.device());
}

}  // namespace pce
}  // namespace sparkct
