// CPU kernels of the reads of stored logits, inmap_ext::stored_column_sums and
// inmap_ext::stored_row_scores (schemas and meaning: csrc/inmap.cpp).
//
// One read of a stored block e (rows x C: exp(Z - row max) in float64, float32 or bfloat16,
// inmap_ext/logit_store.py) against class weights b: r_i = sum_j e_ij b_j, then
// col_j = sum_i e_ij / r_i; for K weight vectors at once (b K x C: several Sinkhorn balancings
// in lockstep) the same for each k, from one read of e (measured at N = 400k, C = 1000: two
// vectors cost ~1.5 reads, not 2). Each row is read once from memory and widened to the work
// dtype into a row buffer that stays in cache for its K dot products and column-sum updates:
// the torch twin converts the block to a float32 copy and makes two matrix-vector products per
// vector (five times the memory traffic of a bfloat16 block). The arithmetic is the work
// dtype's (float32, or float64 for a float64 block)
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
#include "clones.h"

#if defined(__SSE2__)
#include <xmmintrin.h>
#endif

namespace inmap {
namespace cpu {
namespace {

constexpr int64_t kRowBlock = 256;

// Subnormal numbers flushed to zero (x86: MXCSR FTZ and DAZ) while a thread reads the store:
// under a spread log-bias many products e_ij b_j fall below the normal range, and x86 takes a
// microcode assist of ~100 cycles for each one (measured: a read 4x slower in a fit than on the
// same store with a narrow bias). A flushed term is below 2^-126 of its row's largest (which is
// 1): the caller's floor on r_i (logit_store.py) keeps every row whose sum could feel it off
// this path.
class FlushSubnormals {
 public:
#if defined(__SSE2__)
  FlushSubnormals() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | 0x8040); }
  ~FlushSubnormals() { _mm_setcsr(saved_); }

