// The whole op set of inmap_ext, in one place. Kernels register per device:
//   csrc/cpu/*_cpu.cpp   TORCH_LIBRARY_IMPL(inmap_ext, CPU, m)
//   csrc/cuda/*_cuda.cu  TORCH_LIBRARY_IMPL(inmap_ext, CUDA, m)
// Python wrappers, fake (meta) kernels and the pure-torch twin of every op: inmap_ext/_ops.py
// and inmap_ext/reference.py.
//
// Every op is one pattern over rows of x (N x D) against columns of w (D x C):
//   Z = x @ w * inv_tau (+ bias per column) -> row softmax -> a reduction,
// processed `chunk` rows at a time so that no N x C matrix is ever allocated.
#include <torch/library.h>

#include "cpu/bf16_gemm.h"
#include "cpu/bf16x3.h"
#include "design_choice.h"

TORCH_LIBRARY(inmap_ext, m) {
  // log of the column sums of row-softmax(x @ w * inv_tau + bias): a length-C vector.
  // Computed in the log domain, so a column whose probabilities all underflow stays finite.
  m.def("softmax_column_lse(Tensor x, Tensor w, Tensor? bias, float inv_tau, int chunk) -> Tensor");
  // P = row-softmax(x @ w * inv_tau + bias); rows whose largest entry is > alpha become the
  // one-hot of their argmax. Returns (x^T @ P [D x C], column sums of P [C],
  // argmax counts [C] int64, number of one-hot rows [] int64).
  m.def("pseudo_label_reduce(Tensor x, Tensor w, Tensor? bias, float inv_tau, float alpha, int chunk)"
        " -> (Tensor, Tensor, Tensor, Tensor)");
  // x^T @ row-softmax(x @ w * inv_tau): D x C, the data term of the proxy gradient, and the
  // sum over rows of log sum_j exp((x @ w * inv_tau)_ij) [] (the rows' log-sum-exps, which the
  // softmax computes anyway: the objective of the fit without a second GEMM).
  m.def("xt_softmax(Tensor x, Tensor w, float inv_tau, int chunk) -> (Tensor, Tensor)");
  // Top-k of x @ w per row: (values [N x k], indices [N x k] int64).
  m.def("topk_scores(Tensor x, Tensor w, int k, int chunk) -> (Tensor, Tensor)");
  // One read of stored logits (inmap_ext/logit_store.py): e = exp(Z - row max), rows x C in
  // float64, float32 or bfloat16, and class weights b (C, float64 for a float64 e, else
  // float32). Returns (col [C]: sum_i e_ij / r_i with r_i = sum_j e_ij b_j, rmin []: min_i r_i),
  // in b's dtype. b K x C (several balancings in lockstep): col [K x C] and rmin [K], each row
  // k what b[k] alone gives, from one read of e. CPU kernel only: on CUDA the torch twin (a
  // conversion and two cuBLAS matrix-vector products per vector, at the GPU's memory
  // bandwidth) runs.
  m.def("stored_column_sums(Tensor e, Tensor b) -> (Tensor, Tensor)");
  // The scoring read of the same store against K class-weight vectors b (K x C): per row i and
  // candidate k, (mass [rows x K]: sum_j e_ij b_kj, top [rows x K] int64: argmax_j e_ij b_kj,
  // the first of equal ones). CPU kernel only, as above.
  m.def("stored_row_scores(Tensor e, Tensor b) -> (Tensor, Tensor)");
  // Whether the fused CUDA design may run (csrc/design_choice.h): pure, no tensors, any build.
  m.def("fused_design_allowed(bool design_fused, bool dtype_ok, int device_major, int ptx_version)"
        " -> bool", &inmap::fused_design_allowed);
  // Whether the CPU kernels take bfloat16 features (precision="bf16" on the CPU: a bfloat16 GEMM
  // with float32 output in this torch build; csrc/cpu/bf16_gemm.h): pure, no tensors.
  m.def("cpu_bf16_gemm_available() -> bool", &inmap::cpu::bf16_gemm_available);
  // The calling thread's switch of the CPU kernels' float32 GEMMs to three bfloat16 GEMMs each
  // (precision="bf16x3", csrc/cpu/bf16x3.h): sets it, returns what it was. No tensors.
  m.def("cpu_bf16x3(bool on) -> bool", &inmap::cpu::set_bf16x3);
  m.def("cpu_bf16x3_enabled() -> bool", &inmap::cpu::bf16x3_enabled);
}
