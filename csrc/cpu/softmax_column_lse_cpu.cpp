// CPU kernel of inmap_ext::softmax_column_lse (schema and meaning: csrc/inmap.cpp).
#include <torch/library.h>

#include "chunked_cpu.h"

namespace inmap {
namespace cpu {
namespace {

constexpr int64_t kColBlock = 64;

at::Tensor softmax_column_lse_cpu(const at::Tensor& x, const at::Tensor& w,
                                  const c10::optional<at::Tensor>& bias, double inv_tau,
                                  int64_t chunk) {
  check_cpu_inputs(x, w, bias, chunk, "softmax_column_lse");
  const int64_t C = w.size(1);
  at::Tensor b = bias_as(bias, x);
  // Running column log-sum-exp over chunks, as (max, sum of exp(v - max)).
  at::Tensor run_max =
      at::full({C}, -std::numeric_limits<double>::infinity(), compute_options(x));
  at::Tensor run_sum = at::zeros({C}, compute_options(x));
  AT_DISPATCH_FLOATING_TYPES(run_sum.scalar_type(), "softmax_column_lse_cpu", [&] {
    const auto* bp = static_cast<const scalar_t*>(bias_ptr(b));
    scalar_t* M = run_max.data_ptr<scalar_t>();
    scalar_t* S = run_sum.data_ptr<scalar_t>();
    for_each_chunk(x, w, chunk, [&](int64_t, int64_t rows, const Chunk&, at::Tensor& z) {
      scalar_t* zp = z.data_ptr<scalar_t>();
      softmax_rows(zp, rows, C, static_cast<scalar_t>(inv_tau), bp, nullptr, /*log=*/true);
      // Columns in blocks: each column is reduced over rows in order by one thread.
      at::parallel_for(0, C, kColBlock, [&](int64_t begin, int64_t end) {
        scalar_t mloc[kColBlock], sloc[kColBlock];
        for (int64_t j0 = begin; j0 < end; j0 += kColBlock) {
          const int64_t width = std::min(kColBlock, end - j0);
          std::fill(mloc, mloc + width, -std::numeric_limits<scalar_t>::infinity());
          std::fill(sloc, sloc + width, scalar_t(0));
          for (int64_t i = 0; i < rows; ++i) {
            const scalar_t* r = zp + i * C + j0;
_Pragma("omp simd")  // (inside AT_DISPATCH: the operator form)
            for (int64_t j = 0; j < width; ++j) mloc[j] = std::max(mloc[j], r[j]);
          }
          // A column that is -inf in every row (a class with a -inf log-bias: known absent)
          // keeps max -inf and sum 0: shift by 0 there, never by -inf (-inf - -inf = NaN).
          for (int64_t j = 0; j < width; ++j) mloc[j] = finite_or_zero(mloc[j]);
          for (int64_t i = 0; i < rows; ++i) {
            const scalar_t* r = zp + i * C + j0;
_Pragma("omp simd")
            for (int64_t j = 0; j < width; ++j) sloc[j] += softmax_exp(r[j] - mloc[j]);
          }
          for (int64_t j = 0; j < width; ++j) {
            const int64_t c = j0 + j;
            if (sloc[j] == scalar_t(0)) continue;  // nothing from this chunk
            const scalar_t m = std::max(M[c], mloc[j]);
            S[c] = S[c] * std::exp(M[c] - m) + sloc[j] * std::exp(mloc[j] - m);
            M[c] = m;
          }
        }
      });
    });
  });
  return run_max + at::log(run_sum);
}

}  // namespace

TORCH_LIBRARY_IMPL(inmap_ext, CPU, m) { m.impl("softmax_column_lse", &softmax_column_lse_cpu); }

}  // namespace cpu
}  // namespace inmap
