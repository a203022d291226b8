"""The InMaP method (DESIGN.md, "The algorithm, exactly"): pseudo labels from the text proxies,
Sinkhorn balancing in the log domain, the confidence threshold, then the vision proxy that fits
them. The features reach the method by one route (rows.py: in memory, sharded or streamed,
checked once) and every pass over them goes through its ``functional.Runner`` (compiled ops or
pure torch); the method's pieces have their own modules (class_prior.py, labeled.py,
solver.py, lbfgs.py); this module states the steps in order."""
from __future__ import annotations

import time
from typing import Optional

import torch

from . import _ops
from .class_prior import check_class_prior
from .class_prior import choose as choose_class_prior
from .hyper import check_balancing, check_hyper
from .labeled import check_labeled, confirm, right_of_proxies
from .result import VisionProxyResult
from .rows import Rows, check_rows
from .validation import check_shapes
from .solver import SOLVERS, STOP_RULES, solve

Tensor = torch.Tensor


@torch.no_grad()
def fit_vision_proxy(image_features: Tensor, text_proxies: Tensor, *, tau_t: float = 0.01,
                     tau_i: float = 0.04, alpha: float = 0.6, sinkhorn_iters: int = 20,
                     gamma: float = 0.0, iters: int = 2000, lr: float = 10.0,
                     backend: str = "auto", chunk_size: Optional[int] = None,
                     tol: Optional[float] = None, precision: str = "auto",
                     progress: bool = False, process_group=None, device=None,
                     stream: bool = False, class_prior: "str | Tensor | None" = None,
                     mode: str = "default", stop: Optional[str] = None,
                     solver: Optional[str] = None, labeled=None) -> VisionProxyResult:
    """Learn an InMaP vision proxy from unlabeled image features.

    The default fit balances the pseudo labels to a class prior chosen from the unlabeled set
    (``class_prior="auto"``), so that it helps on sets that hold part of the class list or hold
    it unevenly; ``mode="paper"`` is exactly the published algorithm (DESIGN.md).

    Args:
        image_features: N x D image embeddings (rows are L2-normalised here if they are not).
            float32/float64 (half precision is computed in float32 on the CPU).
        text_proxies: D x C text proxies, one column per class (the layout of
            ``open_clip.build_zero_shot_classifier``); columns are L2-normalised if they are not.
        tau_t: temperature of the pseudo labels softmax(X T / tau_t).
        tau_i: temperature of the proxy's softmax(X W / tau_i).
        alpha: confidence threshold; rows whose largest pseudo-label probability is > alpha
            become one-hot.
        sinkhorn_iters: Sinkhorn balancing iterations on the pseudo labels (0: no balancing).
        gamma: the published class-prior exponent of the "uniform" target: 0 balances to a
            uniform prior, > 0 to the zero-shot prediction's class masses raised to gamma.
        iters: the most passes of the solver over the features (gd: gradient steps; all of them
            in mode="paper").
        lr: initial learning rate eta (gd: halved whenever ||G|| grows; lbfgs: the length of
            its first step, the published first step).
        solver: how the objective of step 5 is minimised: "lbfgs" (default fit; lbfgs.py:
            Riemannian L-BFGS on the unit-norm columns, one pass per evaluation, a few dozen
            passes on real CLIP features) or "gd" (the published descent with its learning-rate
            halving, solver.py). None: "lbfgs", or "gd" in ``mode="paper"``.
        stop: when the solver stops: "auto" (default): lbfgs: once the objective fell by at most
            1e-3 (relative) over 5 iterations, or after 80 passes; gd: once, over 10 steps, the
            objective fell by at most 2e-3 and at most 0.05% of the images changed their
            predicted class. "none": every one of ``iters`` passes. None: "auto", or "none" in
            ``mode="paper"``.
        backend: "auto" (compiled kernels for the tensors' device when present, else torch),
            "ext" (compiled kernels or an error), "torch" (pure torch), "triton" (the fused
            Triton kernels of triton_ops.py: CUDA, fp16/bf16/fp32 features; opt-in).
        chunk_size: rows per chunk (memory O(chunk_size * C + D * C)); automatic by default.
        tol: optional early stop besides ``stop``: after a step whose largest per-class change
            of the proxy, max_j ||w_j^new - w_j||_2, is below ``tol``, stop (this reads a
            scalar back from the device every step). None (default): off.
        precision: compute precision of the image-feature GEMMs. "auto": the input's dtype,
            as torch's float32 matmul setting allows (``torch.set_float32_matmul_precision``:
            on CUDA float32 inputs use TF32 only if torch.backends.cuda.matmul.allow_tf32 is
            set; on the CPU "high" or "medium" run "bf16x3" on CPUs with AMX, where it is
            faster, else float32; ``result.hyper["gemm"]`` says what ran);
            "fp64"; "fp32" (exact float32, TF32 off); "tf32" (float32 through TF32 tensor
            cores, CUDA); "bf16x3" (CPU: float32 features, each float32 GEMM of the compiled
            kernels as three bfloat16 GEMMs, logits to ~1e-6; faster with AMX at D >= 512 and
            100+ classes); "fp16" / "bf16" (features cast to 16 bits once, tensor-core GEMMs,
            CUDA; "bf16" also on the CPU where torch has a bfloat16 GEMM with float32 output,
            x86-64 builds: fast on CPUs with AMX or AVX512-BF16 units). Whatever the
            inputs, logits, softmax statistics, Sinkhorn log-biases, gradients and the proxy
            stay float32 (float64 for "fp64"); reduced precision changes a small share of
            predictions (see README, "Precision").
        progress: show tqdm progress bars: the class-prior decision's reads of the logits
            (with its passes over the features) and the solver's passes.
        process_group: a torch.distributed group over which the rows are sharded (each rank
            passes its own rows; see ``inmap_ext.distributed``). None: one process.
        device: the compute device. None: the features' device. A device other than the
            features' (e.g. features in host memory or memory-mapped from disk, device="cuda")
            streams the features to it chunk by chunk every pass (out-of-core: the features
            are never copied whole; host-to-device copies overlap compute).
        stream: stream even when the features are on the compute device (e.g. memory-mapped
            CPU features, which then are never normalised into a full copy).
        class_prior: the class proportions the pseudo labels are balanced to (class_prior.py):
            "auto" (default): decided from the unlabeled set: of no balancing, the uniform target
            and the estimate, the one whose pseudo labels have the highest expected accuracy
            under the three candidates' own posterior models (class_prior.py);
            "uniform": the published target (and ``gamma``); "estimate": proportions estimated
            from the set by EM; "none": no balancing; or a tensor of C non-negative
            proportions (0 = the class is known to be absent). None: "auto", or "uniform" in
            ``mode="paper"``.
        labeled: optional (indices, labels): class labels for a few rows of ``image_features``
            (a small random sample of the set; in a sharded fit, rows of this rank's shard).
            With ``class_prior="auto"`` they choose the candidate whose pseudo labels get the
            most of them right (ties: the unlabeled rule's choice; labeled.py); no label enters
            the pseudo labels or the descent.
        mode: "default", or "paper": exactly the published algorithm (uniform prior, every one
            of ``iters`` steps, the published learning-rate schedule); ``class_prior`` other
            than "uniform", ``stop`` other than "none" and ``tol`` are refused in this mode.

    Returns:
        VisionProxyResult with ``.proxy`` (D x C, unit columns, on the input's device),
        ``.predict``, the pseudo-label statistics, ``.class_prior`` (what the labels were
        balanced to and why), the per-step history (``objective``, ``grad_norm``, ``lr``) and
        ``stop_reason``. dtypes: the computation and the proxy follow the *features*: float64
        features give a float64 proxy, every other dtype float32 (text proxies of another dtype
        are cast; a float32 / float64 mix is allowed and follows this rule).

    Raises:
        TypeError: an input is not a tensor of a floating dtype, or ``class_prior`` is neither
            a name nor a tensor.
        ValueError: bad shapes (not N x D and D x C, D mismatch, text proxies passed C x D),
            NaN/Inf or all-zero vectors, inputs on different devices, a hyper-parameter out of
            range (each message names the argument), an unknown backend / precision / mode /
            stop, a class_prior of the wrong length, negative or summing to 0, or options
            that ``mode="paper"`` refuses. Raised before any expensive work.
        RuntimeError: backend="ext" or "triton" asked for where it cannot run.
        FloatingPointError: never expected: a non-finite proxy from finite inputs (a bug).

    Example:
        >>> import torch, inmap_ext
        >>> from inmap_ext.synthetic import make_problem
        >>> p = make_problem(2000, 64, 20, gap=2.0, text_noise=0.4)
        >>> res = inmap_ext.fit_vision_proxy(p.image_features, p.text_proxies)
        >>> res.class_prior.chosen, res.n_iters < 2000
        ('none', True)
        >>> acc = (res.predict(p.image_features) == p.labels).float().mean()
        >>> zero_shot = (res.zero_shot_predict(p.image_features) == p.labels).float().mean()
        >>> bool(acc > zero_shot)
        True
    """
    tau_t, tau_i, alpha, sinkhorn_iters, gamma, iters, lr, tol, chunk_size = check_hyper(
        tau_t, tau_i, alpha, sinkhorn_iters, gamma, iters, lr, tol, chunk_size)
    class_prior, stop, solver = _check_mode(mode, class_prior, tol, stop, solver)
    given = isinstance(class_prior, torch.Tensor)
    check_balancing(sinkhorn_iters, given or class_prior == "estimate",
                    "given proportions" if given else repr(class_prior))
    _ops.check_backend(backend)
    if labeled is not None and not (isinstance(class_prior, str) and class_prior == "auto"):
        raise ValueError("labeled images settle class_prior='auto' among its candidates; with "
                         f"class_prior={class_prior if isinstance(class_prior, str) else 'given'!r}"
                         " there is nothing to choose (drop labeled, or use class_prior='auto')")
    if labeled is not None and sinkhorn_iters == 0:
        raise ValueError("labeled images choose among balanced pseudo labels; with "
                         "sinkhorn_iters=0 nothing is balanced (drop labeled, or balance)")
    # the cheap checks before any pass over the rows (sharded fits: after check_shard, where
    # every rank raises alike)
    if (process_group is None and isinstance(image_features, torch.Tensor)
            and isinstance(text_proxies, torch.Tensor)):
        x, t = check_shapes(image_features, text_proxies)
        check_class_prior(class_prior, t.shape[1])
        check_labeled(labeled, x.shape[0], t.shape[1])
    rows = check_rows(image_features, text_proxies, device=device, stream=stream,
                      process_group=process_group, backend=backend, chunk_size=chunk_size,
                      precision=precision)
    class_prior = check_class_prior(class_prior, rows.classes)
    labeled = check_labeled(labeled, rows.local_rows, rows.classes)
    with _ops.allow_tf32(rows.tf32), _ops.cpu_bf16x3(rows.bf16x3), _ops.cpu_matmul_ieee():
        return _fit(rows.open(), tau_t, tau_i, alpha, sinkhorn_iters, gamma, iters, lr, tol,
                    progress, precision, class_prior, mode, stop, solver, labeled)


