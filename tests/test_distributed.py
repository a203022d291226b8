"""Sharded fit on the CPU with gloo: world sizes 1-3, uneven and empty shards, equality with the
single-process fit, and mismatched shards failing with the same clear error on every rank."""
import os

import pytest
import torch
import torch.multiprocessing as mp

import dist_workers
from testing import BACKENDS, clip_like, inmap_ext, skip_if_no_ext
from inmap_ext.distributed import shard_rows


def _spawn(fn, world, tmp_path, *args):
    init_file = tmp_path / "init"
    mp.start_processes(fn, args=(world, str(init_file), str(tmp_path)) + args, nprocs=world,
                       join=True, start_method="spawn")


def _spawn_ok(fn, world, tmp_path, *args) -> list:
    """``_spawn``, then every rank's saved output; a rank's error fails the test with its
    traceback."""
    _spawn(fn, world, tmp_path, *args)
    errs = [p for p in os.listdir(tmp_path) if p.endswith(".err")]
    assert not errs, (tmp_path / errs[0]).read_text()
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]


def _sharded_and_single(tmp_path, sizes, kw, backend, dtype=torch.float64):
    """Every rank's output of ``fit_worker`` on shards of sizes ``sizes``, the single-process
    fit of the same rows and those rows (the worker's problem: clip_like(N, 24, 7, seed=13))."""
    outs = _spawn_ok(dist_workers.fit_worker, len(sizes), tmp_path, sizes, dtype, kw, backend)
    X, T, _ = clip_like(sum(sizes), 24, 7, seed=13, dtype=dtype)
    return outs, inmap_ext.fit_vision_proxy(X, T, backend=backend, **kw), X


