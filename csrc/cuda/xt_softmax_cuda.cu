// CUDA kernel of inmap_ext::xt_softmax (schema and meaning: csrc/inmap.cpp):
// per chunk, z = xc @ w (cuBLAS, fp32/fp64 out) -> P = softmax(z * inv_tau) in x's dtype ->
// G += xc^T P (cuBLAS, fp32/fp64 accumulation).
#include <torch/library.h>

#include "chunked_cuda.cuh"

namespace inmap {
namespace cuda {
namespace {

at::Tensor xt_softmax_cuda(const at::Tensor& x_in, const at::Tensor& w_in, double inv_tau,
                           int64_t chunk) {
  check_cuda_inputs(x_in, w_in, c10::nullopt, chunk, "xt_softmax");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in, w = w_in.contiguous();
  const int64_t D = x.size(1), C = w.size(1);
  at::Tensor G = at::zeros({D, C}, x.options().dtype(acc_type(x.scalar_type())));
  const int64_t cs = std::max<int64_t>(1, std::min(chunk, x.size(0)));
  at::Tensor pbuf = at::empty({cs, C}, x.options());
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "xt_softmax_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    for_each_chunk(x, w, chunk, [&](int64_t, int64_t rows, const at::Tensor& xc, at::Tensor& z) {
      at::Tensor p = pbuf.narrow(0, 0, rows);
      row_softmax_kernel<acc_t, scalar_t, RowMode::kProbs><<<rows, kThreads, 0, stream>>>(
          z.data_ptr<acc_t>(), C, static_cast<acc_t>(inv_tau), nullptr, p.data_ptr<scalar_t>(),
          nullptr, acc_t(0), nullptr, nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      gemm_xt_p_accumulate(xc, p, G);
    });
  });
  return G;
}

}  // namespace

TORCH_LIBRARY_IMPL(inmap_ext, CUDA, m) { m.impl("xt_softmax", &xt_softmax_cuda); }

}  // namespace cuda
}  // namespace inmap
