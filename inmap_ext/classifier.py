"""VisionProxyClassifier: a saved vision proxy as a torch.nn.Module head — a drop-in for
open_clip's zero-shot classifier, on image features or (wrapping an open_clip model) on images."""
from __future__ import annotations

import json
from typing import List, Optional

import torch

from .result import VisionProxyResult, load_vision_proxy


class VisionProxyClassifier(torch.nn.Module):
    """logits = logit_scale * normalize(features) @ proxy.

    Args:
        proxy: D x C vision proxy (unit columns).
        classnames: optional class names (column order).
        clip_model: optional open_clip model; then ``forward`` takes preprocessed images.
        logit_scale: multiplier of the cosines (CLIP's 100 by default).
    """

    def __init__(self, proxy: torch.Tensor, classnames: Optional[List[str]] = None,
                 clip_model: Optional[torch.nn.Module] = None, logit_scale: float = 100.0,
                 model_name: Optional[str] = None):
        super().__init__()
        if proxy.dim() != 2:
            raise ValueError(f"proxy must be D x C, got shape {tuple(proxy.shape)}")
        if classnames is not None and len(classnames) != proxy.shape[1]:
            raise ValueError(f"classnames has {len(classnames)} names for C={proxy.shape[1]}")
        self.register_buffer("proxy", proxy.detach().float().clone())
        self.classnames = list(classnames) if classnames is not None else None
        self.logit_scale = float(logit_scale)
        self.model_name = model_name
        self.clip_model = clip_model
        if clip_model is not None:
            self._check_model(clip_model)

    def _check_model(self, model: torch.nn.Module) -> None:
        dim = getattr(getattr(model, "visual", None), "output_dim", None)
        if dim is not None and dim != self.proxy.shape[0]:
            raise ValueError(f"the model's image embedding has D={dim} but the proxy has "
                             f"D={self.proxy.shape[0]}: this proxy was fitted with another model"
                             + (f" ({self.model_name})" if self.model_name else ""))

    @classmethod
    def from_file(cls, path, clip_model: Optional[torch.nn.Module] = None,
                  model_name: Optional[str] = None, **kw) -> "VisionProxyClassifier":
        """Load a proxy saved by ``inmap fit`` / ``VisionProxyResult.save`` (safetensors: nothing
        is unpickled). With ``model_name``, it must match the model the proxy was fitted with."""
        res = load_vision_proxy(path)
        return cls.from_result(res, clip_model=clip_model, model_name=model_name, **kw)

    @classmethod
    def from_result(cls, res: VisionProxyResult, clip_model=None, model_name=None, **kw):
        saved = res.metadata.get("model")
        if model_name is not None and saved is not None and saved != model_name:
            raise ValueError(f"the proxy was fitted with model {saved!r}, not {model_name!r}")
        from .clip import distinct_imagenet     # a proxy fitted before the ImageNet rename

        names = distinct_imagenet(json.loads(res.metadata["classnames"])) \
            if "classnames" in res.metadata else None
        return cls(res.proxy, names, clip_model, model_name=saved or model_name, **kw)

    def __repr__(self) -> str:
        """Short: the head's shape and classes, the wrapped model's class name; never its
        tensors or the whole architecture."""
        D, C = self.proxy.shape
        names = self.classnames
        shown = "" if names is None else \
            f", classes={names[:5]!r}"[:-1] + (f", ... {len(names) - 5} more]" if len(names) > 5
                                                else "]")
        wraps = "" if self.clip_model is None else f", wraps={type(self.clip_model).__name__}"
        model = f", model={self.model_name!r}" if self.model_name else ""
        return (f"VisionProxyClassifier(D={D}, C={C}{shown}{model}, "
                f"logit_scale={self.logit_scale:g}{wraps})")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:
            if self.clip_model is None:
                raise ValueError(f"got a batch of images {tuple(x.shape)} but no clip_model: "
                                 "pass clip_model= to classify images, or pass image features "
                                 f"(N x D={self.proxy.shape[0]})")
            x = self.clip_model.encode_image(x)
        if x.shape[-1] != self.proxy.shape[0]:
            raise ValueError(f"features have D={x.shape[-1]}, the proxy has D={self.proxy.shape[0]}")
        # in float32 (or float64) whatever dtype the module or the features were cast to
        dt = torch.promote_types(torch.promote_types(x.dtype, self.proxy.dtype), torch.float32)
        x = torch.nn.functional.normalize(x.to(dt), dim=-1)
        return self.logit_scale * (x @ self.proxy.to(dt))
