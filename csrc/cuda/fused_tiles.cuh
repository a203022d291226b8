// Design (a) of the CUDA kernels: the logits are never stored. A tensor-core tile kernel computes
// S = x[rows] @ w[:, classes] for a 128 x 128 tile into shared memory and an epilogue consumes it
// there; the softmax normaliser comes from a first pass over all class tiles (online
// log-sum-exp, FlashAttention style) and the tiles are recomputed in the second pass, which
// writes P (input dtype) for the cuBLAS GEMM x^T P, or column log-sum-exp partials for the
// Sinkhorn statistic. Bytes per N x C element: P written and read (2 x 2 for 16-bit inputs)
// instead of design (b)'s fp32 logits written and read plus P (4 + 4 + 2 x 2); the price is one
// more x @ w product. Which design is faster is measured by bench/run.py (variants "ext" and
// "ext-fused"); INMAP_CUDA_DESIGN picks at run time (design.cuh).
//
// Inputs: fp16 and bf16 (WMMA 16x16x16) and fp32 through TF32 (16x16x8); fp32 without TF32 and
// fp64 stay on design (b). Logits, log-sum-exp and partials are fp32. Operands are prepared on
// the host so that the tile loop needs no bounds checks along D: x rows and w padded with zeros
// to D_pad (a multiple of 32), w's columns to a multiple of 8, every row start 16-byte aligned.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include "chunked_cuda.cuh"

