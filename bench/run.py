"""Benchmark suite: `python bench/run.py [--device cuda] [--quick] [--out bench/results]`.

Per configuration (N, D, C, precision, backend): ms per gradient step, per Sinkhorn pass, per
whole fit (2000 steps + 20 Sinkhorn passes + the pseudo-label pass, from the measured parts),
achieved TFLOP/s (4*N*D*C per step), the ratio to the measured rate of the same two GEMMs alone
(cuBLAS on CUDA, ATen/BLAS on the CPU; same precision, same chunking) and peak device memory.
Baselines in the same run: the published computation (dense: N x C logits materialised, fp32)
and the chunked pure-torch backend. Implementations are first checked to agree, then timed.
Writes JSON, a markdown table and (with matplotlib) a PNG plot, with device, driver, torch, date.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from inmap_ext import _ops  # noqa: E402
from inmap_ext.functional import Runner  # noqa: E402
from inmap_ext.reference import acc_dtype  # noqa: E402

FULL_N = [50_000, 1_281_167, 10_000_000]
FULL_C = [1_000, 21_841]
FULL_D = [512, 768, 1024]
# The GPU check's sweep (fits the device tool's 10-minute call): the target shapes.
# (N, D, C, precisions, backends); None = every backend available.
PRESETS = {
    "gpu-check": [
        (50_000, 768, 1_000, ["fp32", "tf32", "bf16", "fp16"], None),
        (1_281_167, 768, 1_000, ["fp32", "tf32", "bf16", "fp16"], None),
        (1_281_167, 512, 21_841, ["bf16", "fp16"], ["ext", "ext-l2", "ext-fused", "triton"]),
        (10_000_000, 768, 21_841, ["fp16"], ["ext", "ext-fused", "triton"]),
    ],
}
DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "fp16": torch.float16,
          "bf16": torch.bfloat16, "fp64": torch.float64}


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timeit(fn, dev, repeat=3, warmup=1):
    """Median milliseconds of ``repeat`` runs (CUDA events on a GPU, perf_counter on the CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        if dev.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def device_info(dev):
    cpu = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"device": cpu, "torch": torch.__version__,
            "date": datetime.date.today().isoformat(), "cpu_threads": torch.get_num_threads()}
    if dev.type == "cuda":
        info["device"] = torch.cuda.get_device_name(dev)
        try:
            info["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True).stdout.strip().splitlines()[0]
        except Exception:  # noqa: BLE001
            info["driver"] = "unknown"
        info["cuda"] = torch.version.cuda
    return info


def dense_step(x, w, B, inv_tau):
    """The published step: N x C logits materialised in fp32."""
    q = torch.softmax((x.float() @ w.float()) * inv_tau, dim=1)
    return x.float().T @ q - B


def gemm_pair(x, w, chunk):
    """The same two GEMMs as one step, alone: z = xc @ w and G += xc^T z."""
    G = torch.zeros(w.shape, dtype=acc_dtype(x.dtype), device=x.device)
    wd = w.to(x.dtype)
    for xc in x.split(chunk):
        z = xc @ wd
        G += (xc.T @ z).to(G.dtype)
    return G


# Implementations timed per configuration: name -> (Runner backend, INMAP_CUDA_DESIGN, chunk
# policy). "ext" is design (b) with the automatic chunk; "ext-l2" the same kernels with chunks
# whose fp32 logit block (16 MiB) and P stay in an H100's 50 MB L2 between the kernels; "ext-fused"
# design (a) (fp16/bf16/tf32 only); "triton" design (c), the same two passes in Triton (wgmma on
# Hopper). See bench/NOTES.md.
VARIANTS = {"ext": ("ext", "chunked", None), "ext-l2": ("ext", "chunked", 16 << 20),
            "ext-fused": ("ext", "fused", None), "triton": ("triton", None, None),
            "torch": ("torch", None, None)}
FUSED_PRECISIONS = ("tf32", "fp16", "bf16")


def variants_for(dev, ext):
    """The implementations a run compares on this device."""
    if not ext:
        return ["torch"]
    if dev.type != "cuda":
        return ["ext", "torch"]
    return ["ext", "ext-l2", "ext-fused"] + (["triton"] if _ops.triton_available(dev) is None
                                             else []) + ["torch"]


def runner_for(variant, dev, n, c, dt):
    """(Runner, the CUDA design context) of one implementation."""
    backend, design, chunk_bytes = VARIANTS[variant]
    chunk = None if chunk_bytes is None else max(1, chunk_bytes // (4 * c))
    ctx = _ops.cuda_design(design) if design else contextlib.nullcontext()
    return Runner(dev, backend, chunk, n, c, dt), ctx


def random_unit_rows(n, d, dtype, dev, gen, block=1 << 20):
    """n x d random unit rows in ``dtype``, drawn a block of rows at a time so that no fp32 copy
    of the whole matrix exists (N = 10M x 768 in fp16 is 15 GB; in fp32, twice over, 61 GB)."""
    x = torch.empty(n, d, device=dev, dtype=dtype)
    for s in range(0, n, block):
        e = min(n, s + block)
        r = torch.randn(e - s, d, device=dev, generator=gen,
                        dtype=torch.float64 if dtype == torch.float64 else torch.float32)
        x[s:e] = torch.nn.functional.normalize(r, dim=1)
    return x


def whole_fit(x, w, runner, precision, dev):
    """Seconds of one real fit_vision_proxy call of the published algorithm (mode="paper": 20
    Sinkhorn iterations, 2000 steps) on the runner's backend and chunking, after a short
    warm-up fit."""
    from inmap_ext import fit_vision_proxy

    kw = dict(backend=runner.backend, chunk_size=runner.chunk, mode="paper",
              precision=precision if dev.type == "cuda" else "auto")
    fit_vision_proxy(x, w, iters=5, **kw)
    sync(dev)
    t0 = time.perf_counter()
    fit_vision_proxy(x, w, **kw)
    sync(dev)
    return time.perf_counter() - t0


def bench_config(n, d, c, precision, dev, backends, do_dense, repeat):
    dt = DTYPES[precision]
    g = torch.Generator(device=dev).manual_seed(0)
    x = random_unit_rows(n, d, dt, dev, g)
    w = torch.nn.functional.normalize(torch.randn(d, c, device=dev, generator=g), dim=0)
    w = w.to(acc_dtype(dt))
    bias = torch.zeros(c, device=dev, dtype=acc_dtype(dt))
    flop = 4.0 * n * d * c
    prev_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    rows, results = [], {}
    try:
        for backend in backends:
            if dt in (torch.float16, torch.bfloat16) and dev.type != "cuda":
                continue
            if backend == "ext-fused" and precision not in FUSED_PRECISIONS:
                continue
            if backend == "triton" and dt == torch.float64:
                continue
            r, design = runner_for(backend, dev, n, c, dt)
            with design:
                if dev.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(dev)
                base_mem = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else 0
                results[backend] = r.xt_softmax(x, w, 25.0)[0]
                step = timeit(lambda: r.xt_softmax(x, w, 25.0), dev, repeat)
                sk = timeit(lambda: r.column_lse(x, w, bias, 100.0), dev, repeat)
                pl = timeit(lambda: r.pseudo_labels(x, w, bias, 100.0, 0.6), dev, 1)
                peak = (torch.cuda.max_memory_allocated(dev) - base_mem) / 2**30 \
                    if dev.type == "cuda" else None
                fit_s = (2000 * step + 20 * sk + pl) / 1e3
                measured = whole_fit(x, w, r, precision, dev) if fit_s < 5 else None
            gemm = timeit(lambda: gemm_pair(x, w, r.chunk), dev, repeat)
            rows.append(dict(N=n, D=d, C=c, precision=precision, backend=backend,
                             chunk=r.chunk, step_ms=step, sinkhorn_ms=sk, fit_s=fit_s,
                             fit_measured_s=measured,
                             tflops=flop / step / 1e9, gemm_tflops=flop / gemm / 1e9,
                             vs_gemm=gemm / step, peak_gib=peak))
        if do_dense:
            dense_gib = n * c * 4 * 3 / 2**30
            free = torch.cuda.mem_get_info(dev)[0] / 2**30 if dev.type == "cuda" else 8.0
            if dense_gib < 0.8 * free:
                B = torch.zeros(d, c, device=dev)
                if dev.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(dev)
                base_mem = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else 0
                step = timeit(lambda: dense_step(x, w, B, 25.0), dev, repeat)
                peak = (torch.cuda.max_memory_allocated(dev) - base_mem) / 2**30 \
                    if dev.type == "cuda" else None
                rows.append(dict(N=n, D=d, C=c, precision="fp32", backend="published-dense",
                                 chunk=n, step_ms=step, sinkhorn_ms=None,
                                 fit_s=2000 * step / 1e3, tflops=flop / step / 1e9,
                                 gemm_tflops=None, vs_gemm=None, peak_gib=peak))
            else:
                rows.append(dict(N=n, D=d, C=c, precision="fp32", backend="published-dense",
                                 chunk=n, step_ms=None, sinkhorn_ms=None, fit_s=None,
                                 tflops=None, gemm_tflops=None, vs_gemm=None,
                                 peak_gib=dense_gib, note="not run: needs "
                                 f"{dense_gib:.0f} GiB for the N x C matrices"))
        if "torch" in results:   # every implementation's G against the chunked torch one
            b = results["torch"].double()
            for row in rows:
                if row["backend"] in results:
                    a = results[row["backend"]].double()
                    row["rel_err_vs_torch"] = float((a - b).norm() / b.norm())
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev_tf32
    return rows


def markdown(rows, info):
    head = ("| N | D | C | precision | backend | ms/step | ms/Sinkhorn pass | s/fit | "
            "s/fit measured | TFLOP/s | GEMM-only TFLOP/s | % of GEMM rate | peak GiB | "
            "rel. err of G vs torch |")
    lines = [f"Device: {info['device']}; torch {info['torch']}; "
             f"driver {info.get('driver', '-')}; date {info['date']}", "", head,
             "|" + "---|" * 14]
    f = lambda v, p=2: "-" if v is None else f"{v:.{p}f}"  # noqa: E731
    err = lambda v: "-" if v is None else f"{v:.1e}"  # noqa: E731
    for r in rows:
        pct = None if r["vs_gemm"] is None else 100 * r["vs_gemm"]
        lines.append(f"| {r['N']:,} | {r['D']} | {r['C']:,} | {r['precision']} | {r['backend']} "
                     f"| {f(r['step_ms'])} | {f(r['sinkhorn_ms'])} | {f(r['fit_s'])} | "
                     f"{f(r.get('fit_measured_s'))} | "
                     f"{f(r['tflops'], 3)} | {f(r['gemm_tflops'], 3)} | {f(pct, 0)} | "
                     f"{f(r['peak_gib'])} | {err(r.get('rel_err_vs_torch'))} |"
                     + (f" {r['note']}" if r.get("note") else ""))
    return "\n".join(lines)


def winners(rows) -> str:
    """Per configuration, the fastest implementation's step (what the defaults should follow)."""
    best = {}
    for r in rows:
        if r["step_ms"] is None:
            continue
        key = (r["N"], r["D"], r["C"], r["precision"])
        if key not in best or r["step_ms"] < best[key]["step_ms"]:
            best[key] = r
    lines = ["", "Fastest gradient step per configuration:"]
    for (n, d, c, p), r in best.items():
        rate = "" if r["vs_gemm"] is None else \
            f" ({100 * r['vs_gemm']:.0f}% of the GEMM-pair rate)"
        lines.append(f"  N={n:,} D={d} C={c:,} {p}: {r['backend']} {r['step_ms']:.3f} ms{rate}")
    return "\n".join(lines)


def plot(rows, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    import numpy as np

    timed = [r for r in rows if r["tflops"]]
    configs = list(dict.fromkeys((r["N"], r["D"], r["C"], r["precision"]) for r in timed))
    keys = sorted({r["backend"] for r in timed})
    fig, ax = plt.subplots(figsize=(max(9, len(configs) * 0.9), 4.5))
    xs = np.arange(len(configs))
    width = 0.8 / max(1, len(keys))
    for i, k in enumerate(keys):
        vals = {(r["N"], r["D"], r["C"], r["precision"]): r["tflops"] for r in timed
                if r["backend"] == k}
        ax.bar(xs + i * width, [vals.get(cfg, 0) for cfg in configs], width, label=k)
    ax.set_xticks(xs + 0.4 - width / 2)
    ax.set_xticklabels([f"{n // 1000}k/{d}/{c}\n{p}" for n, d, c, p in configs], fontsize=6,
                       rotation=90)
    ax.set_ylabel("TFLOP/s per gradient step")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true",
                    help="small sizes (the default on the CPU): N 50k, D 512, C 1000")
    ap.add_argument("--n", type=int, nargs="*", default=None)
    ap.add_argument("--d", type=int, nargs="*", default=None)
    ap.add_argument("--c", type=int, nargs="*", default=None)
    ap.add_argument("--precision", nargs="*", default=None)
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None,
                    help="a named list of configurations instead of the N x D x C sweep")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    ap.add_argument("--tag", default=None, help="file name stem (default: device + date)")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    quick = args.quick or dev.type == "cpu"
    ns = args.n or ([50_000] if quick else FULL_N)
    ds = args.d or ([512] if quick else FULL_D)
    cs = args.c or ([1_000] if quick else FULL_C)
    precisions = args.precision or (["fp32"] if dev.type == "cpu" else ["fp32", "tf32", "bf16",
                                                                         "fp16"])
    backends = variants_for(dev, _ops.ext_available(dev))
    if args.preset:
        configs = [(n, d, c, ps, [b for b in (bk or backends) if b in backends])
                   for n, d, c, ps, bk in PRESETS[args.preset]]
    else:
        configs = [(n, d, c, precisions,
                    backends if n * c <= 2e9 else
                    [b for b in backends if b != "torch"] or backends)
                   for n in ns for d in ds for c in cs]
    info = device_info(dev)
    rows = []
    for n, d, c, ps, bk in configs:
        for i, p in enumerate(ps):
            try:
                got = bench_config(n, d, c, p, dev, bk, do_dense=(i == 0), repeat=args.repeat)
            except torch.OutOfMemoryError as e:
                got = [dict(N=n, D=d, C=c, precision=p, backend="+".join(bk), chunk=None,
                            step_ms=None, sinkhorn_ms=None, fit_s=None, tflops=None,
                            gemm_tflops=None, vs_gemm=None, peak_gib=None,
                            note=f"OOM: {str(e)[:80]}")]
                torch.cuda.empty_cache()
            rows += got
            for r in got:
                print(json.dumps(r), flush=True)
    os.makedirs(args.out, exist_ok=True)
    stem = args.tag or f"{info['device'].replace(' ', '_')}_{info['date']}"
    with open(os.path.join(args.out, stem + ".json"), "w") as f:
        json.dump({"info": info, "rows": rows}, f, indent=1)
    md = markdown(rows, info) + "\n" + winners(rows)
    with open(os.path.join(args.out, stem + ".md"), "w") as f:
        f.write(md + "\n")
    plot(rows, os.path.join(args.out, stem + ".png"))
    print(md)


if __name__ == "__main__":
    main()
