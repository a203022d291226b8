"""Self-verification of the compiled ops on first use: kernels that no GPU has run cannot hurt a
user.

The first time a compiled op (``backend="ext"`` on any device, or ``"triton"``) is resolved for a
combination of (op, device, dtype, design), ``resolve`` runs it once on a small probe on that
device and compares it with the pure-torch backend (``reference.py``) on the same device. The
probe (``probe_inputs``) hits the awkward cases: ragged chunks (300 rows in chunks of 128),
C = 133 (two class tiles of 128, the last ragged, not a multiple of 8), D = 45 (not a multiple
of 8 or 32), a -inf log-bias column, rows above the confidence threshold (one-hot) and rows
below it; a second probe has the aligned layout of real features (D = 64, C = 136), where the
fused CUDA design works on the inputs in place. On agreement (``compare``, within ``tolerance``) the combination is remembered for the
process. On disagreement or an exception, one warning names the op, the device, the dtype, the
design and the error, and the combination runs on the pure-torch backend for the rest of the
process: the fit goes on and is right. In a sharded fit the ranks all-reduce a failure flag, so
every rank runs the same backend. ``INMAP_VERIFY=0`` turns the check off (benchmarks);
``inmap check`` (check.py) is the long form, built on the same ``compare`` and ``tolerance``.

The design of a CUDA op is "chunked" or "fused" (``_ops.cuda_design_of``: INMAP_CUDA_DESIGN, the
dtype, TF32, the capability); the CPU kernels are "cpu"; the Triton kernels "triton". The cost
is one probe per combination: a few milliseconds (README, "Self-verification").
"""
from __future__ import annotations

import contextlib
import math
import os
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Tuple

import torch

from . import _ops, reference

ENV = "INMAP_VERIFY"
REPORT = ("please report it at the project's issue tracker with this warning and the output of "
          "`inmap check --json check.json`")

# Relative error ||kernel - torch|| / ||torch|| allowed per input dtype (as in the tests), and
# for float32 through TF32 tensor cores (tests/test_cuda.py: fused fp32).
REL_TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}
TF32_TOL = 2e-3

# The probe: rows x dim x classes, rows per chunk, top-k, 1/tau_t, 1/tau_i, alpha, -inf column.
PROBE = dict(n=300, d=45, c=133, chunk=128, k=3, inv_tau_t=100.0, inv_tau_i=25.0, alpha=0.6,
             dead_class=7, weights=1)
# The same probe in the layout of real CLIP features (D a multiple of 32, C of 8): there the
# fused CUDA design reads x and w in place instead of padded copies, a code path of its own.
# (``weights``: the stored reads' class weights, one vector on the first probe and two read in
# lockstep on the second, the two forms of stored_column_sums a decision uses.)
PROBE_ALIGNED = dict(PROBE, d=64, c=136, weights=2)
PROBES = (PROBE, PROBE_ALIGNED)


def enabled() -> bool:
    """False when INMAP_VERIFY=0 (or "false" / "off"): compiled ops run unchecked."""
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "off", "no")


def uses_tf32(device: torch.device, dtype: torch.dtype) -> bool:
    return (device.type == "cuda" and dtype == torch.float32 and
            torch.backends.cuda.matmul.allow_tf32)


def tolerance(dtype: torch.dtype, tf32: bool = False) -> float:
    return TF32_TOL if tf32 and dtype == torch.float32 else REL_TOL[dtype]


