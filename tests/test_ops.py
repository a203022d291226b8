"""Every compiled op against the pure-torch backend (the oracle), over dtype x shape x
hyper-parameters, plus the op registration itself (schemas, fake kernels, opcheck)."""
import math

import pytest
import torch

from inmap_ext import _ops, reference
from testing import (DEVICES, FLOAT_DTYPES, clip_like, inmap_ext, skip_if_no_ext, unit_cols,
                     unit_rows)

# (N, D, C, chunk): N < C, C = 1, D not a multiple of 8, one row, ragged last chunk, chunk > N.
SHAPES = [(1, 5, 3, 4), (7, 13, 1, 3), (5, 9, 40, 2), (257, 31, 17, 64), (300, 8, 130, 1000),
          (1000, 67, 9, 333), (20000, 96, 300, 4096)]
TOL = {torch.float32: dict(rtol=2e-5, atol=2e-5), torch.float64: dict(rtol=1e-10, atol=1e-10)}


def _inputs(n, d, c, dtype, device, seed=0):
    x = unit_rows(n, d, seed=seed, dtype=dtype, device=device)
    w = unit_cols(d, c, seed=seed + 1, dtype=dtype, device=device)
    bias = torch.randn(c, generator=torch.Generator().manual_seed(seed + 2), dtype=dtype)
    return x, w, bias.to(device)


def _ext(name):
    return _ops.op(name, "ext")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("use_bias", [False, True])
def test_softmax_column_lse(device, dtype, shape, use_bias):
    skip_if_no_ext(device)
    n, d, c, chunk = shape
    x, w, bias = _inputs(n, d, c, dtype, device)
    bias = bias if use_bias else None
    for inv_tau in (1.0, 100.0):
        got = _ext("softmax_column_lse")(x, w, bias, inv_tau, chunk)
        want = reference.softmax_column_lse(x, w, bias, inv_tau, chunk)
        torch.testing.assert_close(got, want, **TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("alpha", [0.0, 0.6, 1.0])
def test_pseudo_label_reduce(device, dtype, shape, alpha):
    skip_if_no_ext(device)
    n, d, c, chunk = shape
    x, w, bias = _inputs(n, d, c, dtype, device, seed=3)
    got = _ext("pseudo_label_reduce")(x, w, bias, 50.0, alpha, chunk)
    want = reference.pseudo_label_reduce(x, w, bias, 50.0, alpha, chunk)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, **TOL[dtype])
    assert got[2].dtype == torch.int64 and int(got[2].sum()) == n
    torch.testing.assert_close(got[1].sum(), torch.tensor(float(n), dtype=got[1].dtype,
                                                          device=device), **TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_xt_softmax(device, dtype, shape):
    skip_if_no_ext(device)
    n, d, c, chunk = shape
    x, w, _ = _inputs(n, d, c, dtype, device, seed=5)
    for inv_tau in (25.0, 1.0):
        got, got_lse = _ext("xt_softmax")(x, w, inv_tau, chunk)
        want, want_lse = reference.xt_softmax(x, w, inv_tau, chunk)
        torch.testing.assert_close(got, want, **TOL[dtype])
        assert got_lse.shape == () and got_lse.dtype == got.dtype
        torch.testing.assert_close(got_lse, want_lse, **TOL[dtype])
        dense = torch.logsumexp(x.double() @ w.double() * inv_tau, dim=1).sum()
        torch.testing.assert_close(got_lse.double(), dense, rtol=1e-5, atol=1e-5 * n)


@pytest.mark.parametrize("device", ["cpu"])    # the CUDA kernels' sums: not yet run on a GPU
def test_x_t_p_over_many_identical_rows_does_not_drift_in_float32(device):
    # N identical rows: X^T P = N x^T p exactly, and every rounding of a running sum goes the
    # same way. MKL's float32 GEMM adding each chunk into the running sum (beta 1) drifted with
    # N on an AMD EPYC (2.3e-3 at N = 400k); the CPU kernels add the rows into a block that
    # reaches the sum every 8192 rows (csrc/cpu/chunked_cpu.h), so the error stays that of one
    # block's GEMM, whatever N. Both ops that form X^T P.
    skip_if_no_ext(device)
    d, c = 64, 10
    row = unit_rows(1, d, seed=7, dtype=torch.float32, device=device)
    w = unit_cols(d, c, seed=8, dtype=torch.float32, device=device)
    bias = torch.zeros(c, device=device)
    p = torch.softmax((row.double() @ w.double()) * 25.0, dim=1)
    p_hard = torch.softmax((row.double() @ w.double()) * 100.0, dim=1)

    def errors(n):
        x = row.expand(n, d)
        G = _ext("xt_softmax")(x, w, 25.0, 4096)[0]
        B = _ext("pseudo_label_reduce")(x, w, bias, 100.0, 1.0, 4096)[0]
        rel = lambda a, b: float((a.double() - b).norm() / b.norm())  # noqa: E731
        return rel(G, n * row.double().T @ p), rel(B, n * row.double().T @ p_hard)

    block, many = errors(8192), errors(400_000)
    for one, all_rows in zip(block, many):
        assert one < 2e-4, block
        assert all_rows <= 2 * one + 1e-6, (block, many)    # 49 blocks: a drift is ~49x


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_topk_scores(device, dtype, shape):
    skip_if_no_ext(device)
    n, d, c, chunk = shape
    x, w, _ = _inputs(n, d, c, dtype, device, seed=7)
    for k in sorted({1, min(3, c), c}):
        vals, idx = _ext("topk_scores")(x, w, k, chunk)
        rv, ri = reference.topk_scores(x, w, k, chunk)
        torch.testing.assert_close(vals, rv, **TOL[dtype])
        assert torch.equal(idx, ri)


# The stored logits' read (CPU kernel only; on CUDA its torch twin runs): E = exp(Z - row max)
# in the store's dtype, b = exp(bias - max) in the work dtype. Rows: none, one, ragged blocks
# of 256, more than C; C = 1; entries and weights down to the subnormal range (flushed by the
# kernel, kept by the twin: a difference far below the tolerance relative to every row's 1).
@pytest.mark.parametrize("store", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows, c", [(0, 4), (1, 1), (3, 7), (257, 1), (300, 133), (513, 40),
                                     (2000, 1000)])
