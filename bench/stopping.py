"""The stopping rule's accuracy bound on real features:
`python bench/stopping.py A.npz [B.npz ...] [--device cpu]`.

For each DATA.npz (X N x D, y N, T D x C) and its full set: the published algorithm
(mode="paper": uniform prior, all 2000 steps) against the same prior with the default stopping
rule (class_prior="uniform", stop="auto"), so the two differ by the solver's stopping only.
Prints and writes bench/results/stopping_<date>.{json,md}: steps, accuracy of each, the
difference (stopped - published) and the agreement of the predictions.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import inmap_ext  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("data", nargs="+")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args(argv)
    rows = []
    for path in args.data:
        d = np.load(path)
        X = torch.tensor(d["X"]).float().to(args.device)
        T = torch.tensor(d["T"]).float().to(args.device)
        y = torch.from_numpy(np.asarray(d["y"]).astype(np.int64)).to(args.device)
        t0 = time.perf_counter()
        paper = inmap_ext.fit_vision_proxy(X, T, mode="paper")
        t1 = time.perf_counter()
        stopped = inmap_ext.fit_vision_proxy(X, T, class_prior="uniform")
        t2 = time.perf_counter()
        pp, ps = paper.predict(X), stopped.predict(X)
        row = {"data": os.path.basename(path), "n": len(y), "classes": T.shape[1],
               "paper_acc": 100 * float((pp == y).float().mean()),
               "stopped_acc": 100 * float((ps == y).float().mean()),
               "paper_steps": paper.n_iters, "stopped_steps": stopped.n_iters,
               "agreement": 100 * float((pp == ps).float().mean()),
               "paper_s": t1 - t0, "stopped_s": t2 - t1}
        row["difference"] = row["stopped_acc"] - row["paper_acc"]
        rows.append(row)
        print(f"{row['data']}: paper {row['paper_acc']:.2f} ({row['paper_steps']} steps) "
              f"stopped {row['stopped_acc']:.2f} ({row['stopped_steps']} steps) "
              f"difference {row['difference']:+.2f}, agreement {row['agreement']:.2f}%",
              flush=True)
    date = datetime.date.today().isoformat()
    meta = {"device": args.device, "machine": platform.processor() or platform.machine(),
            "torch": torch.__version__, "inmap_ext": inmap_ext.__version__, "date": date}
    os.makedirs(args.out, exist_ok=True)
    base = os.path.join(args.out, f"stopping_{date}")
    with open(base + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    lines = [f"# Stopping rule against all 2000 published steps ({date})", "",
             f"Full sets, uniform prior in both; device {args.device}, torch {meta['torch']}.",
             "", "| data | N | C | paper % (steps) | stopped % (steps) | stopped - paper | "
             "agreement % |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['data']} | {r['n']} | {r['classes']} | {r['paper_acc']:.2f} "
                     f"({r['paper_steps']}) | {r['stopped_acc']:.2f} ({r['stopped_steps']}) | "
                     f"{r['difference']:+.2f} | {r['agreement']:.2f} |")
    worst = min(r["difference"] for r in rows)
    lines += ["", f"Worst difference: {worst:+.2f} points."]
    with open(base + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"worst difference {worst:+.2f}; wrote {base}.md")


if __name__ == "__main__":
    main()
