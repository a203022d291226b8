"""A few labeled images settle the class prior (``fit_vision_proxy(..., labeled=(indices,
labels))``): what the unlabeled images cannot tell apart (a per-class bias of CLIP's text
classifier and a class proportion of the set are the same logit shift, class_prior.py), labels
for a small random sample of the set can.

With ``class_prior="auto"`` the labeled images first test the one claim the uniform candidate
makes, that every class holds 1/C of the set: the labels' log-likelihood under the uniform
target, sum_j log u(y_j), against under CLIP's own class marginal on the set (the zero-shot
class shares q, which the decision computes anyway), sum_j log q(y_j). Where the labels are less
likely under the uniform target, uniform leaves the candidates (measured on the robustness
bench's sets, 200 random draws of k labeled images each: with k = 100 the draws more than a
point below zero-shot fall from 131 to 47 of 5400 and the mean regret from 0.29 to 0.27; no
constant is fitted). Then the candidates' pseudo labels (argmax of softmax(X T / tau_t +
beta_c), the labels each candidate's fit learns from) are scored on the labeled images: the
candidate with the most labeled images right is chosen. A labeled image's pseudo label costs a
read of one row of logits, not a fit; the pseudo labels' accuracy is what decides between the
candidates because the fit follows its pseudo labels (measured in docs/class_prior.md).

When the labeled images cannot tell the candidates apart, auto's own rule decides: that is the
case when no candidate has strictly more labeled images right than the one auto's rule chose
(a tie keeps auto's choice). When the pseudo labels do favour another candidate, the fit makes
both candidates' fits and keeps the challenger only if its fit gets strictly more of the
labeled images right (``confirm``; measured: with 100 labels the draws more than a point below
zero-shot fall from 47 to 11 of 5400, for 1.35 fits on average; docs/class_prior.md). Each
candidate's labeled accuracy is reported with the paired standard error of its difference to
the chosen one's (sqrt of the variance of the per-image differences over k). No label enters
the pseudo labels or the descent: the fit stays an unlabeled fit, judged by a handful of labels.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple

import torch

Tensor = torch.Tensor


def check_labeled(labeled, n_rows: int, num_classes: int) -> Optional[Tuple[Tensor, Tensor]]:
    """(indices, labels) as int64 CPU tensors, or None. ``labeled``: a pair of sequences or
    tensors of equal length: row indices into this process's image features (0 <= i < N, no
    repeats) and their classes (0 <= c < C). Raises ValueError/TypeError naming the argument."""
    if labeled is None:
        return None
    if not isinstance(labeled, (tuple, list)) or len(labeled) != 2:
        raise TypeError("labeled must be a pair (indices, labels): row indices into "
                        "image_features and their class indices")
    idx, lab = (torch.as_tensor(v).reshape(-1) for v in labeled)
    if idx.numel() == 0 and lab.numel() == 0:     # before the dtype: [] is a float tensor
        raise ValueError("labeled holds no images; pass None for an unlabeled fit")
    for name, v in (("indices", idx), ("labels", lab)):
        if v.dtype.is_floating_point or v.dtype == torch.bool or v.is_complex():
            raise TypeError(f"labeled {name} must be integers, got {v.dtype}")
    idx, lab = idx.long().cpu(), lab.long().cpu()
    if idx.numel() != lab.numel():
        raise ValueError(f"labeled: {idx.numel()} indices but {lab.numel()} labels; give one "
                         "label per index")
    if idx.numel() == 0:
        raise ValueError("labeled holds no images; pass None for an unlabeled fit")
    if bool((idx < 0).any()) or bool((idx >= n_rows).any()):
        raise ValueError(f"labeled indices must be rows of image_features, in [0, {n_rows}); "
                         f"got {int(idx.min())}..{int(idx.max())}")
    if idx.unique().numel() != idx.numel():
        raise ValueError("labeled indices repeat a row; label each image once")
    if bool((lab < 0).any()) or bool((lab >= num_classes).any()):
        raise ValueError(f"labeled labels must be class indices in [0, {num_classes}); got "
                         f"{int(lab.min())}..{int(lab.max())}")
    return idx, lab


def right_per_candidate(runner, x: Tensor, t: Tensor, inv_tau: float, betas: Sequence[Tensor],
                        log_q: Sequence[Tensor], labeled: Tuple[Tensor, Tensor]
                        ) -> Tuple[Tensor, Tensor, int, Tensor]:
    """(R, M, k, L) summed over the labeled rows of every rank: R[c] the labeled images candidate
    c's pseudo label gets right, M[c, c'] those both c and c' get right (K x K: the paired
    differences' second moments), k the labeled images, L[q] the labels' log-likelihood
    sum_j log_q[q][y_j] under each class distribution of ``log_q``."""
    rows, lab = _labeled_rows(runner, x, labeled, t.dtype)
    z = (rows @ runner._w(t, rows)) * inv_tau
    right = torch.stack([((z + b.to(z)).argmax(dim=1) == lab).to(torch.float64) for b in betas])
    k = runner.sum_(torch.tensor(float(lab.numel()), dtype=torch.float64, device=z.device))
    L = torch.stack([q.to(device=z.device, dtype=torch.float64)[lab].sum() for q in log_q])
    return (runner.sum_(right.sum(dim=1)), runner.sum_(right @ right.T), int(k.item()),
            runner.sum_(L))


def _labeled_rows(runner, x: Tensor, labeled: Tuple[Tensor, Tensor], dtype):
    """The labeled rows of x, unit-normalised on the compute device, and their labels."""
    idx, lab = labeled
    rows = x[idx.to(x.device)]
    rows = torch.nn.functional.normalize(rows.to(device=runner.device, dtype=dtype), dim=1)
    return rows, lab.to(rows.device)


def uniform_vetoed(L: Tensor) -> bool:
    """Whether the labels are less likely under the uniform target (L[1]) than under the
    zero-shot class shares (L[0]): then the set is not balanced the way uniform assumes."""
    return bool(float(L[1]) < float(L[0]))


def decide(names: Sequence[str], R: Tensor, M: Tensor, k: int, auto_choice: str,
           allowed: Sequence[int], L: Optional[Tensor] = None
           ) -> Tuple[str, Dict[str, dict], str, str]:
    """(chosen candidate, per candidate {"right", "accuracy", "se_vs_chosen"}, why, kept): uniform
    left out when the labels' classes say the set is not balanced (``L``: the labels'
    log-likelihood under the zero-shot class shares and under the uniform target), then the most
    labeled images right among the candidates left; ``kept``, auto's choice (or, if it was left
    out, the first candidate left), unless another has strictly more. Where the chosen is not
    ``kept``, the fit confirms it with the two candidates' fits (``confirm``)."""
    R, M = R.cpu(), M.cpu()
    vetoed = L is not None and "uniform" in names and uniform_vetoed(L.cpu())
    if vetoed:
        allowed = [c for c in allowed if names[c] != "uniform"]
    a = names.index(auto_choice)
    if a not in allowed:
        a = allowed[0]
    best = max(allowed, key=lambda c: (float(R[c]), c == a))
    chosen = best if float(R[best]) > float(R[a]) else a
    stats = {}
    for c in allowed:
        mean = float(R[chosen] - R[c]) / k
        second = float(M[chosen, chosen] + M[c, c] - 2 * M[chosen, c]) / k
        se = math.sqrt(max(second - mean * mean, 0.0) / k)
        stats[names[c]] = {"right": int(R[c]), "accuracy": round(float(R[c]) / k, 4),
                           "se_vs_chosen": round(se, 4)}
    pct = ", ".join(f"{n} {v['right']}" for n, v in stats.items())
    veto = ("" if not vetoed else
            "uniform left out: the labels' classes are less likely under the uniform target "
            f"than under CLIP's class shares (log-likelihood {float(L[1]):.1f} < "
            f"{float(L[0]):.1f}); ")
    if chosen == names.index(auto_choice):
        why = (f"{veto}{k} labeled images did not favour another candidate over the unlabeled "
               f"rule's choice (right: {pct}; a tie keeps it)")
    elif chosen == a:
        why = (f"{veto}{k} labeled images did not favour another candidate over "
               f"{names[a]} (right: {pct}; a tie keeps it)")
    else:
        why = f"{veto}the most of {k} labeled images right (right: {pct})"
    return names[chosen], stats, why, names[a]


