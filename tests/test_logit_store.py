"""The class-prior decision reads the zero-shot logits from one pass kept in memory
(logit_store.py): every read equals the pass it replaces, on every runner and store dtype; a
read out of the store's range is made with a pass; the budget decides whether there is a store;
a fit counts its passes by phase (result.passes) and the decision takes one."""
import math

import pytest
import torch

from testing import BACKENDS, clip_like, inmap_ext, skip_if_no_ext
from inmap_ext.class_prior import expected_accuracies
from inmap_ext import logit_store, memory
from inmap_ext.functional import Runner
from inmap_ext.logit_store import (ENV, PassSource, StoredLogits, budget_bytes,
                                   safe_bias_range, store_dtype)
from inmap_ext.streaming import StreamingRunner


def _runners(n, c, dtype):
    return [Runner("cpu", "torch", 41, n, c, dtype), StreamingRunner("cpu", "torch", 64, n, c, dtype)]


@pytest.mark.parametrize("store, work_tol", [(torch.float64, 1e-12), (torch.float32, 1e-5),
                                             (torch.bfloat16, 5e-3)])
def test_stored_column_lse_equals_the_pass(store, work_tol):
    X, T, _ = clip_like(301, 24, 17, seed=3)
    n, C = X.shape[0], T.shape[1]
    biases = [None, torch.randn(17, dtype=torch.float64) * 3,
              torch.cat([torch.tensor([-math.inf]), torch.randn(16, dtype=torch.float64)])]
    dense = X @ T * 100.0
    for runner in _runners(n, C, torch.float64):
        stored = StoredLogits(runner, X, T, 100.0, store)
        for b in biases:
            want = torch.logsumexp(torch.log_softmax(dense + (0 if b is None else b), 1), 0)
            got = stored.column_lse(b)
            if b is not None:
                assert torch.equal(torch.isneginf(got), torch.isneginf(b))
            fin = torch.isfinite(want)
            torch.testing.assert_close(got[fin], want[fin], rtol=work_tol, atol=work_tol)
            torch.testing.assert_close(PassSource(runner, X, T, 100.0).column_lse(b)[fin],
                                       want[fin], rtol=1e-10, atol=1e-10)
        assert stored.reads_on_passes == 0


def test_a_read_out_of_range_is_made_with_a_pass_and_counted():
    # at tau = 1e-3 the rows' logits span far more than float32's e^-87: entries underflow, so
    # the store is not exact, and a bias lifting the classes that hold no row's maximum far
    # above those that do could need the lost entries
    X, T, _ = clip_like(30, 16, 40, seed=5)        # 30 rows: most of the 40 classes hold none
    runner = Runner("cpu", "torch", 8, 30, 40, torch.float32)
    stored = StoredLogits(runner, X.float(), T.float(), 1000.0, torch.float32)
    assert not stored.exact and stored.depth < -87
    assert stored.safe_range == pytest.approx(math.log(1 / torch.finfo(torch.float32).tiny)
                                              - math.log(40)   # C: kept_floor's factor
                                              - math.log(1 / torch.finfo(torch.float32).eps))
    held = stored.top.nonzero()[:, 0]           # classes holding some row's largest logit
    assert 0 < len(held) < 40
    b = torch.zeros(40, dtype=torch.float32)
    b[held] = -(stored.safe_range + 5)
    before = runner.passes.get("other", 0)
    got = stored.column_lse(b)
    assert stored.reads_on_passes == 1 and runner.passes["other"] == before + 1
    want = torch.logsumexp(torch.log_softmax(X @ T * 1000.0 + b.double(), 1), 0)
    fin = torch.isfinite(want)
    torch.testing.assert_close(got[fin].double(), want[fin], rtol=1e-4, atol=1e-3)
    # at tau = 0.1 nothing underflows here: the same lift is read from the store, exactly
    exact = StoredLogits(runner, X.float(), T.float(), 10.0, torch.float32)
    assert exact.exact
    b = torch.zeros(40, dtype=torch.float32)
    b[exact.top.nonzero()[:, 0]] = -(stored.safe_range + 5)
    got = exact.column_lse(b)
    want = torch.logsumexp(torch.log_softmax(X @ T * 10.0 + b.double(), 1), 0)
    assert exact.reads_on_passes == 0
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-3)
    # a bias that leaves a row only terms below float32's tiny / eps (its logits [0, -80],
    # every entry stored; the bias [-200, 0]): read with a pass
    X2 = torch.tensor([[1.0, 0.0]])
    T2 = torch.tensor([[1.0, 0.2], [0.0, 0.96 ** 0.5]])
    two = StoredLogits(Runner("cpu", "torch", 8, 1, 2, torch.float32), X2, T2, 100.0,
                       torch.float32)
    assert two.exact
    got = two.column_lse(torch.tensor([-200.0, 0.0]))
    assert two.reads_on_passes == 1
    want = torch.logsumexp(torch.log_softmax(X2.double() @ T2.double() * 100.0
                                             + torch.tensor([-200.0, 0.0]).double(), 1), 0)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-3)
    # a class whose every stored entry underflowed (logits [0, -200] in float32): its column
    # sum would be 0 (log -inf) where the true one is e^-200: read with a pass
    T3 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    gone = StoredLogits(Runner("cpu", "torch", 8, 1, 2, torch.float32), X2, T3, 200.0,
                        torch.float32)
    assert not gone.exact and float(gone.chunks[0][0, 1]) == 0.0
    got = gone.column_lse(torch.zeros(2))
    assert gone.reads_on_passes == 1 and bool(torch.isfinite(got).all())
    torch.testing.assert_close(got.double(), torch.tensor([0.0, -200.0], dtype=torch.float64),
                               rtol=1e-4, atol=1e-3)


