// CPU kernel of inmap_ext::stored_column_sums (schema and meaning: csrc/inmap.cpp).
//
// One read of a stored block e (rows x C: exp(Z - row max) in float64, float32 or bfloat16,
// inmap_ext/logit_store.py) against class weights b: r_i = sum_j e_ij b_j, then
// col_j = sum_i e_ij / r_i. Each row is read once from memory and used twice from cache, with
// every stored entry converted to the work dtype in registers: the torch twin converts the block
// to a float32 copy and makes two matrix-vector products (five times the memory traffic of a
// bfloat16 block). The arithmetic is the work dtype's (float32, or float64 for a float64 block)
// with each row block's column partial sums added in float64, in a fixed order: results do not
// depend on the number of threads.
#include <torch/library.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "../checks.h"

namespace inmap {
namespace cpu {
namespace {

constexpr int64_t kRowBlock = 256;

inline float load(const float* p) { return *p; }
inline double load(const double* p) { return *p; }
// bfloat16 is the upper half of a float32: widened exactly by a shift (vectorisable)
inline float load(const c10::BFloat16* p) {
  uint16_t h;
  std::memcpy(&h, p, sizeof(h));
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

template <typename store_t, typename work_t>
void column_sums(const store_t* e, const work_t* b, int64_t rows, int64_t C, double* col,
                 work_t* rmin) {
  const int64_t blocks = (rows + kRowBlock - 1) / kRowBlock;
  std::vector<double> part(static_cast<size_t>(blocks * C), 0.0);
  std::vector<work_t> bmin(static_cast<size_t>(blocks), std::numeric_limits<work_t>::infinity());
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<work_t> acc(static_cast<size_t>(C));
    std::vector<work_t> row(static_cast<size_t>(C));
    for (int64_t blk = begin; blk < end; ++blk) {
      std::fill(acc.begin(), acc.end(), work_t(0));
      work_t lo = std::numeric_limits<work_t>::infinity();
      const int64_t i1 = std::min(rows, (blk + 1) * kRowBlock);
      for (int64_t i = blk * kRowBlock; i < i1; ++i) {
        const store_t* ei = e + i * C;
        work_t* rw = row.data();
        work_t r = 0;
#pragma omp simd reduction(+ : r)
        for (int64_t j = 0; j < C; ++j) {
          rw[j] = load(ei + j);
          r += rw[j] * b[j];
        }
        lo = std::min(lo, r);
        const work_t inv = work_t(1) / r;   // r = 0: inf / NaN, caught by rmin below the floor
        work_t* a = acc.data();
#pragma omp simd
        for (int64_t j = 0; j < C; ++j) a[j] += rw[j] * inv;
      }
      double* p = part.data() + blk * C;
      for (int64_t j = 0; j < C; ++j) p[j] = static_cast<double>(acc[j]);
      bmin[blk] = lo;
    }
  });
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const double* p = part.data() + blk * C;
    for (int64_t j = 0; j < C; ++j) col[j] += p[j];
    *rmin = std::min(*rmin, bmin[blk]);
  }
}

std::tuple<at::Tensor, at::Tensor> stored_column_sums_cpu(const at::Tensor& e,
                                                          const at::Tensor& b) {
  const char* op = "stored_column_sums";
  TORCH_CHECK(e.dim() == 2, op, ": e must be 2-D (rows x C), got ", e.dim(), "-D");
  TORCH_CHECK(b.dim() == 1 && b.size(0) == e.size(1), op, ": b must be a vector of length C=",
              e.size(1), ", got shape ", b.sizes());
  TORCH_CHECK(e.device().is_cpu() && b.device().is_cpu(), op, ": expected CPU tensors");
  const auto st = e.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kBFloat16, op,
              ": e must be float64, float32 or bfloat16, got ", st);
  const auto wt = acc_type(st);
  TORCH_CHECK(b.scalar_type() == wt, op, ": b must be ", wt, " for an e of ", st, ", got ",
              b.scalar_type());
  at::Tensor ec = e.contiguous(), bc = b.contiguous();
  const int64_t rows = ec.size(0), C = ec.size(1);
  at::Tensor col64 = at::zeros({C}, b.options().dtype(at::kDouble));
  at::Tensor rmin = at::full({}, std::numeric_limits<double>::infinity(), b.options());
  if (rows > 0 && C > 0) {
    double* col = col64.data_ptr<double>();
    if (st == at::kDouble) {
      column_sums(ec.data_ptr<double>(), bc.data_ptr<double>(), rows, C, col,
                  rmin.data_ptr<double>());
    } else if (st == at::kFloat) {
      column_sums(ec.data_ptr<float>(), bc.data_ptr<float>(), rows, C, col,
                  rmin.data_ptr<float>());
    } else {
      column_sums(ec.data_ptr<c10::BFloat16>(), bc.data_ptr<float>(), rows, C, col,
                  rmin.data_ptr<float>());
    }
  }
  return {col64.to(wt), rmin};
}

}  // namespace

TORCH_LIBRARY_IMPL(inmap_ext, CPU, m) { m.impl("stored_column_sums", &stored_column_sums_cpu); }

}  // namespace cpu
}  // namespace inmap
