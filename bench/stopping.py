"""The default solver against all 2000 published steps, on real features and synthetic sets:
`python bench/stopping.py [A.npz ...] [--synthetic] [--seed 0] [--device cpu]`.

For each DATA.npz (X N x D, y N, T D x C): its full set and the partial and long-tailed sets of
bench/robustness.py (seed ``--seed``). With ``--synthetic``: every problem kind of
inmap_ext.synthetic (``KINDS``: ViT-like and RN50-like cosine scales, 2 to 100 classes, a weak
zero-shot classifier) holding every class, part of the class list or a long tail (``HOLDS``),
float32, the tests' seed. On every set, with the class prior the default fit
chooses there (so that all runs minimise the same objective the default fit does):
- "published": the published descent for all 2000 steps (solver="gd", stop="none");
- "gd stopped": the published descent with its stopping rule (the default until 2026-12-05);
- "lbfgs": the default solver (Riemannian L-BFGS, lbfgs.py) with its stopping rule;
- "lbfgs@40": the default solver capped at 40 passes.
Prints and writes bench/results/stopping_<date>.{json,md}: passes over the features of each
solver, top-1 of each minus that of the 2000 steps, agreement of predictions with the 2000
steps, and the objective each reached.
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
from robustness import subsets  # noqa: E402
from inmap_ext.synthetic import HOLDS, KINDS, kind_problem  # noqa: E402

SOLVERS = [("gd stopped", dict(solver="gd")), ("lbfgs", {}), ("lbfgs@40", dict(iters=40))]


def compare(name, X, T, y):
    prior = inmap_ext.fit_vision_proxy(X, T, iters=1).class_prior.chosen   # auto's choice
    acc = lambda p: 100 * float((p == y).double().mean())  # noqa: E731
    t0 = time.perf_counter()
    ref = inmap_ext.fit_vision_proxy(X, T, class_prior=prior, solver="gd", stop="none")
    pref = ref.predict(X)
    row = {"set": name, "n": len(y), "classes": T.shape[1], "prior": prior,
           "published": {"acc": acc(pref), "passes": ref.passes["descent"],
                         "objective": float(ref.objective[-1]),
                         "seconds": time.perf_counter() - t0}}
    for label, kw in SOLVERS:
        t0 = time.perf_counter()
        r = inmap_ext.fit_vision_proxy(X, T, class_prior=prior, **kw)
        p = r.predict(X)
        row[label] = {"acc": acc(p), "difference": acc(p) - acc(pref),
                      "agreement": 100 * float((p == pref).double().mean()),
                      "passes": r.passes["descent"] + r.passes["stopping_checks"],
                      "objective": float(r.objective[-1]), "seconds": time.perf_counter() - t0}
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("data", nargs="*")
    ap.add_argument("--synthetic", action="store_true",
                    help="also the synthetic problem kinds of inmap_ext.synthetic")
    ap.add_argument("--kinds", nargs="+", default=None, metavar="KIND",
                    help="with --synthetic: only these KINDS (default: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args(argv)
    if not args.data and not args.synthetic:
        ap.error("give DATA.npz files, --synthetic, or both")
    unknown = set(args.kinds or ()) - set(KINDS)
    if unknown:
        ap.error(f"--kinds: unknown {sorted(unknown)}; expected some of {list(KINDS)}")
    rows = []

    def run(data, set_name, X, T, y):
        row = compare(set_name, X, T, y)
        row["data"] = data
        rows.append(row)
        print(f"{data[:24]:24s} {set_name[:24]:24s} N={row['n']:5d} {row['prior']:8s} "
              f"published {row['published']['acc']:.2f} | " + " | ".join(
                  f"{k}: {row[k]['passes']}p {row[k]['difference']:+.2f} ag "
                  f"{row[k]['agreement']:.2f}" for k, _ in SOLVERS), flush=True)

    for path in args.data:
        d = np.load(path)
        X = torch.nn.functional.normalize(torch.tensor(d["X"]).float(), dim=1).to(args.device)
        T = torch.tensor(d["T"]).float().to(args.device)
        y = np.asarray(d["y"]).astype(np.int64)
        for set_name, idx in subsets(y, T.shape[1], args.seed).items():
            it = torch.from_numpy(idx).to(args.device)
            run(os.path.basename(path), set_name, X[it], T,
                torch.from_numpy(y[idx]).to(args.device))
    if args.synthetic:
        for kind in args.kinds or KINDS:
            for holds in HOLDS:
                p = kind_problem(kind, holds, device=args.device)
                if p is not None:
                    run(f"synthetic {kind}", holds, p.image_features, p.text_proxies, p.labels)
    date = datetime.date.today().isoformat()
    meta = {"device": args.device, "machine": platform.machine(), "seed": args.seed,
            "torch": torch.__version__, "inmap_ext": inmap_ext.__version__, "date": date}
    write(rows, meta, args.out)


def write(rows, meta, out_dir):
    """bench/results/stopping_<date>.{json,md} from the rows (also used to rewrite a run)."""
    date, seed, device = meta["date"], meta["seed"], meta["device"]
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, f"stopping_{date}")
    with open(base + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    lines = [f"# The default solver against all 2000 published steps ({date})", "",
             f"Real features, full sets and the robustness bench's sets (seed {seed}), and "
             "where named the synthetic problem kinds of inmap_ext.synthetic (KINDS x HOLDS, "
             "seed 1, float32); on each, the class prior the default fit chooses there, the same in every run. "
             f"Device {device}, torch {meta['torch']}. Passes: over the features (gd "
             "stopped: its steps plus its top-1 checks).", "",
             "| data | set | N | prior | 2000 steps % | " + " | ".join(
                 f"{k}: passes, diff, agreement %" for k, _ in SOLVERS) + " |",
             "|---|---|---|---|---|" + "---|" * len(SOLVERS)]
    for r in rows:
        data = r["data"] if r["data"].startswith("synthetic") else r["data"].split("_")[0]
        lines.append(f"| {data} | {r['set']} | {r['n']} | {r['prior']} | "
                     f"{r['published']['acc']:.2f} | " + " | ".join(
                         f"{r[k]['passes']}, {r[k]['difference']:+.2f}, {r[k]['agreement']:.2f}"
                         for k, _ in SOLVERS) + " |")
    summary = []
    groups = [("real sets", [r for r in rows if not r["data"].startswith("synthetic")]),
              ("synthetic sets", [r for r in rows if r["data"].startswith("synthetic")])]
    for group, rs in groups:
        if not rs:
            continue
        summary.append(f"{group}:")
        for k, _ in SOLVERS:
            diffs = [r[k]["difference"] for r in rs]
            passes = [r[k]["passes"] for r in rs]
            ag_ok = sum(r[k]["agreement"] >= r["gd stopped"]["agreement"] for r in rs)
            summary.append(
                f"- {k}: passes {min(passes)}-{max(passes)} (median {int(np.median(passes))}); "
                f"top-1 minus 2000 steps: mean {np.mean(diffs):+.2f}, worst {min(diffs):+.2f}; "
                f"within 0.1 point or above on {sum(v >= -0.1 for v in diffs)} of {len(rs)} "
                f"sets, within 0.1 point either way on {sum(abs(v) <= 0.1 for v in diffs)}; "
                f"agreement at least the gd stop's on {ag_ok} of {len(rs)}.")
    lines += [""] + summary
    with open(base + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(summary))
    print(f"wrote {base}.md")


if __name__ == "__main__":
    main()