def test_budget_and_dtype_ladder(monkeypatch):
    assert store_dtype(1000, 100, 1000 * 100 * 8) == torch.float64
    assert store_dtype(1000, 100, 1000 * 100 * 8 - 1) == torch.float32
    assert store_dtype(1000, 100, 1000 * 100 * 2) == torch.bfloat16
    assert store_dtype(1000, 100, 1000 * 100 * 2 - 1) is None
    # N = 400k, C = 1000 within the default 1 GiB: bfloat16 (0.8 GB)
    assert store_dtype(400_000, 1000, budget_bytes()) == torch.bfloat16
    monkeypatch.setenv(ENV, "0")
    assert budget_bytes() == 0
    X, T, _ = clip_like(50, 8, 4)
    runner = Runner("cpu", "torch", 16, 50, 4, torch.float64)
    assert not StoredLogits.build(runner, X, T, 100.0).stored          # budget 0: passes
    monkeypatch.setenv("INMAP_LOGIT_STORE_DTYPE", "bfloat16")
    assert StoredLogits.build(runner, X, T, 100.0).dtype == torch.bfloat16
    monkeypatch.setenv("INMAP_LOGIT_STORE_DTYPE", "half")
    with pytest.raises(ValueError, match="INMAP_LOGIT_STORE_DTYPE"):
        StoredLogits.build(runner, X, T, 100.0)
    monkeypatch.delenv("INMAP_LOGIT_STORE_DTYPE")
    monkeypatch.setenv(ENV, "lots")
    with pytest.raises(ValueError, match=ENV):
        budget_bytes()
    assert safe_bias_range(torch.float64, torch.float64) > 600


def _partial_runners(n, c, dtype):
    return _runners(n, c, dtype) + [Runner("cpu", "auto", 41, n, c, dtype)]


@pytest.mark.parametrize("fit_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kept, recomputed", [(100, True), (200, True), (301, False),
                                              (10_000, False), (0, True), (41, True)])
