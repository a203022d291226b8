// The row-softmax epilogue of the CPU kernels (chunked_cpu.h): every pass over the features
// applies it to each row of a chunk's logits, so after the two GEMMs it is most of a pass (at
// N x C = 3000 x 1000, 13 of 52 ms per pass with the baseline SSE build, one thread).
//
// Per row, two sweeps in L1: (1) scale (and bias) every entry while keeping the row's max,
// (2) exp(v - max) with its sum, and then for the softmax a third: multiply by 1 / sum (for the
// log-softmax: subtract the log-sum-exp). The arithmetic per entry is the same in every build;
// the float32 row runs in the widest build the CPU has (clones.h), whose vector width sets the
// order of the row's sum.
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <limits>

#include "chunked_cpu.h"
#include "clones.h"

namespace inmap {
namespace cpu {
namespace {

template <typename T>
static INMAP_ALWAYS_INLINE T softmax_row(T* r, int64_t C, T inv_tau, const T* bias, bool log) {
  T mx = -std::numeric_limits<T>::infinity();
  if (bias) {
#pragma omp simd reduction(max : mx)
    for (int64_t j = 0; j < C; ++j) {
      const T v = r[j] * inv_tau + bias[j];
      r[j] = v;
      mx = v > mx ? v : mx;
    }
  } else {
#pragma omp simd reduction(max : mx)
    for (int64_t j = 0; j < C; ++j) {
      const T v = r[j] * inv_tau;
      r[j] = v;
      mx = v > mx ? v : mx;
    }
  }
  T s = 0;
  if (log) {
#pragma omp simd reduction(+ : s)
    for (int64_t j = 0; j < C; ++j) s += softmax_exp(r[j] - mx);
    // (v - max) - log s, not v - (max + log s): at logits of 1e6 and more (tiny tau) the sum
    // max + log s rounds log s away in the logits' ulp, and the rows stop summing to 1
    const T log_s = std::log(s);
#pragma omp simd
    for (int64_t j = 0; j < C; ++j) r[j] = (r[j] - mx) - log_s;
    return mx + log_s;
  }
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < C; ++j) {
    const T e = softmax_exp(r[j] - mx);
    r[j] = e;
    s += e;
  }
  const T inv_s = T(1) / s;
#pragma omp simd
  for (int64_t j = 0; j < C; ++j) r[j] *= inv_s;
  return mx + std::log(s);
}

INMAP_CLONES float softmax_row_f32(float* r, int64_t C, float inv_tau, const float* bias,
                                   bool log) {
  return softmax_row(r, C, inv_tau, bias, log);
}

// float64 is the faithful path (std::exp, tested to 1e-8 against a dense implementation): one
// build.
double softmax_row_f64(double* r, int64_t C, double inv_tau, const double* bias, bool log) {
  return softmax_row(r, C, inv_tau, bias, log);
}

template <typename T, typename Row>
void rows_(T* z, int64_t rows, int64_t C, T inv_tau, const T* bias, T* row_lse, bool log,
           Row row) {
  at::parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const T lse = row(z + i * C, C, inv_tau, bias, log);
      if (row_lse) row_lse[i] = lse;
    }
  });
}

}  // namespace

void softmax_rows(float* z, int64_t rows, int64_t C, float inv_tau, const float* bias,
                  float* row_lse, bool log) {
  rows_(z, rows, C, inv_tau, bias, row_lse, log, softmax_row_f32);
}

void softmax_rows(double* z, int64_t rows, int64_t C, double inv_tau, const double* bias,
                  double* row_lse, bool log) {
  rows_(z, rows, C, inv_tau, bias, row_lse, log, softmax_row_f64);
}

}  // namespace cpu
}  // namespace inmap
