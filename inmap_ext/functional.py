"""The building blocks of InMaP as documented functions, none of which stores an N x C matrix.

Each public function validates its inputs and runs on the backend ``backend`` picks (see
``_ops.resolve_backend``): the compiled kernels for the tensors' device when present, else the
pure-torch backend. ``fit_vision_proxy`` (fit.py) composes them; ``Runner`` is the handle it
uses to run them many times without re-validating.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from . import _ops, reference, validation, verify
from .collective import collective as _collective
from .memory import available_bytes
from .reference import acc_dtype

Tensor = torch.Tensor

# Bytes of one N x C chunk buffer (the logits of `chunk` rows) the automatic chunk size allows.
# CPU: 16 MiB (4194 rows of float32 logits at C = 1000): a pass's GEMMs and softmax over a chunk
# that stays nearer the cache took 0.79 s instead of 0.91 s at N = 400k, D = 128, C = 1000
# (2 threads), 0.269 s instead of 0.302 s at N = 20k, D = 512 (1 thread), and the same below;
# a set of up to 4194 rows at C = 1000 is still one chunk (the same bits as before).
CHUNK_BUDGET_BYTES = {"cpu": 16 << 20, "cuda": 512 << 20}
# The CUDA and Triton kernels subtract a row's log-sum-exp that float32 rounds at the logits'
# ulp: accurate to ~1e-3 of a probability up to 1/tau = 1e4 (cosines <= 1), then worse; above it
# their ops give way to the torch ones (the CPU kernels normalise exactly: (v - max) - log s).
GPU_KERNELS_MAX_INV_TAU = 1e4


def auto_chunk_size(n: int, c: int, device: "torch.device | str", dtype=torch.float32) -> int:
    """Rows per chunk: as many as fit the device's chunk budget for a chunk x C logit block."""
    device = torch.device(device)
    budget = CHUNK_BUDGET_BYTES.get(device.type, CHUNK_BUDGET_BYTES["cpu"])
    per_row = max(1, c) * torch.finfo(acc_dtype(dtype)).bits // 8
    return int(max(1, min(max(n, 1), budget // per_row)))


class Runner:
    """Runs the ops for one problem: resolved backend, chunk size, and the reductions across
    ranks when a process group shards the rows (``distributed.py``). Each op is resolved on its
    first use through ``verify.resolve``: a compiled op is checked once per process against the
    pure-torch backend, and runs as the pure-torch op if it failed (``ran`` records what ran)."""

    streams = False   # x is on the compute device (StreamingRunner: x stays in host memory)

    def __init__(self, device, backend: str = "auto", chunk_size: Optional[int] = None,
                 n: int = 1, c: int = 1, dtype=torch.float32, process_group=None):
        self.device = torch.device(device)
        self.dtype = dtype                  # compute dtype of the features
        self.backend = _ops.resolve_backend(backend, device)
        self.chunk = (validation.count(chunk_size, "chunk_size", 1) if chunk_size is not None
                      else auto_chunk_size(n, c, device, dtype))
        self.group = process_group
        self.pad_cols = 0                   # zero columns own_features appended to x
        self._resolved = {}                 # op name -> the callable that runs it
        self.ran = {}                       # op name -> verify.resolve's record
        self.phase = "other"                # what the passes are for (fit.py sets it)
        self.passes = {}                    # phase -> passes over the features (GEMMs N x D x C)

    def count_pass(self) -> None:
        """One pass over this rank's features (a GEMM of its rows against the class columns),
        charged to the current ``phase``: the hardware-free measure of cost."""
        self.passes[self.phase] = self.passes.get(self.phase, 0) + 1

    def op(self, name: str, inv_tau: Optional[float] = None):
        """The callable running op ``name`` in this fit (resolved and verified on first use;
        every rank of a sharded fit resolves the same ops in the same order). Every call is one
        pass over the features (the ops run over all rows) and is counted. Above
        ``GPU_KERNELS_MAX_INV_TAU`` the CUDA and Triton kernels give way to the torch op (they
        subtract a row's log-sum-exp rounded at the logits' ulp: exact enough up to there)."""
        self.count_pass()
        f = self._resolved.get(name)
        if f is None:        # resolved on every rank alike (its collective), whatever follows
            f, self.ran[name] = verify.resolve(name, self.backend, self.device, self.dtype,
                                               self.group)
            self._resolved[name] = f
        if (inv_tau is not None and inv_tau > GPU_KERNELS_MAX_INV_TAU
                and (self.backend == "triton" or (self.backend == "ext"
                                                  and self.device.type == "cuda"))):
            self.ran[f"{name} (1/tau > {GPU_KERNELS_MAX_INV_TAU:g})"] = dict(
                op=name, requested=self.backend, ran="torch", design="-", verified="-",
                why=f"1/tau = {inv_tau:.3g}: the {self.backend} kernel's rounding of the row "
                    "log-sum-exp grows with the logits; the torch op normalises exactly")
            return getattr(reference, name)
        return f

    def summary(self):
        """(the backend that ran, e.g. "ext" or "ext+torch" after a fallback; the record of
        what ran and what the verification found) for VisionProxyResult."""
        return verify.summarize(self.ran, self.backend)

    def own_features(self, x: Tensor) -> Tensor:
        """x as every op of this fit will see it. Where the fused CUDA kernels would zero-pad a
        copy of X on every call (D not a multiple of ``_ops.FUSED_PAD_D``, or x strided or
        misaligned), the padded copy is made here once; the ops then pad w's rows to match
        (zero columns add nothing to X W) and return the first D rows of X^T P. Kept per call
        (no copy) when the copy would take more than half the free device memory."""
        if self.backend != "ext" or not _ops.fused_design_requested(x):
            return x
        n, d = x.shape
        d_pad = -(-d // _ops.FUSED_PAD_D) * _ops.FUSED_PAD_D
        if d_pad == d and x.is_contiguous() and x.data_ptr() % 16 == 0:
            return x
        free = available_bytes(x.device)
        if free is not None and 2 * n * d_pad * x.element_size() > free:
            return x
        padded = x.new_zeros((n, d_pad))
        padded[:, :d] = x
        self.pad_cols = d_pad - d
        return padded

    def _w(self, w: Tensor, x: Tensor) -> Tensor:
        """w in the dtype the ops take with x (``_ops.proxy_dtype``), with zero rows for the
        columns own_features appended to x."""
        w = w.to(_ops.proxy_dtype(x.dtype, x.device, self.backend))
        return torch.nn.functional.pad(w, (0, 0, 0, self.pad_cols)) if self.pad_cols else w

    def _rows(self, t: Tensor) -> Tensor:
        """The first D rows of a (D + pad_cols) x C result."""
        return t[: t.shape[0] - self.pad_cols] if self.pad_cols else t

    def row_chunks(self, x: Tensor, start: int = 0):
        """x's rows from row ``start`` on, a chunk at a time, on the compute device: for method
        passes written in torch (class_prior.expected_accuracies, logit_store.py);
        StreamingRunner streams them. A ``start`` that is a multiple of the chunk size gives
        the chunks of the whole pass from there on."""
        return x[start:].split(self.chunk, dim=0) if x.shape[0] > start else ()

    # -- reductions over the rows of every rank (identity in a single process) ---------------
    def sum_(self, t: Tensor) -> Tensor:
        if self.group is not None:
            _collective(torch.distributed.all_reduce, t, group=self.group)
        return t

    def max_(self, t: Tensor) -> Tensor:
        """The largest value across ranks (in place)."""
        if self.group is not None:
            _collective(torch.distributed.all_reduce, t, op=torch.distributed.ReduceOp.MAX,
                        group=self.group)
        return t

    def lse_(self, t: Tensor) -> Tensor:
        """log-sum-exp across ranks of per-rank log-sums (in place)."""
        if self.group is not None:
            m = self.max_(t.clone())
            m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
            t.copy_(m + torch.log(self.sum_(torch.exp(t - m))))
        return t

    # -- the ops -----------------------------------------------------------------------------
    def column_lse(self, x: Tensor, w: Tensor, bias: Optional[Tensor], inv_tau: float) -> Tensor:
        out = self.op("softmax_column_lse", inv_tau)(x, self._w(w, x), bias, inv_tau,
                                                     self.chunk)
        return self.lse_(out)

    def pseudo_labels(self, x, w, bias, inv_tau, alpha):
        B, mass, counts, n_conf = self.op("pseudo_label_reduce", inv_tau)(
            x, self._w(w, x), bias, inv_tau, alpha, self.chunk)
        return self.sum_(self._rows(B)), self.sum_(mass), self.sum_(counts), self.sum_(n_conf)

    def xt_softmax(self, x: Tensor, w: Tensor, inv_tau: float) -> Tuple[Tensor, Tensor]:
        """(X^T softmax(X W * inv_tau), sum of the rows' log-sum-exps): one pass."""
        G, lse_sum = self.op("xt_softmax", inv_tau)(x, self._w(w, x), inv_tau, self.chunk)
        return self.sum_(self._rows(G)), self.sum_(lse_sum)

    def topk(self, x: Tensor, w: Tensor, k: int) -> Tuple[Tensor, Tensor]:
        return self.op("topk_scores")(x, self._w(w, x), k, self.chunk)



def sinkhorn(column_lse, iters: int, log_q: Tensor, n_total: int,
             log_colsum: Optional[Tensor] = None) -> Tensor:
    """beta = log b of DESIGN.md step 2: the log-domain Sinkhorn balancing of
    row-softmax(Z + beta) to the class proportions exp(log_q), ``iters`` >= 1 times, where
    ``column_lse(beta)`` gives the log column sums of that softmax over every row (a pass over
    the features, or a read of stored logits: logit_store.py). ``log_colsum``: the first
    pass's log column shares (beta = 0), when already computed. A class with log_q = -inf (known
    absent) gets beta = -inf: exactly zero mass. ``log_q`` K x C runs K balancings in lockstep
    (``column_lse`` then takes and returns K x C); each row of the result is what its own
    balancing gives."""
    absent = torch.isneginf(log_q)
    beta = torch.zeros_like(log_q)
    for i in range(iters):
        if i > 0 or log_colsum is None:
            log_colsum = column_lse(beta) - math.log(n_total)
        beta = torch.where(absent, log_q, beta + log_q - log_colsum)
    return beta


def _prepare(features, proxies, backend, chunk_size, proxies_name="text_proxies"):
    x, w = validation.check_features_and_proxies(features, proxies, "image_features", proxies_name)
    if x.dtype != w.dtype:
        w = w.to(x.dtype)
    runner = Runner(x.device, backend, chunk_size, x.shape[0], w.shape[1], x.dtype)
    return x, w, runner


@torch.no_grad()
def zero_shot_topk(image_features: Tensor, proxies: Tensor, k: int = 1, *, backend: str = "auto",
                   chunk_size: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """Top-k classes of every image by cosine with the class proxies (D x C), without storing
    the N x C logits. Returns (cosines N x k, class indices N x k)."""
    x, w, runner = _prepare(image_features, proxies, backend, chunk_size, "proxies")
    k = validation.count(k, "k", 1)
    if k > w.shape[1]:
        raise ValueError(f"k must be <= the number of classes C={w.shape[1]}, got {k}")
    return runner.topk(x, w, k)


@torch.no_grad()
def softmax_column_lse(image_features: Tensor, proxies: Tensor, tau: float,
                       log_bias: Optional[Tensor] = None, *, backend: str = "auto",
                       chunk_size: Optional[int] = None) -> Tensor:
    """log sum_i softmax(x_i W / tau + log_bias)_j for every class j (length C): the column
    statistic of one Sinkhorn iteration, in the log domain."""
    x, w, runner = _prepare(image_features, proxies, backend, chunk_size, "proxies")
    tau = validation.positive(tau, "tau")
    return runner.column_lse(x, w, _check_bias(log_bias, w), 1.0 / tau)


@torch.no_grad()
def sinkhorn_log_bias(image_features: Tensor, text_proxies: Tensor, *, tau_t: float = 0.01,
                      sinkhorn_iters: int = 20, gamma: float = 0.0,
                      class_prior: "Tensor | None" = None, backend: str = "auto",
                      chunk_size: Optional[int] = None) -> Optional[Tensor]:
    """The per-class log-bias beta such that the Sinkhorn-balanced pseudo labels are
    row-softmax(X T / tau_t + beta) (DESIGN.md step 2). None when sinkhorn_iters == 0.
    The target is uniform (with gamma > 0: the zero-shot class masses ^ gamma), or
    ``class_prior``: C non-negative proportions (0: the class gets exactly zero mass)."""
    from .class_prior import check_class_prior, uniform_log_target

    x, t, runner = _prepare(image_features, text_proxies, backend, chunk_size)
    tau_t = validation.positive(tau_t, "tau_t")
    iters = validation.count(sinkhorn_iters, "sinkhorn_iters")
    gamma = validation.non_negative(gamma, "gamma")
    if class_prior is not None:
        prior = check_class_prior(class_prior, t.shape[1])
        if isinstance(prior, str):
            raise TypeError("class_prior here must be a tensor of class proportions "
                            "(the named priors are fit_vision_proxy's)")
    if iters == 0:
        return None
    n = x.shape[0]
    log_zs = runner.column_lse(x, t, None, 1.0 / tau_t) - math.log(n)
    if class_prior is None:
        log_q = uniform_log_target(log_zs, gamma)
    else:
        log_q = torch.log(prior).to(device=log_zs.device, dtype=log_zs.dtype)
    return sinkhorn(lambda beta: runner.column_lse(x, t, beta, 1.0 / tau_t), iters, log_q, n,
                    log_zs)


@torch.no_grad()
def pseudo_label_reduce(image_features: Tensor, text_proxies: Tensor,
                        log_bias: Optional[Tensor] = None, *, tau_t: float = 0.01,
                        alpha: float = 0.6, backend: str = "auto",
                        chunk_size: Optional[int] = None):
    """Pseudo labels P = row-softmax(X T / tau_t + log_bias), confident rows (max > alpha) made
    one-hot, reduced without storing P. Returns (B = X^T P [D x C], column sums of P [C],
    argmax counts [C], number of one-hot rows)."""
    x, t, runner = _prepare(image_features, text_proxies, backend, chunk_size)
    return runner.pseudo_labels(x, t, _check_bias(log_bias, t),
                                1.0 / validation.positive(tau_t, "tau_t"),
                                validation.in_unit_interval(alpha, "alpha"))


@torch.no_grad()
def proxy_gradient(image_features: Tensor, proxy: Tensor, target: Tensor, *, tau_i: float = 0.04,
                   backend: str = "auto", chunk_size: Optional[int] = None) -> Tensor:
    """G = X^T softmax(X W / tau_i) - B (D x C): N * tau_i times the gradient of the
    cross-entropy between softmax(X W / tau_i) and the pseudo labels whose X^T P is ``target``."""
    x, w, runner = _prepare(image_features, proxy, backend, chunk_size, "proxy")
    if not isinstance(target, torch.Tensor) or target.shape != w.shape:
        raise ValueError(f"target must be a tensor of shape {tuple(w.shape)} (X^T P), got "
                         f"{getattr(target, 'shape', type(target).__name__)}")
    G, _ = runner.xt_softmax(x, w, 1.0 / validation.positive(tau_i, "tau_i"))
    return G - target.to(G)


def _check_bias(log_bias, w):
    if log_bias is None:
        return None
    if not isinstance(log_bias, torch.Tensor) or log_bias.shape != (w.shape[1],):
        raise ValueError(f"log_bias must be a tensor of shape ({w.shape[1]},), got "
                         f"{getattr(log_bias, 'shape', type(log_bias).__name__)}")
    if bool(torch.isnan(log_bias).any()) or bool(torch.isposinf(log_bias).any()):
        raise ValueError("log_bias contains NaN or +Inf (-inf is allowed: a class with zero "
                         "mass)")
    if bool(torch.isneginf(log_bias).all()):
        raise ValueError("log_bias is -inf for every class: at least one class must be possible")
    return log_bias.to(device=w.device, dtype=acc_dtype(w.dtype))
