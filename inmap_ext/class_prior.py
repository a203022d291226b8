"""The class prior of the pseudo labels: the class proportions the Sinkhorn balancing targets.

The published method balances the pseudo labels to a uniform prior over every listed class
(``"uniform"``). That is right when the unlabeled set holds every class equally and badly wrong
when it holds part of the class list (mass is forced onto absent classes). This module decides
what to balance to:

- ``"uniform"``   the published target, q_j = 1/C (or, with ``gamma > 0``, the zero-shot class
                  masses raised to gamma: the published option).
- ``"estimate"``  the class proportions of the unlabeled set, estimated by EM on the zero-shot
                  posteriors (Saerens, Latinne & Decaestecker 2002): pi <- mean_i
                  softmax(x_i T / tau_t + log pi), from pi = uniform.
- ``"none"``      no balancing: the pseudo labels are the zero-shot softmax(X T / tau_t).
- a tensor        given proportions (C non-negative numbers; 0 = the class is known absent, its
                  log target is -inf and every kernel keeps it exactly at zero mass).
- ``"auto"``      decides from the unlabeled data alone (the rule below; README "Class prior"
                  has the measurements that chose it).

The auto rule uses two statistics that cost one pass and the uniform balancing itself (and,
before trusting an estimate, two argmax-count passes):
1. coverage = exp(entropy of the zero-shot class masses) / C, the effective share of listed
   classes the set appears to hold. At most ``FEW_CLASSES`` (0.42): few classes are present,
   and the estimated prior is used (it finds the present classes: +7 to +13 points on real
   CLIP features where the uniform target loses 40-50).
   The estimate is trusted only if it does not collapse: its pseudo labels must keep at least
   ``KEPT_CLASSES`` (0.6) of the effective number of classes the zero-shot predictions span
   (measured where it helped: 0.65-1.0; where EM collapsed onto a few "hub" classes of a weak or
   biased zero-shot classifier and lost 5 to 13 points: 0.05-0.57); else no balancing.
2. otherwise, with coverage at least ``FULL_COVERAGE`` (0.7), the spread of the uniform balancing's per-class log-bias beta, as the
   inter-quartile range of tau_t * beta (a cosine). A set that holds every class needs only
   CLIP's own per-class bias corrected (measured spread 0.013-0.016); one that lacks many
   classes needs large pushes onto the absent ones (0.018-0.026). Up to ``BALANCED_SPREAD``
   the uniform target is kept (the published gain, +4 to +8 points); above it the pseudo labels
   are not balanced at all (``"none"``: never below zero-shot, where every fixed target tried
   lost points).

Every statistic is a column log-sum-exp of a biased softmax (``softmax_column_lse``): no N x C
matrix, every backend, sharded and streamed fits alike.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Tuple, Union

import torch

Tensor = torch.Tensor

CLASS_PRIORS = ("auto", "uniform", "estimate", "none")
FEW_CLASSES = 0.42         # auto: coverage at or below which the prior is estimated
FULL_COVERAGE = 0.7        # auto: least coverage for the uniform target ...
BALANCED_SPREAD = 0.017    # ... and the largest IQR of tau_t * beta (cosine) it may need
KEPT_CLASSES = 0.6         # auto: least share of the zero-shot predictions' effective classes
                           # the estimate-balanced pseudo labels must keep (else EM collapsed)
EM_ITERS = 100             # EM iterations of the prior estimate (stops earlier when settled)
EM_TOL = 1e-6              # ... when the largest change of a class proportion is below this


@dataclass
class ClassPrior:
    """What the balancing targeted and why (``VisionProxyResult.class_prior``)."""

    requested: str                       # "auto", "uniform", "estimate", "none" or "given"
    chosen: str                          # what ran: "uniform", "estimate", "none" or "given"
    reason: str
    target: Optional[Tensor]             # the Sinkhorn target q (length C, sums to 1); None: no balancing
    zero_shot_proportions: Tensor        # column sums of softmax(X T / tau_t), normalised
    estimated_proportions: Optional[Tensor] = None   # EM estimate (auto / estimate)
    stats: dict = field(default_factory=dict)

    @property
    def effective_classes(self) -> float:
        """exp(entropy) of the estimated class proportions (of the zero-shot ones without an
        estimate): about how many of the listed classes the set holds."""
        p = self.estimated_proportions
        return _effective(p if p is not None else self.zero_shot_proportions)

    @property
    def few_classes(self) -> bool:
        """The set appears to hold only a small part of the listed classes."""
        return self.stats.get("coverage", 1.0) <= FEW_CLASSES

    def to(self, device) -> "ClassPrior":
        mv = lambda v: None if v is None else v.to(device)  # noqa: E731
        return ClassPrior(self.requested, self.chosen, self.reason, mv(self.target),
                          mv(self.zero_shot_proportions), mv(self.estimated_proportions),
                          dict(self.stats))

    def summary(self) -> dict:
        """JSON-ready: what ran, why, and the statistics (proportions as lists)."""
        out = {"requested": self.requested, "chosen": self.chosen, "reason": self.reason,
               "effective_classes": round(self.effective_classes, 2), **self.stats}
        if self.estimated_proportions is not None:
            out["estimated_proportions"] = [round(v, 6) for v in
                                            self.estimated_proportions.tolist()]
        return out


def check_class_prior(class_prior, num_classes: int):
    """A name of CLASS_PRIORS or C non-negative proportions; returns the name or the
    proportions as a float64 CPU tensor summing to 1. Raises ValueError/TypeError."""
    if isinstance(class_prior, str):
        if class_prior not in CLASS_PRIORS:
            raise ValueError(f"class_prior must be one of {CLASS_PRIORS} or a tensor of C="
                             f"{num_classes} class proportions, got {class_prior!r}")
        return class_prior
    if not isinstance(class_prior, torch.Tensor):
        raise TypeError(f"class_prior must be one of {CLASS_PRIORS} or a tensor of C="
                        f"{num_classes} class proportions, got {type(class_prior).__name__}")
    p = class_prior.detach().to("cpu", torch.float64)
    if p.shape != (num_classes,):
        raise ValueError(f"class_prior must have shape ({num_classes},) (one proportion per "
                         f"class), got {tuple(class_prior.shape)}")
    if not bool(torch.isfinite(p).all()) or bool((p < 0).any()):
        raise ValueError("class_prior must hold finite, non-negative proportions (0 = the "
                         "class is known to be absent)")
    if float(p.sum()) <= 0:
        raise ValueError("class_prior sums to 0: at least one class must have positive mass")
    return p / p.sum()


def choose(runner, x: Tensor, t: Tensor, class_prior: Union[str, Tensor], tau_t: float,
           sinkhorn_iters: int, gamma: float, n: int) -> Tuple[Optional[Tensor], ClassPrior]:
    """The Sinkhorn log-bias beta of the pseudo labels (None: not balanced) and the record of
    what was targeted. ``class_prior`` as returned by ``check_class_prior``."""
    C = t.shape[1]
    inv_tau = 1.0 / tau_t
    dt = t.dtype
    log_zs = runner.column_lse(x, t, None, inv_tau) - math.log(n)   # zero-shot class shares
    zs = _proportions(log_zs)
    stats = {"coverage": round(_effective(zs) / C, 4)}

    def record(chosen, reason, log_q=None, estimate=None):
        target = None if log_q is None else torch.exp(log_q).cpu()
        return ClassPrior(requested, chosen, reason, target, zs, estimate, stats)

    requested = "given" if isinstance(class_prior, torch.Tensor) else class_prior
    if requested == "none" or sinkhorn_iters == 0:
        why = "sinkhorn_iters=0" if sinkhorn_iters == 0 else "class_prior='none'"
        return None, record("none", f"no balancing ({why})")

    def balance(log_q):
        return runner.sinkhorn_log_bias(x, t, tau_t, sinkhorn_iters, log_q, n, log_zs)

    if requested == "given":
        log_q = torch.log(class_prior).to(device=t.device, dtype=dt)
        return balance(log_q), record("given", "class proportions given by the caller", log_q)
    if requested == "uniform":
        log_q = uniform_log_target(log_zs, gamma)
        return balance(log_q), record("uniform", "the published target (class_prior='uniform')",
                                      log_q)
    reason = "class proportions estimated by EM (class_prior='estimate')"
    if requested == "auto":
        if C == 1:
            return None, record("none", "a single class: nothing to balance")
        if stats["coverage"] > FEW_CLASSES:
            log_u = uniform_log_target(log_zs, gamma)
            beta_u = balance(log_u)
            spread = balancing_spread(beta_u, tau_t)
            stats["uniform_spread"] = round(spread, 5)
            if spread <= BALANCED_SPREAD and stats["coverage"] >= FULL_COVERAGE:
                return beta_u, record("uniform", (
                    f"the set appears to hold every class (coverage {stats['coverage']:.0%} >= "
                    f"{FULL_COVERAGE:.0%}, uniform balancing spread {spread:.4f} <= "
                    f"{BALANCED_SPREAD}): balanced to the published uniform prior"), log_u)
            return None, record("none", (
                f"the set appears to hold many but not all classes, or holds them unevenly "
                f"(coverage {stats['coverage']:.0%}, uniform balancing spread {spread:.4f}; "
                f"uniform needs coverage >= {FULL_COVERAGE:.0%} and spread <= "
                f"{BALANCED_SPREAD}): no balancing, since no class prior can be trusted here"))
        reason = (f"the zero-shot predictions cover about {stats['coverage']:.0%} of the listed "
                  f"classes (<= {FEW_CLASSES:.0%}): few classes appear present, so the pseudo "
                  "labels are balanced to the class proportions estimated from the set")
    log_pi = estimate_log_proportions(runner, x, t, tau_t, n)
    beta = balance(log_pi)
    if requested == "auto":
        kept = kept_classes(runner, x, t, beta, inv_tau)
        stats["estimate_kept_classes"] = round(kept, 4)
        if kept < KEPT_CLASSES:
            return None, record("none", (
                f"few classes appear present (coverage {stats['coverage']:.0%}), but the "
                f"estimated proportions collapse the predictions onto {kept:.0%} of the "
                f"classes the zero-shot predictions span (< {KEPT_CLASSES:.0%}): the zero-shot "
                "posteriors are too weak to estimate from, so no balancing"),
                estimate=_proportions(log_pi))
    return beta, record("estimate", reason, log_pi, _proportions(log_pi))


def uniform_log_target(log_zs: Tensor, gamma: float) -> Tensor:
    """The published target: log(1/C), or with gamma > 0 the zero-shot shares ^ gamma."""
    if gamma > 0:
        log_q = gamma * log_zs
        return log_q - torch.logsumexp(log_q, dim=0)
    return torch.full_like(log_zs, -math.log(log_zs.shape[0]))


def estimate_log_proportions(runner, x: Tensor, t: Tensor, tau_t: float, n: int) -> Tensor:
    """log pi of the EM fixed point pi_j = mean_i softmax(x_i T / tau_t + log pi)_j, started
    from the uniform prior: the maximum-likelihood class proportions of the set under CLIP's
    zero-shot posteriors (each iteration is one column log-sum-exp pass)."""
    C = t.shape[1]
    log_pi = torch.full((C,), -math.log(C), dtype=t.dtype, device=t.device)
    for _ in range(EM_ITERS):
        new = runner.column_lse(x, t, log_pi, 1.0 / tau_t) - math.log(n)
        new = new - torch.logsumexp(new, dim=0)      # exact normalisation against rounding
        settled = float((torch.exp(new) - torch.exp(log_pi)).abs().max()) < EM_TOL
        log_pi = new
        if settled:
            break
    return log_pi


def kept_classes(runner, x: Tensor, t: Tensor, beta: Tensor, inv_tau: float) -> float:
    """Effective number of classes (exp entropy of the argmax counts) of the pseudo labels
    balanced by ``beta``, as a share of that of the zero-shot predictions (two passes)."""
    balanced = runner.pseudo_labels(x, t, beta, inv_tau, 1.0)[2]
    zero_shot = runner.pseudo_labels(x, t, None, inv_tau, 1.0)[2]
    return _effective(balanced.cpu()) / max(_effective(zero_shot.cpu()), 1e-12)


def balancing_spread(beta: Tensor, tau_t: float) -> float:
    """Inter-quartile range of tau_t * beta over the classes (a cosine): how unequally the
    uniform balancing had to push the classes."""
    b = (beta.double() * tau_t).cpu()
    b = b[torch.isfinite(b)]
    if b.numel() < 2:
        return 0.0
    q = torch.quantile(b, torch.tensor([0.25, 0.75], dtype=torch.float64))
    return float(q[1] - q[0])


def _proportions(log_p: Tensor) -> Tensor:
    return torch.softmax(log_p.double(), dim=0).cpu()


def _effective(p: Tensor) -> float:
    """exp(entropy) of the distribution proportional to ``p`` (masses or counts)."""
    p = p.double()
    p = p / p.sum()
    nz = p[p > 0]
    return float(torch.exp(-(nz * torch.log(nz)).sum()))
