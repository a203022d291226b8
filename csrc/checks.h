// Argument checks shared by the CPU and CUDA kernels: every op validates its inputs here, so
// errors read the same whichever device runs the op.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Optional.h>

namespace inmap {

inline void check_pair(const at::Tensor& x, const at::Tensor& w, const char* op) {
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D (N x D), got ", x.dim(), "-D");
  TORCH_CHECK(w.dim() == 2, op, ": w must be 2-D (D x C), got ", w.dim(), "-D");
  TORCH_CHECK(x.size(1) == w.size(0), op, ": x is N x D and w is D x C, but x has D=", x.size(1),
              " and w has D=", w.size(0));
  TORCH_CHECK(w.size(1) >= 1, op, ": w must have at least one column (class)");
  TORCH_CHECK(x.device() == w.device(), op, ": x and w must be on the same device, got ",
              x.device(), " and ", w.device());
  TORCH_CHECK(x.scalar_type() == w.scalar_type() ||
                  (x.device().is_cpu() && x.scalar_type() == at::kBFloat16 &&
                   w.scalar_type() == at::kFloat),
              op, ": x and w must have the same dtype (or, on the CPU, bfloat16 x and float32 w), "
              "got ", x.scalar_type(), " and ", w.scalar_type());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op, ": x must be a floating dtype, got ",
              x.scalar_type());
}

inline void check_bias(const c10::optional<at::Tensor>& bias, const at::Tensor& w, const char* op) {
  if (!bias.has_value()) return;
  const at::Tensor& b = *bias;
  TORCH_CHECK(b.dim() == 1 && b.size(0) == w.size(1), op, ": bias must be a vector of length C=",
              w.size(1), ", got shape ", b.sizes());
  TORCH_CHECK(b.device() == w.device(), op, ": bias must be on ", w.device(), ", got ", b.device());
}

inline void check_chunk(int64_t chunk, const char* op) {
  TORCH_CHECK(chunk >= 1, op, ": chunk must be >= 1, got ", chunk);
}

// Accumulation dtype of the ops: float64 stays float64, everything else accumulates in float32.
inline at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace inmap
