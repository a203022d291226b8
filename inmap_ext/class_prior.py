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
- ``"auto"``      decides from the unlabeled data alone (below).

``"auto"`` is a decision under uncertainty, made with the data's own probabilities. Each candidate
prior is also a model of the set: the zero-shot posteriors (``"none"``: CLIP's classifier is
right as it is), the uniform-balanced ones (``"uniform"``: the set is balanced and CLIP's
per-class biases are to be corrected) and the estimate-balanced ones (``"estimate"``: CLIP is
unbiased and the set holds its estimated proportions). From unlabeled images alone a per-class
bias and a class proportion are the same thing (both are a per-class shift of the logits), so no
statistic of the zero-shot logits can say which model is right; but each model says how many of
the *other* candidates' pseudo labels it expects to be right. ``auto`` picks the candidate whose
pseudo labels have the highest expected accuracy under an equal-weight mixture of the models
(``expected_accuracies``: A[c, h] = mean_i P_h(argmax_j P_c(j | x_i) | x_i)). The numbers are
probabilities of the set itself, so the rule is the same in every model's cosine units, class
count and set size; equal weights are the prior odds of a decision with no reason to favour any
candidate, and the only constant.

The same pass gives the standard error of each runner-up's margin over the images. A runner-up
within ``CLOSE_CALL`` (two) standard errors is a close call: the images could not tell the two
apart. It never changes the decision (that would be a threshold on noise); it is reported
(``ClassPrior.close_calls``), so that what the user knows about the set can decide.

One guard, for a failure the mixture cannot see: EM on flat or biased posteriors collapses the
proportions onto a few "hub" classes (the known failure of maximum-likelihood label-shift
estimation with uncalibrated posteriors, Alexandari et al., ICML 2020), and the collapsed model is
then confident in itself. The estimate is a candidate only if its pseudo labels still span at
least ``KEPT_CLASSES`` (half) of the effective number of classes the zero-shot predictions span:
an estimate that removes more than half of what the classifier itself sees has stopped
describing the set and describes the classifier's hubs.