@pytest.mark.parametrize("spread", [3.0, 60.0, 400.0])
def test_stored_column_sums(store, rows, c, spread):
    skip_if_no_ext("cpu")
    g = torch.Generator().manual_seed(rows * 31 + c)
    work = reference.acc_dtype(store)
    z = torch.randn(rows, c, generator=g, dtype=torch.float64) * spread
    e = torch.exp(z - z.amax(dim=1, keepdim=True)).to(store) if rows else \
        torch.empty(0, c, dtype=store)
    beta = torch.randn(c, generator=g, dtype=torch.float64) * spread / 4
    b = torch.exp(beta - beta.max()).to(work)
    if c > 2:
        b[1] = 0.0                                   # a class known absent
    col, rmin = _ext("stored_column_sums")(e, b)
    want, wmin = reference.stored_column_sums(e, b)
    assert col.dtype == work and rmin.dtype == work and col.shape == (c,) and rmin.shape == ()
    assert rows or math.isinf(float(rmin))
    # below this least row mass the caller reads with a pass instead (logit_store.py): there
    # both must only say so
    floor = c * torch.finfo(work).tiny / torch.finfo(work).eps
    if float(wmin) < floor:
        assert float(rmin) < floor * (1 + 1e-5)
        return
    tol = 1e-10 if store == torch.float64 else 2e-5
    torch.testing.assert_close(rmin, wmin, rtol=tol, atol=0)
    # what a read gives the caller: every class's mass b_j col_j (of the rows' total, rows);
    # the subnormal terms the kernel flushes weigh less than eps / C each
    torch.testing.assert_close(col * b, want * b, rtol=tol,
                               atol=rows * torch.finfo(work).eps / c)
    normal = want * b > rows * torch.finfo(work).eps
    torch.testing.assert_close(col[normal], want[normal], rtol=tol, atol=0)
    # the same result whatever the number of threads (fixed row blocks, fixed order)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one, _ = _ext("stored_column_sums")(e, b)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, col)


# K class-weight vectors at once (K balancings in lockstep, class_prior.py): each row of the
# result has the bits of that vector read alone, whatever the thread count, and the twin's.
@pytest.mark.parametrize("store", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows, c, k", [(0, 4, 2), (1, 1, 1), (3, 7, 3), (300, 133, 2),
                                        (513, 40, 4), (2000, 1000, 2), (5, 6, 0)])
