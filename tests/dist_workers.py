"""Worker functions for test_distributed.py (spawned processes import them from here)."""
import contextlib
import datetime
import os
import traceback

import torch
import torch.distributed as dist


def _init(rank, world, init_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))


@contextlib.contextmanager
def _rank_guard(rank, out_dir):
    """A failure in this rank is written to rank<r>.err for the parent; the group is closed."""
    try:
        yield
    except Exception:
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def fit_worker(rank, world, init_file, out_dir, sizes, dtype, kw, backend):
    import inmap_ext
    from testing import clip_like

    torch.set_num_threads(1)
    with _rank_guard(rank, out_dir):
        _init(rank, world, init_file)
        X, T, _ = clip_like(sum(sizes), 24, 7, seed=13, dtype=dtype)
        start = sum(sizes[:rank])
        shard = X[start:start + sizes[rank]]
        res = inmap_ext.fit_vision_proxy(shard, T if rank == 0 else None, backend=backend,
                                         process_group=dist.group.WORLD, **kw)
        torch.save({"proxy": res.proxy, "counts": res.class_counts, "mass": res.class_mass,
                    "conf": res.confident_fraction, "grad_norm": res.grad_norm,
                    "n": res.n_images, "passes": res.passes,
                    "logits": res.class_prior.stats.get("logits")},
                   os.path.join(out_dir, f"rank{rank}.pt"))


def memory_worker(rank, world, init_file, out_dir, sizes, available):
    """A sharded fit where each rank sees its own memory available (``available[rank]``
    bytes) and a 1 GiB default shrunk to nothing: every rank must store alike (the least)."""
    import inmap_ext
    from inmap_ext import logit_store
    from testing import clip_like

    torch.set_num_threads(1)
    logit_store.DEFAULT_BUDGET_BYTES = 0
    logit_store.AVAILABLE_SHARE = 1.0
    logit_store.available_bytes = lambda device: available[rank]
    with _rank_guard(rank, out_dir):
        _init(rank, world, init_file)
        X, T, _ = clip_like(sum(sizes), 24, 7, seed=13, dtype=torch.float32)
        start = sum(sizes[:rank])
        res = inmap_ext.fit_vision_proxy(X[start:start + sizes[rank]], T, iters=30,
                                         chunk_size=50, process_group=dist.group.WORLD)
        torch.save({"proxy": res.proxy, "passes": res.passes,
                    "logits": res.class_prior.stats.get("logits")},
                   os.path.join(out_dir, f"rank{rank}.pt"))


def mismatch_worker(rank, world, init_file, out_dir, case):
    import inmap_ext
    from testing import clip_like

    try:
        _init(rank, world, init_file)
        X, T, _ = clip_like(40, 12, 5, seed=1, dtype=torch.float32)
        if case == "dim" and rank == 1:
            X = X[:, :10]
        if case == "dtype" and rank == 1:
            X = X.double()
        if case == "classes" and rank == 1:
            T = T[:, :4]
        if case == "nan" and rank == 1:
            X = X.clone()
            X[3, 2] = float("nan")
        inmap_ext.fit_vision_proxy(X, T, iters=2, process_group=dist.group.WORLD)
        msg = "no error"
    except ValueError as e:
        msg = str(e)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.msg"), "w") as f:
        f.write(msg)


def dying_worker(rank, world, init_file, out_dir):
    """Rank 1 exits right after joining; rank 0's fit must fail with a clear error, quickly."""
    import time

    import inmap_ext
    from testing import clip_like

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=15))
    if rank == 1:
        os._exit(0)                      # dies without a word
    X, T, _ = clip_like(40, 12, 5, seed=1, dtype=torch.float32)
    t0 = time.time()
    try:
        inmap_ext.fit_vision_proxy(X, T, iters=5, process_group=dist.group.WORLD)
        msg = "no error"
    except Exception as e:  # noqa: BLE001
        msg = f"{type(e).__name__}: {e}"
    with open(os.path.join(out_dir, "rank0.msg"), "w") as f:
        f.write(f"{time.time() - t0:.1f}\n{msg}")
    os._exit(0)


