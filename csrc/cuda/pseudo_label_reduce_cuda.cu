// CUDA kernel of inmap_ext::pseudo_label_reduce (schema and meaning: csrc/inmap.cpp): per
// chunk, P = softmax(x @ w * inv_tau + bias) with confident rows one-hot, argmax and confident
// flags (design.cuh: chunked or fused) -> B += xc^T P, mass += colsum(P), counts, n_confident.
#include <torch/library.h>

#include "design.cuh"

namespace inmap {
namespace cuda {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> pseudo_label_reduce_cuda(
    const at::Tensor& x, const at::Tensor& w_in, const c10::optional<at::Tensor>& bias_in,
    double inv_tau, double alpha, int64_t chunk) {
  check_cuda_inputs(x, w_in, bias_in, chunk, "pseudo_label_reduce");
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor w = w_in.contiguous();
  const auto acc = acc_type(x.scalar_type());
  const int64_t D = x.size(1), C = w.size(1);
  at::Tensor bias = bias_in.has_value() ? bias_in->to(acc).contiguous() : at::Tensor();
  at::Tensor B = at::zeros({D, C}, x.options().dtype(acc));
  at::Tensor mass = at::zeros({C}, x.options().dtype(acc));
  at::Tensor counts = at::zeros({C}, x.options().dtype(at::kLong));
  at::Tensor n_confident = at::zeros({}, x.options().dtype(at::kLong));
  for_each_softmax_chunk<true>(
      x, w, bias, inv_tau, alpha, chunk,
      [&](const at::Tensor& xc, const at::Tensor& p, const at::Tensor& arg, const at::Tensor& conf,
          const at::Tensor&) {
        mass.add_(p.sum(0, /*keepdim=*/false, acc));
        // counted on the device (at::bincount reads the max back to the host: a sync per chunk)
        counts.index_add_(0, arg, at::ones_like(arg));
        n_confident.add_(conf.sum(at::kLong));
        gemm_xt_p_accumulate(xc, p, B);
      });
  return {B, mass, counts, n_confident};
}

}  // namespace

TORCH_LIBRARY_IMPL(inmap_ext, CUDA, m) { m.impl("pseudo_label_reduce", &pseudo_label_reduce_cuda); }

}  // namespace cuda
}  // namespace inmap
