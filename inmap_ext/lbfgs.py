"""The default solver of step 5: Riemannian L-BFGS on the product of unit spheres.

The objective is the published one (solver.py): the cross-entropy between softmax(X W / tau_i)
and the pseudo labels,

    f(W) = (sum_i lse_i - <W, B> / tau_i) / N,     Euclidean gradient  E = (X^T Q - B) / (N tau_i),

on the same constraint, every column of W of unit norm. One evaluation of (f, E) is one pass
over the features (``Runner.xt_softmax``: the pass that gives the gradient also gives the row
log-sum-exps, so the objective costs nothing extra), and a pass is the whole cost of an
iteration: everything else here is D x C arithmetic.

The start: the published descent starts at the text proxies T, on the far side of the modality
gap. The objective has one minimiser whatever the start, so L-BFGS starts where the pseudo labels
put the classes in image space: w_j = B_j / ||B_j||, the normalised pseudo-label mean of class j
(B = X^T P is already computed; a class without pseudo-label mass keeps t_j). Measured on the
four real files (docs/method.md): 10 to 20 fewer passes than from T for the same objective.

The method (Absil, Mahony & Sepulchre 2008, ch. 4 and 8; Huang, Gallivan & Absil 2015):
- Riemannian gradient: the Euclidean one projected on the tangent space of every column,
  g_j = E_j - (w_j . E_j) w_j.
- Direction: d = -H g, H the L-BFGS inverse Hessian model of the last ``HISTORY`` pairs
  (s, y) = (W_t - W, g_t - g) with H0 = (s.y / y.y) I (Barzilai-Borwein), computed in its compact
  form (Byrd, Nocedal & Schnabel 1994; ``_History``); the first direction is -g with the
  published first step (``lr``: the first iterate equals the published descent's first step).
  The pairs are kept as computed, not transported to each new point: d = -H g is a descent
  direction whatever the pairs' tangent spaces (<d, g> = -<H g, g> < 0 for positive definite
  H), and a component of d_j along w_j only rescales column j's step before the retraction's
  normalisation. Transporting the 2 x HISTORY pairs by projection every iteration was most of
  the solver's own arithmetic (2 x HISTORY D x C sweeps bound by memory bandwidth, ~10 ms of an
  iteration at D x C = 512 x 1000) for no fewer passes and the same accuracy (measured on the 23
  sets of bench/stopping.py and synthetic problems; docs/method.md).
- Retraction: W + t d with every column normalised (the published update's normalisation).
- Step length t: 1 (``lr`` on the first iteration), shortened by safeguarded quadratic
  interpolation until the Armijo condition f(W_t) <= f(W) + c1 t <g, d> holds; each trial is
  one pass, and the accepted trial's gradient is the next iterate's (no pass is repeated).
- A pair is kept only when s.y > 0 (the curvature condition), so H stays positive definite;
  a non-descent direction restarts from -g. The search also ends (converged to working
  precision) once a trial's predicted decrease t |<g, d>| is below ``ROUNDING`` ulps of f.

Stopping (``stop="auto"``): after an iteration, once the objective fell by at most
``OBJECTIVE_RTOL`` (relative) over the last ``WINDOW`` iterations, or after ``MAX_PASSES``
passes. ``tol`` (optional, with either rule) stops after an iteration whose largest per-class
proxy change is below it. No prediction pass is needed: the rule reads the objectives the
passes already gave. Its measured bound on real features is in
docs/method.md ("The default solver"). ``stop="none"`` runs until ``max_passes`` passes.

Every quantity the steps depend on comes out of ``Runner.xt_softmax``, which sums over the rows
of every rank (sharded fits) and over the streamed chunks, so every rank takes the same steps and
a sharded or streamed fit equals the in-memory one. The solver's own D x C arithmetic runs on
every rank; its direction and the scalars its branches read (objective, slope, curvature
products, step cap) are agreed across ranks (``_agreed``), so that ranks whose arithmetic rounds
differently (different CPUs or GPUs) still take the same steps: one more all-reduce of D x C
and a few scalars per iteration.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

Tensor = torch.Tensor

HISTORY = 10            # (s, y) pairs kept: 2 x 10 x D x C floats of memory
ARMIJO_C1 = 1e-4        # sufficient decrease of the line search
WINDOW = 5              # iterations over which the stopping rule measures the decrease
OBJECTIVE_RTOL = 1e-3   # stop once the objective fell by at most this (relative) over WINDOW
MAX_PASSES = 80         # ... or after this many passes (stop="auto"): measured on the real files,
                        # the predictions have settled well before (docs/method.md)
MIN_STEP = 1e-10        # a step length below this ends the search (rounding floor)
ROUNDING = 16           # ... as does a predicted decrease t |<g, d>| below ROUNDING ulps of f:
                        # the objective cannot show it (float32 reaches that on flat problems)
STEP_CAP = 1e3          # the longest trial step along any column (tangent length): beyond it
                        # the normalised column is the direction itself to 1e-6 (extreme lr or
                        # tau_i would otherwise overflow float32 in the step)


def _tangent(W: Tensor, E: Tensor) -> Tensor:
    """Project E (D x C) on the tangent space of the unit sphere at every column of W."""
    return torch.addcmul(E, W, torch.linalg.vecdot(W, E, dim=0), value=-1)


def _inner(a: Tensor, b: Tensor) -> Tensor:
    """<a, b> as a tensor of the working dtype, without a D x C temporary."""
    return torch.dot(a.reshape(-1), b.reshape(-1))


def _dot(a: Tensor, b: Tensor) -> float:
    """<a, b> by the BLAS dot of the working dtype; recomputed in float64 where the working
    dtype's products underflow or overflow (the ends of the temperature ranges)."""
    v = float(_inner(a, b))
    if v == 0.0 or not math.isfinite(v):
        v = float(torch.dot(a.reshape(-1).double(), b.reshape(-1).double()))
    return v


