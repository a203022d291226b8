// CUDA kernel of inmap_ext::softmax_column_lse (schema and meaning: csrc/inmap.cpp).
// Chunked design, per chunk, z = xc @ w -> row log-sum-exp (row kernel, kLse) -> per-(row split, column) online
// log-sum-exp partials of z * inv_tau + bias - lse_row -> merged in a fixed order into the
// running column state. Fused design (design.cuh): row log-sum-exp by fused::row_stats, then
// per-(row block, column) partials from recomputed tiles, merged the same way. No atomics:
// results are deterministic.
#include <torch/library.h>

#include "design.cuh"

namespace inmap {
namespace cuda {
namespace {

constexpr int kCols = 32, kRowGroups = 8;

template <typename acc_t>
__global__ void __launch_bounds__(kCols * kRowGroups) column_lse_partial_kernel(
    const acc_t* __restrict__ z, const acc_t* __restrict__ row_lse, int64_t rows, int64_t C,
    acc_t inv_tau, const acc_t* __restrict__ bias, int64_t rows_per_split,
    acc_t* __restrict__ part_m, acc_t* __restrict__ part_s) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kCols + threadIdx.x;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * rows_per_split;
  const int64_t r1 = std::min<int64_t>(rows, r0 + rows_per_split);
  Lse<acc_t> st{-std::numeric_limits<acc_t>::infinity(), acc_t(0)};
  if (j < C) {
    const acc_t b = bias ? bias[j] : acc_t(0);
    for (int64_t i = r0 + threadIdx.y; i < r1; i += kRowGroups)
      st.add(z[i * C + j] * inv_tau + b - row_lse[i]);
  }
  __shared__ acc_t sm[kRowGroups][kCols], ss[kRowGroups][kCols];
  sm[threadIdx.y][threadIdx.x] = st.m;
  ss[threadIdx.y][threadIdx.x] = st.s;
  __syncthreads();
  if (threadIdx.y == 0 && j < C) {
    for (int g = 1; g < kRowGroups; ++g) st.merge(Lse<acc_t>{sm[g][threadIdx.x], ss[g][threadIdx.x]});
    part_m[blockIdx.y * C + j] = st.m;
    part_s[blockIdx.y * C + j] = st.s;
  }
}

at::Tensor softmax_column_lse_cuda(const at::Tensor& x, const at::Tensor& w_in,
                                   const c10::optional<at::Tensor>& bias_in, double inv_tau,
                                   int64_t chunk) {
  check_cuda_inputs(x, w_in, bias_in, chunk, "softmax_column_lse");
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor w = w_in.contiguous();
  const auto acc = acc_type(x.scalar_type());
  const int64_t C = w.size(1);
  at::Tensor bias = bias_in.has_value() ? bias_in->to(acc).contiguous() : at::Tensor();
  at::Tensor run_m = at::full({C}, -std::numeric_limits<double>::infinity(), x.options().dtype(acc));
  at::Tensor run_s = at::zeros({C}, x.options().dtype(acc));
  const int64_t cs = chunk_rows(chunk, x.size(0), C);
  const auto stream = at::cuda::getCurrentCUDAStream();
  if (use_fused(x)) {
    const int64_t blocks = (cs + fused::kBM - 1) / fused::kBM;
    at::Tensor lse_buf = at::empty({cs}, x.options().dtype(at::kFloat));
    at::Tensor part_m = at::empty({blocks, C}, x.options().dtype(at::kFloat));
    at::Tensor part_s = at::empty({blocks, C}, x.options().dtype(at::kFloat));
    const float* bp = bias.defined() ? bias.data_ptr<float>() : nullptr;
    fused::dispatch(x.scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      fused::for_each_chunk<T>(x, w, chunk, [&](int64_t, int64_t rows, const at::Tensor&,
                                                const fused::Operands<T>& op) {
        at::Tensor lse = lse_buf.narrow(0, 0, rows);
        fused::row_stats<T>(op, static_cast<float>(inv_tau), bp, 0.f, lse, nullptr, nullptr);
        fused::column_lse_partials<T>(op, static_cast<float>(inv_tau), bp, lse, part_m, part_s);
        column_lse_merge_kernel<float><<<(C + 255) / 256, 256, 0, stream>>>(
            part_m.data_ptr<float>(), part_s.data_ptr<float>(), (rows + fused::kBM - 1) / fused::kBM,
            C, run_m.data_ptr<float>(), run_s.data_ptr<float>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
    return run_m + at::log(run_s);
  }
  // Row splits per chunk: enough blocks to fill the GPU, each split >= 64 rows, and the
  // partial buffers (splits x C, two of them) within 64 MiB.
  const int64_t elt = acc == at::kDouble ? 8 : 4;
  const int64_t max_splits = std::max<int64_t>(
      1, std::min<int64_t>({256, (cs + 63) / 64, (int64_t(64) << 20) / (2 * elt * C)}));
  at::Tensor lse_buf = at::empty({cs}, x.options().dtype(acc));
  at::Tensor part_m = at::empty({max_splits, C}, x.options().dtype(acc));
  at::Tensor part_s = at::empty({max_splits, C}, x.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "softmax_column_lse_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* bp = bias.defined() ? bias.data_ptr<acc_t>() : nullptr;
    for_each_chunk(x, w, chunk, [&](int64_t, int64_t rows, const at::Tensor&, at::Tensor& z) {
      row_softmax_kernel<acc_t, scalar_t, RowMode::kLse><<<rows, kThreads, 0, stream>>>(
          z.data_ptr<acc_t>(), C, static_cast<acc_t>(inv_tau), bp, nullptr,
          lse_buf.data_ptr<acc_t>(), acc_t(0), nullptr, nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const int64_t splits = std::min<int64_t>(max_splits, (rows + 63) / 64);
      const int64_t per_split = (rows + splits - 1) / splits;
      const dim3 grid((C + kCols - 1) / kCols, splits);
      column_lse_partial_kernel<acc_t><<<grid, dim3(kCols, kRowGroups), 0, stream>>>(
          z.data_ptr<acc_t>(), lse_buf.data_ptr<acc_t>(), rows, C, static_cast<acc_t>(inv_tau),
          bp, per_split, part_m.data_ptr<acc_t>(), part_s.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      column_lse_merge_kernel<acc_t><<<(C + 255) / 256, 256, 0, stream>>>(
          part_m.data_ptr<acc_t>(), part_s.data_ptr<acc_t>(), splits, C,
          run_m.data_ptr<acc_t>(), run_s.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return run_m + at::log(run_s);
}

}  // namespace

TORCH_LIBRARY_IMPL(inmap_ext, CUDA, m) { m.impl("softmax_column_lse", &softmax_column_lse_cuda); }

}  // namespace cuda
}  // namespace inmap
