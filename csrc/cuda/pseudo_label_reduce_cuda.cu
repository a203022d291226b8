// CUDA kernel of inmap_ext::pseudo_label_reduce (schema and meaning: csrc/inmap.cpp):
// per chunk, z = xc @ w -> P = softmax(z * inv_tau + bias) with confident rows one-hot (fused
// epilogue, also writing argmax and the confident flag) -> B += xc^T P, mass += colsum(P).
#include <torch/library.h>

#include "chunked_cuda.cuh"

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
  const int64_t cs = std::max<int64_t>(1, std::min(chunk, x.size(0)));
  at::Tensor pbuf = at::empty({cs, C}, x.options());
  at::Tensor argbuf = at::empty({cs}, x.options().dtype(at::kLong));
  at::Tensor confbuf = at::empty({cs}, x.options().dtype(at::kByte));
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pseudo_label_reduce_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* bp = bias.defined() ? bias.data_ptr<acc_t>() : nullptr;
    for_each_chunk(x, w, chunk, [&](int64_t, int64_t rows, const at::Tensor& xc, at::Tensor& z) {
      at::Tensor p = pbuf.narrow(0, 0, rows);
      at::Tensor arg = argbuf.narrow(0, 0, rows);
      at::Tensor conf = confbuf.narrow(0, 0, rows);
      row_softmax_kernel<acc_t, scalar_t, RowMode::kProbsThreshold><<<rows, kThreads, 0, stream>>>(
          z.data_ptr<acc_t>(), C, static_cast<acc_t>(inv_tau), bp, p.data_ptr<scalar_t>(),
          nullptr, static_cast<acc_t>(alpha), arg.data_ptr<int64_t>(), conf.data_ptr<uint8_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      mass.add_(p.sum(0, /*keepdim=*/false, acc));
      counts.add_(at::bincount(arg, {}, C));
      n_confident.add_(conf.sum(at::kLong));
      gemm_xt_p_accumulate(xc, p, B);
    });
  });
  return {B, mass, counts, n_confident};
}

}  // namespace

TORCH_LIBRARY_IMPL(inmap_ext, CUDA, m) { m.impl("pseudo_label_reduce", &pseudo_label_reduce_cuda); }

}  // namespace cuda
}  // namespace inmap
