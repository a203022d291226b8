"""Scale-out benchmark: `python bench/scaling.py [--out bench/results]`.

1. Multi-process CPU scaling: the same sharded fit with 1 and 2 processes (gloo), threads split
   evenly, ms per gradient step (communication: one D x C all-reduce per step).
2. On a GPU: out-of-core throughput (features in host memory, streamed every pass) against the
   in-memory fit, ms per gradient step.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time

import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def _worker(rank, world, init_file, n, d, c, iters, threads, out):
    import torch.distributed as dist

    import inmap_ext
    from inmap_ext.distributed import shard_rows
    from inmap_ext.synthetic import make_problem

    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    p = make_problem(n, d, c, seed=0)
    rows = shard_rows(n, rank, world)
    x = p.image_features[rows.start:rows.stop]
    inmap_ext.fit_vision_proxy(x, p.text_proxies, iters=2, sinkhorn_iters=1,
                               process_group=dist.group.WORLD)           # warm up
    dist.barrier()
    t0 = time.perf_counter()
    r = inmap_ext.fit_vision_proxy(x, p.text_proxies, iters=iters, sinkhorn_iters=0,
                                   process_group=dist.group.WORLD)
    dist.barrier()
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"step_ms": (time.perf_counter() - t0) / iters * 1e3,
                       "descent_s": r.timings["descent_s"]}, f)
    dist.destroy_process_group()


def cpu_scaling(n, d, c, iters, cores):
    rows = []
    for world in (1, 2):
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "r.json")
            mp.start_processes(_worker, args=(world, os.path.join(tmp, "init"), n, d, c, iters,
                                              max(1, cores // world), out),
                               nprocs=world, start_method="spawn")
            res = json.load(open(out))
        rows.append(dict(kind="cpu-processes", world=world, N=n, D=d, C=c,
                         threads_per_process=max(1, cores // world), step_ms=res["step_ms"]))
        print(rows[-1], flush=True)
    return rows


def gpu_out_of_core(n, d, c, iters):
    import inmap_ext
    from inmap_ext.synthetic import make_problem

    p = make_problem(min(n, 200_000), d, c, seed=0)
    reps = (n + len(p.image_features) - 1) // len(p.image_features)
    host = p.image_features.half().repeat(reps, 1)[:n].contiguous()
    t = p.text_proxies
    rows = []
    for mode in ("in-memory", "streamed"):
        kw = dict(iters=iters, sinkhorn_iters=0, precision="fp16")
        if mode == "in-memory":
            x = host.cuda()
            inmap_ext.fit_vision_proxy(x, t.cuda(), iters=1, sinkhorn_iters=0)
            r = inmap_ext.fit_vision_proxy(x, t.cuda(), **kw)
            del x
        else:
            inmap_ext.fit_vision_proxy(host, t, device="cuda", iters=1, sinkhorn_iters=0)
            r = inmap_ext.fit_vision_proxy(host, t, device="cuda", **kw)
        step = r.timings["descent_s"] / iters * 1e3
        rows.append(dict(kind="gpu-" + mode, N=n, D=d, C=c, precision="fp16", step_ms=step,
                         host_to_device_gbps=(n * d * 2 / step / 1e6 if mode == "streamed"
                                              else None)))
        print(rows[-1], flush=True)
        torch.cuda.empty_cache()
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--c", type=int, default=1000)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--gpu-n", type=int, default=10_000_000)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args(argv)
    rows = cpu_scaling(args.n, args.d, args.c, args.iters, os.cpu_count() or 2)
    if torch.cuda.is_available():
        rows += gpu_out_of_core(args.gpu_n, 768, 1000, args.iters)
    date = datetime.date.today().isoformat()
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"scaling_{date}")
    with open(stem + ".json", "w") as f:
        json.dump({"date": date, "cpus": os.cpu_count(), "torch": torch.__version__,
                   "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                   "rows": rows}, f, indent=1)
    lines = [f"Scaling, {date}, {os.cpu_count()} CPU cores, torch {torch.__version__}", "",
             "| kind | processes | N | D | C | ms/step |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['kind']} | {r.get('world', 1)} | {r['N']:,} | {r['D']} | {r['C']} "
                     f"| {r['step_ms']:.1f} |")
    open(stem + ".md", "w").write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
