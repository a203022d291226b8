"""inmap_ext: InMaP vision proxies for CLIP zero-shot classifiers.

    from inmap_ext import fit_vision_proxy
    result = fit_vision_proxy(image_features, text_proxies)   # N x D, D x C
    labels = result.predict(image_features)

The names below are imported on first use (PEP 562), so that ``import inmap_ext`` and the
``inmap`` command's option errors and ``--version`` do not wait for torch to load.
"""
from importlib import import_module

from .version import __version__

_LAZY = {
    "cuda_design": "_ops", "cpu_bf16x3": "_ops", "extension_loaded": "_ops", "ext_available": "_ops",
    "resolve_backend": "_ops", "triton_available": "_ops",
    "fit_vision_proxy": "fit",
    "auto_chunk_size": "functional", "proxy_gradient": "functional",
    "pseudo_label_reduce": "functional", "sinkhorn_log_bias": "functional",
    "softmax_column_lse": "functional", "zero_shot_topk": "functional",
    "VisionProxyResult": "result", "load_vision_proxy": "result",
    "VisionProxyClassifier": "classifier",
    "load_features": "embeddings",
}

__all__ = [
    "fit_vision_proxy", "VisionProxyResult", "load_vision_proxy", "zero_shot_topk",
    "softmax_column_lse", "sinkhorn_log_bias", "pseudo_label_reduce", "proxy_gradient",
    "VisionProxyClassifier", "auto_chunk_size", "extension_loaded", "ext_available",
    "resolve_backend", "cuda_design", "cpu_bf16x3", "triton_available", "load_features",
    "__version__",
]


def __getattr__(name):
    if name in _LAZY:
        value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    if name == "distributed":
        return import_module(".distributed", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY) | {"distributed"})