def test_stored_column_sums_of_several_weight_vectors(store, rows, c, k):
    skip_if_no_ext("cpu")
    g = torch.Generator().manual_seed(rows * 7 + c + k)
    work = reference.acc_dtype(store)
    z = torch.randn(rows, c, generator=g, dtype=torch.float64) * 20
    e = torch.exp(z - z.amax(dim=1, keepdim=True)).to(store) if rows else \
        torch.empty(0, c, dtype=store)
    beta = torch.randn(k, c, generator=g, dtype=torch.float64) * 5
    b = torch.exp(beta - beta.amax(dim=1, keepdim=True)).to(work) if k else \
        torch.empty(0, c, dtype=work)
    if c > 2 and k:
        b[0, 1] = 0.0                                # a class known absent in one of them
    f = _ext("stored_column_sums")
    threads = torch.get_num_threads()
    for n_threads in (1, 2):
        torch.set_num_threads(n_threads)
        try:
            col, rmin = f(e, b)
        finally:
            torch.set_num_threads(threads)
        assert col.shape == (k, c) and rmin.shape == (k,) and col.dtype == rmin.dtype == work
        for i in range(k):
            one, one_min = f(e, b[i].contiguous())
            assert torch.equal(col[i], one) and torch.equal(rmin[i], one_min)
    want, wmin = reference.stored_column_sums(e, b)
    assert want.shape == (k, c) and wmin.shape == (k,)
    tol = 1e-10 if store == torch.float64 else 2e-5
    torch.testing.assert_close(col * b, want * b, rtol=tol,
                               atol=max(rows, 1) * torch.finfo(work).eps / c)
    torch.testing.assert_close(rmin, wmin, rtol=tol, atol=0)


@pytest.mark.parametrize("store", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows, c, k", [(0, 4, 3), (1, 1, 1), (3, 7, 3), (300, 133, 3),
                                        (2000, 1000, 2)])
def test_stored_row_scores(store, rows, c, k):
    skip_if_no_ext("cpu")
    g = torch.Generator().manual_seed(rows * 17 + c)
    work = reference.acc_dtype(store)
    z = torch.randn(rows, c, generator=g, dtype=torch.float64) * 20
    e = torch.exp(z - z.amax(dim=1, keepdim=True)).to(store) if rows else \
        torch.empty(0, c, dtype=store)
    beta = torch.randn(k, c, generator=g, dtype=torch.float64) * 5
    b = torch.exp(beta - beta.amax(dim=1, keepdim=True)).to(work)
    mass, top = _ext("stored_row_scores")(e, b)
    want_mass, want_top = reference.stored_row_scores(e, b)
    assert mass.shape == top.shape == (rows, k) and mass.dtype == work and top.dtype == torch.int64
    tol = 1e-10 if store == torch.float64 else 2e-5
    torch.testing.assert_close(mass, want_mass, rtol=tol, atol=0)
    assert torch.equal(top, want_top)            # one product per entry: the same argmax
    # ties go to the first class, as torch.argmax
    flat = torch.ones(2, c, dtype=store)
    assert torch.equal(_ext("stored_row_scores")(flat, b[:1] * 0 + 1)[1],
                       torch.zeros(2, 1, dtype=torch.int64))
    if c >= 7:                                   # a tie inside the row: the first of the two
        tied = torch.full((1, c), 0.25, dtype=store)
        tied[0, 2] = tied[0, c - 1] = 1.0
        assert int(_ext("stored_row_scores")(tied, b[:1] * 0 + 1)[1]) == 2


def test_stored_reads_let_a_nan_through_as_their_twins_do():
    skip_if_no_ext("cpu")
    e = torch.rand(300, 9)
    e[123, 4] = e[123, 7] = float("nan")        # the first NaN wins, as in torch.argmax
    b = torch.rand(9)
    col, rmin = _ext("stored_column_sums")(e, b)
    assert math.isnan(float(rmin)) and math.isnan(float(reference.stored_column_sums(e, b)[1]))
    mass, top = _ext("stored_row_scores")(e, b[None])
    want_mass, want_top = reference.stored_row_scores(e, b[None])
    assert torch.equal(top, want_top) and int(top[123, 0]) == 4
    assert torch.equal(torch.isnan(mass), torch.isnan(want_mass))


