// Adam/AdamW step coefficients, shared by the CPU and CUDA kernels.
//
// Computed once per tensor and step in double, then rounded to float as
// aten's fused Adam kernels do, so results stay within float rounding of
// torch.optim.Adam/AdamW. One difference, for speed: the second bias
// correction is a multiply by 1/sqrt(1 - beta2^t) fused with + eps (as
// DeepSpeed's CPU Adam does), not a division, so a step costs one division
// and one square root per element.
#pragma once
#include <cmath>
#include <cstdint>

namespace ds {

struct AdamCoeffs {
  float neg_step_size;    // -lr / (1 - beta1^t)
  float inv_bc2_sqrt;     // 1 / sqrt(1 - beta2^t)
  float eps;
  float lerp_coeff;       // torch's lerp(m, g, w): w, or w - 1 when w >= 0.5
  float beta2;
  float one_minus_beta2;
  float weight_decay;     // Adam (L2) mode: grad += weight_decay * param
  float decay_factor;     // AdamW mode: param *= 1 - lr * weight_decay
  int lerp_from_grad;     // 1: m = g + (w - 1)(g - m); 0: m = m + w (g - m)
  int mode;               // 0 no weight decay, 1 L2 (Adam), 2 decoupled (AdamW)
};

inline AdamCoeffs make_adam_coeffs(double lr, double beta1, double beta2, double eps, double weight_decay,
                                   bool adamw_mode, bool bias_correction, int64_t step) {
  double bias_correction1 = 1.0;
  double bias_correction2 = 1.0;
  if (bias_correction) {
    bias_correction1 = 1.0 - std::pow(beta1, static_cast<double>(step));
    bias_correction2 = 1.0 - std::pow(beta2, static_cast<double>(step));
  }
  const double step_size = lr / bias_correction1;
  AdamCoeffs c{};
  c.neg_step_size = static_cast<float>(-step_size);
  c.inv_bc2_sqrt = static_cast<float>(1.0 / std::sqrt(bias_correction2));
  c.eps = static_cast<float>(eps);
  const float lerp_weight = static_cast<float>(1.0 - beta1);
  c.lerp_from_grad = std::fabs(lerp_weight) < 0.5f ? 0 : 1;
  c.lerp_coeff = c.lerp_from_grad ? lerp_weight - 1.0f : lerp_weight;
  c.beta2 = static_cast<float>(beta2);
  c.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  c.weight_decay = static_cast<float>(weight_decay);
  c.decay_factor = static_cast<float>(1.0 - lr * weight_decay);
  c.mode = weight_decay == 0.0 ? 0 : (adamw_mode ? 2 : 1);
  return c;
}

}  // namespace ds