namespace inmap {
namespace cuda {
namespace fused {

constexpr int kBM = 128, kBN = 128, kBK = 32;  // CTA tile (rows x classes) and K step
constexpr int kWarpsM = 2, kWarpsN = 4, kThreads = 32 * kWarpsM * kWarpsN;
constexpr int kWM = kBM / kWarpsM, kWN = kBN / kWarpsN;  // warp tile: 64 x 32
constexpr int kStageLd = kBN + 4;                        // fp32 staging row (floats)
constexpr int kPadD = kBK, kPadC = 8;                    // host-side operand padding

// WMMA element and fragment types per input dtype.
template <typename T> struct Mma;
template <> struct Mma<at::Half> {
  using elem = __half;
  using frag = __half;
  static constexpr int K = 16;
};
template <> struct Mma<at::BFloat16> {
  using elem = __nv_bfloat16;
  using frag = __nv_bfloat16;
  static constexpr int K = 16;
};
template <> struct Mma<float> {
  using elem = float;
  using frag = nvcuda::wmma::precision::tf32;
  static constexpr int K = 8;
};

template <typename T> struct Layout {
  using E = typename Mma<T>::elem;
  static constexpr int kVec = 16 / sizeof(E);  // elements per 16-byte copy
  static constexpr int kLdA = kBK + kVec;       // shared rows padded by 16 bytes (bank spread)
  static constexpr int kLdB = kBN + kVec;
  static constexpr int kStageElems = kBM * kLdA + kBK * kLdB;
  // cp.async pipeline depth: 3 stages for 16-bit inputs (56.8 KB, inside the 67.6 KB the fp32
  // output tile needs anyway), 2 for fp32 (70.7 KB).
  static constexpr int kStages = sizeof(E) == 2 ? 3 : 2;
  static constexpr size_t kPipeBytes = size_t(kStages) * kStageElems * sizeof(E);
  static constexpr size_t kOutBytes = size_t(kBM) * kStageLd * sizeof(float);
  static constexpr size_t kSmem = kPipeBytes > kOutBytes ? kPipeBytes : kOutBytes;
};

// Host-side operands of one chunk: x rows (rows x ldx, ldx = D_pad) and w (D_pad x ldw).
template <typename T> struct Operands {
  const typename Mma<T>::elem* x;
  int64_t rows, ldx;
  const typename Mma<T>::elem* w;
  int64_t ldw, d_pad, C;
};

// fp32 -> element type (torch builds with the implicit __half/__nv_bfloat16 conversions off).
__device__ __forceinline__ __half to_elem(float v, __half*) { return __float2half_rn(v); }
__device__ __forceinline__ __nv_bfloat16 to_elem(float v, __nv_bfloat16*) {
  return __float2bfloat16_rn(v);
}
__device__ __forceinline__ float to_elem(float v, float*) { return v; }

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define INMAP_FUSED_DEVICE 1
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  const int n = valid ? 16 : 0;  // 0 source bytes: the 16 destination bytes are zero-filled
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(src), "r"(n));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Copies the K step starting at k0 of the x tile (rows r0..) and the w tile (classes c0..) into
// one pipeline stage `buf`. Rows past the chunk and columns past ldw are zero-filled.
template <typename T>
__device__ __forceinline__ void load_stage(const Operands<T>& op, int64_t r0, int64_t c0,
                                           int64_t k0, typename Mma<T>::elem* buf) {
  using L = Layout<T>;
  using E = typename Mma<T>::elem;
  E* sa = buf;
  E* sb = buf + kBM * L::kLdA;
  constexpr int a_per_row = kBK / L::kVec, b_per_row = kBN / L::kVec;
  for (int i = threadIdx.x; i < kBM * a_per_row; i += kThreads) {
    const int r = i / a_per_row, k = (i % a_per_row) * L::kVec;
    const bool ok = r0 + r < op.rows;
    const E* src = ok ? op.x + (r0 + r) * op.ldx + k0 + k : op.x;
    cp_async16(sa + r * L::kLdA + k, src, ok);
  }
  for (int i = threadIdx.x; i < kBK * b_per_row; i += kThreads) {
    const int k = i / b_per_row, c = (i % b_per_row) * L::kVec;
    const bool ok = c0 + c < op.ldw;
    const E* src = ok ? op.w + (k0 + k) * op.ldw + c0 + c : op.w;
    cp_async16(sb + k * L::kLdB + c, src, ok);
  }
}

// S = x[r0 : r0 + 128] @ w[:, c0 : c0 + 128] in fp32, left in `out` (shared, row stride
// kStageLd) for the epilogue. Ends with a barrier; the caller must barrier again before the
// next call overwrites the shared memory.
template <typename T>
__device__ void tile_logits(const Operands<T>& op, int64_t r0, int64_t c0, char* smem) {
  namespace wmma = nvcuda::wmma;
  using L = Layout<T>;
  using M = Mma<T>;
  using E = typename M::elem;
  constexpr int FM = kWM / 16, FN = kWN / 16;
  E* pipe = reinterpret_cast<E*>(smem);
  const int warp = threadIdx.x / 32, wm = warp / kWarpsN, wn = warp % kWarpsN;
  wmma::fragment<wmma::accumulator, 16, 16, M::K, float> acc[FM][FN];
#pragma unroll
  for (int i = 0; i < FM; ++i)
#pragma unroll
    for (int j = 0; j < FN; ++j) wmma::fill_fragment(acc[i][j], 0.f);
  constexpr int S = L::kStages;
  const int ksteps = static_cast<int>(op.d_pad / kBK);
  // K step j travels in commit group j: the prologue fills stages 0..S-2, iteration kt then
  // prefetches K step kt+S-1 into the buffer iteration kt-1 computed on (free once every thread
  // has passed this iteration's barrier). Empty groups keep the count uniform.
#pragma unroll
  for (int j = 0; j < S - 1; ++j) {
    if (j < ksteps) load_stage<T>(op, r0, c0, int64_t(j) * kBK, pipe + j * L::kStageElems);
    cp_async_commit();
  }
  for (int kt = 0; kt < ksteps; ++kt) {
    cp_async_wait<S - 2>();  // groups 0..kt have landed
    __syncthreads();
    const int next = kt + S - 1;
    if (next < ksteps)
      load_stage<T>(op, r0, c0, int64_t(next) * kBK, pipe + (next % S) * L::kStageElems);
    cp_async_commit();
    const E* sa = pipe + (kt % S) * L::kStageElems;
    const E* sb = sa + kBM * L::kLdA;
#pragma unroll
    for (int ks = 0; ks < kBK; ks += M::K) {
      wmma::fragment<wmma::matrix_b, 16, 16, M::K, typename M::frag, wmma::row_major> b[FN];
#pragma unroll
      for (int j = 0; j < FN; ++j) {
        wmma::load_matrix_sync(b[j], sb + ks * L::kLdB + wn * kWN + j * 16, L::kLdB);
        if constexpr (std::is_same<E, float>::value) {
#pragma unroll
          for (int t = 0; t < b[j].num_elements; ++t) b[j].x[t] = wmma::__float_to_tf32(b[j].x[t]);
        }
      }
#pragma unroll
      for (int i = 0; i < FM; ++i) {
        wmma::fragment<wmma::matrix_a, 16, 16, M::K, typename M::frag, wmma::row_major> a;
        wmma::load_matrix_sync(a, sa + (wm * kWM + i * 16) * L::kLdA + ks, L::kLdA);
        if constexpr (std::is_same<E, float>::value) {
#pragma unroll
          for (int t = 0; t < a.num_elements; ++t) a.x[t] = wmma::__float_to_tf32(a.x[t]);
        }
#pragma unroll
        for (int j = 0; j < FN; ++j) wmma::mma_sync(acc[i][j], a, b[j], acc[i][j]);
      }
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // every warp is done with the pipeline buffers: they become the output tile
  float* out = reinterpret_cast<float*>(smem);
#pragma unroll
  for (int i = 0; i < FM; ++i)
#pragma unroll
    for (int j = 0; j < FN; ++j)
      wmma::store_matrix_sync(out + (wm * kWM + i * 16) * kStageLd + wn * kWN + j * 16, acc[i][j],
                              kStageLd, wmma::mem_row_major);
  __syncthreads();
}
#endif  // __CUDA_ARCH__ >= 800

// Pass 1. Grid (row blocks, class splits): each CTA runs over its class tiles keeping, per row,
// the online log-sum-exp of v = s * inv_tau + bias and the argmax (first maximal index); two
// threads per row, merged by a shuffle. Partials: [split][row].
template <typename T>
__global__ void __launch_bounds__(kThreads, 1) row_stats_kernel(
    Operands<T> op, float inv_tau, const float* __restrict__ bias, int tiles_per_split,
    float* __restrict__ part_m, float* __restrict__ part_s, int64_t* __restrict__ part_arg) {
#ifdef INMAP_FUSED_DEVICE
  extern __shared__ __align__(128) char smem[];
  const float* out = reinterpret_cast<const float*>(smem);
  const int64_t r0 = int64_t(blockIdx.x) * kBM;
  const int64_t tiles = (op.C + kBN - 1) / kBN;
  const int64_t t0 = int64_t(blockIdx.y) * tiles_per_split;
  const int64_t t1 = std::min<int64_t>(tiles, t0 + tiles_per_split);
  const int row = threadIdx.x >> 1, half = threadIdx.x & 1;
  const float ninf = -std::numeric_limits<float>::infinity();
  Lse<float> st{ninf, 0.f};
  float best_v = ninf;
  int64_t best = op.C;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t c0 = t * kBN;
    tile_logits<T>(op, r0, c0, smem);
    const float* s = out + row * kStageLd;
    for (int j = half; j < kBN && c0 + j < op.C; j += 2) {
      const float v = s[j] * inv_tau + (bias ? bias[c0 + j] : 0.f);
      st.add(v);
      if (v > best_v) { best_v = v; best = c0 + j; }
    }
    __syncthreads();
  }
  Lse<float> o{__shfl_xor_sync(0xffffffff, st.m, 1), __shfl_xor_sync(0xffffffff, st.s, 1)};
  const float ov = __shfl_xor_sync(0xffffffff, best_v, 1);
  const int64_t ob = __shfl_xor_sync(0xffffffff, best, 1);
  st.merge(o);
  if (ov > best_v || (ov == best_v && ob < best)) best = ob;
  if (half == 0 && r0 + row < op.rows) {
    const int64_t k = int64_t(blockIdx.y) * op.rows + r0 + row;
    part_m[k] = st.m;
    part_s[k] = st.s;
    part_arg[k] = best;
  }
#elif defined(__CUDA_ARCH__)
  __trap();  // built for an architecture below sm_80: design.cuh never launches this (ptxVersion)
#endif
}

// Merges pass 1's splits in order: lse[row], argmax[row] and (threshold) the confident flag
// (largest probability exp(max - lse) = 1 / s > alpha).
template <typename acc_t>  // float; a template so that every .cu may instantiate it
__global__ void row_stats_merge_kernel(const acc_t* __restrict__ part_m,
                                       const acc_t* __restrict__ part_s,
                                       const int64_t* __restrict__ part_arg, int splits,
                                       int64_t rows, acc_t alpha, acc_t* __restrict__ lse,
                                       int64_t* __restrict__ arg, uint8_t* __restrict__ confident) {
  const int64_t r = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= rows) return;
  Lse<acc_t> st{part_m[r], part_s[r]};
  int64_t best = part_arg[r];
  for (int k = 1; k < splits; ++k) {
    const acc_t m = part_m[k * rows + r];
    if (m > st.m) best = part_arg[k * rows + r];  // earlier splits hold smaller indices
    st.merge(Lse<acc_t>{m, part_s[k * rows + r]});
  }
  lse[r] = st.m + ::log(st.s);
  if (arg) arg[r] = best;
  if (confident) confident[r] = acc_t(1) / st.s > alpha ? 1 : 0;
}

enum class Epilogue { kProbs, kProbsThreshold, kColumnLse };

// Pass 2. Grid (row blocks, class tiles): recompute the tile, then
//   kProbs / kProbsThreshold: p[r, c] = exp(v - lse[r]) (one-hot of arg[r] where confident[r])
//   kColumnLse: per column, the online log-sum-exp over the tile's rows of v - lse[r], written
//               as partials [row block][c] (merged in order by column_lse_merge_kernel).
template <typename T, Epilogue kEpi>
__global__ void __launch_bounds__(kThreads, 2) tile_epilogue_kernel(
    Operands<T> op, float inv_tau, const float* __restrict__ bias, const float* __restrict__ lse,
    const int64_t* __restrict__ arg, const uint8_t* __restrict__ confident,
    typename Mma<T>::elem* __restrict__ p, float* __restrict__ part_m,
    float* __restrict__ part_s) {
#ifdef INMAP_FUSED_DEVICE
  extern __shared__ __align__(128) char smem[];
  __shared__ float red_m[kThreads], red_s[kThreads];
  using E = typename Mma<T>::elem;
  // Class tiles vary fastest (a 1-D grid: id = row block * tiles + class tile), so the resident
  // CTAs share a few row blocks of x and all of w (small) stays in L2: x is read from HBM about
  // once per pass, not once per class tile.
  const int64_t tiles = (op.C + kBN - 1) / kBN;
  const int64_t rb = int64_t(blockIdx.x) / tiles;
  const int64_t r0 = rb * kBM, c0 = (int64_t(blockIdx.x) % tiles) * kBN;
  tile_logits<T>(op, r0, c0, smem);
  const float* out = reinterpret_cast<const float*>(smem);
  constexpr int kRowsPer = kThreads / kBN;  // 2 threads per column
  const int col = threadIdx.x % kBN, part = threadIdx.x / kBN;
  const int64_t c = c0 + col;
  const bool valid_c = c < op.C;
  const float b = valid_c && bias ? bias[c] : 0.f;
  const int64_t rows_here = std::min<int64_t>(kBM, op.rows - r0);
  if constexpr (kEpi == Epilogue::kColumnLse) {
    Lse<float> st{-std::numeric_limits<float>::infinity(), 0.f};
    if (valid_c)
      for (int i = part; i < rows_here; i += kRowsPer)
        st.add(out[i * kStageLd + col] * inv_tau + b - lse[r0 + i]);
    red_m[threadIdx.x] = st.m;
    red_s[threadIdx.x] = st.s;
    __syncthreads();
    if (part == 0 && valid_c) {
      for (int k = 1; k < kRowsPer; ++k)
        st.merge(Lse<float>{red_m[k * kBN + col], red_s[k * kBN + col]});
      part_m[rb * op.C + c] = st.m;
      part_s[rb * op.C + c] = st.s;
    }
  } else {
    if (!valid_c) return;
    for (int i = part; i < rows_here; i += kRowsPer) {
      const int64_t r = r0 + i;
      float q;
      if (kEpi == Epilogue::kProbsThreshold && confident[r]) {
        q = c == arg[r] ? 1.f : 0.f;
      } else {
        q = ::expf(out[i * kStageLd + col] * inv_tau + b - lse[r]);
      }
      p[r * op.C + c] = to_elem(q, static_cast<E*>(nullptr));
    }
  }
#elif defined(__CUDA_ARCH__)
  __trap();  // built for an architecture below sm_80: design.cuh never launches this (ptxVersion)
#endif
}

// ---- host side ----------------------------------------------------------------------------

// The PTX version (e.g. 90 for compute_90) of the row_stats kernel image the driver loaded for
// the current device: below 80 (a build whose only usable image is older PTX, e.g.
// TORCH_CUDA_ARCH_LIST="7.5+PTX" on an H100) the kernel bodies are empty (they trap).
template <typename T>
int loaded_ptx_version() {
  cudaFuncAttributes attr;
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, row_stats_kernel<T>));
  return attr.ptxVersion;
}

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

