// bfloat16 GEMMs with float32 accumulation and output for the CPU kernels (precision="bf16" on
// the CPU): MKL's cblas_gemm_bf16bf16f32, which x86-64 builds of torch carry in libtorch_cpu
// (MKL linked in) and which runs on AMX or AVX512-BF16 units where the CPU has them. The symbol
// is declared weak: where a torch build lacks it (aarch64, a build without MKL) its address is
// null, bf16_gemm_available() says so, and fit_vision_proxy refuses precision="bf16" on the CPU
// before any work (the CPU kernels then never see bfloat16 features).
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>

extern "C" {
void cblas_gemm_bf16bf16f32(int layout, int transa, int transb, int m, int n, int k, float alpha,
                            const uint16_t* a, int lda, const uint16_t* b, int ldb, float beta,
                            float* c, int ldc) __attribute__((weak));
}

namespace inmap {
namespace cpu {

inline bool bf16_gemm_available() { return cblas_gemm_bf16bf16f32 != nullptr; }

// c (m x n, row-major, leading dimension ldc, float32) = op(a) b + beta c (beta 0 or 1), with a
// and b bfloat16 row-major: op(a) = a (m x k, lda) or, trans_a, the transpose of a stored k x m
// (lda). MKL's LP64 interface takes int dimensions: the rows of a (and c) or, transposed, the
// shared dimension k are taken in blocks of fewer than 2^31 elements, accumulating in c. k = 0:
// c = beta c, without calling MKL (which refuses a zero leading dimension).
inline void bf16_gemm(bool trans_a, int64_t m, int64_t n, int64_t k, const at::BFloat16* a,
                      int64_t lda, const at::BFloat16* b, int64_t ldb, float beta, float* c,
                      int64_t ldc) {
  TORCH_CHECK(bf16_gemm_available(), "inmap_ext: this torch build has no bfloat16 GEMM with "
              "float32 output on the CPU (MKL's cblas_gemm_bf16bf16f32); use precision='fp32'");
  TORCH_CHECK(beta == 0.0f || beta == 1.0f, "inmap_ext: bf16_gemm takes beta 0 or 1");
  if (m == 0 || n == 0) return;
  if (k == 0) {
    if (beta == 0.0f)
      for (int64_t i = 0; i < m; ++i) std::fill(c + i * ldc, c + i * ldc + n, 0.0f);
    return;
  }
  constexpr int64_t kMax = 2147483647;
  TORCH_CHECK(n <= kMax && ldb <= kMax && ldc <= kMax && lda <= kMax && (trans_a ? m : k) <= kMax,
              "inmap_ext: a bfloat16 GEMM dimension exceeds 2^31 - 1");
  constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;
  auto call = [&](int64_t mm, int64_t kk, const at::BFloat16* aa, const at::BFloat16* bb,
                  float be, float* cc) {
    cblas_gemm_bf16bf16f32(kRowMajor, trans_a ? kTrans : kNoTrans, kNoTrans,
                           static_cast<int>(mm), static_cast<int>(n), static_cast<int>(kk), 1.0f,
                           reinterpret_cast<const uint16_t*>(aa), static_cast<int>(lda),
                           reinterpret_cast<const uint16_t*>(bb), static_cast<int>(ldb), be, cc,
                           static_cast<int>(ldc));
  };
  if (!trans_a) {  // blocks of rows of a and c
    const int64_t step = std::max<int64_t>(1, kMax / std::max<int64_t>({lda, ldc, 1}));
    for (int64_t i = 0; i < m; i += step)
      call(std::min(step, m - i), k, a + i * lda, b, beta, c + i * ldc);
  } else {  // blocks of the shared dimension (rows of the stored a and of b), accumulated
    const int64_t step = std::max<int64_t>(1, kMax / std::max<int64_t>({lda, ldb, 1}));
    for (int64_t p = 0; p < k; p += step)
      call(m, std::min(step, k - p), a + p * lda, b + p * ldb, p == 0 ? beta : 1.0f, c);
  }
}

}  // namespace cpu
}  // namespace inmap
