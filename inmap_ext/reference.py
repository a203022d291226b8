"""The pure-torch backend: every op of ``csrc/inmap.cpp`` written with torch ops only.

Device-agnostic (CPU, CUDA, anything torch runs on), chunked over rows exactly like the
compiled kernels so that memory stays O(chunk * C + D * C), and the oracle every kernel is
tested against. Signatures and meanings match ``torch.ops.inmap_ext.<op>`` one to one.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

Tensor = torch.Tensor


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of every op: float64 stays float64, anything else is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunks(x: Tensor, chunk: int):
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    return x.split(chunk, dim=0) if x.shape[0] else ()


def _logits(xc: Tensor, w: Tensor, inv_tau: float, bias: Optional[Tensor]) -> Tensor:
    dt = acc_dtype(xc.dtype)  # never round logits to 16 bits: tau = 0.01 amplifies the error 100x
    z = (xc.to(dt) @ w.to(dt)) * inv_tau
    return z if bias is None else z + bias.to(z.dtype)


def softmax_column_lse(x: Tensor, w: Tensor, bias: Optional[Tensor], inv_tau: float,
                       chunk: int) -> Tensor:
    """log of the column sums of row-softmax(x @ w * inv_tau + bias), a length-C vector."""
    C = w.shape[1]
    dt = acc_dtype(x.dtype)
    run_max = torch.full((C,), float("-inf"), dtype=dt, device=x.device)
    run_sum = torch.zeros(C, dtype=dt, device=x.device)
    for xc in _chunks(x, chunk):
        logp = torch.log_softmax(_logits(xc, w, inv_tau, bias), dim=1)
        m = torch.maximum(run_max, logp.amax(dim=0))
        safe = torch.where(torch.isneginf(m), torch.zeros_like(m), m)  # a -inf column stays -inf
        run_sum = run_sum * torch.exp(run_max - safe) + torch.exp(logp - safe).sum(dim=0)
        run_max = m
    return run_max + torch.log(run_sum)


def pseudo_label_reduce(x: Tensor, w: Tensor, bias: Optional[Tensor], inv_tau: float,
                        alpha: float, chunk: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """P = row-softmax(x @ w * inv_tau + bias) with rows whose max is > alpha made one-hot.

    Returns (x^T @ P, column sums of P, argmax counts (int64), number of one-hot rows (int64)).
    """
    D, C = w.shape
    dt = acc_dtype(x.dtype)
    B = torch.zeros(D, C, dtype=dt, device=x.device)
    mass = torch.zeros(C, dtype=dt, device=x.device)
    counts = torch.zeros(C, dtype=torch.int64, device=x.device)
    n_confident = torch.zeros((), dtype=torch.int64, device=x.device)
    for xc in _chunks(x, chunk):
        p = torch.softmax(_logits(xc, w, inv_tau, bias), dim=1)
        top, arg = p.max(dim=1)
        confident = top > alpha
        p = torch.where(confident[:, None], torch.nn.functional.one_hot(arg, C).to(dt), p)
        counts += torch.bincount(arg, minlength=C)
        n_confident += confident.sum()
        mass += p.sum(dim=0)
        B += xc.to(dt).T @ p
    return B, mass, counts, n_confident


def xt_softmax(x: Tensor, w: Tensor, inv_tau: float, chunk: int) -> Tuple[Tensor, Tensor]:
    """(x^T @ row-softmax(x @ w * inv_tau) [D x C]: the data term of the proxy gradient,
    sum over rows of logsumexp(x @ w * inv_tau) []: the log-partition part of the objective)."""
    D, C = w.shape
    G = torch.zeros(D, C, dtype=acc_dtype(x.dtype), device=x.device)
    lse_sum = torch.zeros((), dtype=torch.float64, device=x.device)
    for xc in _chunks(x, chunk):
        z = _logits(xc, w, inv_tau, None)
        lse_sum += torch.logsumexp(z, dim=1).double().sum()
        G += xc.to(G.dtype).T @ torch.softmax(z, dim=1)   # not exp(z - lse): lse rounds at
        # the logits' ulp, which at tiny tau (logits of 1e6 and more) swallows log(sum)
    return G, lse_sum.to(G.dtype)


def topk_scores(x: Tensor, w: Tensor, k: int, chunk: int) -> Tuple[Tensor, Tensor]:
    """Top-k of x @ w per row: (values N x k, indices N x k int64)."""
    C = w.shape[1]
    if not 1 <= k <= C:
        raise ValueError(f"k must be in [1, C={C}], got {k}")
    N = x.shape[0]
    values = torch.empty(N, k, dtype=acc_dtype(x.dtype), device=x.device)
    indices = torch.empty(N, k, dtype=torch.int64, device=x.device)
    start = 0
    for xc in _chunks(x, chunk):
        dt = values.dtype
        v, i = torch.topk(xc.to(dt) @ w.to(dt), k, dim=1)
        values[start:start + len(xc)] = v
        indices[start:start + len(xc)] = i
        start += len(xc)
    return values, indices


def stored_column_sums(e: Tensor, b: Tensor) -> Tuple[Tensor, Tensor]:
    """One read of stored logits (logit_store.py): e = exp(Z - row max) (rows x C, float64,
    float32 or bfloat16) and class weights b (C, the work dtype: float64 for a float64 e, else
    float32). Returns (col, rmin) in b's dtype: col_j = sum_i e_ij / r_i with r_i = sum_j e_ij b_j,
    and rmin = min_i r_i (inf for no rows). b K x C: col K x C and rmin K, row k for b[k]."""
    if b.dim() == 2:
        outs = [stored_column_sums(e, bk) for bk in b]
        return (torch.stack([o[0] for o in outs]) if outs else b.new_zeros(b.shape),
                torch.stack([o[1] for o in outs]) if outs else b.new_zeros(0))
    ef = e.to(b.dtype)
    r = ef @ b
    rmin = r.min() if r.numel() else torch.tensor(float("inf"), dtype=b.dtype, device=b.device)
    return ef.T @ (1.0 / r), rmin


def stored_row_scores(e: Tensor, b: Tensor) -> Tuple[Tensor, Tensor]:
    """The scoring read of stored logits against K class-weight vectors b (K x C, the work
    dtype): (mass, top), both rows x K: mass_ik = sum_j e_ij b_kj and top_ik = argmax_j e_ij b_kj
    (the first of equal ones)."""
    ef = e.to(b.dtype)
    mass = ef @ b.T
    top = torch.stack([torch.argmax(ef * bk, dim=1) for bk in b], dim=1) if ef.shape[0] else \
        torch.empty(0, b.shape[0], dtype=torch.int64, device=e.device)
    return mass, top
