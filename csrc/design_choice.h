// Whether the fused CUDA design (design (a), csrc/cuda/fused_tiles.cuh) may run: a pure function
// of what was asked and what the device and the loaded kernel image are, so that it can be
// tested without a GPU (op inmap_ext::fused_design_allowed, registered in csrc/inmap.cpp).
#pragma once
#include <cstdint>

namespace inmap {

// design_fused: INMAP_CUDA_DESIGN == "fused"; dtype_ok: fp16, bf16, or fp32 with TF32 allowed;
// device_major: the GPU's compute capability major; ptx_version: the PTX version of the fused
// kernels' image loaded for that GPU (cudaFuncAttributes::ptxVersion, e.g. 90). The kernels'
// bodies exist only when built for sm_80+ (WMMA bf16/tf32, cp.async).
inline bool fused_design_allowed(bool design_fused, bool dtype_ok, int64_t device_major,
                                 int64_t ptx_version) {
  return design_fused && dtype_ok && device_major >= 8 && ptx_version >= 80;
}

}  // namespace inmap
