"""Shared lists and helpers every test module parametrizes over (pytorch_scatter's habit)."""
import pytest
import torch

import inmap_ext
from inmap_ext import _ops

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# The backends that can run on a device: the pure-torch oracle always, compiled kernels if built.
BACKENDS = ["torch", "ext"]
FLOAT_DTYPES = [torch.float32, torch.float64]

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def skip_if_no_ext(device):
    if not _ops.ext_available(device):
        pytest.skip(f"compiled {torch.device(device).type} kernels not built")


def unit_rows(n, d, *, seed=0, dtype=torch.float64, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    return torch.nn.functional.normalize(x, dim=1).to(device=device, dtype=dtype)


def unit_cols(d, c, *, seed=1, dtype=torch.float64, device="cpu"):
    return unit_rows(c, d, seed=seed, dtype=dtype, device=device).T.contiguous()


def clip_like(n=600, d=48, c=12, *, seed=0, dtype=torch.float64, device="cpu", **kw):
    """A small CLIP-like problem (correlated classes, modality gap) from inmap_ext.synthetic."""
    from inmap_ext.synthetic import make_problem

    p = make_problem(n, d, c, seed=seed, dtype=dtype, device=device, **kw)
    return p.image_features, p.text_proxies, p.labels


def perturbed(f, scale=1.01):
    """A deliberately wrong op: ``f`` with its floating outputs scaled by ``scale``."""
    def wrong(*args):
        out = f(*args)
        if isinstance(out, tuple):
            return tuple(t * scale if t.is_floating_point() else t for t in out)
        return out * scale
    return wrong


__all__ = ["inmap_ext", "DEVICES", "BACKENDS", "FLOAT_DTYPES", "requires_cuda", "skip_if_no_ext",
           "unit_rows", "unit_cols", "clip_like", "perturbed"]