def stream_worker(rank, world, init_file, out_dir, sizes):
    """Sharded and streamed: each rank's rows stay in (memory-mapped) host memory."""
    import inmap_ext
    from testing import clip_like

    torch.set_num_threads(1)
    with _rank_guard(rank, out_dir):
        _init(rank, world, init_file)
        X, T, _ = clip_like(sum(sizes), 24, 7, seed=13)
        X = X * 3.0                                    # not unit: normalised per chunk
        start = sum(sizes[:rank])
        res = inmap_ext.fit_vision_proxy(X[start:start + sizes[rank]], T if rank == 0 else None,
                                         iters=120, stream=True, chunk_size=50,
                                         process_group=dist.group.WORLD)
        torch.save({"proxy": res.proxy, "streamed": res.hyper["streamed"]},
                   os.path.join(out_dir, f"rank{rank}.pt"))


def verify_worker(rank, world, init_file, out_dir, bad_rank):
    """A sharded float64 fit where the compiled CPU ops are wrong on ``bad_rank`` only: every
    rank must fall back to pure torch together (the ranks all-reduce the verdict)."""
    import warnings

    import inmap_ext
    from inmap_ext import _ops
    from testing import clip_like, perturbed

    torch.set_num_threads(1)
    real = _ops.op
    if rank == bad_rank:
        _ops.op = lambda name, backend: perturbed(real(name, backend)) if backend == "ext" \
            else real(name, backend)
    with _rank_guard(rank, out_dir):
        _init(rank, world, init_file)
        X, T, _ = clip_like(301, 24, 7, seed=13)
        shard = X[:150] if rank == 0 else X[150:]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            res = inmap_ext.fit_vision_proxy(shard, T if rank == 0 else None, backend="ext",
                                             iters=100, process_group=dist.group.WORLD)
        torch.save({"proxy": res.proxy, "backend": res.backend,
                    "verification": res.verification,
                    "warnings": [str(w.message) for w in caught]},
                   os.path.join(out_dir, f"rank{rank}.pt"))


def rounding_worker(rank, world, init_file, out_dir, sizes):
    """A sharded default (L-BFGS) fit where rank 1's inner products round differently, as on a
    different CPU: the ranks must still take the same steps (lbfgs._agreed)."""
    import inmap_ext
    from inmap_ext import lbfgs
    from testing import clip_like

    torch.set_num_threads(1)
    with _rank_guard(rank, out_dir):
        _init(rank, world, init_file)
        if rank == 1:
            real = lbfgs._dot
            lbfgs._dot = lambda a, b: real(a, b) * (1 + 3e-7)
        X, T, _ = clip_like(sum(sizes), 24, 7, seed=13, dtype=torch.float32)
        start = sum(sizes[:rank])
        res = inmap_ext.fit_vision_proxy(X[start:start + sizes[rank]], T if rank == 0 else None,
                                         process_group=dist.group.WORLD)
        torch.save({"proxy": res.proxy, "passes": res.passes},
                   os.path.join(out_dir, f"rank{rank}.pt"))


def lockstep_worker(rank, world, init_file, out_dir, sizes):
    """Balancings in lockstep on a sharded store: a K x C bias out of range on one rank only
    sends every rank to the per-bias reads (the same collectives everywhere, no hang)."""
    from inmap_ext.functional import Runner
    from inmap_ext.logit_store import StoredLogits
    from testing import clip_like

    torch.set_num_threads(1)
    with _rank_guard(rank, out_dir):
        _init(rank, world, init_file)
        X, T, _ = clip_like(sum(sizes), 24, 17, seed=21)
        start = sum(sizes[:rank])
        shard = X[start:start + sizes[rank]]
        runner = Runner("cpu", "auto", 41, shard.shape[0], 17, torch.float64, dist.group.WORLD)
        stored = StoredLogits(runner, shard, T, 100.0, torch.float32)
        g = torch.Generator().manual_seed(5)
        biases = torch.randn(2, 17, generator=g, dtype=torch.float64)
        together = stored.column_lse(biases)
        if rank == 1:            # only this rank's store claims a narrow range
            stored.exact, stored.safe_range = False, 1.0
        wide = torch.stack([torch.zeros(17, dtype=torch.float64),
                            torch.randn(17, generator=g, dtype=torch.float64) * 4])
        mixed = stored.column_lse(wide)
        torch.save({"together": together, "mixed": mixed, "biases": biases, "wide": wide,
                    "on_passes": stored.reads_on_passes},
                   os.path.join(out_dir, f"rank{rank}.pt"))
