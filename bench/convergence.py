"""Time to solution: `python bench/convergence.py [DATA.npz] [--device cpu] [--repeat 1]`.

The default fit (class_prior="auto", stop="auto") against mode="paper" (2000 steps), side by
side in one run: steps, wall time, accuracy and agreement of the predictions, on the real
features of DATA.npz (X N x D, y N, T D x C; the full set) when given, and on synthetic shapes
(N from 100 to 20k, C from 2 to 1000, balanced or not). Writes
bench/results/convergence_<data>_<date>.{json,md} with the median time ratio.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import inmap_ext  # noqa: E402
from inmap_ext.synthetic import make_problem  # noqa: E402

# (name, N, D, C, make_problem options): CLIP-calibrated (gap 2, text noise 0.4) and others
SYNTHETIC = [
    ("C=2", 2000, 64, 2, {}),
    ("N=100, C=10", 100, 64, 10, {}),
    ("C=100 balanced", 5000, 128, 100, dict(gap=2.0, text_noise=0.4)),
    ("C=100, 10 present", 1000, 128, 100, dict(gap=2.0, text_noise=0.4, present=10)),
    ("C=100 imbalanced", 5000, 128, 100, dict(gap=2.0, text_noise=0.4, imbalance=3.0)),
    ("N=10k, C=1000", 10000, 128, 1000, dict(gap=2.0, text_noise=0.4)),
]


def _timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    r = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return r, time.perf_counter() - t0


def compare(name, X, T, y, device, repeat=1):
    X, T, y = X.to(device), T.to(device), y.to(device)
    zs = float((inmap_ext.zero_shot_topk(X, T)[1][:, 0] == y).double().mean())
    runs = {}
    for label, kw in (("paper", dict(mode="paper")), ("default", {})):
        best = None
        for _ in range(repeat):
            r, s = _timed(lambda: inmap_ext.fit_vision_proxy(X, T, **kw), device)
            best = s if best is None else min(best, s)
        runs[label] = (r, best)
    (p, tp), (d, td) = runs["paper"], runs["default"]
    pp, pd = p.predict(X), d.predict(X)
    row = {"set": name, "n": X.shape[0], "d": X.shape[1], "c": T.shape[1],
           "zero_shot": 100 * zs,
           "paper_acc": 100 * float((pp == y).double().mean()),
           "default_acc": 100 * float((pd == y).double().mean()),
           "paper_steps": p.n_iters, "default_steps": d.n_iters,
           "paper_s": tp, "default_s": td, "time_ratio": td / tp,
           "agreement": 100 * float((pp == pd).double().mean()),
           "default_prior": d.class_prior.chosen, "how_it_ended": d.stop_reason}
    print(f"{name:22s} N={row['n']:6d} C={row['c']:5d}: paper {row['paper_acc']:.2f}% "
          f"{tp:.1f}s ({p.n_iters} steps) | default {row['default_acc']:.2f}% {td:.1f}s "
          f"({d.n_iters} steps, prior {row['default_prior']}) | time {row['time_ratio']:.1%}, "
          f"agreement {row['agreement']:.2f}%", flush=True)
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("data", nargs="?", help=".npz with X (N x D), y (N), T (D x C)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeat", type=int, default=1, help="timed runs per fit (the best kept)")
    ap.add_argument("--no-synthetic", action="store_true")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    rows = []
    if args.data:
        d = np.load(args.data)
        rows.append(compare(f"real: {os.path.basename(args.data)}",
                            torch.tensor(d["X"]).float(), torch.tensor(d["T"]).float(),
                            torch.tensor(np.asarray(d["y"]).astype(np.int64)), device,
                            args.repeat))
    if not args.no_synthetic:
        for name, n, dim, c, kw in SYNTHETIC:
            p = make_problem(n, dim, c, seed=7, **kw)
            rows.append(compare(f"synthetic: {name}", p.image_features, p.text_proxies,
                                p.labels, device, args.repeat))
    _write(args, rows)


def _write(args, rows):
    date = datetime.date.today().isoformat()
    data = os.path.basename(args.data).rsplit(".", 1)[0] if args.data else "synthetic"
    meta = {"data": args.data and os.path.basename(args.data), "device": args.device,
            "threads": torch.get_num_threads(), "torch": torch.__version__, "date": date,
            "median_time_ratio": statistics.median(r["time_ratio"] for r in rows)}
    os.makedirs(args.out, exist_ok=True)
    base = os.path.join(args.out, f"convergence_{data}_{date}")
    with open(base + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    lines = [f"# Time to solution: default fit vs mode=\"paper\" ({date})", "",
             f"Device {args.device} ({meta['threads']} threads), torch {meta['torch']}; each fit "
             "timed whole (class prior / Sinkhorn, pseudo labels, descent); top-1 % on the set "
             "itself.", "",
             "| set | N | C | zero-shot | paper acc | default acc | paper steps | default steps "
             "| paper s | default s | time ratio | agreement % | default prior |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['set']} | {r['n']} | {r['c']} | {r['zero_shot']:.2f} | "
                     f"{r['paper_acc']:.2f} | {r['default_acc']:.2f} | {r['paper_steps']} | "
                     f"{r['default_steps']} | {r['paper_s']:.2f} | {r['default_s']:.2f} | "
                     f"{r['time_ratio']:.1%} | {r['agreement']:.2f} | {r['default_prior']} |")
    lines += ["", f"Median time ratio (default / paper): {meta['median_time_ratio']:.1%}."]
    with open(base + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print(lines[-1])
    print(f"wrote {base}.json and {base}.md")


if __name__ == "__main__":
    main()