template <typename Kernel>
void allow_smem(Kernel kernel, size_t bytes) {
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(bytes)));
}

// CTAs of `kernel` (kThreads threads, `smem` dynamic shared bytes) resident on the whole device.
template <typename Kernel>
int64_t resident_slots(Kernel kernel, size_t smem) {
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem));
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return std::max<int64_t>(1, int64_t(per_sm) * sms);
}

// Pass 1's class splits: with row_blocks row blocks and `slots` resident CTAs, the number of
// splits (<= tiles, none empty) whose grid row_blocks x splits is closest below a whole number
// of waves, at least one wave when the classes allow it. E.g. N = 10M rows in chunks of 98k
// (768 row blocks), 21,841 classes (171 tiles), 132 slots: 1 split, 768 CTAs = 5.8 waves;
// a chunk of 64 row blocks: 2 splits, 128 CTAs (0.97 wave) instead of 3 splits (1.45 waves).
inline int64_t class_splits(int64_t row_blocks, int64_t tiles, int64_t slots) {
  const int64_t waves = std::max<int64_t>(1, (row_blocks + slots - 1) / slots);
  int64_t splits = std::max<int64_t>(1, std::min<int64_t>(tiles, waves * slots / row_blocks));
  const int64_t per_split = (tiles + splits - 1) / splits;
  return (tiles + per_split - 1) / per_split;
}

