// Building blocks of the CUDA kernels (design (b) of DESIGN.md): per row chunk, one cuBLAS GEMM
// for the logits (fp16/bf16/fp32/fp64 inputs, fp32 or fp64 output: logits are never rounded to
// 16 bits), a fused row-softmax epilogue kernel (temperature, per-column log-bias, confidence
// threshold, one-hot, argmax), and a second cuBLAS GEMM accumulating X^T P into an fp32 (fp64)
// D x C result. Only chunk x C buffers exist; no N x C matrix.
#pragma once
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/Exceptions.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cublas_v2.h>

#include <limits>

#include "../checks.h"

namespace inmap {
namespace cuda {

constexpr int kThreads = 256;  // threads per row in the row kernels

// Rows per chunk buffer: the op's `chunk`, at most N, at least 1, and few enough that a chunk x C
// buffer has < 2^31 elements (cuBLAS takes 32-bit sizes; the kernels index with them).
inline int64_t chunk_rows(int64_t chunk, int64_t N, int64_t C) {
  const int64_t cap = std::max<int64_t>(1, (int64_t(1) << 31) / std::max<int64_t>(C, 1) - 1);
  return std::max<int64_t>(1, std::min({chunk, N, cap}));
}

inline void check_cuda_inputs(const at::Tensor& x, const at::Tensor& w,
                              const c10::optional<at::Tensor>& bias, int64_t chunk,
                              const char* op) {
  check_pair(x, w, op);
  check_bias(bias, w, op);
  check_chunk(chunk, op);
  TORCH_CHECK(x.is_cuda(), op, ": expected CUDA tensors, got ", x.device());
}

inline cudaDataType_t cuda_dtype(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return CUDA_R_16F;
    case at::kBFloat16: return CUDA_R_16BF;
    case at::kFloat: return CUDA_R_32F;
    case at::kDouble: return CUDA_R_64F;
    default: TORCH_CHECK(false, "inmap_ext CUDA kernels: unsupported dtype ", t);
  }
}

// fp32 inputs use TF32 tensor cores only where torch allows it
// (torch.backends.cuda.matmul.allow_tf32); 16-bit inputs always accumulate in fp32.
inline cublasComputeType_t compute_type(at::ScalarType t) {
  if (t == at::kDouble) return CUBLAS_COMPUTE_64F;
  if (t == at::kFloat && at::globalContext().allowTF32CuBLAS()) return CUBLAS_COMPUTE_32F_FAST_TF32;
  return CUBLAS_COMPUTE_32F;
}

// One cuBLAS GEMM in column-major terms, C = A-op * B-op (+ C when accumulate): inputs in `in`
// (fp16/bf16/fp32/fp64), output fp32 (fp64 for fp64 inputs).
inline void gemm(cublasOperation_t opa, cublasOperation_t opb, int64_t m, int64_t n, int64_t k,
                 const at::Tensor& a, int64_t lda, const at::Tensor& b, int64_t ldb, at::Tensor& c,
                 int64_t ldc, bool accumulate) {
  const auto in = b.scalar_type();
  const bool dbl = in == at::kDouble;
  const double one_d = 1.0, beta_d = accumulate ? 1.0 : 0.0;
  const float one_f = 1.f, beta_f = accumulate ? 1.f : 0.f;
  TORCH_CUDABLAS_CHECK(cublasGemmEx(
      at::cuda::getCurrentCUDABlasHandle(), opa, opb, m, n, k,
      dbl ? static_cast<const void*>(&one_d) : static_cast<const void*>(&one_f), a.data_ptr(),
      cuda_dtype(in), lda, b.data_ptr(), cuda_dtype(in), ldb,
      dbl ? static_cast<const void*>(&beta_d) : static_cast<const void*>(&beta_f), c.data_ptr(),
      dbl ? CUDA_R_64F : CUDA_R_32F, ldc, compute_type(in), CUBLAS_GEMM_DEFAULT));
}

// Row-major products through column-major cuBLAS (a row-major M x N matrix is a column-major
// N x M one), all operands contiguous:
//   logits:  z[rows x C]  = xc[rows x D] @ w[D x C]        ->  z^T = w^T xc^T
//   reduce:  G[D x C]    += xc[rows x D]^T @ p[rows x C]   ->  G^T += p^T xc
inline void gemm_logits(const at::Tensor& xc, const at::Tensor& w, at::Tensor& z) {
  const int64_t rows = xc.size(0), D = xc.size(1), C = w.size(1);
  gemm(CUBLAS_OP_N, CUBLAS_OP_N, C, rows, D, w, C, xc, D, z, C, /*accumulate=*/false);
}

// xc may be wider than G has rows (zero padding along D): its first G.size(0) columns are used.
inline void gemm_xt_p_accumulate(const at::Tensor& xc, const at::Tensor& p, at::Tensor& G) {
  const int64_t rows = xc.size(0), D = G.size(0), C = p.size(1);
  const int64_t ldx = std::max<int64_t>(xc.stride(0), xc.size(1));  // any stride when rows == 1
  gemm(CUBLAS_OP_N, CUBLAS_OP_T, C, D, rows, p, C, xc, ldx, G, C, /*accumulate=*/true);
}

__device__ __forceinline__ float dev_exp(float v) { return ::expf(v); }
__device__ __forceinline__ double dev_exp(double v) { return ::exp(v); }

// (max, sum of exp(v - max)) pairs: the online log-sum-exp state.
template <typename acc_t>
struct Lse {
  acc_t m, s;
  // -inf terms (a class with a -inf log-bias: known absent) add nothing; without this
  // check a state still at m = -inf would compute exp(-inf - -inf) = NaN.
  __device__ __forceinline__ void add(acc_t v) {
    if (v == -std::numeric_limits<acc_t>::infinity()) return;
    if (v > m) {
      s = s * dev_exp(m - v) + acc_t(1);
      m = v;
    } else {
      s += dev_exp(v - m);
    }
  }
  __device__ __forceinline__ void merge(Lse o) {
    if (o.m == -std::numeric_limits<acc_t>::infinity()) return;
    if (m == -std::numeric_limits<acc_t>::infinity()) { *this = o; return; }
    const acc_t mm = m > o.m ? m : o.m;
    s = s * dev_exp(m - mm) + o.s * dev_exp(o.m - mm);
    m = mm;
  }
};

// Lane 0 ends with the warp's merged log-sum-exp state and its argmax (ties: smallest index).
template <typename acc_t>
__device__ __forceinline__ void warp_reduce(Lse<acc_t>& st, acc_t& best_v, int64_t& best) {
  for (int off = 16; off > 0; off >>= 1) {
    Lse<acc_t> o{__shfl_down_sync(0xffffffff, st.m, off), __shfl_down_sync(0xffffffff, st.s, off)};
    const acc_t ov = __shfl_down_sync(0xffffffff, best_v, off);
    const int64_t ob = __shfl_down_sync(0xffffffff, best, off);
    st.merge(o);
    if (ov > best_v || (ov == best_v && ob < best)) { best_v = ov; best = ob; }
  }
}

// Merges per-split column log-sum-exp partials [splits x C] into the running state, in split
// order (deterministic: no atomics).
template <typename acc_t>
__global__ void column_lse_merge_kernel(const acc_t* __restrict__ part_m,
                                        const acc_t* __restrict__ part_s, int64_t splits,
                                        int64_t C, acc_t* __restrict__ run_m,
                                        acc_t* __restrict__ run_s) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= C) return;
  Lse<acc_t> st{run_m[j], run_s[j]};
  for (int64_t k = 0; k < splits; ++k) st.merge(Lse<acc_t>{part_m[k * C + j], part_s[k * C + j]});
  run_m[j] = st.m;
  run_s[j] = st.s;
}