def design_of(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """What would run: "torch", "cpu" (CPU kernels), "chunked" / "fused" (CUDA), "triton"."""
    if backend in ("torch", "triton"):
        return backend
    if device.type == "cuda":
        return _ops.cuda_design_of(device, dtype)
    if device.type == "cpu" and dtype == torch.float32 and _ops.cpu_bf16x3_active():
        return "cpu-bf16x3"          # float32 GEMMs as three bfloat16 GEMMs (precision="bf16x3")
    return device.type


# -- the probe and the comparison (shared with `inmap check`) ---------------------------------
def _tf32_round(t: torch.Tensor) -> torch.Tensor:
    """fp32 rounded to TF32 (10-bit mantissa) as the tensor cores round it, so that the products
    of the probe's inputs are exact whichever way a kernel or cuBLAS rounds: kernel and
    reference then differ only by summation order."""
    return ((t.contiguous().view(torch.int32) + 0x1000) & ~0x1FFF).view(torch.float32)


def probe_inputs(device, dtype, p=PROBE) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x N x D, w D x C, log-bias C with one -inf) in ``dtype`` on ``device``; the same numbers
    every call (fixed seed). Every 4th row lies near a class column (pseudo label above alpha);
    the rest are random. tests/test_verify.py checks that no row is near a tie or near alpha."""
    g = torch.Generator().manual_seed(17)
    w = torch.nn.functional.normalize(torch.randn(p["d"], p["c"], generator=g), dim=0)
    x = torch.randn(p["n"], p["d"], generator=g)
    near = torch.randint(0, p["c"], (p["n"],), generator=g)
    x[::4] = x[::4] * 0.05 + w[:, near[::4]].T
    x = torch.nn.functional.normalize(x, dim=1)
    bias = torch.randn(p["c"], generator=g) * 0.5
    bias[p["dead_class"]] = -math.inf
    # w as a fit passes it (_ops.proxy_dtype)
    x, w = x.to(device, dtype), w.to(device, _ops.proxy_dtype(dtype, device))
    if torch.device(device).type == "cuda" and dtype == torch.float32:
        x, w = _tf32_round(x), _tf32_round(w)
    return x, w, bias.to(device, reference.acc_dtype(dtype))


def probe_calls(x, w, bias, p=PROBE) -> Dict[str, tuple]:
    """Each op's arguments on the probe ``p``."""
    stored = stored_probe(x, w, bias, p["inv_tau_t"], p.get("weights", 1))
    return {"softmax_column_lse": (x, w, bias, p["inv_tau_t"], p["chunk"]),
            "pseudo_label_reduce": (x, w, bias, p["inv_tau_t"], p["alpha"], p["chunk"]),
            "xt_softmax": (x, w, p["inv_tau_i"], p["chunk"]),
            "topk_scores": (x, w, p["k"], p["chunk"]),
            "stored_column_sums": stored,
            "stored_row_scores": stored_scores_probe(*stored)}


def stored_probe(x, w, bias, inv_tau: float, weights: int = 1) -> tuple:
    """(e, b) of stored_column_sums from a probe: e = exp(Z - row max) in x's dtype (the store
    of logit_store.py), b = exp(bias - max bias) with the -inf column as 0; ``weights=2``: b and
    b reversed as a 2 x C matrix (two balancings read in lockstep)."""
    acc = reference.acc_dtype(x.dtype)
    z = (x.to(acc) @ w.to(acc)) * inv_tau
    e = torch.exp(z - z.amax(dim=1, keepdim=True)).to(x.dtype)
    b = torch.exp(bias - bias[torch.isfinite(bias)].max()).to(acc)
    return (e, b) if weights == 1 else (e, torch.stack([b, b.flip(0)]))


