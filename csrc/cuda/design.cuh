// Which CUDA design runs, and the one place where the softmax-producing ops branch on it.
//   chunked (default): design (b), chunked_cuda.cuh: cuBLAS logits in fp32 -> fused row kernel.
//   fused:             design (a), fused_tiles.cuh: tensor-core tiles recomputed, no logits
//                      stored; applies to fp16, bf16 and TF32-allowed fp32 on sm_80+, other
//                      inputs stay on chunked.
// Chosen per call from the environment variable INMAP_CUDA_DESIGN ("chunked" or "fused"), so the
// benchmark can compare both in one process. The default follows bench/NOTES.md's measurements.
#pragma once
#include <cstdlib>
#include <string>

#include "../design_choice.h"
#include "chunked_cuda.cuh"
#include "fused_tiles.cuh"

namespace inmap {
namespace cuda {

inline bool use_fused(const at::Tensor& x) {
  const char* env = std::getenv("INMAP_CUDA_DESIGN");
  const std::string design = env && *env ? env : "chunked";
  TORCH_CHECK(design == "chunked" || design == "fused",
              "INMAP_CUDA_DESIGN must be 'chunked' or 'fused', got '", design, "'");
  if (design != "fused") return false;
  const auto t = x.scalar_type();
  const bool dtype_ok = t == at::kHalf || t == at::kBFloat16 ||
                        (t == at::kFloat && at::globalContext().allowTF32CuBLAS());
  if (!dtype_ok) return false;
  const int major = at::cuda::getDeviceProperties(x.get_device())->major;
  int ptx = 0;
  fused::dispatch(t, [&](auto tag) { ptx = fused::loaded_ptx_version<decltype(tag)>(); });
  return fused_design_allowed(true, dtype_ok, major, ptx);
}

// Per row chunk of x: P = row-softmax(x @ w * inv_tau + bias) in x's dtype (with kThreshold,
// rows whose largest probability is > alpha become the one-hot of their argmax, and arg /
// confident are filled) and each row's log-sum-exp lse (acc dtype), then
// f(xc, p, arg, confident, lse) consumes them. xc holds the chunk's rows
// (possibly zero-padded along D: use its first D columns). bias: acc dtype, or undefined.
template <bool kThreshold, typename F>
void for_each_softmax_chunk(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias,
                            double inv_tau, double alpha, int64_t chunk, F&& f) {
  const int64_t C = w.size(1);
  const int64_t cs = chunk_rows(chunk, x.size(0), C);
  at::Tensor pbuf = at::empty({cs, C}, x.options());
  at::Tensor argbuf = at::empty({kThreshold ? cs : 0}, x.options().dtype(at::kLong));
  at::Tensor confbuf = at::empty({kThreshold ? cs : 0}, x.options().dtype(at::kByte));
  at::Tensor lse_buf = at::empty({cs}, x.options().dtype(acc_type(x.scalar_type())));
  struct Outputs {
    at::Tensor p, arg, conf, lse;
  };
  auto outputs = [&](int64_t rows) {  // this chunk's views of the reused buffers
    const int64_t flags = kThreshold ? rows : 0;
    return Outputs{pbuf.narrow(0, 0, rows), argbuf.narrow(0, 0, flags),
                   confbuf.narrow(0, 0, flags), lse_buf.narrow(0, 0, rows)};
  };
  const auto stream = at::cuda::getCurrentCUDAStream();
  if (use_fused(x)) {  // fp16 / bf16 / tf32: the acc dtype, and so lse_buf, is float
    const float* bp = bias.defined() ? bias.data_ptr<float>() : nullptr;
    fused::dispatch(x.scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      fused::for_each_chunk<T>(x, w, chunk, [&](int64_t, int64_t rows, const at::Tensor& xc,
                                                const fused::Operands<T>& op) {
        Outputs o = outputs(rows);
        at::Tensor lse = o.lse;  // a handle on the same buffer (row_stats fills it)
        int64_t* ap = kThreshold ? static_cast<int64_t*>(o.arg.data_ptr()) : nullptr;
        uint8_t* cp = kThreshold ? static_cast<uint8_t*>(o.conf.data_ptr()) : nullptr;
        fused::row_stats<T>(op, static_cast<float>(inv_tau), bp, static_cast<float>(alpha), lse,
                            ap, cp);
        fused::probs<T, kThreshold>(op, static_cast<float>(inv_tau), bp, lse, ap, cp, o.p);
        f(xc, o.p, o.arg, o.conf, o.lse);
      });
    });
    return;
  }
  constexpr RowMode kMode = kThreshold ? RowMode::kProbsThreshold : RowMode::kProbs;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "softmax_chunks_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* bp = bias.defined() ? bias.data_ptr<acc_t>() : nullptr;
    for_each_chunk(x, w, chunk, [&](int64_t, int64_t rows, const at::Tensor& xc, at::Tensor& z) {
      Outputs o = outputs(rows);
      row_softmax_kernel<acc_t, scalar_t, kMode><<<rows, kThreads, 0, stream>>>(
          z.data_ptr<acc_t>(), C, static_cast<acc_t>(inv_tau), bp,
          o.p.template data_ptr<scalar_t>(), o.lse.template data_ptr<acc_t>(),
          static_cast<acc_t>(alpha),
          kThreshold ? o.arg.template data_ptr<int64_t>() : nullptr,
          kThreshold ? o.conf.template data_ptr<uint8_t>() : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      f(xc, o.p, o.arg, o.conf, o.lse);
    });
  });
}

}  // namespace cuda
}  // namespace inmap
