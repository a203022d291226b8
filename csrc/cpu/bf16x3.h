// float32 GEMMs of the CPU kernels as three bfloat16 GEMMs (precision="bf16x3"): each float32
// operand a is split into two bfloat16 parts, a = hi + lo + d with hi = bf16(a),
// lo = bf16(a - hi) and |d| <= 2^-17 |a|, and a b = hi_a hi_b + hi_a lo_b + lo_a hi_b (the
// lo lo term, ~2^-16 of a product, is below the split's own error), each a bfloat16 GEMM with
// float32 accumulation (bf16_gemm.h). Measured on CLIP features (ImageNet ViT-B/32, D = 512,
// C = 1000): the logits' error is 5e-7 rms, 3.6e-6 at most (float32's own: 5e-8, 3e-7; one
// bfloat16 rounding: 4e-4, 2e-3), and where the CPU has AMX the three GEMMs take 60% of one
// float32 GEMM. Where the CPU has no AMX (AVX512-BF16 only, or no bfloat16 unit) three are slower
// than one float32 GEMM: fit_vision_proxy uses the split only where asked (precision="bf16x3";
// "auto" stays float32: the split moves a fit about twice as much as float64 does,
// bench/results/precision_2026-12-06.md).
//
// The switch is per calling thread (set by fit_vision_proxy around a fit, as torch's TF32 switch
// is around CUDA GEMMs): op inmap_ext::cpu_bf16x3(bool) sets it and returns what it was,
// inmap_ext::cpu_bf16x3_enabled() reads it.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>

#include "bf16_gemm.h"

namespace inmap {
namespace cpu {

inline bool& bf16x3_flag() {
  static thread_local bool on = false;
  return on;
}

// Sets the calling thread's switch; returns the previous value. Turning it on where this torch
// build has no bfloat16 GEMM is refused (fit_vision_proxy checks before any work).
inline bool set_bf16x3(bool on) {
  TORCH_CHECK(!on || bf16_gemm_available(), "inmap_ext: precision='bf16x3' needs a bfloat16 GEMM "
              "with float32 output on the CPU (MKL's cblas_gemm_bf16bf16f32), which this torch "
              "build lacks; use precision='fp32'");
  const bool before = bf16x3_flag();
  bf16x3_flag() = on;
  return before;
}

inline bool bf16x3_enabled() { return bf16x3_flag(); }

// Whether the float32 GEMMs of x run as three bfloat16 GEMMs in this thread.
inline bool bf16x3_active(const at::Tensor& x) {
  return bf16x3_flag() && x.scalar_type() == at::kFloat && bf16_gemm_available();
}

// Rows per chunk of the split GEMMs: a chunk's logits (rows x C float32) of about 4 MiB, 256 to
// 1024 rows. Three bfloat16 GEMMs add into the same block: from cache they run 1.5-1.9x faster
// than one float32 GEMM, from memory (4096 rows at C = 1000) 1.1-1.4x (measured at D = 512 to
// 1024, C = 100 to 5000, one and two threads; xt_softmax).
inline int64_t bf16x3_rows(int64_t C) {
  const int64_t rows = (int64_t(1) << 20) / std::max<int64_t>(C, 1);
  return std::min<int64_t>(1024, std::max<int64_t>(256, rows));
}

// hi, lo (rows x cols, row-major, contiguous) of a float32 block src (rows x cols, leading
// dimension ld): hi = bf16(src) and lo = bf16(src - hi), rounded to nearest (ties to even).
// Rows are independent: bitwise the same for any thread count (bf16x3_cpu.cpp: built per ISA).
void split_bf16(const float* src, int64_t rows, int64_t cols, int64_t ld, at::BFloat16* hi,
                at::BFloat16* lo);

// Whether a 2-D tensor's rows are contiguous runs (what the split reads; the leading dimension
// is free). A single column has any stride: only its first entry per row is read.
inline bool unit_row_stride(const at::Tensor& t) { return t.size(1) <= 1 || t.stride(1) == 1; }

// The two parts of a float32 matrix, kept for the GEMMs of one op call (or of one chunk).
struct Split {
  at::Tensor hi, lo;  // bfloat16, row-major, the source's shape

  // Splits src (float32, rows x cols, rows contiguous) into buffers reused across calls: they
  // grow to the largest source seen.
  void of(const at::Tensor& src) {
    const int64_t rows = src.size(0), cols = src.size(1);
    TORCH_INTERNAL_ASSERT(src.scalar_type() == at::kFloat && unit_row_stride(src));
    if (!hi.defined() || hi.numel() < rows * cols) {
      hi = at::empty({rows * cols}, src.options().dtype(at::kBFloat16));
      lo = at::empty({rows * cols}, src.options().dtype(at::kBFloat16));
    }
    split_bf16(src.data_ptr<float>(), rows, cols, src.stride(0), hi.data_ptr<at::BFloat16>(),
               lo.data_ptr<at::BFloat16>());
    rows_ = rows;
    cols_ = cols;
  }
  const at::BFloat16* h() const { return hi.data_ptr<at::BFloat16>(); }
  const at::BFloat16* l() const { return lo.data_ptr<at::BFloat16>(); }
  int64_t rows() const { return rows_; }
  int64_t cols() const { return cols_; }

 private:
  int64_t rows_ = 0, cols_ = 0;
};

// z (m x n, float32, contiguous) = a b from the parts of a (m x k) and b (k x n): the two small
// products first, then the large one added, so that the small ones are not rounded against it.
inline void gemm_bf16x3(const Split& a, const Split& b, float* z) {
  const int64_t m = a.rows(), k = a.cols(), n = b.cols();
  bf16_gemm(false, m, n, k, a.h(), k, b.l(), n, 0.0f, z, n);
  bf16_gemm(false, m, n, k, a.l(), k, b.h(), n, 1.0f, z, n);
  bf16_gemm(false, m, n, k, a.h(), k, b.h(), n, 1.0f, z, n);
}

// out (k x n, float32, contiguous) = a^T b (+ out, beta 1) from the parts of a (m x k) and b
// (m x n), the small products first.
inline void gemm_bf16x3_t(const Split& a, const Split& b, float* out, float beta) {
  const int64_t m = a.rows(), k = a.cols(), n = b.cols();
  bf16_gemm(true, k, n, m, a.h(), k, b.l(), n, beta, out, n);
  bf16_gemm(true, k, n, m, a.l(), k, b.h(), n, 1.0f, out, n);
  bf16_gemm(true, k, n, m, a.h(), k, b.h(), n, 1.0f, out, n);
}

}  // namespace cpu
}  // namespace inmap
