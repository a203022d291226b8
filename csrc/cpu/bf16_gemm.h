// bfloat16 GEMMs with float32 accumulation and output for the CPU kernels (precision="bf16" on
// the CPU): MKL's cblas_gemm_bf16bf16f32, which x86-64 builds of torch carry in libtorch_cpu
// (MKL linked in) and which runs on AMX or AVX512-BF16 units where the CPU has them. The symbol
// is declared weak: where a torch build lacks it (aarch64, a build without MKL) its address is
// null, bf16_gemm_available() says so, and fit_vision_proxy refuses precision="bf16" on the CPU
// before any work (the CPU kernels then never see bfloat16 features).
#pragma once
#include <ATen/ATen.h>

#include <cstdint>

extern "C" {
void cblas_gemm_bf16bf16f32(int layout, int transa, int transb, int m, int n, int k, float alpha,
                            const uint16_t* a, int lda, const uint16_t* b, int ldb, float beta,
                            float* c, int ldc) __attribute__((weak));
}

namespace inmap {
namespace cpu {

inline bool bf16_gemm_available() { return cblas_gemm_bf16bf16f32 != nullptr; }

// c (m x n, row-major, leading dimension ldc, float32) = alpha op(a) op(b) + beta c, with a and
// b bfloat16 row-major (op: transposed where asked). MKL's int dimensions: checked.
inline void bf16_gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k,
                      const at::BFloat16* a, int64_t lda, const at::BFloat16* b, int64_t ldb,
                      float beta, float* c, int64_t ldc) {
  TORCH_CHECK(bf16_gemm_available(), "inmap_ext: this torch build has no bfloat16 GEMM with "
              "float32 output on the CPU (MKL's cblas_gemm_bf16bf16f32); use precision='fp32'");
  constexpr int64_t kMax = 2147483647;
  TORCH_CHECK(m <= kMax && n <= kMax && k <= kMax && lda <= kMax && ldb <= kMax && ldc <= kMax,
              "inmap_ext: a bfloat16 GEMM dimension exceeds 2^31 - 1 (use a smaller chunk_size)");
  if (m == 0 || n == 0) return;
  constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;
  cblas_gemm_bf16bf16f32(kRowMajor, trans_a ? kTrans : kNoTrans, trans_b ? kTrans : kNoTrans,
                         static_cast<int>(m), static_cast<int>(n), static_cast<int>(k), 1.0f,
                         reinterpret_cast<const uint16_t*>(a), static_cast<int>(lda),
                         reinterpret_cast<const uint16_t*>(b), static_cast<int>(ldb), beta, c,
                         static_cast<int>(ldc));
}

}  // namespace cpu
}  // namespace inmap
