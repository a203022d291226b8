"""Passes and wall time of a fit, side by side in one run:
`python bench/speed.py [DATA.npz ...] [--synthetic 4000x512x1000,400000x128x1000]
[--device cpu] [--threads N] [--paper-max-n 20000] [--previous-max-n 20000]
[--passes-max-n N] [--one-gib-max-n N] [--bf16-max-n N] [--bf16x3-max-n N]
[--baseline DIR --baseline-label NAME]`.

For every set (the full set of each DATA.npz: X N x D, y N, T D x C; and synthetic CLIP-like
sets N x D x C, balanced, gap 2, text noise 0.4), one after the other on the same machine:
- "previous default": what the default fit was before the L-BFGS solver and the stored
  logits (``solver="gd"`` with its stopping rule, every decision read a pass over the features:
  INMAP_LOGIT_STORE_BYTES=0);
- "default": today's default fit (class_prior="auto");
- "default, decision on passes" (only up to --passes-max-n images, default none): the default
  fit without the logit store, every read of its decision a pass over the features;
- "default, store within 1 GiB" (only up to --one-gib-max-n images, default none): the default
  fit with its logit store capped at 1 GiB whatever the memory available (the default until
  the store could grow with the memory available: beyond 537k rows at C = 1000 a partial store);
- "default, uniform": the default fit told the set is balanced (class_prior="uniform");
- "default, bf16" (only up to --bf16-max-n images, default none): the default fit with
  precision="bf16" (features rounded to bfloat16 once, bfloat16 GEMMs with float32
  accumulation; agreement with the paper fit shows what the rounding changes);
- "default, bf16x3" (only up to --bf16x3-max-n images, default none): the default fit with
  precision="bf16x3" (float32 features, every float32 GEMM of the CPU kernels as three bfloat16
  GEMMs: csrc/cpu/bf16x3.h);
- "paper": mode="paper", all 2000 published steps (only up to --paper-max-n images);
- with ``--baseline DIR``: the default fit of another build of inmap_ext (DIR holds its
  package, e.g. ``git worktree add /tmp/old COMMIT && pip install --no-build-isolation
  --no-deps --target DIR /tmp/old``: the code as it was, its kernels included), run in a
  subprocess on the same features, device and thread count (``--previous-max-n`` applies).
Each with passes over the features by phase (result.passes: the hardware-free cost), wall
time, top-1 and agreement of predictions with the paper fit. Writes
bench/results/speed_<date>.{json,md}, naming machine, torch, threads, data and date.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import inmap_ext  # noqa: E402
from inmap_ext.synthetic import make_problem  # noqa: E402

RUNS = [("previous default", dict(solver="gd"), {"INMAP_LOGIT_STORE_BYTES": "0"}),
        ("default", {}, {}),
        ("default, decision on passes", {}, {"INMAP_LOGIT_STORE_BYTES": "0"}),
        ("default, store within 1 GiB", {}, {"INMAP_LOGIT_STORE_BYTES": str(1 << 30)}),
        ("default, uniform", dict(class_prior="uniform"), {}),
        ("default, bf16", dict(precision="bf16"), {}),
        ("default, bf16x3", dict(precision="bf16x3"), {}),
        ("paper", dict(mode="paper"), {})]


def _load(path):
    d = np.load(path)
    X = torch.tensor(d["X"]).float()
    return (torch.nn.functional.normalize(X, dim=1), torch.tensor(d["T"]).float(),
            torch.from_numpy(np.asarray(d["y"]).astype(np.int64)))


def _synthetic(spec):
    n, d, c = (int(v) for v in spec.lower().split("x"))
    p = make_problem(n, d, c, gap=2.0, text_noise=0.4, seed=0)
    return f"synthetic {n}x{d}x{c}", p.image_features, p.text_proxies, p.labels


def _fit(X, T, kw, env, device):
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        r = inmap_ext.fit_vision_proxy(X, T, **kw)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return r, time.perf_counter() - t0
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# The baseline's fit, in a fresh interpreter whose inmap_ext is the baseline's (argv: the
# package folder, the features file, the device, the thread count); prints one JSON line.
_BASELINE = r"""
import json, sys, time, torch
sys.path.insert(0, sys.argv[1])
import inmap_ext
X, T, y = torch.load(sys.argv[2])
dev = torch.device(sys.argv[3])
torch.set_num_threads(int(sys.argv[4]))
X, T, y = X.to(dev), T.to(dev), y.to(dev)
inmap_ext.fit_vision_proxy(X[:256], T)            # its first-use checks, as the others had
if dev.type == "cuda":
    torch.cuda.synchronize(dev)
t0 = time.perf_counter()
r = inmap_ext.fit_vision_proxy(X, T)
if dev.type == "cuda":
    torch.cuda.synchronize(dev)