enum class RowMode { kProbs, kProbsThreshold, kLse };

// One block per row of z (rows x C): v_j = z_j * inv_tau + bias_j.
//   kLse:            lse[row] = log sum_j exp(v_j) (the other modes also write it when lse is
//                    not null)
//   kProbs:          p[row, j] = softmax(v)_j  (in out_t)
//   kProbsThreshold: as kProbs, and rows whose largest probability is > alpha become the one-hot
//                    of their argmax (first maximal index); arg[row], confident[row] written.
template <typename acc_t, typename out_t, RowMode kMode>
__global__ void __launch_bounds__(kThreads) row_softmax_kernel(
    const acc_t* __restrict__ z, int64_t C, acc_t inv_tau, const acc_t* __restrict__ bias,
    out_t* __restrict__ p, acc_t* __restrict__ lse, acc_t alpha, int64_t* __restrict__ arg,
    uint8_t* __restrict__ confident) {
  const int64_t row = blockIdx.x;
  const acc_t* zr = z + row * C;
  const acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  Lse<acc_t> st{ninf, acc_t(0)};
  int64_t best = C;  // argmax of this thread's entries (first index of the max)
  acc_t best_v = ninf;
  for (int64_t j = threadIdx.x; j < C; j += blockDim.x) {
    const acc_t v = zr[j] * inv_tau + (bias ? bias[j] : acc_t(0));
    st.add(v);
    if (v > best_v) { best_v = v; best = j; }
  }
  // Block reduction of (lse state, argmax): warp shuffles, then one warp over the warp results.
  __shared__ acc_t sh_m[kThreads / 32], sh_s[kThreads / 32], sh_bv[kThreads / 32];
  __shared__ int64_t sh_b[kThreads / 32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  warp_reduce(st, best_v, best);
  if (lane == 0) { sh_m[warp] = st.m; sh_s[warp] = st.s; sh_bv[warp] = best_v; sh_b[warp] = best; }
  __syncthreads();
  if (warp == 0) {
    const int nw = blockDim.x / 32;
    st = Lse<acc_t>{lane < nw ? sh_m[lane] : ninf, lane < nw ? sh_s[lane] : acc_t(0)};
    best_v = lane < nw ? sh_bv[lane] : ninf;
    best = lane < nw ? sh_b[lane] : C;
    warp_reduce(st, best_v, best);
    if (lane == 0) { sh_m[0] = st.m; sh_s[0] = st.s; sh_b[0] = best; }
  }
  __syncthreads();
  const acc_t M = sh_m[0], S = sh_s[0];
  if (lse && threadIdx.x == 0) lse[row] = M + ::log(S);  // kLse; optional in the other modes
  if (kMode == RowMode::kLse) return;
  bool one_hot = false;
  const int64_t b = sh_b[0];
  if (kMode == RowMode::kProbsThreshold) {
    one_hot = acc_t(1) / S > alpha;  // the largest probability is exp(0) / S
    if (threadIdx.x == 0) {
      arg[row] = b;
      confident[row] = one_hot ? 1 : 0;
    }
  }
  out_t* pr = p + row * C;
  const acc_t inv_s = acc_t(1) / S;
  for (int64_t j = threadIdx.x; j < C; j += blockDim.x) {
    acc_t q;
    if (one_hot) {
      q = j == b ? acc_t(1) : acc_t(0);
    } else {
      q = dev_exp(zr[j] * inv_tau + (bias ? bias[j] : acc_t(0)) - M) * inv_s;
    }
    pr[j] = static_cast<out_t>(q);
  }
}

// Row chunks of x as contiguous tensors (a copy only when x is strided), with z = xc @ w in the
// accumulation dtype computed into a reused buffer. f(start, rows, xc, z).
template <typename F>
void for_each_chunk(const at::Tensor& x, const at::Tensor& w, int64_t chunk, F&& f) {
  const int64_t N = x.size(0), C = w.size(1);
  if (N == 0) return;
  const int64_t cs = chunk_rows(chunk, N, C);
  at::Tensor zbuf = at::empty({cs, C}, x.options().dtype(acc_type(x.scalar_type())));
  for (int64_t start = 0; start < N; start += cs) {
    const int64_t rows = std::min(cs, N - start);
    at::Tensor xc = x.narrow(0, start, rows).contiguous();
    at::Tensor z = zbuf.narrow(0, 0, rows);
    gemm_logits(xc, w, z);
    f(start, rows, xc, z);
  }
}

}  // namespace cuda
}  // namespace inmap