 private:
  unsigned int saved_;
#endif
};

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

// The reads' loops are inlined into one function per (store, work) dtype pair (row_block and
// score_rows below), built for the baseline x86-64 and for AVX2 + FMA (INMAP_CLONES_V3,
// clones.h): the loops vectorise 8 floats wide where the CPU has it.

// The lesser of a and b, NaN if either is (std::min would skip a NaN on one side): a row
// whose mass is NaN must reach the caller's check, as torch's min does.
template <typename T>
inline T min_nan(T a, T b) {
  return (a != a || b != b) ? std::numeric_limits<T>::quiet_NaN() : std::min(a, b);
}

// sum_j a_j b_j with kLanes independent partial sums, added in a fixed order at the end. A
// single accumulator (an `omp simd` reduction) chains every fused multiply-add on the one
// before it, and a read then runs at the adder's latency instead of its throughput (measured:
// the dot products were most of a read's time). The order depends only on C, never on the
// thread count or on K.
constexpr int kLanes = 32;

template <typename T>
static INMAP_ALWAYS_INLINE T dot(const T* a, const T* b, int64_t C) {
  T s[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= C; j += kLanes) {
    for (int u = 0; u < kLanes; ++u) s[u] += a[j + u] * b[j + u];
  }
  T tail = 0;
  for (; j < C; ++j) tail += a[j] * b[j];
  for (int w = kLanes / 2; w > 0; w /= 2) {
    for (int u = 0; u < w; ++u) s[u] += s[u + w];
  }
  return s[0] + tail;
}

// One block of rows against K weight vectors: each k's column sums (into acc, K x C, work
// dtype) and least row mass (into lo, K). The same arithmetic for every K: a read of K vectors
// gives, for each, the bits of a read of that vector alone.
template <typename store_t, typename work_t>
static INMAP_ALWAYS_INLINE void row_block(const store_t* e, const work_t* b, int64_t i0,
                                          int64_t i1, int64_t C, int64_t K, work_t* acc,
                                          work_t* lo, work_t* row) {
  for (int64_t j = 0; j < K * C; ++j) acc[j] = work_t(0);
  for (int64_t k = 0; k < K; ++k) lo[k] = std::numeric_limits<work_t>::infinity();
  for (int64_t i = i0; i < i1; ++i) {
    const store_t* ei = e + i * C;
#pragma omp simd
    for (int64_t j = 0; j < C; ++j) row[j] = load(ei + j);
    for (int64_t k = 0; k < K; ++k) {
      const work_t r = dot(row, b + k * C, C);
      lo[k] = min_nan(lo[k], r);
      const work_t inv = work_t(1) / r;   // r = 0 or NaN: caught by rmin below the floor
      work_t* ak = acc + k * C;
#pragma omp simd
      for (int64_t j = 0; j < C; ++j) ak[j] += row[j] * inv;
    }
  }
}

// AVX2 only (clones.h): an AVX-512 build of these reads rounds their float32 dot products
// differently, and the class prior's decisions were measured (robustness bench) on these bits;
// it was measured faster on lockstep reads with a row block in cache (95 -> 80 ms at N = 400k)
// but no faster reading a store from memory (~3.6 G entries/s per thread either way).
INMAP_CLONES_V3 void block_bf16(const c10::BFloat16* e, const float* b, int64_t i0, int64_t i1,
                                int64_t C, int64_t K, float* acc, float* lo, float* row) {
  row_block(e, b, i0, i1, C, K, acc, lo, row);
}
INMAP_CLONES_V3 void block_f32(const float* e, const float* b, int64_t i0, int64_t i1, int64_t C,
                               int64_t K, float* acc, float* lo, float* row) {
  row_block(e, b, i0, i1, C, K, acc, lo, row);
}
INMAP_CLONES_V3 void block_f64(const double* e, const double* b, int64_t i0, int64_t i1, int64_t C,
                               int64_t K, double* acc, double* lo, double* row) {
  row_block(e, b, i0, i1, C, K, acc, lo, row);
}

inline void block(const c10::BFloat16* e, const float* b, int64_t i0, int64_t i1, int64_t C,
                  int64_t K, float* acc, float* lo, float* row) {
  block_bf16(e, b, i0, i1, C, K, acc, lo, row);
}
inline void block(const float* e, const float* b, int64_t i0, int64_t i1, int64_t C, int64_t K,
                  float* acc, float* lo, float* row) {
  block_f32(e, b, i0, i1, C, K, acc, lo, row);
}
inline void block(const double* e, const double* b, int64_t i0, int64_t i1, int64_t C, int64_t K,
                  double* acc, double* lo, double* row) {
  block_f64(e, b, i0, i1, C, K, acc, lo, row);
}

template <typename store_t, typename work_t>
void column_sums(const store_t* e, const work_t* b, int64_t rows, int64_t C, int64_t K,
                 double* col, work_t* rmin) {
  const int64_t blocks = (rows + kRowBlock - 1) / kRowBlock;
  const int64_t KC = K * C;
  std::vector<double> part(static_cast<size_t>(blocks * KC), 0.0);
  std::vector<work_t> bmin(static_cast<size_t>(blocks * K),
                           std::numeric_limits<work_t>::infinity());
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    FlushSubnormals flush;
    std::vector<work_t> acc(static_cast<size_t>(KC));
    std::vector<work_t> row(static_cast<size_t>(C));
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t i1 = std::min(rows, (blk + 1) * kRowBlock);
      block(e, b, blk * kRowBlock, i1, C, K, acc.data(), bmin.data() + blk * K, row.data());
      double* p = part.data() + blk * KC;
      for (int64_t j = 0; j < KC; ++j) p[j] = static_cast<double>(acc[j]);
    }
  });
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const double* p = part.data() + blk * KC;
    for (int64_t j = 0; j < KC; ++j) col[j] += p[j];
    for (int64_t k = 0; k < K; ++k) rmin[k] = min_nan(rmin[k], bmin[blk * K + k]);
  }
}