def test_a_partial_store_reads_as_the_whole_store(fit_dtype, kept, recomputed, monkeypatch):
    """A store holding the whole pieces of its first ``kept`` rows, every other row's logits
    computed again at each read: on every read (one bias, two in lockstep, the scoring read) the
    bits of the whole bfloat16 store where its pieces are the whole store's (at least a whole
    store's piece kept), else the same to the reads' rounding; a read that computes rows again
    is a pass."""
    monkeypatch.setattr(logit_store, "STORE_PIECE_BYTES", 82 * 4 * 17)   # pieces of 82 rows
    X, T, _ = clip_like(301, 24, 17, seed=3, dtype=fit_dtype)
    biases = [None, torch.randn(17, dtype=fit_dtype) * 3, torch.randn(2, 17, dtype=fit_dtype)]
    for runner in _partial_runners(301, 17, fit_dtype):
        whole = StoredLogits(runner, X, T, 100.0, torch.bfloat16)
        part = StoredLogits(runner, X, T, 100.0, torch.bfloat16, kept=kept)
        assert part.recomputes == recomputed and not whole.recomputes
        piece = logit_store.piece_rows(runner.chunk, 17, kept)
        same_pieces = piece == whole.piece           # kept at least a whole store's piece: yes
        assert piece % runner.chunk == 0 and (same_pieces or kept < 82)
        assert part.kept == (301 if kept >= 301 else kept // piece * piece)
        assert part.rows_kept == part.kept and part.rows_total == 301
        assert part.nbytes == part.kept * 17 * 2
        assert part.exact == whole.exact and torch.equal(part.top, whole.top)
        same = torch.equal if same_pieces else (
            lambda a, b: torch.allclose(a, b, rtol=1e-5, atol=1e-6))
        for b in biases:
            before = runner.passes.get("other", 0)
            assert same(part.column_lse(b), whole.column_lse(b))
            assert runner.passes.get("other", 0) - before == int(recomputed)
        betas = [torch.zeros(17, dtype=fit_dtype), biases[1]]
        want = expected_accuracies(runner, whole, 17, betas)
        got = expected_accuracies(runner, part, 17, betas)
        for g, w in zip(got, want):
            assert torch.equal(g, w) if same_pieces or g.dtype == torch.int64 else \
                torch.allclose(g, w, rtol=1e-5, atol=1e-6)
        assert part.reads_recomputed == (len(biases) + 1) * int(recomputed)


def test_a_partial_store_read_out_of_range_is_counted_and_made_with_a_pass():
    # at tau = 1e-3 entries underflow (not exact); a bias lifting the classes that hold no row's
    # largest far above those that do is out of range: the read is charged as a partial read
    # and made with a pass
    X, T, _ = clip_like(30, 16, 40, seed=5)
    runner = Runner("cpu", "torch", 8, 30, 40, torch.float32)
    part = StoredLogits(runner, X.float(), T.float(), 1000.0, torch.bfloat16, kept=16)
    assert part.recomputes and part.kept == 16 and not part.exact
    b = torch.zeros(40, dtype=torch.float32)
    b[part.top.nonzero()[:, 0]] = -(part.safe_range + 5)
    before = runner.passes.get("other", 0)
    got = part.column_lse(b)
    assert part.reads_on_passes == 1 and part.reads_recomputed == 1
    assert runner.passes["other"] == before + 2
    want = torch.logsumexp(torch.log_softmax(X @ T * 1000.0 + b.double(), 1), 0)
    fin = torch.isfinite(want)
    torch.testing.assert_close(got[fin].double(), want[fin], rtol=1e-4, atol=1e-3)


def test_the_budget_makes_a_partial_store_of_whole_chunks(monkeypatch):
    X, T, _ = clip_like(300, 16, 10, seed=2, dtype=torch.float32)
    runner = Runner("cpu", "torch", 40, 300, 10, torch.float32)
    # bfloat16 for 300 rows is 6000 bytes; 2000 bytes hold 100 rows: two chunks of 40 kept
    monkeypatch.setenv(ENV, "2000")
    part = StoredLogits.build(runner, X, T, 100.0)
    assert part.stored and part.dtype == torch.bfloat16 and part.recomputes
    assert part.kept == 80 and part.nbytes == 80 * 10 * 2 <= 2000
    monkeypatch.setenv(ENV, str(39 * 10 * 2))         # less than a chunk: every read a pass
    assert not StoredLogits.build(runner, X, T, 100.0).stored
    monkeypatch.setenv(ENV, str(300 * 10 * 2))        # the whole bfloat16 store
    whole = StoredLogits.build(runner, X, T, 100.0)
    assert whole.dtype == torch.bfloat16 and not whole.recomputes


def test_without_the_variable_a_bfloat16_store_grows_with_the_memory_available(monkeypatch):
    # the float64 / float32 tiers keep the 1 GiB budget; a bfloat16 store may take a quarter of
    # the memory available (at least 1 GiB); the variable, when set, is the budget of every tier
    monkeypatch.delenv(ENV, raising=False)
    gib = logit_store.DEFAULT_BUDGET_BYTES
    monkeypatch.setattr(logit_store, "available_bytes", lambda device: 16 * gib)
    assert logit_store.capacity_bytes(torch.device("cpu")) == 4 * gib
    c = 1000
    assert store_dtype(400_000, c, gib, 4 * gib) == torch.bfloat16      # as with 1 GiB
    assert store_dtype(200_000, c, gib, 4 * gib) == torch.float64 or 200_000 * c * 8 > gib
    assert store_dtype(250_000, c, gib, 4 * gib) == torch.float32        # 1 GB, not float64
    assert store_dtype(1_000_000, c, gib, 4 * gib) == torch.bfloat16     # 2 GB: whole
    assert store_dtype(1_000_000, c, gib, gib) is None                   # partial with 1 GiB
    monkeypatch.setattr(logit_store, "available_bytes", lambda device: None)
    assert logit_store.capacity_bytes(torch.device("cpu")) == gib        # unknown: 1 GiB
    monkeypatch.setattr(logit_store, "available_bytes", lambda device: gib)
    assert logit_store.capacity_bytes(torch.device("cpu")) == gib        # at least 1 GiB
    monkeypatch.setenv(ENV, str(gib // 2))
    assert logit_store.capacity_bytes(torch.device("cpu")) == gib // 2   # the variable rules
    monkeypatch.delenv(ENV)
    # what a fit sees: the store a small budget would make partial is whole where the memory
    # available allows it, and the fit is the same bit for bit
    X, T, _ = clip_like(300, 16, 10, seed=2, dtype=torch.float32)
    runner = Runner("cpu", "torch", 40, 300, 10, torch.float32)
    monkeypatch.setattr(logit_store, "DEFAULT_BUDGET_BYTES", 2000)      # 100 rows of bfloat16
    monkeypatch.setattr(logit_store, "STORE_PIECE_BYTES", 80 * 4 * 10)  # pieces of 80 rows in
                                                                        # both (as at N = 1M)
    monkeypatch.setattr(logit_store, "available_bytes", lambda device: 4 * 300 * 10 * 2)
    whole = StoredLogits.build(runner, X, T, 100.0)
    assert whole.dtype == torch.bfloat16 and not whole.recomputes and whole.kept == 300
    assert whole.capacity == 300 * 10 * 2
    monkeypatch.setattr(logit_store, "available_bytes", lambda device: 4 * 2000)
    part = StoredLogits.build(runner, X, T, 100.0)
    assert part.recomputes and part.kept == 80
    bias = torch.linspace(-1.0, 0.5, 10)
    assert torch.equal(whole.column_lse(bias), part.column_lse(bias))


def test_the_float_tiers_hold_a_small_store_and_bfloat16_the_rest(monkeypatch):
    # without the variable, float64 / float32 only up to PRECISE_TIER_BYTES (a read's bytes are
    # its time); with it, its budget holds for every tier, as does a budget given to build
    monkeypatch.delenv(ENV, raising=False)
    X, T, _ = clip_like(300, 16, 10, seed=2, dtype=torch.float32)
    runner = Runner("cpu", "torch", 64, 300, 10, torch.float32)
    assert logit_store.precise_budget_bytes() == logit_store.PRECISE_TIER_BYTES
    assert StoredLogits.build(runner, X, T, 100.0).dtype == torch.float64     # 24 kB
    monkeypatch.setattr(logit_store, "PRECISE_TIER_BYTES", 300 * 10 * 4)      # float32 fits
    assert StoredLogits.build(runner, X, T, 100.0).dtype == torch.float32
    monkeypatch.setattr(logit_store, "PRECISE_TIER_BYTES", 300 * 10 * 4 - 1)
    small = StoredLogits.build(runner, X, T, 100.0)
    assert small.dtype == torch.bfloat16 and not small.recomputes
    assert small.capacity >= logit_store.DEFAULT_BUDGET_BYTES
    assert StoredLogits.build(runner, X, T, 100.0, budget=1 << 20).dtype == torch.float64
    monkeypatch.setenv(ENV, str(1 << 20))
    assert logit_store.precise_budget_bytes() == 1 << 20
    assert StoredLogits.build(runner, X, T, 100.0).dtype == torch.float64
    # the float64 store and the bfloat16 one make the same decision here
    monkeypatch.delenv(ENV)
    f64 = StoredLogits.build(runner, X, T, 100.0, budget=1 << 20)
    bias = torch.linspace(-1.0, 0.5, 10, dtype=torch.float64)
    torch.testing.assert_close(small.column_lse(bias).double(), f64.column_lse(bias).double(),
                               rtol=0, atol=5e-3)


def test_the_memory_available_is_read_on_this_machine():
    free = memory.available_bytes(torch.device("cpu"))
    assert free is None or free > 0
    assert memory.available_bytes(torch.device("meta")) is None


def test_a_memory_cgroup_limit_and_ranks_sharing_a_host_bound_the_room(tmp_path, monkeypatch):
    def files(folder, limit, used, v1=False):
        folder.mkdir(parents=True, exist_ok=True)
        names = (("memory.limit_in_bytes", "memory.usage_in_bytes") if v1
                 else ("memory.max", "memory.current"))
        (folder / names[0]).write_text(f"{limit}\n")
        (folder / names[1]).write_text(f"{used}\n")

    proc = tmp_path / "cgroup"
    # cgroup v2: the process's own folder (a job's limit) and a parent with more room
    v2 = tmp_path / "v2"
    files(v2, "max", 10)                                          # the root: no limit
    files(v2 / "slurm" / "job_7", 1_000_000, 400_000)
    files(v2 / "slurm", 5_000_000, 3_000_000)
    proc.write_text("0::/slurm/job_7\n")
    assert memory._cgroup_room(str(proc), str(v2)) == 600_000
    files(v2 / "slurm", 5_000_000, 4_900_000)                     # the parent has less left
    assert memory._cgroup_room(str(proc), str(v2)) == 100_000
    files(v2 / "slurm" / "job_7", "max", 0)
    files(v2 / "slurm", "max", 0)
    assert memory._cgroup_room(str(proc), str(v2)) is None   # no limit anywhere
    # a container (cgroup namespace): "/" is its own folder, the mount's root
    files(v2, 2_000_000, 500_000)
    proc.write_text("0::/\n")
    assert memory._cgroup_room(str(proc), str(v2)) == 1_500_000
    # cgroup v1: the memory controller's hierarchy
    v1 = tmp_path / "v1"
    files(v1 / "memory" / "docker" / "abc", 5000, 7000, v1=True)  # over: nothing left
    proc.write_text("4:memory:/docker/abc\n3:cpu:/\n")
    assert memory._cgroup_room(str(proc), str(v1)) == 0
    assert memory._cgroup_room(str(tmp_path / "no-proc"), str(tmp_path / "none")) is None
    # the page cache the kernel reclaims first is not counted as used (v1: the hierarchy's)
    (v1 / "memory" / "docker" / "abc" / "memory.stat").write_text(
        "cache 9000\ninactive_file 100\ntotal_inactive_file 3000\n")
    assert memory._cgroup_room(str(proc), str(v1)) == 1000
    # the CPU's available memory is never above what the cgroup allows
    monkeypatch.setattr(memory, "_cgroup_room", lambda: 12345)
    assert memory.available_bytes(torch.device("cpu")) == 12345
    # ranks of a sharded fit on one host share the room: LOCAL_WORLD_SIZE, else the world size
    monkeypatch.delenv(ENV, raising=False)
    gib = logit_store.DEFAULT_BUDGET_BYTES
    monkeypatch.setattr(logit_store, "available_bytes", lambda device: 64 * gib)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert logit_store.capacity_bytes(torch.device("cpu"), group=object()) == 4 * gib
    # a GPU per rank: nothing shared
    assert logit_store.capacity_bytes(torch.device("cuda"), group=object()) == 16 * gib
    assert logit_store.capacity_bytes(torch.device("cpu")) == 16 * gib      # one process
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "64")
    assert logit_store.capacity_bytes(torch.device("cpu"), group=object()) == gib   # at least


@pytest.mark.parametrize("prior, stream", [("auto", False), ("uniform", False),
                                           ("uniform", True)])
def test_fit_on_a_partial_store_equals_the_fit_on_the_whole_store(prior, stream, monkeypatch):
    X, T, y = clip_like(900, 48, 30, seed=7, dtype=torch.float32, gap=2.0, text_noise=0.4,
                        present=12)
    if stream:          # host rows of other norms: each streamed chunk normalised by its rows'
        X = X * torch.linspace(0.5, 3.0, 900)[:, None]   # scales (the rows computed again too)
    kw = dict(class_prior=prior, chunk_size=100, stream=stream)
    monkeypatch.setattr(logit_store, "STORE_PIECE_BYTES", 300 * 4 * 30)  # pieces of 300 rows
    monkeypatch.setenv("INMAP_LOGIT_STORE_DTYPE", "bfloat16")
    whole = inmap_ext.fit_vision_proxy(X, T, **kw)
    monkeypatch.delenv("INMAP_LOGIT_STORE_DTYPE")
    monkeypatch.setenv(ENV, str(350 * 30 * 2))       # 350 rows: one piece of 300 kept
    part = inmap_ext.fit_vision_proxy(X, T, **kw)
    assert part.class_prior.chosen == whole.class_prior.chosen
    assert "for 300 of 900 rows" in part.class_prior.stats["logits"]
    assert (whole.log_bias is None) == (part.log_bias is None)
    if whole.log_bias is not None:
        assert torch.equal(part.log_bias, whole.log_bias)
    assert torch.equal(part.proxy, whole.proxy)
    reads = int(part.class_prior.stats["logits"].split("each of ")[1].split()[0])
    assert part.passes["decision"] == whole.passes["decision"] + reads > 1


@pytest.mark.parametrize("prior", ["auto", "estimate", "uniform", "none"])
def test_fit_on_stored_logits_equals_the_fit_on_passes(prior, monkeypatch):
    X, T, y = clip_like(900, 48, 30, seed=7, dtype=torch.float32, gap=2.0, text_noise=0.4,
                        present=12)
    stored = inmap_ext.fit_vision_proxy(X, T, class_prior=prior)
    monkeypatch.setenv(ENV, "0")
    passes = inmap_ext.fit_vision_proxy(X, T, class_prior=prior)
    assert stored.class_prior.chosen == passes.class_prior.chosen
    assert "stored once (float64" in stored.class_prior.stats["logits"]
    assert passes.class_prior.stats["logits"] == "a pass over the features per read"
    if stored.log_bias is not None:
        torch.testing.assert_close(stored.log_bias, passes.log_bias, rtol=1e-4, atol=1e-4)
    # float64 stored logits against float32 passes: the same decision, biases within 1e-4,
    # predictions of the two fits within a few images
    assert float((stored.predict(X) == passes.predict(X)).double().mean()) >= 0.99
    assert stored.passes["decision"] == 1         # the zero-shot proportions are always read
    if prior != "none":
        assert passes.passes["decision"] >= 20          # at least the Sinkhorn balancing
    for r in (stored, passes):
        p = r.passes
        assert p["total"] == sum(v for k, v in p.items() if k != "total")
        assert p["pseudo_labels"] == 1 and p["descent"] == r.n_iters


def test_paper_mode_reads_the_features_as_published():
    X, T, _ = clip_like(300, 16, 6, seed=2)
    r = inmap_ext.fit_vision_proxy(X, T, mode="paper", iters=5)
    assert r.passes == {"decision": 20, "pseudo_labels": 1, "descent": 5,
                        "stopping_checks": 0, "total": 26}
    assert r.class_prior.stats["logits"] == "a pass over the features per read"


@pytest.mark.parametrize("backend", BACKENDS)
def test_passes_by_phase_on_every_backend(backend):
    skip_if_no_ext("cpu") if backend == "ext" else None
    X, T, _ = clip_like(500, 24, 9, seed=11)
    gd = inmap_ext.fit_vision_proxy(X, T, backend=backend, solver="gd", class_prior="uniform")
    assert gd.passes["descent"] == gd.n_iters
    assert gd.passes["stopping_checks"] == gd.n_iters // 10
    assert gd.passes["decision"] == 1


def test_few_images_many_classes_stored_equals_passes(monkeypatch):
    """16 images of 4 classes under 300 listed: balancing to uniform lifts the empty classes by
    hundreds against the others (a class far below the top once underflowed to log b = -inf and
    turned the next bias into +inf); the stored decision equals the one on passes."""
    X, T, _ = clip_like(16, 32, 300, seed=3, dtype=torch.float64, gap=2.0, text_noise=0.4,
                        present=4)         # float64: the passes' float32 columns underflow here
    for prior in ("auto", "uniform"):
        stored = inmap_ext.fit_vision_proxy(X, T, class_prior=prior, iters=3)
        monkeypatch.setenv(ENV, "0")
        passes = inmap_ext.fit_vision_proxy(X, T, class_prior=prior, iters=3)
        monkeypatch.delenv(ENV)
        assert stored.class_prior.chosen == passes.class_prior.chosen
        assert stored.class_prior.stats.get("expected_accuracy") == \
            passes.class_prior.stats.get("expected_accuracy")
        if stored.log_bias is not None:
            assert torch.isfinite(stored.log_bias).all()
            torch.testing.assert_close(stored.log_bias, passes.log_bias, rtol=1e-9, atol=1e-7)


@pytest.mark.parametrize("fit_dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("store", [torch.float64, torch.float32, torch.bfloat16])
def test_compiled_reads_equal_the_pass_for_every_fit_and_store_dtype(fit_dtype, store):
    # the compiled reads (CPU, backend "ext") in real use: every read and the scoring against
    # a pass, for a float64 fit over a 16- or 32-bit store too (read in float64 by the twins)
    skip_if_no_ext("cpu")
    from inmap_ext.class_prior import expected_accuracies

    X, T, _ = clip_like(301, 24, 17, seed=8)
    X, T = X.to(fit_dtype), T.to(fit_dtype)
    runner = Runner("cpu", "ext", 41, 301, 17, fit_dtype)
    stored = StoredLogits(runner, X, T, 100.0, store)
    passes = PassSource(runner, X, T, 100.0)
    tol = {torch.float64: 1e-6, torch.float32: 1e-5, torch.bfloat16: 5e-3}[store]
    bias = torch.randn(17, generator=torch.Generator().manual_seed(2), dtype=fit_dtype) * 3
    torch.testing.assert_close(stored.column_lse(bias), passes.column_lse(bias), rtol=tol,
                               atol=tol)
    betas = [torch.zeros(17, dtype=fit_dtype), bias]
    A, counts, M = expected_accuracies(runner, stored, 17, betas)
    A2, counts2, M2 = expected_accuracies(runner, passes, 17, betas)
    torch.testing.assert_close(A, A2, rtol=max(tol, 1e-4), atol=max(tol, 1e-4))
    if store != torch.bfloat16:         # a bfloat16 store may move a near-tie's argmax
        assert torch.equal(counts, counts2)
    assert stored.reads_on_passes == 0
    ran = runner.ran["stored_column_sums"]["ran"] if "stored_column_sums" in runner.ran else \
        "torch"
    assert ran == ("ext" if stored.work == (torch.float64 if store == torch.float64
                                            else torch.float32) else "torch")


def test_a_float64_store_of_float32_exponentials_knows_what_they_lost():
    # a float32 fit exponentiates its float32 logits before storing them in float64: entries
    # below float32's range are lost whatever the store's dtype, and the store says so
    X, T, _ = clip_like(30, 16, 40, seed=5)
    runner = Runner("cpu", "torch", 8, 30, 40, torch.float32)
    stored = StoredLogits(runner, X.float(), T.float(), 1000.0, torch.float64)
    assert stored.depth < -104 and not stored.exact
    assert stored.safe_range == pytest.approx(safe_bias_range(torch.float32, torch.float64, 40))
    held = stored.top.nonzero()[:, 0]
    b = torch.zeros(40, dtype=torch.float32)
    b[held] = -(stored.safe_range + 5)
    got = stored.column_lse(b)
    assert stored.reads_on_passes == 1
    want = PassSource(runner, X.float(), T.float(), 1000.0).column_lse(b)
    torch.testing.assert_close(got, want)


def test_a_float64_fit_over_a_float32_store_runs(monkeypatch):
    X, T, _ = clip_like(400, 24, 9, seed=6)
    monkeypatch.setenv("INMAP_LOGIT_STORE_DTYPE", "float32")
    got = inmap_ext.fit_vision_proxy(X.double(), T.double())
    monkeypatch.setenv("INMAP_LOGIT_STORE_DTYPE", "float64")
    want = inmap_ext.fit_vision_proxy(X.double(), T.double())
    assert got.class_prior.chosen == want.class_prior.chosen
    assert "float32" in got.class_prior.stats["logits"]


@pytest.mark.parametrize("store", [torch.float64, torch.float32, torch.bfloat16])
def test_the_storing_pass_in_cache_sized_blocks_stores_the_same(store, monkeypatch):
    # the storing pass computes each chunk in blocks of rows (logit_store.STORE_BLOCK_BYTES) so
    # that its elementwise sweeps read from cache: ragged blocks (7 rows of a 41-row chunk) give
    # the store of one block per chunk, the same rows' maxima and depth, and reads equal to a pass
    from inmap_ext import logit_store

    X, T, _ = clip_like(301, 24, 17, seed=5)
    X32, T32 = X.float(), T.float()
    runner = Runner("cpu", "torch", 41, X.shape[0], 17, torch.float32)
    monkeypatch.setattr(logit_store, "STORE_BLOCK_BYTES", 7 * 17 * 4)
    assert logit_store._store_block(41, 17, torch.float32, torch.device("cpu")) == 7
    blocked = StoredLogits(runner, X32, T32, 100.0, store)
    monkeypatch.setattr(logit_store, "STORE_BLOCK_BYTES", 1 << 40)
    whole = StoredLogits(runner, X32, T32, 100.0, store)
    assert [c.shape for c in blocked.chunks] == [c.shape for c in whole.chunks]
    assert all(c.dtype == store for c in blocked.chunks)
    # the float32 GEMM of a 7-row block may round a logit otherwise than the 41-row chunk's
    # (bit for bit with MKL on an AMX CPU; a few ulps of a cosine on an AMD EPYC, times
    # 1/tau_t = 100 in the exponent: up to 1.5e-5 of an entry)
    tol = {torch.float64: 5e-5, torch.float32: 5e-5, torch.bfloat16: 8e-3}[store]
    for a, b in zip(blocked.chunks, whole.chunks):
        torch.testing.assert_close(a.double(), b.double(), rtol=tol, atol=1e-30)
    assert torch.equal(blocked.top, whole.top)
    assert blocked.depth == pytest.approx(whole.depth, rel=1e-5)
    assert blocked.exact and whole.exact
    bias = torch.randn(17) * 2
    torch.testing.assert_close(blocked.column_lse(bias),
                               PassSource(runner, X32, T32, 100.0).column_lse(bias),
                               rtol=tol, atol=tol)


@pytest.mark.parametrize("store", [torch.float64, torch.float32, torch.bfloat16])
def test_balancings_in_lockstep_read_the_store_once_for_all(store, monkeypatch):
    # a K x C bias: one read of each chunk for the K of them, each row what its own read gives
    # (bit for bit: the decision does not change); a row out of the store's range sends each to
    # its own read (that one on a pass)
    X, T, _ = clip_like(301, 24, 17, seed=9)
    runner = Runner("cpu", "auto", 41, X.shape[0], 17, torch.float64)
    stored = StoredLogits(runner, X, T, 100.0, store)
    reads = []
    real = stored._read
    stored._read = lambda e, b: (reads.append(tuple(b.shape)), real(e, b))[1]
    biases = torch.stack([torch.randn(17, dtype=torch.float64) * 2,
                          torch.cat([torch.tensor([-math.inf]),
                                     torch.randn(16, dtype=torch.float64)])])
    together = stored.column_lse(biases)
    assert reads == [(2, 17)] * len(stored.chunks)
    alone = torch.stack([stored.column_lse(b) for b in biases])
    assert torch.equal(together, alone)
    # sinkhorn in lockstep equals the two balancings one after the other, bit for bit
    from inmap_ext.functional import sinkhorn

    n = X.shape[0]
    log_zs = stored.column_lse(None) - math.log(n)
    targets = torch.stack([torch.full((17,), -math.log(17), dtype=torch.float64),
                           torch.log_softmax(torch.randn(17, dtype=torch.float64), 0)])
    lock = sinkhorn(stored.column_lse, 20, targets, n, log_zs)
    for q, got in zip(targets, lock):
        assert torch.equal(got, sinkhorn(stored.column_lse, 20, q, n, log_zs))
    # out of range for one of them: each read alone, the wide one on a pass
    stored.exact, stored.safe_range = False, 1.0
    wide = biases.clone()
    wide[1] = torch.where(stored.top, torch.zeros(17, dtype=torch.float64),
                          torch.full((17,), 5.0, dtype=torch.float64))
    wide[0] = 0.0
    before = stored.reads_on_passes
    got = stored.column_lse(wide)
    assert stored.reads_on_passes == before + 1
    pass_read = PassSource(runner, X, T, 100.0).column_lse(wide[1])
    torch.testing.assert_close(got[1], pass_read, rtol=1e-12, atol=1e-12)
    assert torch.equal(got[0], stored.column_lse(wide[0]))


def test_the_decision_balances_its_two_candidates_in_lockstep(monkeypatch):
    # class_prior="auto": the zero-shot read, EM's reads and sinkhorn_iters - 1 reads for both
    # balancings together (not 2 x (sinkhorn_iters - 1))
    from inmap_ext import class_prior as cp

    X, T, _ = clip_like(400, 24, 13, seed=2)
    n = X.shape[0]
    runner = Runner("cpu", "auto", None, n, 13, torch.float64)
    stored = StoredLogits(runner, X, T, 100.0, torch.float64)
    shapes = []
    real = stored._read
    stored._read = lambda e, b: (shapes.append(tuple(b.shape)), real(e, b))[1]
    em = []
    real_em = cp.estimate_log_proportions

    def counted(source, *a):
        k = len(shapes)
        out = real_em(source, *a)
        em.append(len(shapes) - k)
        return out

    monkeypatch.setattr(cp, "estimate_log_proportions", counted)
    cp._choose(stored, runner, T, "auto", 20, 0.0, n)
    assert em and em[0] >= 1
    assert shapes.count((2, 13)) == 19
    assert len(shapes) == 1 + em[0] + 19
