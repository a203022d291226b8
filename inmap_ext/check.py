"""`inmap check`: every compiled kernel (both CUDA designs, and the Triton kernels where they run)
against the pure-torch backend on fresh random inputs, on each device that has kernels; a
pass/fail table with errors and timings. The first thing to run after installing."""
from __future__ import annotations

import contextlib
import time
from typing import List

import torch

from . import _ops, reference

# Relative error ||ext - torch|| / ||torch|| allowed per input dtype.
REL_TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("inf")
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _time(fn, device, repeat=3) -> float:
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) / repeat * 1e3


def _cases(device: torch.device):
    dtypes = [torch.float32, torch.float64]
    shapes = [(1, 7, 1), (333, 77, 129), (4096, 256, 1000)]
    if device.type == "cuda":
        dtypes = [torch.float32, torch.float16, torch.bfloat16]
        shapes.append((50_000, 768, 1000))
    g = torch.Generator().manual_seed(int(time.time()))          # fresh inputs every run
    for n, d, c in shapes:
        for dt in dtypes:
            x = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)
            w = torch.nn.functional.normalize(torch.randn(d, c, generator=g), dim=0)
            bias = torch.randn(c, generator=g)
            yield (n, d, c), dt, x.to(device, dt), w.to(device, dt), bias.to(device)


def run_check(devices=None, verbose=True) -> List[dict]:
    """Compare every op of every device with compiled kernels; returns the table rows."""
    if devices is None:
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    for dev in map(torch.device, devices):
        if not _ops.ext_available(dev):
            rows.append(dict(device=str(dev), op="(all)", shape="", dtype="", rel_err=None,
                             ext_ms=None, torch_ms=None, ok=False,
                             note=f"no compiled {dev.type} kernels"))
            continue
        for shape, dt, x, w, bias in _cases(dev):
            chunk = max(1, min(shape[0], 8192))
            acc = reference.acc_dtype(dt)
            calls = {
                "softmax_column_lse": (x, w, bias.to(acc), 100.0, chunk),
                "pseudo_label_reduce": (x, w, bias.to(acc), 100.0, 0.6, chunk),
                "xt_softmax": (x, w, 25.0, chunk),
                "topk_scores": (x, w, min(5, shape[2]), chunk),
            }
            for design in _designs(dev, dt):
                ctx = _ops.cuda_design(design) if design in _ops.CUDA_DESIGNS else \
                    contextlib.nullcontext()
                with ctx:
                    for name, args in calls.items():
                        if name == "topk_scores" and design not in ("-", "chunked"):
                            continue  # one GEMM + torch.topk in every design
                        rows.append(_check_op(dev, name, args, shape, dt, design))
    if verbose:
        print(format_table(rows))
    return rows


def _designs(dev: torch.device, dt: torch.dtype) -> List[str]:
    """What runs the ops on ``dev``: on the CPU its kernels ("-"); on CUDA both designs of the
    compiled kernels (csrc/cuda/design.cuh; "fused" takes 16-bit inputs here) and, where Triton
    runs, the Triton backend (triton_ops.py)."""
    if dev.type != "cuda":
        return ["-"]
    designs = list(_ops.CUDA_DESIGNS) if dt in (torch.float16, torch.bfloat16) else ["chunked"]
    return designs + (["triton"] if _ops.triton_available(dev) is None else [])


def _check_op(dev, name, args, shape, dt, design) -> dict:
    ext = _ops.op(name, "triton" if design == "triton" else "ext")
    ref = getattr(reference, name)
    got, want = ext(*args), ref(*args)
    got = got if isinstance(got, tuple) else (got,)
    want = want if isinstance(want, tuple) else (want,)
    if name == "topk_scores":   # ties may order differently: compare the scores
        err = _rel(got[0], want[0])
    elif name == "pseudo_label_reduce":
        err = max(_rel(got[0], want[0]), _rel(got[1], want[1]))
    else:
        err = _rel(got[0], want[0])
    return dict(device=str(dev), op=name, design=design, shape="x".join(map(str, shape)),
                dtype=str(dt).replace("torch.", ""), rel_err=err,
                ext_ms=_time(lambda: ext(*args), dev), torch_ms=_time(lambda: ref(*args), dev),
                ok=err <= REL_TOL[dt], note="")


def format_table(rows) -> str:
    head = f"{'device':6} {'op':20} {'design':8} {'N x D x C':>16} {'dtype':9} {'rel err':>9} " \
           f"{'ext ms':>9} {'torch ms':>9}  result"
    lines = [head, "-" * len(head)]
    for r in rows:
        err = "" if r["rel_err"] is None else f"{r['rel_err']:.1e}"
        ems = "" if r["ext_ms"] is None else f"{r['ext_ms']:.2f}"
        tms = "" if r["torch_ms"] is None else f"{r['torch_ms']:.2f}"
        verdict = "PASS" if r["ok"] else ("SKIP " + r["note"] if r["note"] else "FAIL")
        lines.append(f"{r['device']:6} {r['op']:20} {r.get('design', '-'):8} {r['shape']:>16} "
                     f"{r['dtype']:9} {err:>9} "
                     f"{ems:>9} {tms:>9}  {verdict}")
    n_pass = sum(r["ok"] for r in rows)
    n_fail = sum((not r["ok"]) and not r["note"] for r in rows)
    lines.append(f"{n_pass} passed, {n_fail} failed")
    return "\n".join(lines)
