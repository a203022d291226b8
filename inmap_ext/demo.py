"""`inmap demo`: the main job on a built-in default that works offline.

1. A synthetic CLIP-like problem with a modality gap (inmap_ext.synthetic; synthetic, not CLIP):
   zero-shot vs InMaP accuracy and fit time per backend and device, for the default fit (class
   prior auto + the stopping rule) and the published algorithm (mode="paper": uniform prior,
   all 2000 steps), on a set holding every class and on one holding a tenth of them.
2. The whole image pipeline end to end (when open_clip is installed): an open_clip model
   (random weights unless --pretrained names weights open_clip can load), generated images ->
   text proxies -> features -> fit -> proxy file, report and predictions. With random weights
   its accuracy means nothing: it shows the pipeline runs, not how well.

The sizes below keep the whole demo within about a minute on 2 CPU cores (the published fit's
2000 steps dominate); `inmap demo --n 10000 --dim 256` runs a larger problem.
"""
from __future__ import annotations

import os
import tempfile
import time

import torch

from . import _ops
from .fit import fit_vision_proxy
from .synthetic import make_image_folder, make_problem

# The synthetic comparison's default size: N images, D dimensions, C listed classes, at most
# ITERS gradient steps (the published algorithm runs all of them).
N, D, C, ITERS = 1000, 128, 30, 2000

# CLIP-like synthetic geometry: image-text cosines ~0.4 through a shared modality gap, so that
# InMaP has the text-image gap to close (synthetic, not CLIP features).
CLIP_LIKE = dict(gap=2.0, text_noise=0.4)