def stored_scores_probe(e, b) -> tuple:
    """(e, B) of stored_row_scores from ``stored_probe``'s (e, b): three class-weight vectors
    (the probe's bias, none, and the bias reversed)."""
    b = b if b.dim() == 1 else b[0]
    return e, torch.stack([b, torch.ones_like(b), b.flip(0)])


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want|| over the finite entries of ``want``; inf when the shapes or
    the non-finite entries (a -inf column) differ, or ``got`` has a NaN."""
    if not isinstance(got, torch.Tensor) or got.shape != want.shape:
        return math.inf
    got, want = got.double(), want.double()
    finite = torch.isfinite(want)
    if not torch.equal(torch.isfinite(got), finite) or \
            not torch.equal(got[~finite], want[~finite]):
        return math.inf
    diff = (got[finite] - want[finite]).norm()
    return float(diff / want[finite].norm().clamp_min(1e-30))


OUTPUTS = {"softmax_column_lse": ("column log-sums",),
           "pseudo_label_reduce": ("X^T P", "class mass", "argmax counts", "one-hot rows"),
           "xt_softmax": ("X^T softmax", "log-partition sum"),
           "stored_column_sums": ("column sums", "least row mass"),
           "stored_row_scores": ("row masses", "argmax")}


def compare(name: str, got, want, args, tol: float) -> Tuple[bool, float, str]:
    """(agree, worst relative error, which output) of an op's outputs against the reference's.
    Floating outputs: relative error <= tol. Pseudo-label counts: exact (the probe has no
    near-ties). Top-k: the scores, and the reference scores at the returned indices (ties may
    order differently)."""
    got = got if isinstance(got, tuple) else (got,)
    want = want if isinstance(want, tuple) else (want,)
    if len(got) != len(want):
        return False, math.inf, f"{len(got)} outputs, expected {len(want)}"
    if name == "topk_scores":
        x, w = args[0], args[1]
        acc = reference.acc_dtype(x.dtype)
        idx = got[1].long().clamp(0, w.shape[1] - 1) if got[1].shape == want[1].shape else None
        at_idx = None if idx is None else torch.cat(   # chunked: no N x C matrix
            [torch.gather(xc.to(acc) @ w.to(acc), 1, ic)
             for xc, ic in zip(x.split(4096), idx.split(4096))])
        errs = {"values": rel_err(got[0], want[0]),
                "indices": math.inf if at_idx is None or not torch.equal(idx, got[1]) else
                rel_err(at_idx, want[0])}
    else:
        errs = {}
        for out, a, b in zip(OUTPUTS[name], got, want):
            if b.is_floating_point():
                errs[out] = rel_err(a, b)
            else:
                errs[out] = 0.0 if (isinstance(a, torch.Tensor) and a.shape == b.shape
                                              and torch.equal(a.long(), b)) else math.inf
    worst = max(errs, key=errs.get)
    return errs[worst] <= tol, errs[worst], worst


@dataclass
class Verdict:
    """What the first-use check of one combination found."""
    op: str
    backend: str
    design: str
    device: str
    device_name: str
    dtype: str
    ok: bool
    rel_err: float
    tol: float
    ms: float
    error: str = ""          # the output that disagreed most, or the exception
    raised: bool = False

    def describe(self) -> str:
        what = (f"raised {self.error}" if self.raised else
                f"relative error {self.rel_err:.2e} > tolerance {self.tol:.0e} ({self.error})")
        return (f"the compiled op {self.op} ({self.backend} backend, {self.design} design) "
                f"disagreed with the pure-torch backend on its first-use check on {self.device} "
                f"({self.device_name}), {self.dtype}: {what}")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        cap = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)}, sm_{cap[0]}{cap[1]}"
    return device.type


def _indexed(device) -> torch.device:
    """``device`` with its index ("cuda" -> "cuda:0"), so that a combination has one key."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def _one_thread(device):
    """CPU probes run on one thread: they are too small to share, and on a busy machine the
    threads' synchronisation alone costs 100x the probe."""
    threads = torch.get_num_threads()
    if device.type == "cpu" and threads > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


def check_op(name: str, backend: str, device, dtype) -> Verdict:
    """Run op ``name`` of ``backend`` on the probe and compare with the pure-torch backend."""
    device = _indexed(device)
    tf32 = uses_tf32(device, dtype)
    tol = tolerance(dtype, tf32)
    design = design_of(backend, device, dtype)
    _sync(device)
    t0 = time.perf_counter()
    err, what, ok, raised = math.inf, "", False, False
    try:
        with _one_thread(device):
            err = 0.0
            for p in PROBES:                 # every probe must agree; the worst is reported
                args = probe_calls(*probe_inputs(device, dtype, p), p)[name]
                mine = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
                got = _ops.op(name, backend)(*mine)       # on copies: the reference reads the
                with _ops.allow_tf32(False):              # inputs as given (exact fp32)
                    want = getattr(reference, name)(*args)
                ok, e, out = compare(name, got, want, args, tol)
                changed = [i for i, (a, b) in enumerate(zip(args, mine))
                           if isinstance(a, torch.Tensor) and not torch.equal(a, b)]
                if changed:                            # the more telling diagnosis
                    ok, e, out = False, math.inf, f"the kernel modified its input {changed[0]}"
                if e >= err:
                    err, what = e, f"{out}, probe D={p['d']} C={p['c']}"
                if not ok:
                    break
        _sync(device)
    except Exception as e:  # a raising kernel is a failed check, never a failed fit
        first = str(e).splitlines()[0][:300] if str(e) else ""
        err, ok, what, raised = math.inf, False, f"{type(e).__name__}: {first}", True
    ms = (time.perf_counter() - t0) * 1e3
    return Verdict(name, backend, design, str(device), device_name(device),
                   str(dtype).replace("torch.", "") + (" (TF32)" if tf32 else "")
                   + (" (bf16x3)" if design == "cpu-bf16x3" else ""),
                   ok, err, tol, ms, what, raised)


