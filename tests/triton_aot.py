"""Compile the Triton backend's kernels ahead of time for CUDA targets, without a GPU (Triton
ships ptxas), and count the instructions that matter in the PTX. Run with TRITON_INTERPRET
unset: `python tests/triton_aot.py` prints one JSON list (dtype, kernel, cc, counts).

Each kernel is specialised as a launch on contiguous inputs with 16-aligned sizes would be
(unit strides, pointers and leading strides divisible by 16)."""
import json
import re

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from inmap_ext import triton_ops as T

KERNELS = [("row_stats", T._row_stats, {}), ("probs", T._probs, {"THRESHOLD": True}),
           ("column_lse", T._column_lse, {})]


def compile_for(kernel, dtype: str, cc: int, **constexprs):
    elem = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32"}[dtype]
    sig, attrs = {}, {}
    for i, a in enumerate(kernel.arg_names):
        if a in constexprs:
            sig[a] = "constexpr"
            continue
        sig[a] = (elem if a in ("x_ptr", "w_ptr", "p_ptr") else "*i64" if a in ("pa_ptr", "arg_ptr")
                  else "*u8" if a == "conf_ptr" else "*fp32" if a.endswith("_ptr")
                  else "fp32" if a == "inv_tau" else "i32")
        if sig[a].startswith("*") or a in ("sxn", "swd", "spn", "N", "D", "C"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    cfg = T._config({"fp16": T.torch.float16, "bf16": T.torch.bfloat16,
                     "fp32": T.torch.float32}[dtype])
    src = ASTSource(fn=kernel, signature=sig, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", cc, 32),
                          options=dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]))


def main():
    rows = []
    for dtype in ("fp16", "bf16", "fp32"):
        cfg = T._config({"fp16": T.torch.float16, "bf16": T.torch.bfloat16,
                         "fp32": T.torch.float32}[dtype])
        const = dict(BM=cfg["BM"], BN=cfg["BN"], BK=cfg["BK"], HAS_BIAS=True,
                     PRECISION="tf32" if dtype == "fp32" else None, sxd=1, swc=1)
        for name, kernel, extra in KERNELS:
            for cc in (90, 80):
                k = compile_for(kernel, dtype, cc, **const, **extra)
                ptx = k.asm["ptx"]
                rows.append(dict(dtype=dtype, kernel=name, cc=cc, shared=k.metadata.shared,
                                 wgmma=len(re.findall(r"wgmma\.mma_async", ptx)),
                                 mma_sync=len(re.findall(r"\bmma\.sync", ptx)),
                                 cp_async=len(re.findall(r"cp\.async\.c[ag]", ptx))))
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