// The arguments of both reads: e (rows x C) a store's block in float64, float32 or bfloat16
// on the CPU, b its class weights in e's work dtype: K x C (``per_candidate``: the scoring
// read), or a vector of C or K x C (the column sums).
void check_store_read(const at::Tensor& e, const at::Tensor& b, bool per_candidate,
                      const char* op) {
  TORCH_CHECK(e.dim() == 2, op, ": e must be 2-D (rows x C), got ", e.dim(), "-D");
  if (per_candidate) {
    TORCH_CHECK(b.dim() == 2 && b.size(1) == e.size(1), op, ": b must be K x C with C=",
                e.size(1), ", got shape ", b.sizes());
  } else {
    TORCH_CHECK((b.dim() == 1 || b.dim() == 2) && b.size(-1) == e.size(1), op,
                ": b must be a vector of length C=", e.size(1), " or K x C, got shape ",
                b.sizes());
  }
  TORCH_CHECK(e.device().is_cpu() && b.device().is_cpu(), op, ": expected CPU tensors");
  const auto st = e.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kBFloat16, op,
              ": e must be float64, float32 or bfloat16, got ", st);
  const auto wt = acc_type(st);
  TORCH_CHECK(b.scalar_type() == wt, op, ": b must be ", wt, " for an e of ", st, ", got ",
              b.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> stored_column_sums_cpu(const at::Tensor& e,
                                                          const at::Tensor& b) {
  const auto st = e.scalar_type();
  check_store_read(e, b, false, "stored_column_sums");
  const auto wt = acc_type(st);
  at::Tensor ec = e.contiguous(), bc = b.contiguous();
  const int64_t rows = ec.size(0), C = ec.size(1), K = b.dim() == 2 ? b.size(0) : 1;
  at::Tensor col64 = at::zeros(b.sizes(), b.options().dtype(at::kDouble));
  at::Tensor rmin = b.dim() == 2
                        ? at::full({K}, std::numeric_limits<double>::infinity(), b.options())
                        : at::full({}, std::numeric_limits<double>::infinity(), b.options());
  if (rows > 0 && C > 0 && K > 0) {
    double* col = col64.data_ptr<double>();
    if (st == at::kDouble) {
      column_sums(ec.data_ptr<double>(), bc.data_ptr<double>(), rows, C, K, col,
                  rmin.data_ptr<double>());
    } else if (st == at::kFloat) {
      column_sums(ec.data_ptr<float>(), bc.data_ptr<float>(), rows, C, K, col,
                  rmin.data_ptr<float>());
    } else {
      column_sums(ec.data_ptr<c10::BFloat16>(), bc.data_ptr<float>(), rows, C, K, col,
                  rmin.data_ptr<float>());
    }
  }
  return {col64.to(wt), rmin};
}

// argmax_j a_j b_j, the first of equal ones; a NaN product wins (the first NaN), as in
// torch.argmax. The largest product is found in vector registers (no branch per class), then the
// first class whose product (the same multiplication, the same bits) equals it: a scalar
// compare-and-branch loop over the C classes was most of a scoring read's time.
template <typename T>
static INMAP_ALWAYS_INLINE int64_t first_argmax(const T* a, const T* b, int64_t C) {
  T best = -std::numeric_limits<T>::infinity();
  int nan = 0;
#pragma omp simd reduction(max : best) reduction(| : nan)
  for (int64_t j = 0; j < C; ++j) {
    const T v = a[j] * b[j];
    nan |= (v != v);
    best = v > best ? v : best;
  }
  for (int64_t j = 0; j < C; ++j) {
    const T v = a[j] * b[j];
    if (nan ? v != v : v == best) return j;
  }
  return 0;   // C = 0, or every product -inf (the products are >= 0 here: not reached)
}

// stored_row_scores: per row i and candidate k, the mass r_ik = sum_j e_ij b_kj and the class
// argmax_j e_ij b_kj (the first of equal ones, as torch.argmax). Rows are independent: any
// thread count gives the same result.
template <typename store_t, typename work_t>
static INMAP_ALWAYS_INLINE void score_rows(const store_t* e, const work_t* b,
                                                             int64_t i0, int64_t i1, int64_t C,
                                                             int64_t K, work_t* mass,
                                                             int64_t* top, work_t* row) {
  for (int64_t i = i0; i < i1; ++i) {
    const store_t* ei = e + i * C;
#pragma omp simd
    for (int64_t j = 0; j < C; ++j) row[j] = load(ei + j);
    for (int64_t k = 0; k < K; ++k) {
      const work_t* bk = b + k * C;
      work_t r = 0;
#pragma omp simd reduction(+ : r)
      for (int64_t j = 0; j < C; ++j) r += row[j] * bk[j];
      mass[i * K + k] = r;
      top[i * K + k] = first_argmax(row, bk, C);
    }
  }
}

INMAP_CLONES_V3 void scores_bf16(const c10::BFloat16* e, const float* b, int64_t i0, int64_t i1,
                                 int64_t C, int64_t K, float* mass, int64_t* top, float* row) {
  score_rows(e, b, i0, i1, C, K, mass, top, row);
}
INMAP_CLONES_V3 void scores_f32(const float* e, const float* b, int64_t i0, int64_t i1, int64_t C,
                                int64_t K, float* mass, int64_t* top, float* row) {
  score_rows(e, b, i0, i1, C, K, mass, top, row);
}
INMAP_CLONES_V3 void scores_f64(const double* e, const double* b, int64_t i0, int64_t i1, int64_t C,
                                int64_t K, double* mass, int64_t* top, double* row) {
  score_rows(e, b, i0, i1, C, K, mass, top, row);
}

inline void scores(const c10::BFloat16* e, const float* b, int64_t i0, int64_t i1, int64_t C,
                   int64_t K, float* mass, int64_t* top, float* row) {
  scores_bf16(e, b, i0, i1, C, K, mass, top, row);
}
inline void scores(const float* e, const float* b, int64_t i0, int64_t i1, int64_t C, int64_t K,
                   float* mass, int64_t* top, float* row) {
  scores_f32(e, b, i0, i1, C, K, mass, top, row);
}
inline void scores(const double* e, const double* b, int64_t i0, int64_t i1, int64_t C,
                   int64_t K, double* mass, int64_t* top, double* row) {
  scores_f64(e, b, i0, i1, C, K, mass, top, row);
}

std::tuple<at::Tensor, at::Tensor> stored_row_scores_cpu(const at::Tensor& e,
                                                         const at::Tensor& b) {
  const auto st = e.scalar_type();
  check_store_read(e, b, true, "stored_row_scores");
  at::Tensor ec = e.contiguous(), bc = b.contiguous();
  const int64_t rows = ec.size(0), C = ec.size(1), K = bc.size(0);
  at::Tensor mass = at::empty({rows, K}, b.options());
  at::Tensor top = at::empty({rows, K}, b.options().dtype(at::kLong));
  if (rows == 0 || K == 0) return {mass, top};
  at::parallel_for(0, rows, 64, [&](int64_t i0, int64_t i1) {
    FlushSubnormals flush;
    if (st == at::kDouble) {
      std::vector<double> row(static_cast<size_t>(C));
      scores(ec.data_ptr<double>(), bc.data_ptr<double>(), i0, i1, C, K,
             mass.data_ptr<double>(), top.data_ptr<int64_t>(), row.data());
    } else {
      std::vector<float> row(static_cast<size_t>(C));
      if (st == at::kFloat) {
        scores(ec.data_ptr<float>(), bc.data_ptr<float>(), i0, i1, C, K, mass.data_ptr<float>(),
               top.data_ptr<int64_t>(), row.data());
      } else {
        scores(ec.data_ptr<c10::BFloat16>(), bc.data_ptr<float>(), i0, i1, C, K,
               mass.data_ptr<float>(), top.data_ptr<int64_t>(), row.data());
      }
    }
  });
  return {mass, top};
}

}  // namespace

TORCH_LIBRARY_IMPL(inmap_ext, CPU, m) {
  m.impl("stored_column_sums", &stored_column_sums_cpu);
  m.impl("stored_row_scores", &stored_row_scores_cpu);
}

}  // namespace cpu
}  // namespace inmap
