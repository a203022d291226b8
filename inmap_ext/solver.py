"""Step 5 of the method: gradient descent on the vision proxy, and when to stop it.

The update is the published one (DESIGN.md step 5): W <- normalise(W - eta / (N tau_i) G) with
G = X^T softmax(X W / tau_i) - B, eta halved whenever ||G|| grows. What is new is knowing the
objective, the cross-entropy between softmax(X W / tau_i) and the pseudo labels P,

    f(W) = (1/N) sum_i [ logsumexp_j(x_i w_j / tau_i) - sum_j P_ij x_i w_j / tau_i ]
         = (sum_i lse_i - <W, B> / tau_i) / N,                   (B = X^T P)

whose row log-sum-exps the gradient pass already computes (``xt_softmax`` returns their sum),
so it costs nothing extra, and a stopping rule built on it:

``stop="auto"`` (the default fit): every ``CHECK_EVERY`` steps, stop once both
- the objective fell by at most ``OBJECTIVE_RTOL`` (relative) over those steps, and
- at most ``PREDICTION_TOL`` of the images changed their predicted class over those steps
  (one top-1 pass over the features per check, about half a step).
Measured on real CLIP features (README "Time to solution") this stops after 150-300 steps with
the accuracy of all 2000 published steps. ``stop="none"`` runs every one of ``iters`` steps
(``mode="paper"``). ``tol`` (optional, either rule) stops after a step whose largest per-class
proxy change is below it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

Tensor = torch.Tensor

STOP_RULES = ("auto", "none")
SOLVERS = ("lbfgs", "gd")   # the default fit's solver (lbfgs.py) and the published descent
CHECK_EVERY = 10          # steps between two checks of the stopping rule
OBJECTIVE_RTOL = 2e-3     # relative decrease of the objective over CHECK_EVERY steps
PREDICTION_TOL = 5e-4     # share of images whose prediction changed over CHECK_EVERY steps


@dataclass
class Descent:
    proxy: Tensor
    grad_norm: Tensor       # ||G||_F per pass
    lr: Tensor              # eta per step (gd), the trial step length per pass (lbfgs)
    objective: Tensor       # f(W) per pass, at the W the pass's gradient was taken
    n_iters: int            # passes over the features (gd: one per step)
    converged: bool         # stopped by a rule (auto or tol), not by the iters cap
    stop_reason: str


def solve(runner, x: Tensor, w0: Tensor, B: Tensor, tau_i: float, iters: int, lr: float,
          n: int, *, solver: str = "lbfgs", stop: str = "auto", tol: Optional[float] = None,
          progress: bool = False) -> Descent:
    """Minimise the objective with ``solver``: "lbfgs" (lbfgs.py, the default fit's: at most
    ``iters`` passes, from the pseudo labels' class means) or "gd" (the published descent below
    from ``w0``, the text proxies: at most ``iters`` steps)."""
    if solver == "gd" or iters == 0:     # no pass: the start, the text proxies, as published
        return descend(runner, x, w0, B, tau_i, iters, lr, n, stop=stop, tol=tol,
                       progress=progress)
    from .lbfgs import minimize, start

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(desc="vision proxy (L-BFGS)", unit="pass")
    W, obj, gn, step, k, converged, reason = minimize(
        runner, x, start(B, w0), B, tau_i, n, max_passes=iters, lr=lr, stop=stop, tol=tol, bar=bar)
    if bar is not None:
        bar.set_postfix_str(f"objective {float(obj[-1]):.5f}" if k else "", refresh=False)
        bar.close()
    return Descent(W, gn, step, obj, k, converged, reason)


def descend(runner, x: Tensor, w0: Tensor, B: Tensor, tau_i: float, iters: int, lr: float,
            n: int, *, stop: str = "auto", tol: Optional[float] = None,
            progress: bool = False) -> Descent:
    """Run the published descent from ``w0`` (D x C) for at most ``iters`` steps."""
    device, dt = w0.device, w0.dtype
    W = w0.clone()
    eta = torch.tensor(lr, dtype=dt, device=device)
    prev = torch.tensor(float("inf"), dtype=dt, device=device)
    scale = torch.tensor(n * tau_i, dtype=dt, device=device)
    grad_norm = torch.empty(iters, dtype=dt, device=device)
    lr_used = torch.empty(iters, dtype=dt, device=device)
    objective = torch.empty(iters, dtype=dt, device=device)
    bar = None
    steps = range(iters)
    if progress:
        from tqdm.auto import tqdm

        steps = bar = tqdm(steps, desc="vision proxy", unit="step")
    last_pred = None
    n_run, reason = 0, f"ran every one of iters={iters} steps"
    if stop == "auto":
        reason = f"reached the iters={iters} cap before the stopping rule fired"
    for k in steps:
        XtQ, lse_sum = runner.xt_softmax(x, W, 1.0 / tau_i)
        G = XtQ - B
        objective[k] = (lse_sum.to(dt) - (W * B).sum() / tau_i) / n
        g = torch.linalg.vector_norm(G)
        eta = torch.where(g > prev, eta / 2, eta)      # no host sync per step
        prev = g
        W_new = torch.nn.functional.normalize(W - (eta / scale) * G, dim=0, eps=1e-12)
        grad_norm[k] = g
        lr_used[k] = eta
        n_run = k + 1
        if tol is not None:
            change = float(torch.linalg.vector_norm(W_new - W, dim=0).max())
            if change < tol:
                W = W_new
                _close(bar, n_run, "stopped: tol")
                return _done(W, grad_norm, lr_used, objective, n_run, True,
                             f"the largest per-class proxy change {change:.2e} < tol={tol}")
        W = W_new
        if (k + 1) % CHECK_EVERY == 0 and (stop == "auto" or bar is not None):
            f_now = float(objective[k])
            if bar is not None:
                bar.set_postfix(objective=f"{f_now:.5f}", refresh=False)
            if stop == "auto" and k + 1 >= 2 * CHECK_EVERY:
                f_then = float(objective[k + 1 - CHECK_EVERY])
                rel = (f_then - f_now) / max(abs(f_now), 1e-30)
                pred = _predictions(runner, x, W)
                changed = float(runner.sum_((pred != last_pred).sum())) / n
                last_pred = pred
                if rel <= OBJECTIVE_RTOL and changed <= PREDICTION_TOL:
                    _close(bar, n_run, "stopped: settled")
                    return _done(W, grad_norm, lr_used, objective, n_run, True,
                                 f"settled after {n_run} steps: over the last {CHECK_EVERY} "
                                 f"steps the objective fell by {rel:.1e} (relative, <= "
                                 f"{OBJECTIVE_RTOL:g}) and {changed:.2%} of the images changed "
                                 f"their predicted class (<= {PREDICTION_TOL:.2%})")
            elif stop == "auto":
                last_pred = _predictions(runner, x, W)
    return _done(W, grad_norm, lr_used, objective, n_run, False, reason)


def _predictions(runner, x, W) -> Tensor:
    """Top-1 classes for the stopping rule: a pass of its own, counted as a stopping check."""
    phase, runner.phase = runner.phase, "stopping_checks"
    try:
        return runner.topk(x, W, 1)[1][:, 0]
    finally:
        runner.phase = phase


def _close(bar, n_run: int, note: str) -> None:
    """An early stop: the bar shows the steps that ran (tqdm's count lags while iterating)."""
    if bar is not None:
        bar.n = n_run
        bar.set_postfix_str(note, refresh=False)
        bar.close()


def _done(W, grad_norm, lr_used, objective, n_run, converged, reason) -> Descent:
    return Descent(W, grad_norm[:n_run], lr_used[:n_run], objective[:n_run], n_run, converged,
                   reason)
