"""`inmap check`: every compiled kernel (both CUDA designs, and the Triton kernels where they run)
against the pure-torch backend on the first-use probe (verify.py) and on fresh random inputs, on
each device that has kernels; a pass/fail table with errors and timings. The first thing to run
after installing. It is the long form of the check every fit runs on first use, with the same
probe, comparison and tolerances (verify.py). A CUDA build on a machine without a GPU says that
its CUDA kernels were not checked."""
from __future__ import annotations

import contextlib
import math
import time
from typing import List

import torch

from . import _ops, reference, verify
from .verify import REL_TOL  # noqa: F401  (one home for the tolerances)

NO_GPU = "NOT CHECKED: CUDA kernels are built but this machine has no GPU"


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
    """(shape label, dtype, each op's arguments, exact): the first-use probe (exact pseudo-label
    counts: it has no near-ties), then fresh random inputs every run."""
    dtypes = [torch.float32, torch.float64]
    if device.type == "cpu" and _ops.cpu_bf16_available():
        dtypes.append(torch.bfloat16)    # precision="bf16" on the CPU (csrc/cpu/bf16_gemm.h)
    shapes = [(1, 7, 1), (333, 77, 129), (4096, 256, 1000)]
    if device.type == "cuda":
        dtypes = [torch.float32, torch.float16, torch.bfloat16]
        shapes.append((50_000, 768, 1000))
    for dt in dtypes:
        for p in verify.PROBES:
            yield f"probe {p['n']}x{p['d']}x{p['c']}", dt, \
                verify.probe_calls(*verify.probe_inputs(device, dt, p), p), True
    g = torch.Generator().manual_seed(int(time.time()))          # fresh inputs every run
    for n, d, c in shapes:
        for dt in dtypes:
            x = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)
            w = torch.nn.functional.normalize(torch.randn(d, c, generator=g), dim=0)
            b = torch.randn(c, generator=g)
            x = x[_clear_of_alpha(x, w, b, 100.0, 0.6)]
            x, w = x.to(device, dt), w.to(device, _ops.proxy_dtype(dt, device))   # as a fit
            bias = b.to(device, reference.acc_dtype(dt))
            chunk = max(1, min(n, 8192))
            calls = {"softmax_column_lse": (x, w, bias, 100.0, chunk),
                     "pseudo_label_reduce": (x, w, bias, 100.0, 0.6, chunk),
                     "xt_softmax": (x, w, 25.0, chunk),
                     "topk_scores": (x, w, min(5, c), chunk)}
            if device.type == "cpu":         # the CPU-only reads (_ops.CPU_ONLY_OPS)
                stored = verify.stored_probe(x, w, bias, 100.0, weights=2)   # in lockstep
                calls.update(stored_column_sums=stored,
                             stored_row_scores=verify.stored_scores_probe(*stored))
            yield "x".join(map(str, (n, d, c))), dt, calls, False


# Random rows whose largest pseudo-label probability lies this close to alpha are left out of
# the random cases: a kernel's rounding (float32's own ~1e-7 of a logit, bf16x3's ~1e-6, 16 bits'
# more) may put such a row on either side, and one row made one-hot moves X^T P by ~1e-2 of its
# norm, far beyond the tolerance (seen with bf16x3 on 1 of 12 draws of 4096 rows: a check that
# failed by chance). The probes never hold such rows (verify.probe_inputs).
ALPHA_MARGIN = 1e-3


def _clear_of_alpha(x, w, bias, inv_tau, alpha):
    """The rows of x whose largest probability of softmax(x w * inv_tau + bias) is more than
    ``ALPHA_MARGIN`` from alpha (computed in float64)."""
    top = torch.softmax((x.double() @ w.double()) * inv_tau + bias.double(), dim=1).amax(dim=1)
    return (top - alpha).abs() > ALPHA_MARGIN


def run_check(devices=None, verbose=True) -> List[dict]:
    """Compare every op of every device with compiled kernels; returns the table rows."""
    if devices is None:
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() or
                             _ops.ext_available("cuda") else [])
    rows = []
    for dev in map(torch.device, devices):
        if dev.type == "cpu" and not _ops.extension_loaded():   # built, but broken: a failure
            row = _skip(dev, f"the compiled extension failed to load: {_ops.load_error()}")
            rows.append(dict(row, failed=True))
            continue
        if not _ops.ext_available(dev):
            rows.append(_skip(dev, f"no compiled {dev.type} kernels"))
            continue
        if dev.type == "cuda" and not torch.cuda.is_available():
            rows.append(_skip(dev, NO_GPU))
            continue
        for shape, dt, calls, exact in _cases(dev):
            for design in _designs(dev, dt):
                ctx = (_ops.cuda_design(design) if design in _ops.CUDA_DESIGNS else
                       _ops.cpu_bf16x3(True) if design == "bf16x3" else
                       contextlib.nullcontext())
                with ctx:
                    for name, args in calls.items():
                        if name == "topk_scores" and design not in ("-", "chunked"):
                            continue  # one GEMM + torch.topk in every design
                        if design == "bf16x3" and name in _ops.CPU_ONLY_OPS:
                            continue  # reads of stored logits: no GEMM to split
                        if name in _ops.CPU_ONLY_OPS and dev.type != "cpu":
                            continue  # its torch twin runs there
                        rows.append(_check_op(dev, name, args, shape, dt, design, exact))
    if verbose:
        print(format_table(rows))
    return rows


