// CPU kernel of inmap_ext::pseudo_label_reduce (schema and meaning: csrc/inmap.cpp).
#include <torch/library.h>

#include <vector>

#include "chunked_cpu.h"

namespace inmap {
namespace cpu {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> pseudo_label_reduce_cpu(
    const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
    double inv_tau, double alpha, int64_t chunk) {
  check_cpu_inputs(x, w, bias, chunk, "pseudo_label_reduce");
  const int64_t D = x.size(1), C = w.size(1);
  at::Tensor b = bias_as(bias, x);
  at::Tensor B = at::zeros({D, C}, compute_options(x));
  at::Tensor mass = at::zeros({C}, compute_options(x));
  at::Tensor counts = at::zeros({C}, x.options().dtype(at::kLong));
  // bfloat16 features: the pseudo labels rounded to bfloat16 for X^T P (bf16x3: split into
  // two parts), and the chunk's product
  XtScratch zb;
  int64_t n_confident = 0;
  AT_DISPATCH_FLOATING_TYPES(B.scalar_type(), "pseudo_label_reduce_cpu", [&] {
    const auto* bp = static_cast<const scalar_t*>(bias_ptr(b));
    const scalar_t thr = static_cast<scalar_t>(alpha);
    int64_t* cnt = counts.data_ptr<int64_t>();
    std::vector<int64_t> arg;
    std::vector<char> confident;
    for_each_chunk(x, w, chunk, [&](int64_t, int64_t rows, const Chunk& xc, at::Tensor& z) {
      scalar_t* zp = z.data_ptr<scalar_t>();
      softmax_rows(zp, rows, C, static_cast<scalar_t>(inv_tau), bp, nullptr, /*log=*/false);
      arg.assign(rows, 0);
      confident.assign(rows, 0);
      at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          scalar_t* r = zp + i * C;
          int64_t best = 0;  // first maximal entry, as torch.argmax
          for (int64_t j = 1; j < C; ++j)
            if (r[j] > r[best]) best = j;
          arg[i] = best;
          if (r[best] > thr) {  // confident row: replaced by its one-hot
            confident[i] = 1;
            std::fill(r, r + C, scalar_t(0));
            r[best] = scalar_t(1);
          }
        }
      });
      for (int64_t i = 0; i < rows; ++i) {
        cnt[arg[i]] += 1;
        n_confident += confident[i];
      }
      mass.add_(z.sum(0));
      add_xt(B, xc, z, zb);
    });
  });
  flush_xt(B, zb);
  return {B, mass, counts, at::scalar_tensor(n_confident, counts.options())};
}

}  // namespace

TORCH_LIBRARY_IMPL(inmap_ext, CPU, m) { m.impl("pseudo_label_reduce", &pseudo_label_reduce_cpu); }

}  // namespace cpu
}  // namespace inmap