MODES = ("default", "paper")


def _check_mode(mode, class_prior, tol, stop, solver):
    """The class prior, stopping rule and solver the mode runs (None -> the mode's own)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if stop is not None and stop not in STOP_RULES:
        raise ValueError(f"stop must be one of {STOP_RULES}, got {stop!r}")
    if solver is not None and solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    if mode == "paper":
        if solver not in (None, "gd"):
            raise ValueError(f"mode='paper' runs the published descent; got solver={solver!r} "
                             "(drop it, or use mode='default')")
        if class_prior is not None and not (isinstance(class_prior, str)
                                            and class_prior == "uniform"):
            raise ValueError("mode='paper' runs the published uniform class prior; got "
                             f"class_prior={class_prior!r} (drop it, or use mode='default')")
        if tol is not None or stop not in (None, "none"):
            raise ValueError("mode='paper' runs every one of `iters` steps; tol must be None "
                             f"and stop None or 'none' (got tol={tol!r}, stop={stop!r})")
        return "uniform", "none", "gd"
    return ("auto" if class_prior is None else class_prior), (stop or "auto"), (solver or "lbfgs")


def _fit(rows: Rows, tau_t, tau_i, alpha, sinkhorn_iters, gamma, iters, lr, tol, progress,
         precision, class_prior, mode, stop, solver, labeled=None) -> VisionProxyResult:
    runner, x, t, n = rows.runner, rows.x, rows.text, rows.n
    device = runner.device
    timings = {}

    # Steps 1-3: pseudo labels (never stored), Sinkhorn-balanced to the class prior
    # (class_prior.py: the published uniform target, an estimate, given proportions or none),
    # confident rows one-hot.
    t0 = _now(device)
    runner.phase = "decision"
    beta, prior, alternative = choose_class_prior(runner, x, t, class_prior, tau_t,
                                                  sinkhorn_iters, gamma, n,
                                                  store=mode != "paper", labeled=labeled,
                                                  progress=progress)
    timings["sinkhorn_s"] = _now(device) - t0

    def learn(beta):
        # Step 4: B = X^T P.
        t0 = _now(device)
        runner.phase = "pseudo_labels"
        B, mass, counts, n_confident = runner.pseudo_labels(x, t, beta, 1.0 / tau_t, alpha)
        timings["pseudo_labels_s"] = timings.get("pseudo_labels_s", 0.0) + _now(device) - t0
        # Step 5: minimise the cross-entropy to the pseudo labels over unit-norm W from W = T
        # (solver.py: the published descent in mode="paper", every step; the default fit's
        # Riemannian L-BFGS, lbfgs.py, until the objective has settled).
        t0 = _now(device)
        runner.phase = "descent"
        d = solve(runner, x, t, B, tau_i, iters, lr, n, solver=solver, stop=stop, tol=tol,
                  progress=progress)
        timings["descent_s"] = timings.get("descent_s", 0.0) + _now(device) - t0
        return d, mass, counts, n_confident

    fit = learn(beta)
    if alternative is not None:
        # labeled images favoured prior.chosen over the candidate they would keep: both fits
        # are judged on them, the challenger kept only with strictly more right (labeled.py)
        beta_kept, prior_kept = alternative
        fit_kept = learn(beta_kept)
        (right, right_kept), k = right_of_proxies(runner, x, labeled,
                                                  [fit[0].proxy, fit_kept[0].proxy])
        prior = confirm(prior, prior_kept, right, right_kept, k)
        if prior is prior_kept:
            beta, fit = beta_kept, fit_kept
    d, mass, counts, n_confident = fit
    W = d.proxy
    if not bool(torch.isfinite(W).all()):  # never hand back garbage silently
        raise FloatingPointError(
            "fit_vision_proxy produced a non-finite proxy; inputs were finite, so this is a bug "
            f"in the '{runner.backend}' backend: please report it with the shapes and dtypes")

    hyper = dict(tau_t=tau_t, tau_i=tau_i, alpha=alpha, sinkhorn_iters=sinkhorn_iters,
                 gamma=gamma, iters=iters, lr=lr, tol=tol, chunk_size=runner.chunk, mode=mode,
                 class_prior=prior.chosen, solver=solver, stop=stop,
                 precision=precision, compute_dtype=str(runner.dtype).replace("torch.", ""),
                 gemm=rows.gemm,
                 streamed=runner.streams)
    backend, verification = runner.summary()
    return VisionProxyResult(
        proxy=W, text_proxies=t, log_bias=beta, class_counts=counts, class_mass=mass,
        confident_fraction=float(n_confident) / n, grad_norm=d.grad_norm, lr=d.lr,
        objective=d.objective, n_iters=d.n_iters, converged=d.converged,
        stop_reason=d.stop_reason, n_images=n,
        backend=backend, hyper=hyper, timings=timings, class_prior=prior,
        verification=verification, passes=_passes(runner.passes))


PHASES = ("decision", "pseudo_labels", "descent", "stopping_checks")


def _passes(counted: dict) -> dict:
    """Passes over the features by phase (every phase named, 0 when it made none) and their
    total; the passes of this rank (every rank of a sharded fit makes the same)."""
    out = {p: int(counted.get(p, 0)) for p in PHASES}
    out.update({p: int(v) for p, v in counted.items() if p not in out})
    out["total"] = sum(out.values())
    return out


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()

