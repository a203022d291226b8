// inmap_ext::topk_scores for every device (schema and meaning: csrc/inmap.cpp): one ATen GEMM
// and one ATen top-k per row chunk, written into the N x k outputs. Registered as
// CompositeExplicitAutograd because ATen already has the fast per-device pieces.
#include <torch/library.h>

#include <algorithm>

#include "checks.h"

namespace inmap {
namespace {

std::tuple<at::Tensor, at::Tensor> topk_scores(const at::Tensor& x, const at::Tensor& w, int64_t k,
                                               int64_t chunk) {
  check_pair(x, w, "topk_scores");
  check_chunk(chunk, "topk_scores");
  const int64_t N = x.size(0), C = w.size(1);
  TORCH_CHECK(k >= 1 && k <= C, "topk_scores: k must be in [1, C=", C, "], got ", k);
  const auto acc = acc_type(x.scalar_type());
  at::Tensor values = at::empty({N, k}, x.options().dtype(acc));
  at::Tensor indices = at::empty({N, k}, x.options().dtype(at::kLong));
  const int64_t cs = std::max<int64_t>(1, std::min(chunk, N));
  for (int64_t start = 0; start < N; start += cs) {
    const int64_t rows = std::min(cs, N - start);
    // Scores in the accumulation dtype: 16-bit inputs are not ranked on 16-bit logits.
    at::Tensor z = at::mm(x.narrow(0, start, rows).to(acc), w.to(acc));
    auto top = at::topk(z, k, /*dim=*/1, /*largest=*/true, /*sorted=*/true);
    values.narrow(0, start, rows).copy_(std::get<0>(top));
    indices.narrow(0, start, rows).copy_(std::get<1>(top));
  }
  return {values, indices};
}

}  // namespace

TORCH_LIBRARY_IMPL(inmap_ext, CompositeExplicitAutograd, m) {
  m.impl("topk_scores", &topk_scores);
}

}  // namespace inmap