def _agreed(runner, *values: float):
    """``values`` as every rank of a sharded fit sees them: the ranks' largest. Each rank
    computes the solver's D x C arithmetic itself from the same all-reduced quantities, so the
    values agree to the last bit where the ranks' arithmetic is the same; on ranks whose
    arithmetic rounds differently (different CPU or GPU kernels) they could differ by a
    rounding and send the ranks down different branches, and so to different collectives (a
    hang). The identity in one process."""
    if runner.group is None:
        return values if len(values) > 1 else values[0]
    t = runner.max_(torch.tensor(values, dtype=torch.float64, device=runner.device))
    out = tuple(float(v) for v in t.tolist())
    return out if len(out) > 1 else out[0]


def _retract(W: Tensor, t: float, d: Tensor) -> Tensor:
    return torch.nn.functional.normalize(W + t * d, dim=0, eps=1e-12)


class _Evaluator:
    """f(W) and the Euclidean gradient from one pass; records the history per pass."""

    def __init__(self, runner, x, B, tau_i, n, max_passes, bar):
        self.runner, self.x, self.B, self.tau_i, self.n = runner, x, B, tau_i, n
        self.max_passes, self.bar = max_passes, bar
        dt, dev = B.dtype, B.device
        self.objective = torch.empty(max_passes, dtype=dt, device=dev)
        self.grad_norm = torch.empty(max_passes, dtype=dt, device=dev)
        self.step = torch.empty(max_passes, dtype=dt, device=dev)
        self.passes = 0

    @property
    def spent(self) -> bool:
        return self.passes >= self.max_passes

    def __call__(self, W: Tensor, t: float):
        XtQ, lse_sum = self.runner.xt_softmax(self.x, W, 1.0 / self.tau_i)
        G = XtQ - self.B
        f = (lse_sum.to(G.dtype) - _inner(W, self.B) / self.tau_i) / self.n
        k = self.passes
        self.objective[k], self.grad_norm[k], self.step[k] = f, torch.linalg.vector_norm(G), t
        self.passes += 1
        if self.bar is not None:
            self.bar.update(1)
        return _agreed(self.runner, float(f)), G / (self.n * self.tau_i)


def start(B: Tensor, text: Tensor) -> Tensor:
    """The starting proxy: every class's normalised pseudo-label mean B_j / ||B_j|| (a class
    with no pseudo-label mass, e.g. one known absent, starts at its text proxy)."""
    norms = torch.linalg.vector_norm(B, dim=0, keepdim=True)
    tiny = norms <= torch.finfo(B.dtype).tiny ** 0.5
    return torch.where(tiny, text, B / torch.where(tiny, torch.ones_like(norms), norms))