Cost: the EM estimate (at most ``EM_ITERS`` column log-sum-exp reads, usually far fewer), two
Sinkhorn balancings (``sinkhorn_iters`` reads each, the first shared; run in lockstep, so that a
read of stored logits serves both: ``sinkhorn_iters - 1`` reads for the two) and one scoring read
(``expected_accuracies``, which also counts the argmax classes). The reads are of the logits
stored once (logit_store.py) within a memory budget (beyond it, of the rows it holds, the
others' computed again per read; else passes over the features). No N x C matrix beyond that
budget; every backend, sharded (every rank reduces the same sums, so every rank decides the
same) and streamed fits.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Optional, Tuple, Union

import torch

from .functional import sinkhorn
from .reference import acc_dtype

Tensor = torch.Tensor

CLASS_PRIORS = ("auto", "uniform", "estimate", "none")
KEPT_CLASSES = 0.5         # auto: least share of the zero-shot predictions' effective classes the
                           # estimate-balanced predictions must keep to be a candidate (see above)
CLOSE_CALL = 2.0           # auto: a runner-up within this many standard errors of the chosen
                           # candidate is reported as a close call (the conventional two-sided
                           # 95% bound); it never changes the decision, only what the user is told
EM_ITERS = 100             # EM iterations of the prior estimate (stops earlier when settled)
EM_TOL = 0.01              # ... once no class proportion moves by more than this share of a
                           # uniform class share (1/C) in an iteration: scale-free in C
SQUAREM_UNTIL = 10         # EM is accelerated until a step is below this many EM_TOLs


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
        """The pseudo labels were balanced to estimated proportions that hold at most half of
        the listed classes: the set appears to hold only part of the class list."""
        p = self.estimated_proportions
        return (self.chosen == "estimate" and p is not None
                and _effective(p) <= 0.5 * p.numel())

    @property
    def assumption(self) -> str:
        """In one sentence, what the fit assumed about the set and what to pass if you know
        otherwise: the unlabeled images cannot tell a class proportion of the set from a bias of
        CLIP's classifier, so every fit rests on an assumption (docs/class_prior.md)."""
        if self.chosen == "none":
            return ("Assumed: the set's classes are as CLIP's zero-shot classifier sees them (its "
                    "own class marginal kept, no balancing). If the set holds every listed class "
                    "about equally, pass class_prior='uniform' (--class-prior uniform); if you "
                    "know its proportions or which classes it holds, pass them (a class-prior "
                    "file).")
        if self.chosen == "uniform":
            return ("Assumed: the set holds every listed class about equally (every class "
                    "balanced to 1/C, the published method). If it holds part of the class list "
                    "or holds it unevenly, pass class_prior='none' or the known proportions (a "
                    "class-prior file).")
        if self.chosen == "estimate":
            return (f"Assumed: the set holds the classes in the proportions estimated from it "
                    f"(about {self.effective_classes:.0f} of {self.zero_shot_proportions.numel()} "
                    "classes). If it holds every listed class about equally, pass "
                    "class_prior='uniform' (--class-prior uniform); if you know its proportions "
                    "or which classes it holds, pass them (a class-prior file).")
        return ("Assumed: the class proportions you gave (classes given 0 are absent). Nothing "
                "was decided from the images.")

    @property
    def close_calls(self) -> list:
        """The other candidates of ``auto`` whose expected accuracy was within ``CLOSE_CALL``
        standard errors of the chosen one's: the data did not tell them apart, so what the user
        knows about the set (balanced? part of the class list?) should decide."""
        return close_calls_of(self.stats)

    def to(self, device) -> "ClassPrior":
        mv = lambda v: None if v is None else v.to(device)  # noqa: E731
        return ClassPrior(self.requested, self.chosen, self.reason, mv(self.target),
                          mv(self.zero_shot_proportions), mv(self.estimated_proportions),
                          dict(self.stats))

    def summary(self) -> dict:
        """JSON-ready: what ran, why, and the statistics (proportions as lists)."""
        out = {"requested": self.requested, "chosen": self.chosen,
               "assumption": self.assumption, "reason": self.reason,
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
           sinkhorn_iters: int, gamma: float, n: int, store: bool = True, labeled=None,
           progress: bool = False) -> Tuple[Optional[Tensor], ClassPrior, Optional[tuple]]:
    """The Sinkhorn log-bias beta of the pseudo labels (None: not balanced), the record of
    what was targeted and, where labeled images favour another candidate than the one they
    would keep, that kept candidate's (beta, record) for the fit to judge both fits by
    (labeled.confirm; else None). ``class_prior`` as returned by ``check_class_prior``.
    ``store``: read the zero-shot logits from one pass kept in memory (logit_store.py, within
    its budget) instead of a pass over the features per read (False: ``mode="paper"``, the
    published arithmetic).
    ``labeled``: (indices, labels) of a few labeled rows (labeled.py) that settle ``auto``.
    ``progress``: a tqdm bar of the reads of the logits (a store read, or a pass where there is
    no store) with the decision's passes so far."""
    bar = _bar(progress, class_prior, store)
    try:
        out = _choose_reading(runner, x, t, class_prior, tau_t, sinkhorn_iters, gamma, n,
                              store, labeled, bar)
    finally:
        if bar is not None:
            bar.close()
    return out


def _bar(progress: bool, class_prior, store: bool):
    """The decision's progress bar (None without ``progress``)."""
    if not progress:
        return None
    from tqdm.auto import tqdm

    name = "given" if isinstance(class_prior, torch.Tensor) else class_prior
    bar = tqdm(desc=f"class prior ({name})", unit="read")
    bar.set_postfix_str("storing the logits (1 pass)" if store else "a pass per read")
    return bar


def _choose_reading(runner, x, t, class_prior, tau_t, sinkhorn_iters, gamma, n, store, labeled,
                    bar):
    from .logit_store import PassSource, StoredLogits

    inv_tau = 1.0 / tau_t
    source = (StoredLogits.build(runner, x, t, inv_tau) if store
              else PassSource(runner, x, t, inv_tau))
    if bar is not None:
        where = (f"logits stored ({str(source.dtype).replace('torch.', '')}, "
                 f"{source.nbytes / 2**30:.2f} GiB)" if source.stored else "a pass per read")

        def on_read():
            bar.update(1)
            bar.set_postfix_str(f"{where}; passes {runner.passes.get('decision', 0)}",
                                refresh=False)

        source.on_read = on_read
    judge = None                 # labeled.py: the labeled rows' right answers per candidate
    if labeled is not None:
        from .labeled import right_per_candidate

        judge = functools.partial(right_per_candidate, runner, x, t, inv_tau, labeled=labeled)
    beta, prior, alternative = _choose(source, runner, t, class_prior, sinkhorn_iters, gamma, n,
                                       judge)
    if source.stored:
        room = ("" if source.capacity is None else
                f"; memory budget {source.capacity / 2**30:.2f} GiB")
        prior.stats["logits"] = (f"stored once ({str(source.dtype).replace('torch.', '')}, "
                                 f"{source.nbytes / 2**20:.1f} MiB{room})")
        if source.recomputes:
            prior.stats["logits"] += (f" for {source.rows_kept} of {source.rows_total} rows (the "
                                      "memory budget's share); the other rows' logits computed "
                                      f"again at each of {source.reads_recomputed} reads")
        if source.reads_on_passes:
            prior.stats["logits"] += (f"; {source.reads_on_passes} reads out of the store's "
                                      "range made with passes")
    else:
        prior.stats["logits"] = "a pass over the features per read"
    if bar is not None:
        bar.set_postfix_str(f"{prior.chosen}; passes {runner.passes.get('decision', 0)}",
                            refresh=False)
    return beta, prior, alternative


def _choose(source, runner, t, class_prior, sinkhorn_iters, gamma, n, judge=None):
    C = t.shape[1]
    dt = t.dtype
    log_zs = source.column_lse(None) - math.log(n)   # zero-shot class shares
    zs = _proportions(log_zs)
    stats = {"coverage": round(_effective(zs) / C, 4)}

    def record(chosen, reason, log_q=None, estimate=None):
        target = None if log_q is None else torch.exp(log_q).cpu()
        return ClassPrior(requested, chosen, reason, target, zs, estimate, stats)

    requested = "given" if isinstance(class_prior, torch.Tensor) else class_prior
    if requested == "none" or sinkhorn_iters == 0:
        why = "sinkhorn_iters=0" if sinkhorn_iters == 0 else "class_prior='none'"
        return None, record("none", f"no balancing ({why})"), None

    def balance(log_q):
        return sinkhorn(source.column_lse, sinkhorn_iters, log_q, n, log_zs)

    if requested == "given":
        log_q = torch.log(class_prior).to(device=t.device, dtype=dt)
        return balance(log_q), record("given", "class proportions given by the caller",
                                      log_q), None
    if requested == "uniform":
        log_q = uniform_log_target(log_zs, gamma)
        return balance(log_q), record("uniform", "the published target (class_prior='uniform')",
                                      log_q), None
    if requested == "estimate":
        log_pi = estimate_log_proportions(source, C, n, dt, t.device, log_zs)
        return balance(log_pi), record("estimate", "class proportions estimated by EM "
                                       "(class_prior='estimate')", log_pi,
                                       _proportions(log_pi)), None
    if C == 1:
        return None, record("none", "a single class: nothing to balance"), None
    return _auto(source, runner, t, n, stats, balance, uniform_log_target(log_zs, gamma),
                 record, judge, log_zs)


CANDIDATES = ("none", "uniform", "estimate")


def _auto(source, runner, t, n, stats, balance, log_u, record, judge=None, log_zs=None):
    """class_prior="auto" (module docstring): the candidate with the highest expected accuracy
    under the equal mixture of the candidates' posterior models; the estimate only if it does
    not collapse."""
    log_pi = estimate_log_proportions(source, t.shape[1], n, t.dtype, t.device, log_zs)
    # the two balancings in lockstep: one read of stored logits per iteration serves both
    # (each gets what its own balancing gives; logit_store.StoredLogits.column_lse)
    beta_u, beta_pi = balance(torch.stack([log_u, log_pi]))
    betas = {"none": torch.zeros_like(log_u), "uniform": beta_u, "estimate": beta_pi}
    A, counts, M = expected_accuracies(runner, source, t.shape[1], list(betas.values()))
    A, M = A / n, M / n
    kept = _effective(counts[2].cpu()) / max(_effective(counts[0].cpu()), 1e-12)
    stats["estimate_kept_classes"] = round(kept, 4)
    allowed = [0, 1] + ([2] if kept >= KEPT_CLASSES else [])
    score = {CANDIDATES[c]: float(A[c, allowed].mean()) for c in allowed}
    stats["expected_accuracy"] = {k: round(v, 4) for k, v in score.items()}
    chosen = max(score, key=score.get)     # ties: the first of none, uniform, estimate
    stats["margin"] = _margins(A.double(), M, allowed, CANDIDATES.index(chosen), n)
    estimate = _proportions(log_pi) if 2 in allowed else None   # a collapsed one is not shown
    pct = ", ".join(f"{k} {100 * v:.1f}%" for k, v in score.items())
    close = close_calls_of(stats)
    if close:
        pct += (f"; a close call: {' and '.join(close)} within {CLOSE_CALL:g} standard errors, "
                "so what you know about the set should decide")
    why = (f"expected accuracy of the pseudo labels under the candidates' own posteriors: {pct}"
           + ("" if 2 in allowed else
              f"; the estimate was left out: its predictions keep {kept:.0%} (< "
              f"{KEPT_CLASSES:.0%}) of the classes the zero-shot predictions span (EM "
              "collapsed onto a few classes)"))
    alternative = None
    if judge is not None:
        from .labeled import decide, uniform_vetoed

        R, Mr, k, L = judge(list(betas.values()), (log_zs, log_u))
        unlabeled_choice = chosen
        chosen, stats["labeled"], how, kept = decide(CANDIDATES, R, Mr, k, chosen, allowed, L)
        stats["labeled_balance"] = {"log_likelihood_zero_shot_shares": round(float(L[0]), 3),
                                    "log_likelihood_uniform": round(float(L[1]), 3),
                                    "uniform_left_out": uniform_vetoed(L)}
        stats["unlabeled_choice"] = unlabeled_choice
        stats["decided_by"] = ("unlabeled rule" if chosen == unlabeled_choice
                               else "labeled images")
        if chosen != kept:        # fit.py judges both candidates' fits (labeled.confirm)
            alternative = _candidate(kept, f"{how}; unlabeled rule: {why}", betas, log_u,
                                     log_pi, estimate, record)
        why = f"{how}; unlabeled rule: {why}"
    beta, prior = _candidate(chosen, why, betas, log_u, log_pi, estimate, record)
    if judge is not None:     # each candidate's runners-up (close calls) against itself
        for cand in [prior] + ([alternative[1]] if alternative is not None else []):
            best = CANDIDATES.index(cand.chosen)
            cand.stats = dict(cand.stats, margin=_margins(
                A.double(), M, sorted(set(allowed) | {best}), best, n))
    return beta, prior, alternative


def _candidate(name, why, betas, log_u, log_pi, estimate, record):
    """(beta, ClassPrior) of the auto candidate ``name``."""
    if name == "none":
        return None, record("none", f"no balancing ({why})", estimate=estimate)
    if name == "uniform":
        return betas["uniform"], record("uniform", f"balanced to the uniform prior ({why})",
                                        log_u, estimate)
    return betas["estimate"], record("estimate", f"balanced to the class proportions "
                                     f"estimated from the set ({why})", log_pi, estimate)


def expected_accuracies(runner, source, C: int, betas) -> Tuple[Tensor, Tensor, Tensor]:
    """One read of the logits Z (``source``: logit_store.py) for K candidate log-biases beta_k
    of softmax(Z + beta_k): A[c, h] = sum_i P_h(argmax_j P_c(j | x_i) | x_i) (K x K, summed over
    the rows of every rank), the argmax counts of every candidate (K x C) and the second moments
    M = sum_i v_i v_i^T (K^2 x K^2) of the per-image vectors v_i[c * K + h] = P_h(argmax P_c | x_i),
    from which the standard error of any comparison of candidates follows
    (``_margins``). A chunk x C block at a time, never N x C beyond what the source stores: a
    stored block by one read (``stored_row_scores``), a pass's logits in torch."""
    K = len(betas)
    dt = acc_dtype(runner.dtype)
    B = torch.stack([b.to(device=runner.device, dtype=dt) for b in betas])
    A = torch.zeros(K * K, dtype=dt, device=runner.device)
    M = torch.zeros(K * K, K * K, dtype=torch.float64, device=runner.device)  # a variance comes
                                                  # from it by a difference: summed in float64
    counts = torch.zeros(K, C, dtype=torch.int64, device=runner.device)
    Bx = (torch.exp((B - B.amax(dim=1, keepdim=True)).to(source.work)) if source.stored
          else None)                                 # b_k = exp(beta_k - max beta_k)
    for kind, z in source.scoring_chunks(betas):
        v, top = None, None
        if kind == "exp":                            # z = E = exp(Z - row max): no exp or log
            v, top = _judged_exp(z, Bx, K, source.r_floor, source.row_scores)
        if v is None:                                # z = Z - row max (or E out of its range)
            v, top = _judged_log(z if kind == "log" else torch.log(z.to(source.work)), B, K)
        for c in range(K):
            counts[c].index_add_(0, top[c], torch.ones_like(top[c]))   # no host sync
        A += v.sum(0)
        M += (v.T @ v).double()
    return runner.sum_(A.reshape(K, K)), runner.sum_(counts), runner.sum_(M)


def _judged_log(z: Tensor, B: Tensor, K: int):
    """Per row of z = Z - row max: v[:, c * K + h] = P_h(argmax P_c) (softmax(z + B_h)) and the
    argmaxes, in the log domain."""
    top = [torch.argmax(z + B[c], dim=1) for c in range(K)]
    v = torch.empty(z.shape[0], K * K, dtype=B.dtype, device=z.device)
    for h in range(K):
        lse = torch.logsumexp(z + B[h], dim=1)
        for c in range(K):
            zc = z.gather(1, top[c][:, None])[:, 0] + B[h][top[c]]
            v[:, c * K + h] = torch.exp(zc - lse)
    return v, top


def _judged_exp(e: Tensor, Bx: Tensor, K: int, r_floor: float, row_scores):
    """``_judged_log`` from a stored chunk E = exp(Z - row max) and b_k = exp(beta_k - max):
    softmax(Z + beta_h)_ij = E_ij b_hj / r_hi with r_h = E b_h, and argmax_j P_c = argmax_j
    E_ij b_cj, both from one read of the chunk (``row_scores``: logit_store.py), no exp or log;
    (None, None) when some row's r_h is below ``r_floor`` (its underflowed terms could matter:
    the log domain decides that chunk)."""
    r, top = row_scores(e, Bx)                       # rows x K each
    if not bool((r >= r_floor).all()):
        return None, None
    top = [top[:, c] for c in range(K)]
    v = torch.empty(e.shape[0], K * K, dtype=Bx.dtype, device=e.device)
    for c in range(K):
        ec = e.gather(1, top[c][:, None])[:, 0].to(Bx.dtype)
        for h in range(K):
            v[:, c * K + h] = ec * Bx[h][top[c]] / r[:, h]
    return v, top


def close_calls_of(stats: dict) -> list:
    """The runners-up of ``auto`` (stats["margin"]) within CLOSE_CALL standard errors."""
    return [c for c, m in stats.get("margin", {}).items() if m["margin"] < CLOSE_CALL * m["se"]]


def _margins(A: Tensor, M: Tensor, allowed, best: int, n: int) -> dict:
    """For every other allowed candidate: how much higher the chosen candidate's expected
    accuracy is (a mean over the images of the mixture-judged difference d_i) and the standard
    error of that mean, sqrt(var(d_i) / n), from the first (A) and second (M) moments of the
    per-image judged accuracies (both already divided by n)."""
    K = A.shape[0]
    out = {}
    for c in allowed:
        if c == best:
            continue
        w = torch.zeros(K * K, dtype=A.dtype, device=A.device)
        for h in allowed:
            w[best * K + h] += 1.0 / len(allowed)
            w[c * K + h] -= 1.0 / len(allowed)
        d = float(w @ A.reshape(-1))
        var = max(float(w @ M @ w) - d * d, 0.0)
        out[CANDIDATES[c]] = {"margin": round(d, 6), "se": round(math.sqrt(var / n), 6)}
    return out


def uniform_log_target(log_zs: Tensor, gamma: float) -> Tensor:
    """The published target: log(1/C), or with gamma > 0 the zero-shot shares ^ gamma."""
    if gamma > 0:
        log_q = gamma * log_zs
        return log_q - torch.logsumexp(log_q, dim=0)
    return torch.full_like(log_zs, -math.log(log_zs.shape[0]))


def estimate_log_proportions(source, C: int, n: int, dtype, device,
                             log_zs: Optional[Tensor] = None) -> Tensor:
    """log pi of the EM fixed point pi_j = mean_i softmax(z_i + log pi)_j (z_i = x_i T / tau_t,
    read from ``source``: logit_store.py), started from the uniform prior: the
    maximum-likelihood class proportions of the set under CLIP's zero-shot posteriors. Each EM
    iteration is one column log-sum-exp read; at most ``EM_ITERS``.

    Accelerated by SQUAREM (Varadhan & Roland 2008, scheme S3: from two EM steps r, v, the
    extrapolated point pi - 2 a r + a^2 v with a = min(-1, -|r| / |v|), plain EM where it leaves
    the simplex) while EM's steps are large, and finished by plain EM once a step moves no
    proportion by more than ``SQUAREM_UNTIL`` times the tolerance: EM stops before its fixed
    point (``EM_TOL``), and where it stops decides the collapse guard on knife-edge sets, so
    the last stretch is EM's own path. Measured on the robustness bench's 122 real sets: 1.3x
    fewer reads, every guard outcome as with plain EM (docs/class_prior.md).

    ``log_zs`` (the zero-shot class shares' logs, log mean_i softmax(z_i), which the decision
    reads first): EM's first step from the uniform prior is exactly that read (a constant bias
    leaves the softmax as it is; on stored logits the same bits), so it is taken from there
    instead of reading the logits again."""
    read = [0]
    first = None if log_zs is None else log_zs.to(dtype=dtype, device=device)

    def em(log_p):
        nonlocal first
        read[0] += 1
        if first is not None:                       # the uniform start's step: log_zs
            new, first = first, None
        else:
            new = source.column_lse(log_p) - math.log(n)
        return new - torch.logsumexp(new, dim=0)     # exact normalisation against rounding

    def step(a, b):
        return float((torch.exp(a) - torch.exp(b)).abs().max()) * C

    def finish(log_p):                               # plain EM to its own stopping rule
        while read[0] < EM_ITERS:
            new = em(log_p)
            settled, log_p = step(new, log_p) < EM_TOL, new
            if settled:
                break
        return log_p

    def settle(new, old):                            # None: go on accelerating
        d = step(new, old)
        return new if d < EM_TOL else finish(new) if d < SQUAREM_UNTIL * EM_TOL else None

    log_pi = torch.full((C,), -math.log(C), dtype=dtype, device=device)
    while read[0] < EM_ITERS:
        p1 = em(log_pi)
        done = settle(p1, log_pi)
        if done is not None:
            return done
        p2 = em(p1)
        done = settle(p2, p1)
        if done is not None or read[0] >= EM_ITERS:
            return p2 if done is None else done
        e0, e1, e2 = torch.exp(log_pi), torch.exp(p1), torch.exp(p2)
        r, v = e1 - e0, e2 - 2 * e1 + e0
        a = min(-1.0, -float(torch.linalg.vector_norm(r) / torch.linalg.vector_norm(v).clamp_min(
            torch.finfo(v.dtype).tiny)))
        q = e0 - 2 * a * r + a * a * v
        if not bool((q > 0).all()):                  # off the simplex: the EM step instead
            log_pi = p2
            continue
        q = torch.log(q / q.sum())
        p3 = em(q)
        done = settle(p3, q)
        if done is not None:
            return done
        log_pi = p3
    return log_pi


def _proportions(log_p: Tensor) -> Tensor:
    return torch.softmax(log_p.double(), dim=0).cpu()


def _effective(p: Tensor) -> float:
    """exp(entropy) of the distribution proportional to ``p`` (masses or counts)."""
    p = p.double()
    p = p / p.sum()
    nz = p[p > 0]
    return float(torch.exp(-(nz * torch.log(nz)).sum()))
