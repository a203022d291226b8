// Building blocks of the CPU kernels: the row-chunk loop (one ATen GEMM per chunk into a reused
// buffer) and the fused row-softmax epilogue. Rows are independent and our own loops sum in a
// fixed order; the GEMMs are MKL's, whose float32 rounding may differ with the number of threads
// (a review measured 1 and 2 threads apart in the last bits at 5000 x 512 x 1000): on one CPU and
// thread count CPU results are bitwise reproducible.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "../checks.h"
#include "bf16_gemm.h"
#include "bf16x3.h"

namespace inmap {
namespace cpu {

inline void check_cpu_inputs(const at::Tensor& x, const at::Tensor& w,
                             const c10::optional<at::Tensor>& bias, int64_t chunk, const char* op) {
  check_pair(x, w, op);
  check_bias(bias, w, op);
  check_chunk(chunk, op);
  TORCH_CHECK(x.device().is_cpu(), op, ": expected CPU tensors, got ", x.device());
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble ||
                  (bf16 && bf16_gemm_available()),
              op, ": the CPU kernels take float32 or float64 (or bfloat16 where torch has a "
              "bfloat16 GEMM with float32 output), got ", x.scalar_type(),
              " (fit_vision_proxy upcasts half precision on the CPU)");
}

// The dtype a CPU kernel computes in: the features' (float32, float64), float32 for bfloat16
// features (precision="bf16": bfloat16 GEMMs with float32 accumulation, everything else float32).
inline at::TensorOptions compute_options(const at::Tensor& x) {
  return x.options().dtype(acc_type(x.scalar_type()));
}

// A chunk of rows of x as the GEMMs take it: x itself (float32, float64 or bfloat16 rows) and,
// where float32 GEMMs run as three bfloat16 GEMMs (bf16x3.h), its two bfloat16 parts.
struct Chunk {
  at::Tensor x;
  const Split* parts = nullptr;
};

// Calls f(start_row, rows, chunk, z) for consecutive row chunks, where z = x_chunk @ w
// (rows x C, contiguous, in the compute dtype) lives in one buffer reused by every chunk.
// bfloat16 x: z from bfloat16 GEMMs with float32 accumulation and output. A float32 w (what the
// fit passes: the proxy it descends on) is split into two bfloat16 parts, w = hi + lo up to
// ~2^-17 of each entry, and z = x hi + x lo: a w rounded to bfloat16 at every pass hides the
// descent's small steps (measured on RN50 features: predictions 74-91% as the float32 fit's,
// and the descent stopping early; with the split 96-100%, as with the features rounded alone).
// float32 x under the bf16x3 switch (bf16x3.h): x's chunk and w both split, z from three
// bfloat16 GEMMs, in chunks of at most ``bf16x3_rows(C)`` rows (fewer than ``chunk``: the rows'
// GEMMs then run from cache).
template <typename F>
void for_each_chunk(const at::Tensor& x_in, const at::Tensor& w_in, int64_t chunk, F&& f) {
  const int64_t N = x_in.size(0), C = w_in.size(1);
  if (N == 0) return;
  const bool bf16 = x_in.scalar_type() == at::kBFloat16;
  const bool x3 = bf16x3_active(x_in);
  // row-major x for the bfloat16 GEMMs (a copy per call where it is not: the fit passes
  // contiguous features); bf16x3 splits each chunk into row-major parts instead
  const at::Tensor x = bf16 ? x_in.contiguous() : x_in;
  // w for the bfloat16 GEMMs: its two parts (bf16x3, or a float32 w with bfloat16 features), or
  // a bfloat16 w as it is (one part)
  const bool split_w = x3 || (bf16 && w_in.scalar_type() != at::kBFloat16);
  const at::Tensor w = bf16 && !split_w ? w_in.contiguous() : w_in;
  Split w_parts, x_parts;
  if (split_w) w_parts.of(w_in.to(at::kFloat).contiguous());
  const int64_t cs = std::min(x3 ? std::min(chunk, bf16x3_rows(C)) : chunk, N);
  at::Tensor buf = at::empty({cs, C}, compute_options(x));
  for (int64_t start = 0; start < N; start += cs) {
    const int64_t rows = std::min(cs, N - start);
    Chunk c{x.narrow(0, start, rows)};
    at::Tensor z = buf.narrow(0, 0, rows);
    if (x3) {
      // rows with a unit stride within: a strided x is copied a chunk at a time
      x_parts.of(unit_row_stride(c.x) ? c.x : c.x.contiguous());
      c.parts = &x_parts;
      gemm_bf16x3(x_parts, w_parts, z.data_ptr<float>());
    } else if (bf16) {
      const at::BFloat16* xp = c.x.data_ptr<at::BFloat16>();
      bf16_gemm(false, rows, C, x.size(1), xp, x.size(1),
                split_w ? w_parts.h() : w.data_ptr<at::BFloat16>(), C, 0.0f, z.data_ptr<float>(),
                C);
      if (split_w)
        bf16_gemm(false, rows, C, x.size(1), xp, x.size(1), w_parts.l(), C, 1.0f,
                  z.data_ptr<float>(), C);
    } else {
      at::mm_out(z, c.x, w);
    }
    f(start, rows, c, z);
  }
}

// What add_xt reuses across chunks: the chunk's probabilities in bfloat16 (one part, or two for
// bf16x3) and a D x C float32 block holding the products of the rows since the last flush.
struct XtScratch {
  Split z;
  at::Tensor part;
  int64_t rows = 0;   // rows in ``part`` (0: it holds nothing yet)
};

// Rows whose X^T P a GEMM adds into one block before the block is added to the sum. MKL's GEMM
// adding into a running sum (beta 1) rounds its partial sums against the whole sum so far, and
// the error grew with N: found by a review for the bfloat16 GEMMs (3.7e-4 of X^T P at N = 1M
// with bf16x3 on an AMX CPU, against 1.7e-5 for the split itself), and on an AMD EPYC (AVX-512,
// 2026-12-06) for float32 too: on N identical rows (every rounding of the sum the same way)
// 2.3e-3 at N = 400k against ~7e-5 for one block of 8192 rows (the block: one more D x C buffer
// per op call). Adding every chunk's block
// instead cost up to 20% of a pass where D x C is large (C = 5000, bf16x3's 256-1024-row chunks).
// A fit of at most 8192 rows (the real files) gets the bits of the plain running sum: the block
// starts at zero and is added to a zero sum.
constexpr int64_t kXtFlushRows = 8192;

// acc += s.part, and s.part emptied (after the last chunk, and every kXtFlushRows rows).
inline void flush_xt(at::Tensor& acc, XtScratch& s) {
  if (s.rows == 0) return;
  acc.add_(s.part);
  s.rows = 0;
}

// acc += xc^T @ z (D x C += (rows x D)^T rows x C). bfloat16 xc: z (probabilities) rounded to
// bfloat16 in ``s.z.hi`` and the bfloat16 GEMM accumulates in float32, as the 16-bit
// tensor-core GEMMs of precision="bf16" on CUDA (splitting z as w is split changed no more
// predictions on the real files: not done). A split chunk (bf16x3): z split into ``s.z`` too,
// and three bfloat16 GEMMs. Both bfloat16 forms add into ``s.part``, which reaches acc every
// kXtFlushRows rows and at ``flush_xt`` (the caller's, after the last chunk).
inline void add_xt(at::Tensor& acc, const Chunk& c, const at::Tensor& z, XtScratch& s) {
  const at::Tensor& xc = c.x;
  const int64_t rows = z.size(0), C = z.size(1), D = acc.size(0);
  if (!s.part.defined()) s.part = at::empty({D, C}, acc.options());
  const float beta = s.rows == 0 ? 0.0f : 1.0f;   // the bfloat16 GEMMs: a new block or into it
  if (c.parts == nullptr && xc.scalar_type() != at::kBFloat16) {
    // float32 / float64: the ATen GEMM into the block (from zero, as the running sum it replaces
    // started: the same bits up to the first flush)
    if (s.rows == 0) s.part.zero_();
    s.part.addmm_(xc.t(), z);
  } else if (c.parts != nullptr) {
    s.z.of(z);
    gemm_bf16x3_t(*c.parts, s.z, s.part.data_ptr<float>(), beta);
  } else {
    if (!s.z.hi.defined() || s.z.hi.numel() < rows * C)
      s.z.hi = at::empty({rows * C}, xc.options());
    at::Tensor zr = s.z.hi.narrow(0, 0, rows * C).view({rows, C});
    zr.copy_(z);
    bf16_gemm(true, D, C, rows, xc.data_ptr<at::BFloat16>(), D,   // xc: rows of a row-major x
              zr.data_ptr<at::BFloat16>(), C, beta, s.part.data_ptr<float>(), C);
  }
  s.rows += rows;
  if (s.rows >= kXtFlushRows) flush_xt(acc, s);
}

// The shift of a log-sum-exp whose running max is m: m itself, or 0 while m is -inf (no term
// yet, or only -inf terms), so that exp(v - shift) is exp(-inf) = 0 and never exp(NaN).
template <typename scalar_t>
inline scalar_t finite_or_zero(scalar_t m) {
  return m == -std::numeric_limits<scalar_t>::infinity() ? scalar_t(0) : m;
}

// exp(v) for v <= 0 in the softmax epilogues. float64 keeps std::exp (the faithful path, tested to
// 1e-8 against a dense float64 implementation). float32 uses a branch-free version the compiler
// vectorises (SSE, 4 lanes, at the baseline x86-64 target): v = n ln2 + r with
// |r| <= ln2 / 2 (Cody-Waite, two-part ln2), a degree-6 Taylor polynomial (relative error
// < 2e-7, about 2 ulp), and 2^n built in the exponent bits. v is clamped to >= -87, so terms
// below -87 (and v = -inf: a class with a -inf log-bias) come out as exactly 0.
inline double softmax_exp(double v) { return std::exp(v); }
inline float softmax_exp(float v) {
  const bool underflow = !(v >= -87.0f);  // also NaN-free for v = -inf
  v = underflow ? -87.0f : v;
  const float t = v * 1.44269504088896341f;
  const float n = (t + 12582912.0f) - 12582912.0f;  // round to nearest (1.5 * 2^23 trick)
  const float r = (v - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
  const float p =
      1.0f + r * (1.0f + r * (0.5f + r * (1.0f / 6 + r * (1.0f / 24 + r * (1.0f / 120 +
                                                                    r * (1.0f / 720))))));
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return underflow ? 0.0f : p * scale;
}

// In place on a rows x C row-major block: z <- softmax(z * inv_tau + bias) per row, or its log
// (log = true) — the max-subtracted form, so no row overflows. row_lse (optional, log = false):
// each row's log-sum-exp, log sum_j exp(z_j * inv_tau + bias_j). Rows are independent, so the
// result does not depend on the number of threads (softmax_rows_cpu.cpp: float32 built per ISA,
// clones.h).
void softmax_rows(float* z, int64_t rows, int64_t C, float inv_tau, const float* bias,
                  float* row_lse, bool log);
void softmax_rows(double* z, int64_t rows, int64_t C, double inv_tau, const double* bias,
                  double* row_lse, bool log);

inline const void* bias_ptr(const at::Tensor& b) { return b.defined() ? b.data_ptr() : nullptr; }

inline at::Tensor bias_as(const c10::optional<at::Tensor>& bias, const at::Tensor& x) {
  return bias.has_value() ? bias->to(acc_type(x.scalar_type())).contiguous() : at::Tensor();
}

}  // namespace cpu
}  // namespace inmap