def test_stored_column_sums_refuses_bad_arguments():
    skip_if_no_ext("cpu")
    f = _ext("stored_column_sums")
    e = torch.rand(4, 3)
    with pytest.raises(RuntimeError, match="b must be a vector of length C=3 or K x C"):
        f(e, torch.rand(4))
    with pytest.raises(RuntimeError, match="b must be a vector of length C=3 or K x C"):
        f(e, torch.rand(2, 4))
    with pytest.raises(RuntimeError, match="b must be a vector of length C=3 or K x C"):
        f(e, torch.rand(2, 2, 3))
    with pytest.raises(RuntimeError, match="b must be Float"):
        f(e, torch.rand(3, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="e must be 2-D"):
        f(torch.rand(3), torch.rand(3))
    with pytest.raises(RuntimeError, match="float64, float32 or bfloat16"):
        f(e.half(), torch.rand(3))


@pytest.mark.parametrize("seed", range(6))
def test_random_problems_through_the_public_blocks(seed):
    """Random shapes and hyper-parameters: every building block, ext against torch."""
    skip_if_no_ext("cpu")
    import inmap_ext

    g = torch.Generator().manual_seed(100 + seed)
    n, d, c = (int(torch.randint(lo, hi, (1,), generator=g)) for lo, hi in
               ((1, 900), (1, 70), (1, 60)))
    x, w, bias = _inputs(n, d, c, torch.float64, "cpu", seed=seed)
    tau = float(torch.empty(1).uniform_(0.005, 0.2, generator=g))
    alpha = float(torch.rand(1, generator=g))
    chunk = int(torch.randint(1, n + 5, (1,), generator=g))
    kw = dict(chunk_size=chunk)
    for fn, args in [(inmap_ext.softmax_column_lse, (x, w, tau, bias)),
                     (inmap_ext.sinkhorn_log_bias, (x, w)),
                     (inmap_ext.zero_shot_topk, (x, w, min(4, c)))]:
        a, b = fn(*args, backend="ext", **kw), fn(*args, backend="torch", **kw)
        for u, v in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
            torch.testing.assert_close(u, v, rtol=1e-9, atol=1e-9)
    a = inmap_ext.pseudo_label_reduce(x, w, bias, tau_t=tau, alpha=alpha, backend="ext", **kw)
    b = inmap_ext.pseudo_label_reduce(x, w, bias, tau_t=tau, alpha=alpha, backend="torch", **kw)
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, rtol=1e-9, atol=1e-9)
    a = inmap_ext.proxy_gradient(x, w, a[0], tau_i=tau, backend="ext", **kw)
    b = inmap_ext.proxy_gradient(x, w, b[0], tau_i=tau, backend="torch", **kw)
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_non_contiguous_and_offset_inputs():
    skip_if_no_ext("cpu")
    big = unit_rows(60, 40, dtype=torch.float32)
    x = big[5:55:2, 3:30]            # strided rows, offset storage
    w = unit_cols(27, 33, dtype=torch.float32)[:, ::3]
    for name, args in [("xt_softmax", (20.0, 7)), ("softmax_column_lse", (None, 20.0, 7)),
                       ("topk_scores", (2, 7))]:
        got = _ext(name)(x, w, *args)
        want = getattr(reference, name)(x, w, *args)
        for g, r in zip(got if isinstance(got, tuple) else (got,),
                        want if isinstance(want, tuple) else (want,)):
            torch.testing.assert_close(g, r, rtol=2e-5, atol=2e-5)


def test_extreme_logits_stay_finite_in_float32():
    """A class far from every row: its float32 softmax column underflows; the log-domain
    column statistic still matches float64."""
    skip_if_no_ext("cpu")
    x = unit_rows(64, 6, seed=1, dtype=torch.float64)
    w = torch.cat([x[:4].T, -x[:1].T], dim=1)       # last class is anti-aligned with row 0
    w = torch.nn.functional.normalize(w, dim=0)
    got = _ext("softmax_column_lse")(x.float(), w.float(), None, 400.0, 16)
    want = reference.softmax_column_lse(x, w, None, 400.0, 16)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("backend", ["ext", "torch"])