def _skip(dev: torch.device, note: str) -> dict:
    return dict(device=str(dev), op="(all)", shape="", dtype="", rel_err=None, ext_ms=None,
                torch_ms=None, ok=False, note=note)


def _designs(dev: torch.device, dt: torch.dtype) -> List[str]:
    """What runs the ops on ``dev``: on the CPU its kernels ("-"), and for float32 the same with
    each GEMM as three bfloat16 GEMMs ("bf16x3", precision="bf16x3": csrc/cpu/bf16x3.h) where
    this build has them; on CUDA both designs of the compiled kernels (csrc/cuda/design.cuh;
    "fused" takes 16-bit inputs here) and, where Triton runs, the Triton backend
    (triton_ops.py)."""
    if dev.type != "cuda":
        return ["-"] + (["bf16x3"] if dt == torch.float32 and _ops.cpu_bf16x3_available()
                        else [])
    designs = list(_ops.CUDA_DESIGNS) if dt in (torch.float16, torch.bfloat16) else ["chunked"]
    return designs + (["triton"] if _ops.triton_available(dev) is None else [])


def _check_op(dev, name, args, shape, dt, design, exact) -> dict:
    ext = _ops.op(name, "triton" if design == "triton" else "ext")
    ref = getattr(reference, name)
    row = dict(device=str(dev), op=name, design=design, shape=shape,
               dtype=str(dt).replace("torch.", ""), rel_err=None, ext_ms=None, torch_ms=None,
               ok=False, note="")
    try:
        got = ext(*args)
    except Exception as e:     # a raising kernel is a FAIL row; the other ops are still checked
        first = str(e).splitlines()[0][:200] if str(e) else ""
        return dict(row, note=f"raised {type(e).__name__}: {first}", failed=True)
    want = ref(*args)
    if not exact and name == "pseudo_label_reduce":   # random inputs may hold near-ties
        got, want = got[:2], want[:2]
    ok, err, _ = verify.compare(name, got, want, args, REL_TOL[dt])
    return dict(row, rel_err=err if math.isfinite(err) else None, ok=ok,   # JSON-safe
                ext_ms=_time(lambda: ext(*args), dev), torch_ms=_time(lambda: ref(*args), dev))


def failed(row: dict) -> bool:
    """A row that fails the check: a wrong or raising kernel, or an extension that failed to
    load (a row with only a note, e.g. no GPU, was not checked)."""
    return not row["ok"] and (not row["note"] or bool(row.get("failed")))


def format_table(rows) -> str:
    head = f"{'device':6} {'op':20} {'design':8} {'N x D x C':>16} {'dtype':9} {'rel err':>9} " \
           f"{'ext ms':>9} {'torch ms':>9}  result"
    lines = [head, "-" * len(head)]
    for r in rows:
        err = "" if r["rel_err"] is None else f"{r['rel_err']:.1e}"
        ems = "" if r["ext_ms"] is None else f"{r['ext_ms']:.2f}"
        tms = "" if r["torch_ms"] is None else f"{r['torch_ms']:.2f}"
        verdict = "PASS" if r["ok"] else ("FAIL" + (f" {r['note']}" if r["note"] else "")
                                          if failed(r) else
                                          ("" if r["note"] == NO_GPU else "SKIP ") + r["note"])
        lines.append(f"{r['device']:6} {r['op']:20} {r.get('design', '-'):8} {r['shape']:>16} "
                     f"{r['dtype']:9} {err:>9} "
                     f"{ems:>9} {tms:>9}  {verdict}")
    n_pass = sum(r["ok"] for r in rows)
    n_fail = sum(failed(r) for r in rows)
    n_skip = sum(bool(r["note"]) and not failed(r) for r in rows)
    lines.append(f"{n_pass} passed, {n_fail} failed" +
                 (f", {n_skip} not checked" if n_skip else ""))
    if any(r["note"] == NO_GPU for r in rows):
        lines.append("The CUDA kernels were NOT checked: this machine has no GPU, so nothing "
                     "above says they are correct. On a GPU, `inmap check` checks them, and every "
                     "fit checks each one on first use (verify.py; INMAP_VERIFY=0 turns that off).")
    return "\n".join(lines)
