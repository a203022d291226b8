"""How much a fit's answer moves with its arithmetic, on real CLIP features:
`python bench/precision.py A.npz [B.npz ...] [--seeds 0 1] [--threads 1]
[--runs bf16x3 chunk512 fp64]`.

Every unlabeled set of bench/robustness.py (the full set of each DATA.npz, sets holding a half,
a fifth and a tenth of the classes, long tails with imbalance 10 and 100; the full set once) is
fitted with the default fit in float32 and with each run of ``--runs``:
- "bf16x3": precision="bf16x3" (every float32 GEMM of the CPU kernels as three bfloat16 GEMMs:
  csrc/cpu/bf16x3.h);
- "chunk512": float32 with 512 rows per chunk (the same arithmetic summed in another order: what
  float32's own rounding moves);
- "fp64": precision="fp64";
- "bf16": precision="bf16" (features rounded to bfloat16 once).
For each: the class prior chosen, passes, top-1 and agreement of predictions with the float32
fit. Writes bench/results/precision_<date>.{json,md}: per set, and a summary per run (the same
prior on how many sets; agreement median and least; top-1 difference mean |.|, least and most),
naming machine, torch, threads and date.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
import inmap_ext  # noqa: E402
from robustness import subsets  # noqa: E402

RUNS = {"bf16x3": dict(precision="bf16x3"), "chunk512": dict(chunk_size=512),
        "fp64": dict(precision="fp64"), "bf16": dict(precision="bf16")}


def _load(path):
    d = np.load(path)
    X = torch.nn.functional.normalize(torch.from_numpy(np.asarray(d["X"])).float(), dim=1)
    return X.contiguous(), torch.from_numpy(np.asarray(d["T"])).float(), \
        np.asarray(d["y"]).astype(np.int64)


def run_file(path, seeds, runs):
    X, T, y = _load(path)
    out = []
    for seed in seeds:
        for name, idx in subsets(y, T.shape[1], seed).items():
            if name == "full" and seed != seeds[0]:
                continue
            Xs, ys = X[idx].contiguous(), torch.from_numpy(y[idx])
            fits = {"fp32": inmap_ext.fit_vision_proxy(Xs, T)}
            for run in runs:
                fits[run] = inmap_ext.fit_vision_proxy(Xs, T, **RUNS[run])
            pred = {k: r.predict(Xs) for k, r in fits.items()}
            row = {"file": os.path.basename(path), "set": name, "seed": seed, "n": len(idx)}
            for k, r in fits.items():
                row[k] = {"prior": r.class_prior.chosen, "passes": r.passes["total"],
                          "top1": round(100 * float((pred[k] == ys).double().mean()), 2),
                          "agreement": round(100 * float((pred[k] == pred["fp32"]).double()
                                                         .mean()), 2)}
            out.append(row)
            print(f"{row['file']} | {name} (seed {seed}, {len(idx)} images) | " + " | ".join(
                f"{k}: {v['prior']} {v['passes']} passes top-1 {v['top1']:.2f} agreement "
                f"{v['agreement']:.2f}" for k, v in row.items() if isinstance(v, dict)),
                flush=True)
    return out


def summary(rows, runs):
    s = {}
    for run in runs:
        ag = [r[run]["agreement"] for r in rows]
        dt = [r[run]["top1"] - r["fp32"]["top1"] for r in rows]
        s[run] = {"sets": len(rows),
                  "same_prior": sum(r[run]["prior"] == r["fp32"]["prior"] for r in rows),
                  "agreement_median": statistics.median(ag), "agreement_least": min(ag),
                  "top1_diff_mean_abs": round(statistics.mean(abs(v) for v in dt), 3),
                  "top1_diff_least": round(min(dt), 2), "top1_diff_most": round(max(dt), 2),
                  "passes_diff_least": min(r[run]["passes"] - r["fp32"]["passes"] for r in rows),
                  "passes_diff_most": max(r[run]["passes"] - r["fp32"]["passes"] for r in rows)}
    return s


def _markdown(meta, summ, rows, runs):
    lines = [f"# How much the default fit moves with its arithmetic ({meta['date']})", "",
             f"Device cpu ({meta['machine']}), {meta['threads']} torch threads, torch "
             f"{meta['torch']}. Every set is fitted with the default fit (class_prior='auto') in "
             "float32 and with each run; agreement is of predictions with the float32 fit.", "",
             "| run | sets | same prior | agreement median | agreement least | top-1 diff mean "
             "abs | top-1 diff least, most | passes diff least, most |",
             "|---|---|---|---|---|---|---|---|"]
    for run, v in summ.items():
        lines.append(f"| {run} | {v['sets']} | {v['same_prior']} | {v['agreement_median']:.2f} "
                     f"| {v['agreement_least']:.2f} | {v['top1_diff_mean_abs']:.3f} | "
                     f"{v['top1_diff_least']:+.2f}, {v['top1_diff_most']:+.2f} | "
                     f"{v['passes_diff_least']:+d}, {v['passes_diff_most']:+d} |")
    lines += ["", "| file | set | seed | N | fp32: prior, passes, top-1 | "
              + " | ".join(f"{r}: prior, passes, top-1, agreement" for r in runs) + " |",
              "|---|---|---|---|---|" + "---|" * len(runs)]
    for r in rows:
        f = r["fp32"]
        lines.append(f"| {r['file']} | {r['set']} | {r['seed']} | {r['n']} | {f['prior']}, "
                     f"{f['passes']}, {f['top1']:.2f} | " + " | ".join(
                         f"{r[k]['prior']}, {r[k]['passes']}, {r[k]['top1']:.2f}, "
                         f"{r[k]['agreement']:.2f}" for k in runs) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("data", nargs="+")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--runs", nargs="+", default=["bf16x3", "chunk512", "fp64"],
                    choices=sorted(RUNS))
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args(argv)
    from inmap_ext import _ops

    for run, need in (("bf16x3", _ops.cpu_bf16x3_available), ("bf16", _ops.cpu_bf16_available)):
        if run in args.runs and not need():
            ap.error(f"--runs {run}: this install has no bfloat16 GEMM in compiled CPU kernels "
                     f"(extension loaded: {_ops.extension_loaded()})")
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [row for p in args.data for row in run_file(p, args.seeds, args.runs)]
    date = datetime.date.today().isoformat()
    meta = {"date": date, "machine": f"{platform.machine()} {os.cpu_count()} cores",
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "files": [os.path.basename(p) for p in args.data], "seeds": args.seeds}
    summ = summary(rows, args.runs)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"precision_{date}")
    with open(stem + ".json", "w") as f:
        json.dump({"meta": meta, "summary": summ, "rows": rows}, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(_markdown(meta, summ, rows, args.runs))
    print(_markdown(meta, summ, [], args.runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