@pytest.mark.parametrize("inv_tau", [25.0, 1e6, 1e8])
def test_tiny_temperatures_normalise_rows_exactly(backend, inv_tau):
    """At 1/tau of 1e6 and more the logits are that large: a row normalised as v - (max +
    log s) loses log s in their ulp (rows stop summing to 1; tied classes each get 1). Every
    CPU op normalises as (v - max) - log s: float32 matches float64 at any temperature."""
    if backend == "ext":
        skip_if_no_ext("cpu")
    f = _ops.op
    x = unit_rows(400, 32, seed=12, dtype=torch.float64)
    w = unit_cols(32, 6, seed=13, dtype=torch.float64)
    w = torch.cat([w, w[:, :1]], dim=1)                      # a duplicated class: a tie
    lse = f("softmax_column_lse", backend)(x.float(), w.float(), None, inv_tau, 64)
    assert float(torch.exp(lse.double()).sum()) == pytest.approx(400, rel=1e-5)
    # the tied pair's mass together: how a tie splits depends on the float32 GEMM's rounding
    # of the two equal columns (the same with MKL on an AMX CPU; an ulp apart on an AMD EPYC,
    # which at 1/tau = 1e6 moves mass between them), not on the normalisation
    want_lse = torch.logsumexp(torch.log_softmax(x @ w * inv_tau, dim=1), dim=0)
    torch.testing.assert_close(torch.logaddexp(lse[0], lse[6]).double(),
                               torch.logaddexp(want_lse[0], want_lse[6]), rtol=1e-5, atol=1e-5)
    G, _ = f("xt_softmax", backend)(x.float(), w.float(), inv_tau, 64)
    want = x.T @ torch.softmax(x @ w * inv_tau, dim=1)
    tied = lambda m: torch.cat([m[:, 1:6], m[:, :1] + m[:, 6:]], dim=1)  # noqa: E731 (as above)
    assert float((tied(G.double()) - tied(want)).norm() / want.norm()) < 1e-5
    B, mass, _, _ = f("pseudo_label_reduce", backend)(x.float(), w.float(), None, inv_tau, 1.0,
                                                     64)
    assert float(mass.double().sum()) == pytest.approx(400, rel=1e-5)


def test_gpu_kernels_give_way_to_torch_at_tiny_temperatures(monkeypatch):
    """The CUDA and Triton kernels subtract a rounded row log-sum-exp: above
    GPU_KERNELS_MAX_INV_TAU their three softmax ops run as the torch ops, and the fit's record
    says so."""
    from inmap_ext import functional

    runner = functional.Runner("cpu", "torch", None, 10, 3, torch.float32)
    monkeypatch.setattr(runner, "backend", "triton")
    resolved = []

    def kernel(*a):
        raise AssertionError("the kernel ran above the limit")

    def resolve(name, backend, device, dtype, group):    # the op is still resolved (a sharded
        resolved.append(name)                             # fit's ranks meet in its collective)
        return kernel, dict(op=name, requested=backend, ran=backend)

    monkeypatch.setattr(functional.verify, "resolve", resolve)
    limit = functional.GPU_KERNELS_MAX_INV_TAU
    names = ("softmax_column_lse", "pseudo_label_reduce", "xt_softmax")
    for name in names:
        assert runner.op(name, limit * 10) is getattr(reference, name)
        rec = runner.ran[f"{name} (1/tau > {limit:g})"]
        assert rec["ran"] == "torch" and rec["requested"] == "triton"
        assert runner.op(name, 25.0) is kernel                # below it: the kernel
    assert resolved == list(names)
    assert runner.passes[runner.phase] == 6                  # each call still a pass
    assert runner.summary()[0] == "torch+triton"


def test_op_checks_name_the_problem():
    skip_if_no_ext("cpu")
    x, w, _ = _inputs(4, 5, 3, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="x has D=5 and w has D=4"):
        _ext("xt_softmax")(x, w[:4], 1.0, 2)
    with pytest.raises(RuntimeError, match="same dtype"):
        _ext("xt_softmax")(x, w.double(), 1.0, 2)
    with pytest.raises(RuntimeError, match="chunk must be >= 1"):
        _ext("xt_softmax")(x, w, 1.0, 0)
    with pytest.raises(RuntimeError, match="bias must be a vector of length C=3"):
        _ext("softmax_column_lse")(x, w, torch.zeros(4), 1.0, 2)
    with pytest.raises(RuntimeError, match="k must be in"):
        _ext("topk_scores")(x, w, 4, 2)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        _ext("xt_softmax")(x.half(), w.half(), 1.0, 2)