def minimize(runner, x: Tensor, w0: Tensor, B: Tensor, tau_i: float, n: int, *,
             max_passes: int, lr: float, stop: str = "auto", tol: Optional[float] = None,
             bar=None):
    """Riemannian L-BFGS from ``w0``; returns (W, objective, grad_norm, step, passes, converged,
    reason), the histories one entry per pass."""
    capped = stop == "auto" and max_passes > MAX_PASSES
    if capped:
        max_passes = MAX_PASSES
    ev = _Evaluator(runner, x, B, tau_i, n, max_passes, bar)
    ulp = torch.finfo(B.dtype).eps
    W = w0.clone()
    f, E = ev(W, 0.0)
    g = _tangent(W, E)
    pairs = _History(HISTORY)
    fs = [f]                       # objective at every accepted iterate
    while not ev.spent:
        d, first = pairs.direction(g), not pairs
        if runner.group is not None:                 # one direction on every rank (_agreed)
            d = runner.max_(d)
        slope = _agreed(runner, _dot(d, g))
        if not (slope < 0 and math.isfinite(slope)):   # not a descent direction: restart
            pairs.clear()
            d, first = -g, True
            slope = _agreed(runner, _dot(d, g))
        if not slope < 0:
            return _out(W, ev, True, "the Riemannian gradient vanished (a stationary point)")
        t = lr if first else 1.0
        longest = _agreed(runner, float(torch.linalg.vector_norm(d, dim=0).max()))
        t = min(t, STEP_CAP / max(longest, 1e-300))
        while True:
            W_t = _retract(W, t, d)
            f_t, E_t = ev(W_t, t)
            if f_t <= f + ARMIJO_C1 * t * slope or ev.spent:
                break
            denom = 2.0 * (f_t - f - slope * t)      # quadratic through f, slope and f_t
            t_new = -slope * t * t / denom if denom > 0 and math.isfinite(denom) else 0.1 * t
            t = min(max(t_new, 0.1 * t), 0.5 * t)
            if t < MIN_STEP or -t * slope <= ROUNDING * ulp * abs(f):
                return _out(W, ev, True, "the line search found no decrease above the "
                            "rounding of the objective (converged to working precision)")
        if not f_t <= f + ARMIJO_C1 * t * slope:      # the pass budget ran out mid-search
            break
        g_t = _tangent(W_t, E_t)
        s, y = W_t - W, g_t - g
        sy, yy, ss = _agreed(runner, _dot(s, y), _dot(y, y), _dot(s, s))
        if math.isfinite(sy) and yy > 0 and sy > 1e-10 * math.sqrt(ss * yy):
            pairs.append(s, y, sy, yy)
        change = (_agreed(runner, float(torch.linalg.vector_norm(s, dim=0).max()))
                  if tol is not None else None)
        W, f, g = W_t, f_t, g_t
        fs.append(f)
        if change is not None and change < tol:
            return _out(W, ev, True, f"the largest per-class proxy change {change:.2e} < "
                        f"tol={tol}")
        if stop == "auto" and len(fs) > WINDOW:
            rel = (fs[-1 - WINDOW] - f) / max(abs(f), 1e-30)
            if rel <= OBJECTIVE_RTOL:
                return _out(W, ev, True, f"settled after {ev.passes} passes ({len(fs) - 1} "
                            f"iterations): over the last {WINDOW} iterations the objective fell "
                            f"by {rel:.1e} (relative, <= {OBJECTIVE_RTOL:g})")
    if capped:
        return _out(W, ev, True, f"stopped at the rule's cap of {MAX_PASSES} passes (the "
                    f"objective still fell by more than {OBJECTIVE_RTOL:g} over {WINDOW} "
                    "iterations)")
    return _out(W, ev, False, f"reached the cap of iters={max_passes} passes before the "
                "stopping rule fired" if stop == "auto" else f"ran every one of {max_passes} "
                "passes")


