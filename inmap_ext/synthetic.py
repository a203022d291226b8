"""A CLIP-like synthetic problem with a modality gap, for the demo, the tests and the benchmark.

Synthetic, not CLIP: image features cluster around per-class centres; the text proxies are those
centres seen through a modality gap (one shared offset, as in CLIP's joint space) plus per-class
noise, so the text proxies are sub-optimal class centres for images — the situation InMaP fixes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class SyntheticProblem:
    image_features: torch.Tensor  # N x D, unit rows
    text_proxies: torch.Tensor    # D x C, unit columns
    labels: torch.Tensor          # N, int64 ground truth


def make_problem(n: int = 10000, d: int = 256, c: int = 50, *, cone: float = 2.0,
                 gap: float = 1.0, text_noise: float = 0.9, image_noise: float = 1.0,
                 imbalance: float = 0.0, present: Optional[int] = None, seed: int = 0,
                 dtype=torch.float32, device="cpu",
                 generator: Optional[torch.Generator] = None) -> SyntheticProblem:
    """Draw a problem. Class centres share a common direction (``cone``: its weight against a
    random unit-scale part, so classes are correlated as in CLIP's narrow cone); ``gap`` is the
    length of the shared text-image offset; ``text_noise`` the per-class error of the text
    proxies; ``image_noise`` the spread of images around their centre (random parts are
    per-dimension N(0, 1/d), so of about unit length); ``imbalance`` > 0 makes class sizes
    decay geometrically (class c-1 is exp(-imbalance) times as likely as class 0); ``present``
    < c draws the images from that many randomly chosen classes only (a set that holds part of
    the class list; the text proxies still cover all c classes)."""
    g = generator or torch.Generator().manual_seed(seed)
    unit = lambda t, dim: torch.nn.functional.normalize(t, dim=dim)  # noqa: E731
    common = unit(torch.randn(d, generator=g, dtype=torch.float64), 0)
    centres = unit(cone * common + torch.randn(c, d, generator=g, dtype=torch.float64) / d ** 0.5,
                   1)
    offset = unit(torch.randn(d, generator=g, dtype=torch.float64), 0) * gap
    text = unit(centres + offset + text_noise * torch.randn(c, d, generator=g,
                                                            dtype=torch.float64) / d ** 0.5, 1)
    weights = torch.exp(-imbalance * torch.arange(c, dtype=torch.float64) / max(c - 1, 1))
    if present is not None:
        if not 1 <= present <= c:
            raise ValueError(f"present must be in [1, c={c}], got {present}")
        absent = torch.randperm(c, generator=g)[present:]
        weights[absent] = 0.0
    labels = torch.multinomial(weights, n, replacement=True, generator=g)
    images = unit(centres[labels] + image_noise * torch.randn(n, d, generator=g,
                                                              dtype=torch.float64) / d ** 0.5, 1)
    return SyntheticProblem(images.to(device=device, dtype=dtype),
                            text.T.contiguous().to(device=device, dtype=dtype),
                            labels.to(device))


# Problems that differ the way real CLIP models and sets differ (the tests' class-prior problems
# and bench/stopping.py's synthetic sets): the cosine scale of the zero-shot logits (ViT-like:
# top-1 cosine ~0.3, per-image spread over the classes ~0.02-0.03; RN50-like: ~0.2 and ~0.01,
# so softmax(S / 0.01) is much flatter), the class count, a strong or a weak zero-shot
# classifier, and what the set holds: every class evenly, part of the class list, a long tail.
KINDS = {  # name: (classes, make_problem arguments); zero-shot top-1 in the comment
    "vit, C=10": (10, dict(d=128, gap=2.0, text_noise=0.4)),                 # ~0.94
    "vit, C=100": (100, dict(d=128, gap=2.0, text_noise=0.4)),               # ~0.67
    "rn50, C=10": (10, dict(d=128, gap=4.0, text_noise=0.4, cone=3.0)),      # ~0.67, flat
    "rn50, C=100": (100, dict(d=128, gap=3.0, text_noise=0.4)),              # ~0.66, flat
    "weak, C=100": (100, dict(d=128, gap=3.0, text_noise=1.0)),              # ~0.16
    "vit, C=2": (2, dict(d=64, gap=2.0, text_noise=1.5)),
}
HOLDS = {"every class": {}, "half the classes": dict(present=0.5),
         "a fifth of the classes": dict(present=0.2), "long tail": dict(imbalance=4.6)}


def kind_problem(kind: str, holds: str, *, seed: int = 1, dtype=torch.float32,
                 device="cpu") -> Optional[SyntheticProblem]:
    """The problem of ``KINDS[kind]`` holding ``HOLDS[holds]``: max(400, 20 C) images; None
    where the kind has too few classes for that part of the list."""
    c, kw = KINDS[kind]
    extra = dict(HOLDS[holds])
    if "present" in extra:
        extra["present"] = max(2, round(extra["present"] * c))
        if extra["present"] >= c:
            return None
    return make_problem(max(400, 20 * c), c=c, seed=seed, dtype=dtype, device=device, **kw,
                        **extra)


COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220),
           "yellow": (230, 210, 40), "purple": (140, 50, 170), "orange": (240, 140, 30)}


def make_image_folder(root: str, classes=("red", "green", "blue"), per_class: int = 6,
                      size: int = 64, seed: int = 0, labeled: bool = True) -> list:
    """Write small generated images (a coloured disc on a noisy background per class name in
    COLOURS) as <root>/<class>/<i>.png (labeled) or <root>/<class>_<i>.png (flat). Returns the
    paths."""
    import os

    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    paths = []
    for c in classes:
        colour = COLOURS.get(c, tuple(int(v) for v in rng.integers(0, 255, 3)))
        folder = os.path.join(root, c) if labeled else root
        os.makedirs(folder, exist_ok=True)
        for i in range(per_class):
            bg = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
            im = Image.fromarray(bg)
            r = int(rng.integers(size // 4, size // 2))
            cx, cy = (int(v) for v in rng.integers(r, size - r + 1, 2))
            ImageDraw.Draw(im).ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
            name = f"{i:03d}.png" if labeled else f"{c}_{i:03d}.png"
            p = os.path.join(folder, name)
            im.save(p)
            paths.append(p)
    return paths