def test_opcheck_registrations():
    """Schemas, fake kernels and dispatch agree (torch.library.opcheck)."""
    skip_if_no_ext("cpu")
    x, w, bias = _inputs(9, 6, 4, torch.float32, "cpu")
    cases = {
        "softmax_column_lse": (x, w, bias, 10.0, 4),
        "pseudo_label_reduce": (x, w, bias, 10.0, 0.5, 4),
        "xt_softmax": (x, w, 10.0, 4),
        "topk_scores": (x, w, 2, 4),
    }
    for name, args in cases.items():
        torch.library.opcheck(getattr(torch.ops.inmap_ext, name).default, args,
                              test_utils=("test_schema", "test_faketensor"))


def test_auto_backend_and_errors():
    assert _ops.resolve_backend("torch", "cpu") == "torch"
    expected = "ext" if _ops.ext_available("cpu") else "torch"
    assert _ops.resolve_backend("auto", "cpu") == expected
    with pytest.raises(ValueError, match="backend must be one of"):
        _ops.resolve_backend("cuda", "cpu")
    assert _ops.resolve_backend("auto", "meta") == "torch"   # no kernels for other devices
    with pytest.raises(RuntimeError, match="backend='ext' requested for meta tensors"):
        _ops.resolve_backend("ext", "meta")


def test_a_misspelt_cuda_design_is_an_error_not_a_kernel_failure(monkeypatch):
    # the CUDA kernels refuse it (design.cuh); the first-use check would call that a failed
    # kernel and fall back to torch: the name is refused where the design is chosen instead
    monkeypatch.setenv(_ops.DESIGN_ENV, "FUSED")
    with pytest.raises(ValueError, match="INMAP_CUDA_DESIGN='FUSED': expected one of"):
        _ops.cuda_design_of("cuda", torch.float16)
    monkeypatch.setenv(_ops.DESIGN_ENV, "")
    assert _ops.cuda_design_of("cuda", torch.float16) == "chunked"


def test_cuda_design_context_sets_and_restores_the_environment(monkeypatch):
    import os

    monkeypatch.delenv(_ops.DESIGN_ENV, raising=False)
    with _ops.cuda_design("fused"):
        assert os.environ[_ops.DESIGN_ENV] == "fused"
        with _ops.cuda_design("chunked"):
            assert os.environ[_ops.DESIGN_ENV] == "chunked"
        assert os.environ[_ops.DESIGN_ENV] == "fused"
    assert _ops.DESIGN_ENV not in os.environ
    with pytest.raises(ValueError, match="design must be one of"):
        with _ops.cuda_design("fastest"):
            pass


@pytest.mark.parametrize("fused,dtype_ok,major,ptx,allowed", [
    (True, True, 9, 90, True), (True, True, 8, 80, True),
    (True, True, 9, 75, False),      # only older PTX loaded (e.g. "7.5+PTX"): empty kernels
    (True, True, 7, 75, False), (True, False, 9, 90, False), (False, True, 9, 90, False),
])
def test_fused_design_choice(fused, dtype_ok, major, ptx, allowed):
    if not _ops.extension_loaded():
        pytest.skip("extension not built")
    assert torch.ops.inmap_ext.fused_design_allowed(fused, dtype_ok, major, ptx) is allowed


@pytest.mark.parametrize("d,strided,padded", [(100, False, 128), (64, False, 64), (64, True, 64)])
def test_runner_pads_x_once_per_fit_where_the_fused_kernels_would(monkeypatch, d, strided,
                                                                  padded):
    """Where the fused CUDA design would zero-pad X on every call, the Runner makes the copy once
    (own_features) and pads w's rows to match; the fit is unchanged. Exercised here with the
    CPU kernels standing in for the CUDA ones (the copy logic is the same)."""
    from inmap_ext.functional import Runner

    if not _ops.ext_available("cpu"):
        pytest.skip("extension not built")
    X, T, _ = clip_like(400, d, 7, seed=5, dtype=torch.float32)
    if strided:                                     # rows of a wider tensor: not contiguous
        X = torch.cat([X, X], dim=1)[:, :d]
    plain = inmap_ext.fit_vision_proxy(X, T, iters=60, backend="ext")
    monkeypatch.setattr(_ops, "fused_design_requested", lambda x: True)
    runner = Runner("cpu", "ext", None, 400, 7)
    owned = runner.own_features(X)
    assert owned.shape == (400, padded) and owned.is_contiguous()
    assert runner.pad_cols == padded - d and torch.equal(owned[:, :d], X)
    assert (owned is X) == (padded == d and not strided)
    G, lse = runner.xt_softmax(owned, T, 25.0)
    G0, lse0 = _ops.op("xt_softmax", "ext")(X.contiguous(), T, 25.0, 400)
    assert G.shape == (d, 7)
    torch.testing.assert_close(G, G0, rtol=1e-5, atol=1e-6)
    padded_fit = inmap_ext.fit_vision_proxy(X, T, iters=60, backend="ext")
    assert padded_fit.proxy.shape == (d, 7)
    torch.testing.assert_close(padded_fit.proxy, plain.proxy, rtol=1e-5, atol=1e-6)
    assert torch.equal(padded_fit.predict(X), plain.predict(X))