@pytest.mark.parametrize("sizes", [[301], [150, 151], [200, 0, 101], [1, 299, 1]],
                         ids=["world1", "world2", "world3-empty", "world3-tiny"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_sharded_equals_single_process_float64(tmp_path, sizes, backend):
    if backend == "ext":
        skip_if_no_ext("cpu")
    kw = dict(iters=150, sinkhorn_iters=10, gamma=0.5)
    outs, single, _ = _sharded_and_single(tmp_path, sizes, kw, backend)
    for o in outs:
        assert torch.equal(o["proxy"], outs[0]["proxy"])           # every rank, same proxy
        torch.testing.assert_close(o["proxy"], single.proxy, rtol=0, atol=1e-8)
        assert torch.equal(o["counts"], single.class_counts)
        torch.testing.assert_close(o["mass"], single.class_mass)
        assert o["conf"] == pytest.approx(single.confident_fraction)
        assert o["n"] == sum(sizes)


def test_uneven_shards_agree_on_the_logit_store(tmp_path, monkeypatch):
    # a budget the largest shard's store does not fit and a smaller one's does: every rank
    # follows the largest (here: no store, every read a pass), as the single process does
    monkeypatch.setenv("INMAP_LOGIT_STORE_BYTES", "2000")
    sizes = [200, 0, 101]
    kw = dict(iters=60, sinkhorn_iters=10, gamma=0.5)
    outs, single, _ = _sharded_and_single(tmp_path, sizes, kw, "torch")
    for o in outs:
        torch.testing.assert_close(o["proxy"], single.proxy, rtol=0, atol=1e-8)


def test_uneven_shards_share_a_partial_logit_store(tmp_path, monkeypatch):
    # a budget that holds the bfloat16 logits of 100 rows (7 classes): each rank keeps its first
    # two chunks of 50 and computes the rest again at each read (rank 1 has no rows, rank 2 one
    # row to compute again); every rank counts the same passes, as the single process does
    monkeypatch.setenv("INMAP_LOGIT_STORE_BYTES", str(100 * 7 * 2))
    sizes = [200, 0, 101]
    kw = dict(iters=60, sinkhorn_iters=10, chunk_size=50)
    outs, single, _ = _sharded_and_single(tmp_path, sizes, kw, "torch")
    assert "for 100 of 301 rows" in single.class_prior.stats["logits"]
    for o in outs:
        assert o["passes"] == single.passes and o["passes"]["decision"] > 1
        assert "for 200 of 301 rows" in o["logits"]          # 100 + 0 + 100 rows kept
        torch.testing.assert_close(o["proxy"], single.proxy, rtol=0, atol=1e-8)


def test_ranks_with_different_memory_available_store_alike(tmp_path, monkeypatch):
    # rank 0 could store its 200 rows whole, rank 1 only 100 rows, and the two ranks share the
    # host (no LOCAL_WORLD_SIZE: the world size): both keep the least room, halved (50 rows of
    # bfloat16 at 7 classes), and read as one partial store
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    sizes = [200, 101]
    outs = _spawn_ok(dist_workers.memory_worker, 2, tmp_path, sizes,
                     [10 * 200 * 7 * 2, 100 * 7 * 2])
    for o in outs:
        assert "for 100 of 301 rows" in o["logits"] and o["passes"] == outs[0]["passes"]
        assert torch.equal(o["proxy"], outs[0]["proxy"])
    assert outs[0]["passes"]["decision"] > 1


def test_ranks_whose_arithmetic_rounds_differently_take_the_same_steps(tmp_path):
    sizes = [150, 151]
    outs = _spawn_ok(dist_workers.rounding_worker, 2, tmp_path, sizes)
    assert torch.equal(outs[0]["proxy"], outs[1]["proxy"])
    assert outs[0]["passes"] == outs[1]["passes"]


def test_sharded_float32_predictions_agree(tmp_path):
    sizes = [700, 500, 800]
    outs, single, X = _sharded_and_single(tmp_path, sizes, dict(iters=200), "auto",
                                          torch.float32)
    proxy = outs[2]["proxy"]
    agree = ((X @ proxy).argmax(1) == single.predict(X)).double().mean()
    # float32: the ranks' sums round differently from the single process's, and L-BFGS carries
    # rounding along the objective's flat directions (test_streaming.py); float64 sharded fits
    # equal the single-process fit to 1e-8 (test_sharded_equals_single_process_float64)
    assert agree >= 0.995


@pytest.mark.parametrize("case, match", [
    ("dim", r"rank 1 has image_features D=10 but rank 0 has D=12"),
    ("dtype", r"rank 1 has image_features dtype=torch.float64"),
    ("classes", r"rank 1 has 4 classes but rank 0 has 5"),
    ("nan", r"rank 1: image_features contains NaN or Inf"),
])
def test_mismatched_shards_fail_on_every_rank(tmp_path, case, match):
    import re

    _spawn(dist_workers.mismatch_worker, 2, tmp_path, case)
    for r in range(2):
        msg = (tmp_path / f"rank{r}.msg").read_text()
        assert re.search(match, msg), (r, msg)


def test_shard_rows_cover_in_order():
    for n in (0, 1, 7, 10, 1001):
        for world in (1, 2, 3, 8):
            got = [i for r in range(world) for i in shard_rows(n, r, world)]
            assert got == list(range(n))
            sizes = [len(shard_rows(n, r, world)) for r in range(world)]
            assert max(sizes) - min(sizes) <= 1


def test_dead_rank_gives_a_clear_error_not_a_hang(tmp_path):
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=dist_workers.dying_worker,
                         args=(r, 2, str(tmp_path / "init"), str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert not p.is_alive(), "a rank hung past the process group's timeout"
    seconds, msg = (tmp_path / "rank0.msg").read_text().split("\n", 1)
    assert "sharded fit: communication with the other ranks failed" in msg, msg
    assert float(seconds) < 60


def test_sharded_and_streamed(tmp_path):
    sizes = [180, 0, 121]
    outs = _spawn_ok(dist_workers.stream_worker, 3, tmp_path, sizes)
    X, T, _ = clip_like(sum(sizes), 24, 7, seed=13)
    single = inmap_ext.fit_vision_proxy(X, T, iters=120)
    for o in outs:
        assert o["streamed"]
        torch.testing.assert_close(o["proxy"], single.proxy, rtol=0, atol=1e-8)


@pytest.mark.parametrize("prior", ["estimate", "auto", "given"])
def test_sharded_class_priors_equal_single_process(tmp_path, prior):
    """The class-prior decision and the estimate are reductions over every rank's rows: a
    sharded fit (one empty shard) balances exactly as the single-process fit; given proportions
    with known-absent classes keep those classes at zero pseudo labels on every rank."""
    sizes = [150, 0, 151]
    cp = torch.tensor([2.0, 0, 1, 1, 0, 3, 1], dtype=torch.float64) if prior == "given" else prior
    kw = dict(iters=60, class_prior=cp)
    outs, single, _ = _sharded_and_single(tmp_path, sizes, kw, "torch")
    for o in outs:
        torch.testing.assert_close(o["proxy"], single.proxy, rtol=0, atol=1e-8)
        assert torch.equal(o["counts"], single.class_counts)
    if prior == "given":
        assert single.class_counts[[1, 4]].tolist() == [0, 0]


@pytest.mark.parametrize("sizes, on_passes", [([50, 40, 41], 1), ([50, 0, 81], 0)],
                         ids=["rank1-narrow", "rank1-empty"])
def test_lockstep_reads_of_a_sharded_store(tmp_path, sizes, on_passes):
    # two balancings read in lockstep on every rank's store equal the dense column log-sums of
    # all rows; one rank finding a bias out of its store's range sends every rank to the
    # per-bias reads (that one on a pass), and every rank ends with the same result. A rank
    # without rows reads nothing and sends no read to a pass.
    import math

    from testing import clip_like

    outs = _spawn_ok(dist_workers.lockstep_worker, len(sizes), tmp_path, sizes)
    X, T, _ = clip_like(sum(sizes), 24, 17, seed=21)
    dense = X @ T * 100.0

    def want(b):
        return torch.logsumexp(torch.log_softmax(dense + b, 1), 0)

    for o in outs:
        assert o["on_passes"] == on_passes
        for key, biases in (("together", o["biases"]), ("mixed", o["wide"])):
            assert torch.equal(o[key], outs[0][key])
            for got, b in zip(o[key], biases):
                torch.testing.assert_close(got, want(b), rtol=1e-5, atol=1e-5)
    assert not math.isnan(float(outs[0]["mixed"].sum()))