// Runs f(tag) with tag of the fused element type of `t` (at::Half, at::BFloat16 or float).
template <typename F>
void dispatch(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kHalf: f(at::Half{}); break;
    case at::kBFloat16: f(at::BFloat16{}); break;
    case at::kFloat: f(float{}); break;
    default: TORCH_CHECK(false, "inmap_ext fused CUDA kernels: unsupported dtype ", t);
  }
}

// Row chunks of x as fused-kernel operands: f(start, rows, xc, op) with xc the chunk as a
// rows x D_pad tensor (x itself when it is already contiguous, aligned and D % 32 == 0, else a
// zero-padded copy) and w padded once per call (used in place when already in that layout).
template <typename T, typename F>
void for_each_chunk(const at::Tensor& x, const at::Tensor& w, int64_t chunk, F&& f) {
  using E = typename Mma<T>::elem;
  const int64_t N = x.size(0), D = x.size(1), C = w.size(1);
  if (N == 0) return;
  const int64_t d_pad = round_up(D, kPadD), ldw = round_up(C, kPadC);
  auto aligned = [](const at::Tensor& t) {
    return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  };
  // w as it is when it already has the padded layout (e.g. D = 768, C = 1000), else a copy.
  at::Tensor wp = w;
  if (!(w.is_contiguous() && D == d_pad && C == ldw && aligned(w))) {
    wp = at::zeros({d_pad, ldw}, w.options());
    wp.narrow(0, 0, D).narrow(1, 0, C).copy_(w);
  }
  const bool direct = x.is_contiguous() && D == d_pad && aligned(x);
  const int64_t cs = chunk_rows(chunk, N, C);
  at::Tensor xbuf = direct ? at::Tensor() : at::zeros({cs, d_pad}, x.options());
  for (int64_t start = 0; start < N; start += cs) {
    const int64_t rows = std::min(cs, N - start);
    at::Tensor xc = direct ? x.narrow(0, start, rows) : xbuf.narrow(0, 0, rows);
    if (!direct) xc.narrow(1, 0, D).copy_(x.narrow(0, start, rows));
    const Operands<T> op{reinterpret_cast<const E*>(xc.data_ptr()), rows, d_pad,
                         reinterpret_cast<const E*>(wp.data_ptr()), ldw, d_pad, C};
    f(start, rows, xc, op);
  }
}