def right_of_proxies(runner, x: Tensor, labeled: Tuple[Tensor, Tensor],
                     proxies) -> Tuple[list, int]:
    """(the labeled images each proxy (D x C) classifies right, the labeled images), summed over
    the rows of every rank in one reduction."""
    rows, lab = _labeled_rows(runner, x, labeled, proxies[0].dtype)
    counts = [((rows @ runner._w(W, rows)).argmax(dim=1) == lab).sum() for W in proxies]
    counts.append(torch.tensor(lab.numel(), device=rows.device))
    *right, k = (int(v) for v in runner.sum_(torch.stack(counts).to(torch.float64)).tolist())
    return right, k


def challenger_stands(right: int, right_kept: int) -> bool:
    """A switch the pseudo labels proposed stands only if the challenger's fit gets strictly
    more labeled images right than the kept candidate's fit (a tie keeps the kept one)."""
    return right > right_kept


def confirm(prior, kept_prior, right: int, right_kept: int, k: int):
    """The ClassPrior that stands after the two fits were judged on the labeled images: the
    challenger (``prior``) only with strictly more right than ``kept_prior``'s fit. The reason
    and ``stats["labeled_fits"]`` say what the fits scored; ``stats["decided_by"]`` whether the
    outcome differs from the unlabeled rule's choice."""
    wins = challenger_stands(right, right_kept)
    out = prior if wins else kept_prior
    scores = {prior.chosen: right, kept_prior.chosen: right_kept}
    out.stats["labeled_fits"] = scores
    unlabeled = out.stats.get("unlabeled_choice")
    out.stats["decided_by"] = "unlabeled rule" if out.chosen == unlabeled else "labeled images"
    verdict = (f"its fit got {right} of {k} labeled images right, {kept_prior.chosen}'s "
               f"{right_kept}" if wins else
               f"but its fit got {right} of {k} labeled images right, not more than "
               f"{kept_prior.chosen}'s {right_kept}: {kept_prior.chosen} kept")
    out.reason = f"{out.reason}; {prior.chosen} judged by its fit: {verdict}"
    return out