# -- the memo and the fallback ------------------------------------------------------------------
_MEMO: Dict[tuple, Verdict] = {}
_WARNED: set = set()
_LOCK = threading.Lock()


def verdicts() -> Dict[tuple, Verdict]:
    """Every combination checked in this process so far."""
    return dict(_MEMO)


def clear() -> None:
    """Forget every verdict (tests)."""
    with _LOCK:
        _MEMO.clear()
        _WARNED.clear()


def resolve(name: str, backend: str, device, dtype, group=None) -> Tuple[Callable, dict]:
    """The callable that runs op ``name`` for a resolved ``backend`` on ``device`` / ``dtype``,
    and a record of what runs and why. A compiled op is checked on its first use in this process
    (``check_op``); one that failed runs as the pure-torch op. With a process group, the ranks
    agree: if any rank's check failed, every rank runs the pure-torch op."""
    device = _indexed(device)
    f = _ops.op(name, backend)
    ref = getattr(reference, name)
    design = design_of(backend, device, dtype)
    record = dict(op=name, requested=backend, ran=backend, design=design, verified="-")
    if f is ref:          # nothing compiled runs this op (backend "torch", Triton's top-k)
        return f, record
    ok = True
    if enabled():
        key = (name, backend, str(device), dtype, design, uses_tf32(device, dtype))
        with _LOCK:
            if key not in _MEMO:
                _MEMO[key] = check_op(name, backend, device, dtype)
            verdict = _MEMO[key]
        ok = verdict.ok
        err = verdict.rel_err if math.isfinite(verdict.rel_err) else None  # JSON-safe
        record.update(verified="passed" if ok else "failed", rel_err=err, tol=verdict.tol,
                      check_ms=round(verdict.ms, 3), device_name=verdict.device_name)
        if not ok:
            record["error"] = verdict.error
            _warn_once(key, verdict.describe())
    else:
        record["verified"] = f"off ({ENV}=0)"
    if group is not None and not _all_ok(ok, group, device):
        if ok:
            record["verified"] = "failed on another rank"
            _warn_once((name, backend, design, "rank"),
                       f"the compiled op {name} ({backend} backend, {design} design) failed its "
                       "first-use check on another rank of the process group")
        ok = False
    if ok:
        return f, record
    return ref, dict(record, ran="torch")


def _all_ok(ok: bool, group, device) -> bool:
    from .collective import collective as _collective

    flag = torch.tensor([0 if ok else 1], dtype=torch.int32, device=device)
    _collective(torch.distributed.all_reduce, flag, op=torch.distributed.ReduceOp.MAX,
                group=group)
    return int(flag.item()) == 0


def _warn_once(key, what: str) -> None:
    with _LOCK:
        if key in _WARNED:
            return
        _WARNED.add(key)
    warnings.warn(f"inmap_ext: {what}. This combination runs on the pure-torch backend for the "
                  f"rest of this process (correct, slower); {REPORT}.", RuntimeWarning,
                  stacklevel=4)


def summarize(records: Dict[str, dict], requested: str) -> Tuple[str, dict]:
    """(the backend that ran: "ext", "torch", "triton" or e.g. "ext+torch" when some ops fell
    back; the record for VisionProxyResult.verification / report.json)."""
    ran = sorted({r["ran"] for r in records.values()}) or [requested]
    return "+".join(ran), {"enabled": enabled(), "requested": requested,
                           "ops": {k: dict(v) for k, v in records.items()}}

