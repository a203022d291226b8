"""inmap_ext: InMaP vision proxies for CLIP zero-shot classifiers.

    from inmap_ext import fit_vision_proxy
    result = fit_vision_proxy(image_features, text_proxies)   # N x D, D x C
    labels = result.predict(image_features)
"""
from ._ops import cuda_design, extension_loaded, ext_available, resolve_backend, triton_available
from .fit import fit_vision_proxy
from .functional import (
    auto_chunk_size,
    proxy_gradient,
    pseudo_label_reduce,
    sinkhorn_log_bias,
    softmax_column_lse,
    zero_shot_topk,
)
from . import distributed
from .result import VisionProxyResult, load_vision_proxy
from .version import __version__
from .classifier import VisionProxyClassifier

__all__ = [
    "fit_vision_proxy", "VisionProxyResult", "load_vision_proxy", "zero_shot_topk",
    "softmax_column_lse", "sinkhorn_log_bias", "pseudo_label_reduce", "proxy_gradient",
    "VisionProxyClassifier", "auto_chunk_size", "extension_loaded", "ext_available",
    "resolve_backend", "cuda_design", "triton_available", "__version__",
]