def synthetic_comparison(n=N, d=D, c=C, iters=ITERS, devices=None, seed=0, progress=True,
                         paper=True):
    """Print (and return as dicts) zero-shot vs the default fit vs the published algorithm.
    The published fit runs once per set and device, on the first backend (its accuracy does
    not depend on the backend); its row in the table holds its accuracy and time."""
    devices = devices or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    n_part, c_part = max(100, n // 5), max(1, c // 10)
    print(f"[1/2] synthetic CLIP-like problem (NOT real CLIP features): {n} images, D={d}, "
          f"C={c} listed classes, a modality gap between text proxies and image clusters; "
          f"then {n_part} images of {c_part} of the {c} classes")
    print(f"{'set':16} {'device':6} {'backend':7} {'zero-shot':>9} {'default':>8} "
          f"{'(prior, passes, s)':>22}  {'paper':>6} {'(s)':>6}")
    rows = []
    sets = [("every class", make_problem(n, d, c, seed=seed, **CLIP_LIKE)),
            (f"{c_part} of {c} classes",
             make_problem(n_part, d, c, seed=seed, present=c_part, **CLIP_LIKE))]
    for name, p in sets:
        for dev in devices:
            x, t, y = p.image_features.to(dev), p.text_proxies.to(dev), p.labels.to(dev)
            paper_done = not paper
            for backend in ("ext", "torch"):
                if backend == "ext" and not _ops.ext_available(dev):
                    print(f"{name:16} {dev:6} {backend:7} (no compiled kernels for this device)")
                    continue
                # a bar per fit (passes or steps, objective) on stderr; the table to stdout
                t0 = time.perf_counter()
                r = fit_vision_proxy(x, t, iters=iters, backend=backend, progress=progress)
                secs = time.perf_counter() - t0
                zs = (r.zero_shot_predict(x) == y).float().mean().item()
                acc = (r.predict(x) == y).float().mean().item()
                pacc = paper_s = None
                if not paper_done:
                    t0 = time.perf_counter()
                    pr = fit_vision_proxy(x, t, iters=iters, backend=backend, mode="paper",
                                          progress=progress)
                    paper_s = time.perf_counter() - t0
                    pacc = (pr.predict(x) == y).float().mean().item()
                    paper_done = True
                rows.append(dict(set=name, device=dev, backend=backend, zero_shot=zs, inmap=acc,
                                 seconds=secs, steps=r.n_iters, passes=r.passes["total"],
                                 prior=r.class_prior.chosen,
                                 paper=pacc, paper_seconds=paper_s))
                what = f"({r.class_prior.chosen}, {r.passes['total']}p, {secs:.1f}s)"
                tail = (f"{pacc:6.4f} {paper_s:6.1f}" if pacc is not None else
                        f"{'':>6} {'':>6}" if not paper else f"{'(above)':>13}")
                print(f"{name:16} {dev:6} {backend:7} {zs:9.4f} {acc:8.4f} {what:>22}  {tail}",
                      flush=True)
    print(f"      default = class_prior auto + L-BFGS with its stopping rule; (prior, passes "
          f"over the features, seconds)")
    if paper:
        print(f"      paper = the published algorithm, mode=\"paper\": uniform prior, all {iters} "
              f"steps; run once per set and device (the backends agree)")
    return rows


def pipeline_run(model="ViT-B-32", pretrained=None, device="cpu", workdir=None):
    try:
        import open_clip  # noqa: F401
    except ImportError:
        print("[2/2] image pipeline skipped: open_clip is not installed "
              "(pip install 'inmap_ext[clip]')")
        return None
    from .pipeline import Log, fit_images

    temporary = workdir is None
    if temporary:      # a temporary folder, removed afterwards: its paths are not printed
        with tempfile.TemporaryDirectory(prefix="inmap_demo_") as tmp:
            return _pipeline(model, pretrained, device, tmp, temporary, Log, fit_images)
    return _pipeline(model, pretrained, device, workdir, temporary, Log, fit_images)


def _pipeline(model, pretrained, device, workdir, temporary, Log, fit_images):
    images = os.path.join(workdir, "images")
    classes = ["red", "green", "blue", "yellow"]
    make_image_folder(images, classes, per_class=8)
    with open(os.path.join(workdir, "classes.txt"), "w") as f:
        f.write("\n".join(classes) + "\n")
    what = f"pretrained weights {pretrained!r}" if pretrained else \
        "RANDOM weights (no pretrained weights offline): accuracy here is meaningless"
    where = "a temporary folder, removed at the end" if temporary else images
    print(f"[2/2] image pipeline end to end: open_clip {model} with {what}; "
          f"{len(classes) * 8} generated images of {len(classes)} colours in {where}", flush=True)
    out = os.path.join(workdir, "out")
    t0 = time.perf_counter()
    # open_clip's log records and Python warnings become "warning: ..." lines, as in the CLI
    with Log("text").routing_third_party():
        report = fit_images(model=model, pretrained=pretrained, images=images,
                            classes=os.path.join(workdir, "classes.txt"), out=out,
                            device=device, workers=0, cache_dir=os.path.join(workdir, "cache"),
                            iters=200, log=Log("quiet"))
    secs = time.perf_counter() - t0
    files = "proxy.safetensors, report.json, predictions.csv"
    print(f"      wrote {files}" + ("" if temporary else f" in {out}") +
          f" ({secs:.1f}s: model, text proxies, features, fit)")
    if "zero_shot" in report:
        print(f"      top-1 zero-shot {report['zero_shot']['acc1']:.3f} -> InMaP "
              f"{report['inmap']['acc1']:.3f}"
              + ("" if pretrained else " (random weights: meaningless)"))
    return report


def main(args) -> int:
    def arg(name, default):
        value = getattr(args, name, None)
        return default if value is None else value

    t0 = time.perf_counter()
    synthetic_comparison(n=arg("n", N), d=arg("dim", D), c=arg("classes", C),
                         iters=arg("iters", ITERS),
                         devices=[args.device] if getattr(args, "device", None) else None)
    if not getattr(args, "no_pipeline", False):
        pipeline_run(arg("model", "ViT-B-32"), getattr(args, "pretrained", None),
                     getattr(args, "device", None) or "cpu")
    print(f"demo done in {time.perf_counter() - t0:.0f}s. On your images: "
          "inmap fit --model ViT-B-32 --pretrained openai --images DIR --classes classes.txt "
          "--out runs/x  (README.md)")
    return 0
