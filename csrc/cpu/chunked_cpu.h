// Building blocks of the CPU kernels: the row-chunk loop (one ATen GEMM per chunk into a reused
// buffer) and the fused row-softmax epilogue. Rows are independent, so results do not depend on
// the number of threads: CPU results are bitwise reproducible.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "../checks.h"

namespace inmap {
namespace cpu {

inline void check_cpu_inputs(const at::Tensor& x, const at::Tensor& w,
                             const c10::optional<at::Tensor>& bias, int64_t chunk, const char* op) {
  check_pair(x, w, op);
  check_bias(bias, w, op);
  check_chunk(chunk, op);
  TORCH_CHECK(x.device().is_cpu(), op, ": expected CPU tensors, got ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, op,
              ": the CPU kernels take float32 or float64, got ", x.scalar_type(),
              " (fit_vision_proxy upcasts half precision on the CPU)");
}

// Calls f(start_row, rows, x_chunk, z) for consecutive row chunks, where z = x_chunk @ w
// (rows x C, contiguous) lives in one buffer reused by every chunk.
template <typename F>
void for_each_chunk(const at::Tensor& x, const at::Tensor& w, int64_t chunk, F&& f) {
  const int64_t N = x.size(0), C = w.size(1);
  if (N == 0) return;
  const int64_t cs = std::min(chunk, N);
  at::Tensor buf = at::empty({cs, C}, x.options());
  for (int64_t start = 0; start < N; start += cs) {
    const int64_t rows = std::min(cs, N - start);
    at::Tensor xc = x.narrow(0, start, rows);
    at::Tensor z = buf.narrow(0, 0, rows);
    at::mm_out(z, xc, w);
    f(start, rows, xc, z);
  }
}

// In place on a rows x C row-major block: z <- softmax(z * inv_tau + bias) per row, or its log
// (kLog) — the max-subtracted form, so no row overflows.
template <typename scalar_t, bool kLog>
void softmax_rows_(scalar_t* z, int64_t rows, int64_t C, scalar_t inv_tau, const scalar_t* bias) {
  at::parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      scalar_t* r = z + i * C;
      scalar_t mx = -std::numeric_limits<scalar_t>::infinity();
      for (int64_t j = 0; j < C; ++j) {
        const scalar_t v = r[j] * inv_tau + (bias ? bias[j] : scalar_t(0));
        r[j] = v;
        mx = std::max(mx, v);
      }
      scalar_t s = 0;
      if (kLog) {
        for (int64_t j = 0; j < C; ++j) s += std::exp(r[j] - mx);
        const scalar_t lse = mx + std::log(s);
        for (int64_t j = 0; j < C; ++j) r[j] -= lse;
      } else {
        for (int64_t j = 0; j < C; ++j) {
          r[j] = std::exp(r[j] - mx);
          s += r[j];
        }
        for (int64_t j = 0; j < C; ++j) r[j] /= s;
      }
    }
  });
}

inline const void* bias_ptr(const at::Tensor& b) { return b.defined() ? b.data_ptr() : nullptr; }

inline at::Tensor bias_as(const c10::optional<at::Tensor>& bias, const at::Tensor& x) {
  return bias.has_value() ? bias->to(x.scalar_type()).contiguous() : at::Tensor();
}

}  // namespace cpu
}  // namespace inmap
