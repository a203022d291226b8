"""Extraction throughput: `python bench/extract.py [--n 256] [--out bench/results]`.

images/s of `inmap extract` against a bare open_clip loop (the same model with random weights,
batch size, DataLoader workers, precision and images): generated JPEGs as a folder and the same
JPEGs as webdataset tar shards. Each run is timed whole, from the model's creation to the last
feature in memory (the bare loop) or to the command's return (`inmap extract`: option checks,
model, listing, the cache key, encoding, cache writes), into a fresh cache each time; the runs
alternate and repeat, and the best of each is kept (the machine may be shared: its load average
is recorded). The target: `inmap extract` at 90% or more of the bare loop's rate.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import platform
import sys
import tarfile
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def make_images(folder: str, n: int, size: int, seed: int = 0) -> list:
    """``n`` JPEGs of ``size`` x ``size``: a smooth gradient with noise (photo-like sizes)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    paths = []
    for i in range(n):
        base = ramp[None, :, None] * rng.uniform(0.2, 1, 3) + ramp[:, None, None] * 0.3
        img = np.clip(base + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
        p = os.path.join(folder, f"{i:06d}.jpg")
        Image.fromarray(img).save(p, quality=90)
        paths.append(p)
    return paths


def make_shards(folder: str, paths: list, n_shards: int) -> str:
    """The same JPEGs in ``n_shards`` tars (webdataset layout: key.jpg); returns the pattern."""
    os.makedirs(folder, exist_ok=True)
    per = -(-len(paths) // n_shards)
    for s in range(n_shards):
        with tarfile.open(os.path.join(folder, f"{s:05d}.tar"), "w") as t:
            for p in paths[s * per:(s + 1) * per]:
                t.add(p, arcname=os.path.basename(p))
    return os.path.join(folder, "{%05d..%05d}.tar" % (0, n_shards - 1))


class Files(torch.utils.data.Dataset):
    def __init__(self, paths, preprocess):
        self.paths, self.preprocess = paths, preprocess

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        from PIL import Image

        with Image.open(self.paths[i]) as im:
            return self.preprocess(im.convert("RGB"))


@torch.no_grad()
def bare_loop(model_name: str, paths: list, batch_size: int, workers: int) -> dict:
    """The bare open_clip loop: create the model, DataLoader over the files, encode_image."""
    import open_clip

    t0 = time.perf_counter()
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=None)
    model.eval()
    t_model = time.perf_counter()
    loader = torch.utils.data.DataLoader(Files(paths, preprocess), batch_size=batch_size,
                                         num_workers=workers)
    n = 0
    for x in loader:
        f = model.encode_image(x, normalize=True)
        n += f.shape[0]
    t1 = time.perf_counter()
    return {"images": n, "seconds": t1 - t0, "encode_seconds": t1 - t_model}


def inmap_extract(model_name: str, images: str, batch_size: int, workers: int,
                  cache: str) -> dict:
    """`inmap extract` in this process (no interpreter start-up on either side), --log json."""
    from inmap_ext.cli import main

    err = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stderr(err):
        rc = main(["extract", "--model", model_name, "--pretrained", "none", "--images", images,
                   "--batch-size", str(batch_size), "--workers", str(workers), "--cache-dir",
                   cache, "--log", "json"])
    t1 = time.perf_counter()
    if rc != 0:
        raise RuntimeError(f"inmap extract failed ({rc}): {err.getvalue()[-2000:]}")
    events = [json.loads(line) for line in err.getvalue().splitlines() if line.startswith("{")]
    feats = [e for e in events if e.get("event") == "features"][-1]
    return {"images": feats["encoded"], "seconds": t1 - t0, "encode_seconds": feats["seconds"],
            "reported_images_per_s": feats["images_per_s"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=256, help="generated JPEGs (default 256)")
    ap.add_argument("--size", type=int, default=256, help="their side in pixels (default 256)")
    ap.add_argument("--shards", type=int, default=4, help="tar shards (default 4)")
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    ap.add_argument("--tag", default=None, help="file name tag (default: today's date)")
    args = ap.parse_args()
    os.environ.setdefault("INMAP_VERIFY", "0")
    date = datetime.date.today().isoformat()
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_images(os.path.join(tmp, "jpg"), args.n, args.size)
        pattern = make_shards(os.path.join(tmp, "tars"), paths, args.shards)
        runs = {"bare open_clip loop": [], "inmap extract, folder": [],
                "inmap extract, tar shards": []}
        for r in range(args.repeats):
            for name in runs:
                load = os.getloadavg()[0]
                cache = os.path.join(tmp, f"cache{r}_{len(runs[name])}_{hash(name) & 0xffff}")
                if name.startswith("bare"):
                    got = bare_loop(args.model, paths, args.batch_size, args.workers)
                else:
                    src = pattern if "tar" in name else os.path.join(tmp, "jpg")
                    got = inmap_extract(args.model, src, args.batch_size, args.workers, cache)
                got.update(images_per_s=got["images"] / got["seconds"],
                           encode_images_per_s=got["images"] / got["encode_seconds"],
                           load_before=load, load_after=os.getloadavg()[0])
                runs[name].append(got)
                print(f"{name:28s} run {r}: {got['images_per_s']:6.1f} images/s "
                      f"({got['seconds']:.1f} s; load {load:.1f})", file=sys.stderr)
    best = {k: max(v, key=lambda g: g["images_per_s"]) for k, v in runs.items()}
    bare = best["bare open_clip loop"]["images_per_s"]
    result = {
        "date": date, "machine": {"platform": platform.platform(),
                                  "processor": platform.processor() or platform.machine(),
                                  "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                                  "torch": torch.__version__, "device": "cpu"},
        "data": {"images": args.n, "format": "JPEG q90", "side_px": args.size,
                 "shards": args.shards},
        "settings": {"model": args.model, "weights": "random (seed 0)", "precision": "fp32",
                     "batch_size": args.batch_size, "workers": args.workers,
                     "repeats": args.repeats, "kept": "best of the repeats"},
        "runs": runs,
        "best_images_per_s": {k: v["images_per_s"] for k, v in best.items()},
        "ratio_to_bare": {k: v["images_per_s"] / bare for k, v in best.items()},
    }
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"extract_{args.tag or date}")
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=1)
    lines = [f"Extraction throughput, {date}: {args.model} (random weights, fp32, CPU), "
             f"{args.n} generated {args.size}x{args.size} JPEGs (q90), batch {args.batch_size}, "
             f"{args.workers} DataLoader workers; {platform.processor() or platform.machine()}, "
             f"{os.cpu_count()} CPUs, torch {torch.__version__}. Each run timed whole (model "
             "creation included, into a fresh cache); best of "
             f"{args.repeats} alternating runs.", "",
             "| run | images/s (best, whole run) | vs bare loop | encoding phase only, "
             "images/s | each run: images/s (load average before) |",
             "|---|---|---|---|---|"]
    for k, v in runs.items():
        each = ", ".join(f"{g['images_per_s']:.1f} ({g['load_before']:.1f})" for g in v)
        lines.append(f"| {k} | {best[k]['images_per_s']:.1f} | "
                     f"{100 * result['ratio_to_bare'][k]:.0f}% | "
                     f"{best[k]['encode_images_per_s']:.1f} | {each} |")
    loads = [g[k] for v in runs.values() for g in v for k in ("load_before", "load_after")]
    lines += ["", "Encoding phase: the bare loop after the model is created; `inmap extract` "
              "from its cache key (a stat of every file) to the features read back from the "
              "cache (its `features` event's seconds: the rate report.json's "
              "`features.images_per_s` and the log show).", "",
              f"Load average during the runs: {min(loads):.1f} to {max(loads):.1f} on "
              f"{os.cpu_count()} CPUs (other jobs share the machine: compare runs of one table "
              "only)."]
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