secs = time.perf_counter() - t0
print(json.dumps({"seconds": secs, "top1": 100 * float((r.predict(X) == y).double().mean()),
                  "steps": int(r.n_iters), "prior": r.class_prior.chosen,
                  "passes": getattr(r, "passes", None) or None, "package": inmap_ext.__file__,
                  "decision_s": r.timings.get("sinkhorn_s", 0.0),
                  "pred": r.predict(X).tolist()}))
"""


def _baseline(folder, X, T, y, device):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "features.pt")
        torch.save((X.cpu(), T.cpu(), y.cpu()), path)
        out = subprocess.run([sys.executable, "-c", _BASELINE, folder, path, str(device),
                              str(torch.get_num_threads())], capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": ""})
    if out.returncode != 0:
        raise RuntimeError(f"the baseline in {folder} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(name, X, T, y, device, paper_max_n, previous_max_n, baseline=None,
            passes_max_n=0, one_gib_max_n=0, bf16_max_n=0, bf16x3_max_n=0):
    X, T, y = X.to(device), T.to(device), y.to(device)
    acc = lambda p: 100 * float((p == y).double().mean())  # noqa: E731
    row = {"set": name, "n": X.shape[0], "d": X.shape[1], "c": T.shape[1],
           "zero_shot": acc(inmap_ext.zero_shot_topk(X, T)[1][:, 0]), "runs": {}}
    preds = {}
    inmap_ext.fit_vision_proxy(X[:256], T)     # first-use checks of every op, as the baseline's
    if baseline is not None and X.shape[0] <= previous_max_n:
        folder, label = baseline
        b = _baseline(folder, X, T, y, device)
        preds[label] = torch.tensor(b.pop("pred"), device=device)
        row["runs"][label] = {**b, "seconds": round(b["seconds"], 3),
                              "decision_s": round(b["decision_s"], 3), "baseline": True}
        print(f"  {name} | {label}: {b['steps']} steps {b['seconds']:.1f}s top-1 "
              f"{b['top1']:.2f} ({b['prior']}; {b['package']})", flush=True)
    most = {"paper": paper_max_n, "previous default": previous_max_n,
            "default, decision on passes": passes_max_n,      # the runs with a size limit
            "default, store within 1 GiB": one_gib_max_n,
            "default, bf16": bf16_max_n, "default, bf16x3": bf16x3_max_n}
    for label, kw, env in RUNS:
        if X.shape[0] > most.get(label, X.shape[0]):
            continue
        r, secs = _fit(X, T, kw, env, device)
        preds[label] = r.predict(X)
        row["runs"][label] = {"passes": r.passes, "seconds": round(secs, 3),
                              "decision_s": round(r.timings.get("sinkhorn_s", 0.0), 3),
                              "top1": acc(preds[label]), "prior": r.class_prior.chosen,
                              "solver": r.hyper["solver"], "logits": r.class_prior.stats.get(
                                  "logits", "")}
        print(f"  {name} | {label}: {r.passes['total']} passes {r.passes} {secs:.1f}s "
              f"top-1 {row['runs'][label]['top1']:.2f} ({r.class_prior.chosen})", flush=True)
    if "paper" in preds:
        for label in preds:
            row["runs"][label]["agreement_with_paper"] = 100 * float(
                (preds[label] == preds["paper"]).double().mean())
    for label in ("default, bf16", "default, bf16x3"):
        if label in preds:
            row["runs"][label]["agreement_with_default"] = 100 * float(
                (preds[label] == preds["default"]).double().mean())
    return row


def _table(rows):
    lines = ["| set | N x D x C | zero-shot | run | prior | passes (decision + labels + descent "
             "+ checks) | wall s (decision s) | top-1 | agreement with paper |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for label, v in r["runs"].items():
            p = v["passes"]
            passes = (f"**{p['total']}** ({p['decision']} + {p['pseudo_labels']} + "
                      f"{p['descent']} + {p['stopping_checks']})" if p else
                      f"not recorded ({v['steps']} descent steps)")
            lines.append(
                f"| {r['set']} | {r['n']}x{r['d']}x{r['c']} | {r['zero_shot']:.2f} | {label} | "
                f"{v['prior']} | {passes} | {v['seconds']:.1f} "
                f"({v['decision_s']:.1f}) | {v['top1']:.2f} | "
                + (f"{v['agreement_with_paper']:.2f}" if "agreement_with_paper" in v else "-")
                + " |")
    return lines


def _ratios(rows):
    out = []
    for r in rows:
        runs = r["runs"]
        prev, cur = runs.get("previous default"), runs.get("default")
        line = f"- {r['set']}: default {cur['passes']['total']} passes"
        if prev:
            line += (f", {cur['seconds'] / prev['seconds']:.0%} of the previous default's time "
                     f"({prev['passes']['total']} passes)")
        for label, v in runs.items():
            if v.get("baseline"):
                line += (f", {cur['seconds'] / v['seconds']:.0%} of the time of the default at "
                         f"{label} ({v['seconds']:.1f} s, top-1 {v['top1']:.2f})")
        if "paper" in runs:
            uni, pap = runs["default, uniform"], runs["paper"]
            line += (f"; default with the uniform prior: {uni['seconds'] / pap['seconds']:.1%} of "
                     f"the 2000 published steps' time, top-1 {uni['top1'] - pap['top1']:+.2f}")
        line += (f"; the decision {cur['decision_s'] / cur['seconds']:.0%} of the default fit's "
                 "time")
        for prec in ("bf16", "bf16x3"):
            bf = runs.get(f"default, {prec}")
            if bf:
                line += (f"; precision='{prec}': {bf['seconds'] / cur['seconds']:.0%} of the "
                         f"default's time, {bf['passes']['total']} passes, top-1 "
                         f"{bf['top1'] - cur['top1']:+.2f}, predictions as the default's on "
                         f"{bf['agreement_with_default']:.2f}%")
        off = runs.get("default, decision on passes")
        if off:
            line += (f", {cur['decision_s']:.1f} s against {off['decision_s']:.1f} s on passes "
                     f"({off['passes']['decision']} passes)")
        out.append(line)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("data", nargs="*")
    ap.add_argument("--synthetic", default="4000x512x1000",
                    help="comma-separated NxDxC synthetic sets ('' for none)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (CPU)")
    ap.add_argument("--paper-max-n", type=int, default=20000,
                    help="run mode='paper' (2000 passes) only on sets up to this many images")
    ap.add_argument("--previous-max-n", type=int, default=20000,
                    help="run the previous default (hundreds of passes) only up to this N")
    ap.add_argument("--passes-max-n", type=int, default=0,
                    help="also run the default fit with its decision on passes over the features "
                    "(no logit store: INMAP_LOGIT_STORE_BYTES=0) on sets up to this N")
    ap.add_argument("--one-gib-max-n", type=int, default=0,
                    help="also run the default fit with its logit store capped at 1 GiB "
                    "(INMAP_LOGIT_STORE_BYTES=2^30, the default before 2026-12-06's second "
                    "session) on sets up to this N")
    ap.add_argument("--bf16-max-n", type=int, default=0,
                    help="also run the default fit with precision='bf16' (bfloat16 features and "
                    "GEMMs: CUDA, or a CPU whose torch has MKL's bfloat16 GEMM) up to this N")
    ap.add_argument("--bf16x3-max-n", type=int, default=0,
                    help="also run the default fit with precision='bf16x3' (float32 GEMMs as "
                    "three bfloat16 GEMMs, CPU) up to this N")
    ap.add_argument("--baseline", default=None, metavar="DIR",
                    help="a folder holding another build of the inmap_ext package (pip install "
                    "--target DIR): its default fit is run beside, in a subprocess")
    ap.add_argument("--baseline-label", default="baseline",
                    help="what the baseline is called in the results (e.g. its commit)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sets = [(os.path.basename(p), *_load(p)) for p in args.data]
    baseline = None
    if args.baseline:
        if not os.path.isdir(os.path.join(args.baseline, "inmap_ext")):
            ap.error(f"--baseline {args.baseline}: no inmap_ext package in that folder")
        baseline = (os.path.abspath(args.baseline), args.baseline_label)
    rows = []
    for name, X, T, y in sets:
        rows.append(measure(name, X, T, y, device, args.paper_max_n, args.previous_max_n,
                            baseline, args.passes_max_n, args.one_gib_max_n,
                            args.bf16_max_n, args.bf16x3_max_n))
    for spec in [s for s in args.synthetic.split(",") if s.strip()]:
        rows.append(measure(*_synthetic(spec), device, args.paper_max_n, args.previous_max_n,
                            baseline, args.passes_max_n, args.one_gib_max_n,
                            args.bf16_max_n, args.bf16x3_max_n))
    date = datetime.date.today().isoformat()
    meta = {"device": str(device), "machine": f"{platform.machine()} "
            f"{os.cpu_count()} cores" if device.type == "cpu" else
            torch.cuda.get_device_name(device), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "inmap_ext": inmap_ext.__version__, "date": date,
            "load_average": os.getloadavg(),
            "baseline": None if baseline is None else {"folder": baseline[0],
                                                       "label": baseline[1]}}
    os.makedirs(args.out, exist_ok=True)
    base = os.path.join(args.out, f"speed_{date}")
    with open(base + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    text = [f"# Passes and wall time of a fit ({date})", "",
            f"Device {meta['device']} ({meta['machine']}), {meta['threads']} torch threads, torch "
            f"{meta['torch']}; load average at the end {meta['load_average'][0]:.1f}. Passes "
            "are over the features (each a GEMM of N x D x C) and do not depend on the machine.",
            "", *_table(rows), "", "Ratios:", *_ratios(rows)]
    with open(base + ".md", "w") as f:
        f.write("\n".join(text) + "\n")
    print("\n".join(text))


if __name__ == "__main__":
    main()
