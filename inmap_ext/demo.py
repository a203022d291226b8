"""`inmap demo`: the main job on a built-in default that works offline.

1. A synthetic CLIP-like problem with a modality gap (inmap_ext.synthetic; synthetic, not CLIP):
   zero-shot vs InMaP accuracy and fit time per backend and device.
2. The whole image pipeline end to end (when open_clip is installed): an open_clip model
   (random weights unless --pretrained names weights open_clip can load), generated images ->
   text proxies -> features -> fit -> proxy file, report and predictions. With random weights
   its accuracy means nothing: it shows the pipeline runs, not how well.
"""
from __future__ import annotations

import os
import tempfile
import time

import torch

from . import _ops
from .fit import fit_vision_proxy
from .synthetic import make_image_folder, make_problem


# CLIP-calibrated synthetic geometry: image-text cosines ~0.4 through a shared modality gap,
# zero-shot ~2/3 right, as CLIP ViT-B/32 on ImageNet (README "Class prior").
CLIP_LIKE = dict(gap=2.0, text_noise=0.4)


def synthetic_comparison(n=10000, d=256, c=50, iters=2000, devices=None, seed=0,
                         progress=True):
    devices = devices or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    print(f"[1/2] synthetic CLIP-like problem (NOT real CLIP features): N={n} images, D={d}, "
          f"C={c} listed classes, modality gap between text proxies and image clusters")
    print(f"{'set':22} {'device':6} {'backend':7} {'zero-shot':>9} {'default':>8} "
          f"{'(prior, steps, s)':>24} {'paper':>7} {'(s)':>6}")
    rows = []
    sets = [("every class", make_problem(n, d, c, seed=seed, **CLIP_LIKE)),
            (f"{max(1, c // 10)} of {c} classes",
             make_problem(max(100, n // 10), d, c, seed=seed, present=max(1, c // 10),
                          **CLIP_LIKE))]
    for name, p in sets:
        for dev in devices:
            x, t, y = p.image_features.to(dev), p.text_proxies.to(dev), p.labels.to(dev)
            for backend in ("ext", "torch"):
                if backend == "ext" and not _ops.ext_available(dev):
                    print(f"{name:22} {dev:6} {backend:7} (no compiled kernels for this device)")
                    continue
                # a bar per fit (steps, objective) on stderr; the table goes to stdout
                t0 = time.perf_counter()
                r = fit_vision_proxy(x, t, iters=iters, backend=backend, progress=progress)
                secs = time.perf_counter() - t0
                t0 = time.perf_counter()
                paper = fit_vision_proxy(x, t, iters=iters, backend=backend, mode="paper",
                                         progress=progress)
                paper_s = time.perf_counter() - t0
                zs = (r.zero_shot_predict(x) == y).float().mean().item()
                acc = (r.predict(x) == y).float().mean().item()
                pacc = (paper.predict(x) == y).float().mean().item()
                rows.append(dict(set=name, device=dev, backend=backend, zero_shot=zs, inmap=acc,
                                 seconds=secs, steps=r.n_iters, prior=r.class_prior.chosen,
                                 paper=pacc, paper_seconds=paper_s))
                what = f"({r.class_prior.chosen}, {r.n_iters}, {secs:.1f}s)"
                print(f"{name:22} {dev:6} {backend:7} {zs:9.4f} {acc:8.4f} {what:>24} "
                      f"{pacc:7.4f} {paper_s:6.1f}", flush=True)
    print("      default = class_prior auto + the stopping rule; paper = the published "
          "algorithm (uniform prior, all steps)")
    return rows


def pipeline_run(model="ViT-B-32", pretrained=None, device="cpu", workdir=None):
    try:
        import open_clip  # noqa: F401
    except ImportError:
        print("[2/2] image pipeline skipped: open_clip is not installed "
              "(pip install 'inmap_ext[clip]')")
        return None
    from .pipeline import Log, fit_images

    if workdir is None:      # a temporary folder, removed afterwards
        with tempfile.TemporaryDirectory(prefix="inmap_demo_") as tmp:
            return pipeline_run(model, pretrained, device, tmp)
    images = os.path.join(workdir, "images")
    classes = ["red", "green", "blue", "yellow"]
    make_image_folder(images, classes, per_class=8)
    with open(os.path.join(workdir, "classes.txt"), "w") as f:
        f.write("\n".join(classes) + "\n")
    what = f"pretrained weights {pretrained!r}" if pretrained else \
        "RANDOM weights (no pretrained weights offline): accuracy here is meaningless"
    print(f"[2/2] image pipeline end to end: open_clip {model} with {what}; "
          f"{len(classes) * 8} generated images in {images}")
    report = fit_images(model=model, pretrained=pretrained, images=images,
                        classes=os.path.join(workdir, "classes.txt"),
                        out=os.path.join(workdir, "out"), device=device, workers=0,
                        cache_dir=os.path.join(workdir, "cache"), iters=200,
                        log=Log("quiet"))
    print(f"      wrote {report['outputs']['proxy']}, report.json, predictions.csv; "
          f"top-1 zero-shot {report['zero_shot']['acc1']:.3f} -> InMaP "
          f"{report['inmap']['acc1']:.3f} (random weights)" if "zero_shot" in report else "")
    return report


def main(args) -> int:
    synthetic_comparison(n=args.n, d=args.dim, c=args.classes, iters=args.iters,
                         devices=[args.device] if args.device else None)
    if not args.no_pipeline:
        pipeline_run(args.model, args.pretrained, args.device or "cpu")
    return 0
