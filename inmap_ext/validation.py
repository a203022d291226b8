"""Input checks with errors that name the argument and what was expected.

Every public entry point validates here, once, before any work: a bad input never reaches a
kernel, and nothing is silently wrong.
"""
from __future__ import annotations

import torch

from .hyper import count, in_unit_interval, non_negative, positive  # noqa: F401
from .reference import acc_dtype

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_matrix(t, name: str, layout: str) -> torch.Tensor:
    """A 2-D floating tensor with at least one row and column, every entry finite."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor ({layout}), got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D ({layout}), got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float16, bfloat16, float32 or "
                        f"float64), got {t.dtype}")
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"{name} is empty: expected {layout} with both sizes >= 1, "
                         f"got shape {tuple(t.shape)}")
    return t


def check_finite(t: torch.Tensor, name: str, dim: int) -> torch.Tensor:
    """Norms along ``dim`` in float32/64 (O(rows) memory); raises on NaN/Inf or zero vectors."""
    acc = torch.float64 if t.dtype == torch.float64 else torch.float32
    norms = torch.linalg.vector_norm(t, dim=dim, dtype=acc)
    bad = ~torch.isfinite(norms) | (norms == 0)
    if bool(bad.any()):
        # finite vectors whose squared norm overflows (entries ~1e20 and up in float32) or
        # underflows (~1e-20 and below): the norm of the vector scaled by its largest entry,
        # times that entry (a vector of zeros stays at norm 0)
        idx = bad.nonzero().flatten()
        sub_t = t.index_select(1 - dim, idx)
        scale = sub_t.abs().amax(dim=dim).to(acc)
        if bool(torch.isfinite(scale).all()):
            shape = (-1, 1) if dim == 1 else (1, -1)
            safe = torch.where(scale > 0, scale, torch.ones_like(scale))
            norms[idx] = scale * torch.linalg.vector_norm(sub_t.to(acc) / safe.reshape(shape),
                                                          dim=dim)
        bad = ~torch.isfinite(norms)
    if bool(bad.any()):
        idx = int(bad.nonzero()[0])
        what = "row" if dim == 1 else "column"
        if bool(torch.isfinite(t.index_select(1 - dim, bad.nonzero().flatten())).all()):
            raise ValueError(f"{name} {what} {idx} has a norm above the largest "
                             f"{str(acc).replace('torch.', '')} ({torch.finfo(acc).max:.3g}); "
                             "scale the vectors down")
        raise ValueError(f"{name} contains NaN or Inf (first in {what} {idx})")
    tiny = (norms > 0) & (norms < torch.finfo(acc).tiny)
    if bool(tiny.any()):     # 1 / norm would overflow where the rows are scaled (streaming)
        idx = int(tiny.nonzero()[0])
        what = "row" if dim == 1 else "column"
        raise ValueError(f"{name} {what} {idx} has norm {float(norms[idx]):.3g}, below the "
                         f"smallest normal {str(acc).replace('torch.', '')} "
                         f"({torch.finfo(acc).tiny:.3g}); scale the vectors up")
    zero = norms == 0
    if bool(zero.any()):
        idx = int(zero.nonzero()[0])
        what = "row" if dim == 1 else "column"
        raise ValueError(f"{name} has an all-zero {what} ({what} {idx}); every vector must be "
                         "non-zero to be L2-normalised")
    return norms


# How far from 1 a norm may be for a vector to count as already unit (about the rounding of
# one L2-normalisation in that dtype).
UNIT_NORM_ATOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 2e-3,
                  torch.bfloat16: 1e-2}


def normalise(t: torch.Tensor, norms: torch.Tensor, dim: int) -> torch.Tensor:
    """L2-normalise along ``dim`` unless it already is (then the input is used as is, no copy)."""
    if bool(((norms - 1).abs() <= UNIT_NORM_ATOL[t.dtype]).all()):
        return t
    shape = (-1, 1) if dim == 1 else (1, -1)
    return (t / norms.to(t.dtype).reshape(shape)).to(t.dtype)


def check_shapes(image_features, text_proxies, xname="image_features", tname="text_proxies"):
    """X (N x D) and T (D x C) are floating matrices with the same D (nothing is copied)."""
    x = check_matrix(image_features, xname, "N x D: one row per image")
    t = check_matrix(text_proxies, tname, "D x C: one column per class, as "
                     "open_clip.build_zero_shot_classifier returns")
    if x.shape[1] != t.shape[0]:
        raise ValueError(f"{xname} has D={x.shape[1]} but {tname} has D={t.shape[0]} "
                         f"(expected {xname} N x D and {tname} D x C; pass "
                         f"{tname}.T if yours is C x D)")
    if t.shape[0] == t.shape[1] and t.shape[0] > 1:
        # C == D: the shapes cannot tell the layouts apart, the norms can (one class per column,
        # each L2-normalised): unit rows and non-unit columns mean C x D was passed
        acc = torch.float64 if t.dtype == torch.float64 else torch.float32
        tol = max(UNIT_NORM_ATOL[t.dtype], 1e-6)
        rows = torch.linalg.vector_norm(t, dim=1, dtype=acc)
        cols = torch.linalg.vector_norm(t, dim=0, dtype=acc)
        if bool(((rows - 1).abs() <= tol).all()) and not bool(((cols - 1).abs() <= tol).all()):
            raise ValueError(f"{tname} looks transposed: its rows are unit-norm and its columns "
                             f"are not, but the layout is D x C (one unit column per class); "
                             f"pass {tname}.T")
    return x, t


def check_features_and_proxies(image_features, text_proxies, xname="image_features",
                                tname="text_proxies"):
    """Validate X (N x D) and T (D x C); returns them L2-normalised (rows of X, columns of T)."""
    x, t = check_shapes(image_features, text_proxies, xname, tname)
    if x.device != t.device:
        raise ValueError(f"{xname} is on {x.device} but {tname} is on {t.device}; "
                         "move both to one device")
    x, t = cpu_upcast(x), cpu_upcast(t)
    x = normalise(x, check_finite(x, xname, 1), 1)
    t = normalise(t, check_finite(t, tname, 0), 0)
    return x, t


def cpu_upcast(t: torch.Tensor) -> torch.Tensor:
    """The CPU kernels compute in float32/float64: half precision on the CPU becomes float32
    (before normalising, so nothing is rounded to 16 bits on the way)."""
    if t.device.type == "cpu" and t.dtype in (torch.float16, torch.bfloat16):
        return t.float()
    return t


VALIDATION_CHUNK = 65536   # rows per chunk of the streamed check below


def check_host_features(x, chunk: int = VALIDATION_CHUNK):
    """Validate an N x D feature array that stays where it is (host memory, a memory map: the
    streamed fits) chunk by chunk; returns 1/row-norm (float32, or
    float64 for float64 features; None when every row is already unit) without copying the
    array."""
    x = check_matrix(x, "image_features", "N x D: one row per image")
    scales, unit = [], True
    for s in range(0, x.shape[0], chunk):
        norms = check_finite(x[s:s + chunk], "image_features", 1)
        if not bool(((norms - 1).abs() <= UNIT_NORM_ATOL[x.dtype]).all()):
            unit = False
        scales.append(1.0 / norms.to(acc_dtype(x.dtype)))
    return None if unit else torch.cat(scales)