class _History:
    """The last ``m`` pairs (s, y) and their inner products, and d = -H g from them.

    H is the L-BFGS inverse Hessian model with H0 = gamma I, gamma = s.y / y.y of the newest
    pair: the matrix the two-loop recursion applies (Nocedal & Wright, alg. 7.4), here in the
    compact form of Byrd, Nocedal & Schnabel (1994, eq. 3.1),

        H g = gamma g + S R^-T ((Dg + gamma Y^T Y) R^-1 S^T g - gamma Y^T g) - gamma Y R^-1 S^T g,

    S, Y the pairs as columns (oldest first), R the upper triangle of S^T Y, Dg its diagonal.
    The pairs live in one buffer (2m rows of D x C), so that S^T g and Y^T g, and the products
    of a new y with every pair (R's new column, Y^T Y's new row), take one read of the pairs
    (the products of (g, y) with S and with Y), and the combination a second. The two-loop
    recursion reads each pair twice and rewrites g 2m times (bound by memory bandwidth: ~10 ms
    of an iteration at D x C = 512 x 1000, one thread). The m x m algebra runs in float64; R's
    diagonal, the pairs' s.y, is positive (``minimize`` keeps a pair only then), so R is
    invertible. The pairs are never changed once stored (no transport), so their products are
    computed once."""

    def __init__(self, m: int):
        self.m = m
        self.buf: Optional[Tensor] = None   # rows [0, m): s by slot; [m, 2m): y by slot
        self.order: list = []               # slots, oldest pair first
        self.SY = torch.zeros(m, m, dtype=torch.float64)   # s_slot_i . y_slot_j
        self.YY = torch.zeros(m, m, dtype=torch.float64)   # y_slot_i . y_slot_j
        self.gamma = 1.0
        self.pending: Optional[int] = None  # slot of the newest pair, its products not yet

    def __len__(self) -> int:
        return len(self.order)

    def clear(self) -> None:
        self.order, self.pending = [], None

    def append(self, s: Tensor, y: Tensor, sy: float, yy: float) -> None:
        if self.buf is None:
            self.buf = s.new_zeros(2 * self.m, s.numel())
        slot = len(self.order) if len(self.order) < self.m else self.order.pop(0)
        self.buf[slot].copy_(s.reshape(-1))
        self.buf[self.m + slot].copy_(y.reshape(-1))
        self.order.append(slot)
        self.pending, self.gamma = slot, sy / yy

    def direction(self, g: Tensor) -> Tensor:
        """-H g (-g without pairs)."""
        if not self.order:
            return -g
        k, m = len(self.order), self.m
        S, Y = self.buf[:k], self.buf[m:m + k]      # slots [0, k): filled in order from 0
        if self.pending is None:
            V = g.reshape(1, -1)
        else:
            V = torch.stack([g.reshape(-1), self.buf[m + self.pending]])
        Sv = (V @ S.T).double().cpu()          # (g, y_new) against every stored s, by slot
        Yv = (V @ Y.T).double().cpu()
        if self.pending is not None:
            j = self.pending
            self.SY[:k, j] = Sv[1]
            self.YY[:k, j] = Yv[1]
            self.YY[j, :k] = Yv[1]
            self.pending = None
        o = torch.tensor(self.order)
        SY, YY = self.SY[o][:, o], self.YY[o][:, o]
        R = torch.triu(SY)
        u, v = Sv[0][o], Yv[0][o]
        p = torch.linalg.solve_triangular(R, u[:, None], upper=True)[:, 0]
        w = torch.diagonal(SY) * p + self.gamma * (YY @ p) - self.gamma * v
        c_s = torch.linalg.solve_triangular(R.T, w[:, None], upper=False)[:, 0]
        c_y = -self.gamma * p
        coef = torch.zeros(2 * k, dtype=torch.float64)   # by slot: S rows, then Y rows
        coef[o] = c_s
        coef[k + o] = c_y
        coef = coef.to(device=g.device, dtype=g.dtype)
        Hg = torch.addmv(g.reshape(-1), S.T, coef[:k], alpha=1.0, beta=self.gamma)
        Hg.addmv_(Y.T, coef[k:])
        return Hg.neg_().reshape(g.shape)


def _out(W, ev, converged, reason):
    k = ev.passes
    return W, ev.objective[:k], ev.grad_norm[:k], ev.step[:k], k, converged, reason
