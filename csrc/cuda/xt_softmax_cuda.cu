// CUDA kernel of inmap_ext::xt_softmax (schema and meaning: csrc/inmap.cpp): per chunk,
// P = softmax(x @ w * inv_tau) in x's dtype (design.cuh: chunked or fused) -> G += xc^T P
// (cuBLAS, fp32/fp64 accumulation); the row log-sum-exps the softmax computed are summed.
#include <torch/library.h>

#include "design.cuh"

namespace inmap {
namespace cuda {
namespace {

std::tuple<at::Tensor, at::Tensor> xt_softmax_cuda(const at::Tensor& x, const at::Tensor& w_in,
                                                   double inv_tau, int64_t chunk) {
  check_cuda_inputs(x, w_in, c10::nullopt, chunk, "xt_softmax");
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor w = w_in.contiguous();
  const auto acc = acc_type(x.scalar_type());
  at::Tensor G = at::zeros({x.size(1), w.size(1)}, x.options().dtype(acc));
  at::Tensor lse_sum = at::zeros({}, x.options().dtype(at::kDouble));
  for_each_softmax_chunk<false>(
      x, w, at::Tensor(), inv_tau, 0.0, chunk,
      [&](const at::Tensor& xc, const at::Tensor& p, const at::Tensor&, const at::Tensor&,
          const at::Tensor& lse) {
        gemm_xt_p_accumulate(xc, p, G);
        lse_sum.add_(lse.sum(0, /*keepdim=*/false, at::kDouble));  // the rows' log-sum-exps
      });
  return {G, lse_sum.to(acc)};
}

}  // namespace

TORCH_LIBRARY_IMPL(inmap_ext, CUDA, m) { m.impl("xt_softmax", &xt_softmax_cuda); }

}  // namespace cuda
}  // namespace inmap