# ---- the public building blocks against dense formulas (not only against each other) ---

@pytest.mark.parametrize("backend", ["torch", "ext"])
@pytest.mark.parametrize("gamma,tau_t", [(0.5, 0.01), (0.0, 0.03), (1.0, 0.02)])
def test_public_sinkhorn_log_bias_matches_dense(backend, gamma, tau_t):
    if backend == "ext":
        skip_if_no_ext("cpu")
    X, T, _ = clip_like(400, 24, 9, seed=7)
    beta = inmap_ext.sinkhorn_log_bias(X, T, tau_t=tau_t, sinkhorn_iters=300, gamma=gamma,
                                       backend=backend, chunk_size=61)
    L = X @ T / tau_t
    zs = torch.softmax(L, 1).mean(0)
    q = zs ** gamma / (zs ** gamma).sum() if gamma > 0 else torch.full_like(zs, 1 / 9)
    torch.testing.assert_close(torch.softmax(L + beta, 1).mean(0), q, rtol=0, atol=1e-7)


@pytest.mark.parametrize("backend", ["torch", "ext"])
def test_proxy_gradient_matches_dense(backend):
    if backend == "ext":
        skip_if_no_ext("cpu")
    X, T, _ = clip_like(300, 16, 7, seed=2)
    B = torch.randn(16, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    G = inmap_ext.proxy_gradient(X, T, B, tau_i=0.04, backend=backend, chunk_size=50)
    torch.testing.assert_close(G, X.T @ torch.softmax(X @ T / 0.04, 1) - B, rtol=1e-10,
                               atol=1e-10)


def test_ext_ops_take_a_minus_inf_bias_directly():
    """The kernel-level oracle test with a -inf log-bias column (not through the public API,
    whose first-use check would silently swap in the pure-torch op)."""
    skip_if_no_ext("cpu")
    from inmap_ext import _ops, reference

    X, T, _ = clip_like(257, 31, 17, seed=5)
    bias = torch.randn(17, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    bias[[0, 9]] = -math.inf
    for dt in (torch.float32, torch.float64):
        x, w, b = X.to(dt), T.to(dt), bias.to(reference.acc_dtype(dt))
        for name, args in (("softmax_column_lse", (b, 100.0, 64)),
                           ("pseudo_label_reduce", (b, 100.0, 0.6, 64))):
            got = _ops.op(name, "ext")(x, w, *args)
            want = getattr(reference, name)(x, w, *args)
            for g, r in zip(got if isinstance(got, tuple) else (got,),
                            want if isinstance(want, tuple) else (want,)):
                torch.testing.assert_close(g, r, rtol=2e-5, atol=2e-5)


def test_auto_chunk_size_keeps_the_logit_block_within_its_budget():
    from inmap_ext.functional import CHUNK_BUDGET_BYTES, auto_chunk_size

    budget = CHUNK_BUDGET_BYTES["cpu"]
    for n, c in [(10**7, 1000), (10**7, 21841), (10**7, 1), (5, 1000), (0, 10), (1, 10**9)]:
        for dt, size in ((torch.float32, 4), (torch.float64, 8), (torch.float16, 4)):
            k = auto_chunk_size(n, c, "cpu", dt)          # 16-bit features accumulate in fp32
            assert 1 <= k <= max(n, 1), (n, c, dt, k)
            assert k == 1 or k * c * size <= budget, (n, c, dt, k)
            assert k == max(n, 1) or (k + 1) * c * size > budget, (n, c, dt, k)  # the largest

