"""The result of a fit: the vision proxy, what the pseudo labels looked like, how the descent
went; prediction with it; saving and loading it as safetensors (never pickle)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import torch

from .class_prior import ClassPrior
from .version import __version__

Tensor = torch.Tensor

FORMAT = "inmap_ext.vision_proxy/1"
RESERVED_METADATA = frozenset({"format", "inmap_ext_version", "hyper", "timings", "summary",
                               "verification", "class_prior"})   # written by save itself


@dataclass
class VisionProxyResult:
    """What ``fit_vision_proxy`` returns.

    proxy            D x C vision proxy, unit columns, on the input's device.
    text_proxies     D x C text proxies the fit started from (unit columns).
    log_bias         length-C Sinkhorn log-bias beta (pseudo labels = softmax(XT/tau_t + beta)),
                     None without balancing.
    class_counts     pseudo-label argmax count per class (int64, length C).
    class_mass       soft pseudo-label mass per class (column sums of P after the threshold).
    confident_fraction  share of images whose pseudo label was made one-hot (max > alpha).
    grad_norm, lr    per-iteration ||G||_F and learning rate actually used (length n_iters).
    objective        per-iteration objective: the cross-entropy between softmax(X W / tau_i)
                     and the pseudo labels (solver.py), at the W of that step's gradient.
    n_iters          passes of the solver (gd: gradient steps; all of ``iters`` in
                     mode="paper"; lbfgs: evaluations, line-search trials included).
    passes           passes over the features by phase, each a GEMM of N x D x C: "decision"
                     (the class prior), "pseudo_labels", "descent", "stopping_checks", and
                     "total": the hardware-free measure of a fit's cost.
    converged        True when a stopping rule (``stop="auto"`` or ``tol``) ended the descent.
    stop_reason      in words, how the descent ended.
    hyper            the hyper-parameters of the fit (with ``mode`` and the ``class_prior``
                     that ran).
    backend          the backend that ran the ops: "ext", "torch", "triton", or e.g. "ext+torch"
                     when a compiled op failed its first-use check and ran on pure torch.
    verification     what ran per op and what its first-use check found (verify.py):
                     {"enabled", "requested", "ops": {op: {"ran", "design", "verified",
                     "rel_err", "tol", "check_ms", ...}}}.
    class_prior      what the pseudo labels were balanced to and why (class_prior.ClassPrior:
                     ``chosen``, ``reason``, ``target``, ``estimated_proportions``,
                     ``effective_classes``, ``few_classes``, ``summary()``).
    """

    proxy: Tensor
    text_proxies: Tensor
    log_bias: Optional[Tensor]
    class_counts: Tensor
    class_mass: Tensor
    confident_fraction: float
    grad_norm: Tensor
    lr: Tensor
    n_iters: int
    converged: bool
    n_images: int
    backend: str
    hyper: Dict[str, object] = field(default_factory=dict)
    timings: Dict[str, float] = field(default_factory=dict)
    metadata: Dict[str, str] = field(default_factory=dict)
    class_prior: Optional[ClassPrior] = None
    objective: Optional[Tensor] = None
    stop_reason: str = ""
    verification: Dict[str, object] = field(default_factory=dict)
    passes: Dict[str, int] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return self.proxy.shape[1]

    def __repr__(self) -> str:
        """Short: shapes, prior, steps; never whole tensors."""
        D, C = self.proxy.shape
        prior = self.class_prior.chosen if self.class_prior is not None else None
        model = self.metadata.get("model")
        return (f"VisionProxyResult(proxy D={D} x C={C} {str(self.proxy.dtype).replace('torch.', '')}"
                f" on {self.proxy.device}, n_images={self.n_images}, steps={self.n_iters}, "
                f"converged={self.converged}, class_prior={prior!r}, "
                f"confident_fraction={self.confident_fraction:.3f}, backend={self.backend!r}"
                + (f", model={model!r}" if model else "") + ")")

    # -- prediction ---------------------------------------------------------------------------
    def topk(self, features: Tensor, k: Optional[int] = None, *, backend: str = "auto",
             chunk_size: Optional[int] = None) -> Tuple[Tensor, Tensor]:
        """(cosines N x k, class indices N x k) of L2-normalised features against the proxy;
        k: None = min(5, C)."""
        from .functional import zero_shot_topk

        k = min(5, self.proxy.shape[1]) if k is None else k
        return zero_shot_topk(features, self.proxy.to(features.device), k, backend=backend,
                              chunk_size=chunk_size)

    def predict(self, features: Tensor, k: int = 1, **kw) -> Tensor:
        """Class indices: shape (N,) for k == 1, (N, k) best first otherwise."""
        idx = self.topk(features, k, **kw)[1]
        return idx[:, 0] if k == 1 else idx

    def zero_shot_topk(self, features: Tensor, k: Optional[int] = None, *, backend: str = "auto",
                       chunk_size: Optional[int] = None) -> Tuple[Tensor, Tensor]:
        """``topk`` with the text proxies: the zero-shot classifier InMaP started from."""
        from .functional import zero_shot_topk

        k = min(5, self.text_proxies.shape[1]) if k is None else k
        return zero_shot_topk(features, self.text_proxies.to(features.device), k,
                              backend=backend, chunk_size=chunk_size)

    def zero_shot_predict(self, features: Tensor, k: int = 1, **kw) -> Tensor:
        """``predict`` with the text proxies (the zero-shot classifier)."""
        idx = self.zero_shot_topk(features, k, **kw)[1]
        return idx[:, 0] if k == 1 else idx

    def to(self, device) -> "VisionProxyResult":
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v)
                 for k, v in self.__dict__.items()}  # class_prior's tensors stay on the CPU
        return VisionProxyResult(**moved)

    # -- persistence --------------------------------------------------------------------------
    def save(self, path, metadata: Optional[Dict[str, str]] = None) -> None:
        """Write a safetensors file: tensors plus string metadata (hyper-parameters, version,
        and ``metadata``, e.g. the model and class names the pipeline adds)."""
        from .fileio import save_safetensors

        tensors = {"proxy": self.proxy, "text_proxies": self.text_proxies,
                   "class_counts": self.class_counts, "class_mass": self.class_mass,
                   "grad_norm": self.grad_norm, "lr": self.lr}
        if self.objective is not None:
            tensors["objective"] = self.objective
        if self.log_bias is not None:
            tensors["log_bias"] = self.log_bias
        prior = self.class_prior
        if prior is not None:
            tensors["prior_zero_shot_proportions"] = prior.zero_shot_proportions
            if prior.target is not None:
                tensors["prior_target"] = prior.target
            if prior.estimated_proportions is not None:
                tensors["prior_estimated_proportions"] = prior.estimated_proportions
        tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        bad = [(k, v) for k, v in (metadata or {}).items()
               if not isinstance(k, str) or not isinstance(v, str)]
        if bad:
            k, v = bad[0]
            raise TypeError(f"metadata must map strings to strings (safetensors stores text), got "
                            f"{k!r}: {type(v).__name__}; json.dumps other values")
        taken = sorted(set(metadata or {}) & RESERVED_METADATA)
        if taken:
            raise ValueError(f"metadata keys {taken} are written by save itself; use other names")
        meta = dict(self.metadata)
        meta.update(metadata or {})
        meta.update({
            "format": FORMAT, "inmap_ext_version": __version__,
            "hyper": json.dumps(self.hyper), "timings": json.dumps(self.timings),
            "summary": json.dumps({"confident_fraction": self.confident_fraction,
                                   "n_iters": self.n_iters, "converged": self.converged,
                                   "n_images": self.n_images, "backend": self.backend,
                                   "stop_reason": self.stop_reason, "passes": self.passes}),
        })
        if self.verification:
            meta["verification"] = json.dumps(self.verification)
        if prior is not None:
            meta["class_prior"] = json.dumps({"requested": prior.requested, "chosen": prior.chosen,
                                              "reason": prior.reason, "stats": prior.stats})
        save_safetensors(tensors, str(path), metadata={k: str(v) for k, v in meta.items()})

    @classmethod
    def load(cls, path, device="cpu") -> "VisionProxyResult":
        """Read a file written by ``save`` (safetensors: no code is unpickled)."""
        from safetensors import SafetensorError, safe_open

        try:
            f = safe_open(str(path), framework="pt", device="cpu")
        except (SafetensorError, OSError) as e:
            if isinstance(e, FileNotFoundError):
                raise
            raise ValueError(f"{path} is not a safetensors vision proxy written by inmap "
                             f"({e}); make one with `inmap fit ... --out DIR` (DIR/"
                             "proxy.safetensors) or VisionProxyResult.save") from e
        with f:
            meta = dict(f.metadata() or {})
            if meta.get("format") != FORMAT:
                raise ValueError(f"{path} is not an inmap_ext vision proxy file (format "
                                 f"{meta.get('format')!r}, expected {FORMAT!r})")
            t = {k: f.get_tensor(k).to(device) for k in f.keys()}
        summary = json.loads(meta.pop("summary"))
        hyper = json.loads(meta.pop("hyper"))
        timings = json.loads(meta.pop("timings"))
        meta.pop("format")
        # the writer's version, under a name save does not reserve (so that a loaded proxy's
        # metadata can be passed to save again)
        meta["written_by_inmap_ext"] = meta.pop("inmap_ext_version", "unknown")
        verification = json.loads(meta.pop("verification", "{}"))
        prior = None
        if "class_prior" in meta:
            p = json.loads(meta.pop("class_prior"))
            prior = ClassPrior(p["requested"], p["chosen"], p["reason"], t.pop("prior_target", None),
                               t.pop("prior_zero_shot_proportions"),
                               t.pop("prior_estimated_proportions", None), p["stats"])
            prior = prior.to("cpu")
        return cls(class_prior=prior, proxy=t["proxy"], text_proxies=t["text_proxies"], log_bias=t.get("log_bias"),
                   class_counts=t["class_counts"], class_mass=t["class_mass"],
                   grad_norm=t["grad_norm"], lr=t["lr"], objective=t.get("objective"),
                   hyper=hyper, timings=timings, verification=verification,
                   metadata=meta, **summary)


def load_vision_proxy(path, device="cpu") -> VisionProxyResult:
    """Load a vision proxy saved by ``VisionProxyResult.save`` (or ``inmap fit``)."""
    return VisionProxyResult.load(path, device)
