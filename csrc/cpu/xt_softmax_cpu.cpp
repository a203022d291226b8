// CPU kernel of inmap_ext::xt_softmax (schema and meaning: csrc/inmap.cpp).
#include <torch/library.h>

#include <vector>

#include "chunked_cpu.h"

namespace inmap {
namespace cpu {
namespace {

std::tuple<at::Tensor, at::Tensor> xt_softmax_cpu(const at::Tensor& x, const at::Tensor& w,
                                                  double inv_tau, int64_t chunk) {
  check_cpu_inputs(x, w, c10::nullopt, chunk, "xt_softmax");
  const int64_t D = x.size(1), C = w.size(1);
  at::Tensor G = at::zeros({D, C}, compute_options(x));
  // bfloat16 features: the softmax rounded to bfloat16 for the second GEMM (bf16x3: split into
  // two parts), and the chunk's product
  XtScratch zb;
  double lse_sum = 0;  // rows summed in order: independent of the thread count
  AT_DISPATCH_FLOATING_TYPES(G.scalar_type(), "xt_softmax_cpu", [&] {
    std::vector<scalar_t> lse;
    for_each_chunk(x, w, chunk, [&](int64_t, int64_t rows, const Chunk& xc, at::Tensor& z) {
      lse.resize(rows);
      softmax_rows(z.data_ptr<scalar_t>(), rows, C, static_cast<scalar_t>(inv_tau), nullptr,
                   lse.data(), /*log=*/false);
      for (int64_t i = 0; i < rows; ++i) lse_sum += lse[i];
      add_xt(G, xc, z, zb);
    });
  });
  flush_xt(G, zb);
  return {G, at::scalar_tensor(lse_sum, G.options())};
}

}  // namespace

TORCH_LIBRARY_IMPL(inmap_ext, CPU, m) { m.impl("xt_softmax", &xt_softmax_cpu); }

}  // namespace cpu
}  // namespace inmap