// Pass 1 for one chunk: lse[rows] (fp32) and, when given, arg[rows] and confident[rows].
template <typename T>
void row_stats(const Operands<T>& op, float inv_tau, const float* bias, float alpha,
               at::Tensor& lse, int64_t* arg, uint8_t* confident) {
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t row_blocks = (op.rows + kBM - 1) / kBM, tiles = (op.C + kBN - 1) / kBN;
  // Split the classes over CTAs so that the grid fills whole waves of the resident CTA slots
  // (occupancy API: 1 CTA of this kernel per SM with its shared memory, not an assumed 2).
  allow_smem(row_stats_kernel<T>, Layout<T>::kSmem);
  const int64_t slots = resident_slots(row_stats_kernel<T>, Layout<T>::kSmem);
  const int64_t splits = class_splits(row_blocks, tiles, slots);
  const int64_t per_split = (tiles + splits - 1) / splits;
  auto opts = lse.options();
  at::Tensor pm = at::empty({splits, op.rows}, opts), ps = at::empty({splits, op.rows}, opts);
  at::Tensor pa = at::empty({splits, op.rows}, opts.dtype(at::kLong));
  row_stats_kernel<T><<<dim3(row_blocks, splits), kThreads, Layout<T>::kSmem, stream>>>(
      op, inv_tau, bias, static_cast<int>(per_split), pm.data_ptr<float>(), ps.data_ptr<float>(),
      pa.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  row_stats_merge_kernel<float><<<(op.rows + 255) / 256, 256, 0, stream>>>(
      pm.data_ptr<float>(), ps.data_ptr<float>(), pa.data_ptr<int64_t>(), static_cast<int>(splits),
      op.rows, alpha, lse.data_ptr<float>(), arg, confident);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Pass 2's 1-D grid: every (row block, class tile), class tiles fastest (tile_epilogue_kernel).
template <typename T>
dim3 epilogue_grid(const Operands<T>& op) {
  const int64_t blocks = ((op.rows + kBM - 1) / kBM) * ((op.C + kBN - 1) / kBN);
  TORCH_CHECK(blocks < (int64_t(1) << 31), "inmap_ext fused kernels: chunk too large (", blocks,
              " tiles); pass a smaller chunk_size");
  return dim3(static_cast<unsigned>(blocks));
}

// Pass 2 for one chunk: P (rows x C, x's dtype), one-hot where confident when kThreshold.
template <typename T, bool kThreshold>
void probs(const Operands<T>& op, float inv_tau, const float* bias, const at::Tensor& lse,
           const int64_t* arg, const uint8_t* confident, at::Tensor& p) {
  constexpr Epilogue kEpi = kThreshold ? Epilogue::kProbsThreshold : Epilogue::kProbs;
  const dim3 grid = epilogue_grid(op);
  allow_smem(tile_epilogue_kernel<T, kEpi>, Layout<T>::kSmem);
  tile_epilogue_kernel<T, kEpi><<<grid, kThreads, Layout<T>::kSmem,
                                  at::cuda::getCurrentCUDAStream()>>>(
      op, inv_tau, bias, lse.data_ptr<float>(), arg, confident,
      reinterpret_cast<typename Mma<T>::elem*>(p.data_ptr()), nullptr, nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Pass 2 for the Sinkhorn statistic: column log-sum-exp partials [row blocks x C] of v - lse.
template <typename T>
void column_lse_partials(const Operands<T>& op, float inv_tau, const float* bias,
                         const at::Tensor& lse, at::Tensor& part_m, at::Tensor& part_s) {
  constexpr Epilogue kEpi = Epilogue::kColumnLse;
  const dim3 grid = epilogue_grid(op);
  allow_smem(tile_epilogue_kernel<T, kEpi>, Layout<T>::kSmem);
  tile_epilogue_kernel<T, kEpi><<<grid, kThreads, Layout<T>::kSmem,
                                  at::cuda::getCurrentCUDAStream()>>>(
      op, inv_tau, bias, lse.data_ptr<float>(), nullptr, nullptr, nullptr,
      part_m.data_ptr<float>(), part_s.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace fused
}  // namespace cuda
}  // namespace inmap
