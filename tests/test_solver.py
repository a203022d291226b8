"""The solvers of step 5: the published descent (solver.py, mode="paper" and solver="gd") and
the default Riemannian L-BFGS (lbfgs.py). The objective returned by the gradient pass equals the
dense cross-entropy; the default solver reaches the accuracy of all 2000 published steps in a
few dozen passes, over problem shapes and every class_prior option; both stopping rules do what
docs/method.md says."""
import pytest
import torch

from dense_inmap import dense_inmap
from testing import BACKENDS, clip_like, inmap_ext, skip_if_no_ext


def _cross_entropy(X, W, P, tau_i):
    logq = torch.log_softmax(X @ W / tau_i, dim=1)
    return float(-(P * logq).sum(dim=1).mean())


@pytest.mark.parametrize("backend", BACKENDS)
def test_objective_is_the_cross_entropy_of_each_step(backend):
    skip_if_no_ext("cpu") if backend == "ext" else None
    X, T, _ = clip_like(500, 24, 9, seed=11)
    r = inmap_ext.fit_vision_proxy(X, T, iters=12, mode="paper", backend=backend, chunk_size=77)
    assert r.objective.shape == (12,) and r.objective.dtype == torch.float64
    for k in (0, 5, 11):
        ref = dense_inmap(X, T, iters=k)        # W after k steps, P the pseudo labels
        want = _cross_entropy(X.double(), ref["W"], ref["P"], 0.04)
        assert float(r.objective[k]) == pytest.approx(want, rel=1e-10, abs=1e-10)


# (N, D, C, extra problem options, class_prior): a spread of shapes, balanced or not
SHAPES = [
    (3000, 32, 2, {}, "auto"),
    (3000, 64, 10, {}, "auto"),
    (4000, 128, 100, dict(gap=2.0, text_noise=0.4), "auto"),
    (3000, 128, 100, dict(gap=2.0, text_noise=0.4, present=10), "auto"),
    (3000, 64, 50, dict(imbalance=3.0), "estimate"),
    (3000, 48, 20, {}, "uniform"),
    (3000, 48, 20, dict(present=5), "none"),
]


@pytest.mark.parametrize("n,d,c,kw,prior", SHAPES,
                         ids=[f"N{s[0]}-C{s[2]}-{s[4]}{'-' + ','.join(s[3]) if s[3] else ''}"
                              for s in SHAPES])
def test_default_solver_keeps_the_accuracy_of_every_published_step(n, d, c, kw, prior):
    X, T, y = clip_like(n, d, c, seed=c, dtype=torch.float32, **kw)
    fast = inmap_ext.fit_vision_proxy(X, T, class_prior=prior)
    full = inmap_ext.fit_vision_proxy(X, T, class_prior=prior, solver="gd", stop="none")
    gd = inmap_ext.fit_vision_proxy(X, T, class_prior=prior, solver="gd")
    assert full.n_iters == 2000 and fast.converged and fast.hyper["solver"] == "lbfgs"
    assert fast.passes["descent"] == fast.n_iters <= 80 and fast.passes["stopping_checks"] == 0
    acc = lambda r: float((r.predict(X) == y).double().mean())  # noqa: E731
    agree = lambda r: float((r.predict(X) == full.predict(X)).double().mean())  # noqa: E731
    # the published steps stop short of the minimum that L-BFGS approaches (on the partial set
    # by 0.02 in objective), so the two can differ by a few images in either direction: measured
    # on these shapes -0.7 to +0.7 points, agreement within 1 point of the gd stop's or above
    assert acc(fast) >= acc(full) - 0.01, (fast.n_iters, acc(fast), acc(full))
    assert agree(fast) >= agree(gd) - 0.01, (agree(fast), agree(gd))
    # the rule, or a flat problem's objective at float32 rounding before the rule's window
    assert "settled" in fast.stop_reason or "working precision" in fast.stop_reason
    assert len(fast.objective) == len(fast.grad_norm) == fast.n_iters


@pytest.mark.parametrize("prior", ["uniform", "none"])
def test_lbfgs_reaches_the_objective_of_every_published_step(prior):
    """Same objective, same constraint: run long enough, L-BFGS goes at least as low as all
    2000 published steps (which stop short of the minimum), its iterates keep unit columns, and
    its first pass is the objective at the documented start (the pseudo labels' class means)."""
    from inmap_ext.lbfgs import start

    X, T, _ = clip_like(1500, 32, 12, seed=4, dtype=torch.float64, gap=2.0, text_noise=0.4)
    paper = inmap_ext.fit_vision_proxy(X, T, class_prior=prior, solver="gd", stop="none")
    long = inmap_ext.fit_vision_proxy(X, T, class_prior=prior, stop="none", iters=300)
    assert float(long.objective.min()) <= float(paper.objective[-1]) + 1e-9
    torch.testing.assert_close(long.proxy.norm(dim=0), torch.ones(12, dtype=torch.float64))
    ref = dense_inmap(X, T, iters=0, sinkhorn_iters=0 if prior == "none" else 20)
    B = X.T @ ref["P"]
    want = _cross_entropy(X, start(B, T), ref["P"], 0.04)
    assert float(long.objective[0]) == pytest.approx(want, rel=1e-9)


def test_lbfgs_on_every_backend_equals_torch():
    skip_if_no_ext("cpu")
    X, T, _ = clip_like(700, 24, 9, seed=8, dtype=torch.float64)
    a = inmap_ext.fit_vision_proxy(X, T, backend="torch", chunk_size=97)
    b = inmap_ext.fit_vision_proxy(X, T, backend="ext", chunk_size=128)
    assert a.n_iters == b.n_iters and a.passes == b.passes
    torch.testing.assert_close(a.proxy, b.proxy, rtol=1e-8, atol=1e-9)


def test_lbfgs_auto_stop_obeys_its_documented_rule():
    # docs/method.md: stop after an iteration once the objective fell by at most 1e-3
    # (relative) over the last 5 iterations; the histories have one entry per pass
    import inmap_ext.lbfgs as lb

    assert (lb.WINDOW, lb.OBJECTIVE_RTOL, lb.MAX_PASSES) == (5, 1e-3, 80)
    X, T, _ = clip_like(3000, 64, 10, seed=10, dtype=torch.float64)
    r = inmap_ext.fit_vision_proxy(X, T, class_prior="uniform")
    n = r.n_iters
    assert r.converged and "settled" in r.stop_reason and n < 2000
    # the same solver run for one pass less has not stopped; its histories are a prefix
    shorter = inmap_ext.fit_vision_proxy(X, T, class_prior="uniform", iters=n - 1)
    assert not shorter.converged and shorter.n_iters == n - 1
    torch.testing.assert_close(shorter.objective, r.objective[:n - 1])
    f = r.objective.double()
    assert float(f[-1]) <= float(f[0])
    # the rule's cap: never more than MAX_PASSES passes unless iters says so
    lb.MAX_PASSES = 7
    try:
        capped = inmap_ext.fit_vision_proxy(X, T, class_prior="uniform")
        more = inmap_ext.fit_vision_proxy(X, T, class_prior="uniform", stop="none", iters=9)
    finally:
        lb.MAX_PASSES = 80
    assert capped.n_iters == 7 and capped.converged and "cap of 7" in capped.stop_reason
    assert more.n_iters == 9


def test_default_and_paper_agree_on_a_balanced_set():
    X, T, y = clip_like(4000, 128, 100, seed=3, dtype=torch.float32, gap=2.0, text_noise=0.4)
    fast = inmap_ext.fit_vision_proxy(X, T)
    paper = inmap_ext.fit_vision_proxy(X, T, mode="paper")
    acc = lambda r: float((r.predict(X) == y).double().mean())  # noqa: E731
    assert fast.class_prior.chosen == "uniform" and paper.n_iters == 2000
    assert acc(fast) >= acc(paper) - 0.001 and fast.passes["total"] <= 80


def test_stop_none_runs_every_step_and_bad_stop_is_refused():
    X, T, _ = clip_like(200, 16, 5, seed=1)
    assert inmap_ext.fit_vision_proxy(X, T, iters=37, stop="none", solver="gd").n_iters == 37
    assert inmap_ext.fit_vision_proxy(X, T, iters=9, stop="none").n_iters == 9
    with pytest.raises(ValueError, match="solver must be one of"):
        inmap_ext.fit_vision_proxy(X, T, solver="adam")
    with pytest.raises(ValueError, match="mode='paper' runs the published descent"):
        inmap_ext.fit_vision_proxy(X, T, mode="paper", solver="lbfgs")
    with pytest.raises(ValueError, match="stop must be one of"):
        inmap_ext.fit_vision_proxy(X, T, stop="early")
    with pytest.raises(ValueError, match="mode='paper'"):
        inmap_ext.fit_vision_proxy(X, T, mode="paper", stop="auto")


def test_tol_is_the_largest_per_class_change():
    X, T, _ = clip_like(800, 32, 10, seed=21, dtype=torch.float64)
    kw = dict(class_prior="uniform", stop="none", solver="gd")
    r = inmap_ext.fit_vision_proxy(X, T, iters=2000, tol=1e-4, **kw)
    n = r.n_iters
    W = [inmap_ext.fit_vision_proxy(X, T, iters=k, **kw).proxy for k in (n - 2, n - 1, n)]
    assert float((W[2] - W[1]).norm(dim=0).max()) < 1e-4          # the stopping step
    assert float((W[1] - W[0]).norm(dim=0).max()) >= 1e-4         # the step before did not


def test_auto_stop_obeys_both_documented_criteria():
    # docs/method.md: checked every 10 steps; the objective fell by at most 2e-3 (relative) and
    # at most 0.05% of the images changed their prediction over the last 10 steps
    CHECK_EVERY, OBJECTIVE_RTOL, PREDICTION_TOL = 10, 2e-3, 5e-4

    X, T, _ = clip_like(3000, 64, 10, seed=10, dtype=torch.float32)
    r = inmap_ext.fit_vision_proxy(X, T, solver="gd")
    n = r.n_iters
    assert r.converged and n % CHECK_EVERY == 0 and n >= 2 * CHECK_EVERY
    assert r.passes["stopping_checks"] == n // CHECK_EVERY       # one top-1 pass per check
    f = r.objective.double()
    assert (f[n - CHECK_EVERY] - f[n - 1]) / abs(f[n - 1]) <= OBJECTIVE_RTOL
    kw = dict(stop="none", solver="gd")
    before = inmap_ext.fit_vision_proxy(X, T, iters=n - CHECK_EVERY, **kw)
    torch.testing.assert_close(inmap_ext.fit_vision_proxy(X, T, iters=n, **kw).proxy, r.proxy)
    changed = float((before.predict(X) != r.predict(X)).double().mean())
    assert changed <= PREDICTION_TOL


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tangent_projection_is_the_sphere_s(dtype):
    # lbfgs._tangent: E - W diag(W^T E), every column orthogonal to its w afterwards
    from inmap_ext import lbfgs

    g = torch.Generator().manual_seed(3)
    W = torch.nn.functional.normalize(torch.randn(17, 9, generator=g, dtype=dtype), dim=0)
    E = torch.randn(17, 9, generator=g, dtype=dtype)
    want = E - W * (W * E).sum(0, keepdim=True)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    got = lbfgs._tangent(W, E)
    torch.testing.assert_close(got, want, **tol)
    assert got.dtype == dtype and got.shape == E.shape
    torch.testing.assert_close((W * got).sum(0), torch.zeros(9, dtype=dtype), **tol)


def _two_loop(g, pairs):
    """-H g by the L-BFGS two-loop recursion (Nocedal & Wright, alg. 7.4): the oracle of
    lbfgs._History's compact form."""
    q = g.clone()
    alphas = []
    for s, y in reversed(pairs):
        a = float((s * q).sum()) / float((s * y).sum())
        alphas.append(a)
        q -= a * y
    s, y = pairs[-1]
    q *= float((s * y).sum()) / float((y * y).sum())
    for (s, y), a in zip(pairs, reversed(alphas)):
        b = float((y * q).sum()) / float((s * y).sum())
        q += (a - b) * s
    return -q


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_compact_history_is_the_two_loop_recursion(dtype):
    # pairs of a convex quadratic (y = A s, A SPD), more than HISTORY of them so that the ring
    # buffer wraps around, and a restart (clear) halfway; after every new pair the compact form
    # gives the two-loop's direction
    from inmap_ext import lbfgs

    g = torch.Generator().manual_seed(5)
    D, C, m = 13, 7, 4
    M = torch.randn(D * C, D * C, generator=g, dtype=torch.float64)
    A = M @ M.T / (D * C) + torch.eye(D * C, dtype=torch.float64)
    hist, kept = lbfgs._History(m), []
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-4, atol=1e-5)
    for i in range(11):
        if i == 6:
            hist.clear()
            kept = []
        s = torch.randn(D, C, generator=g, dtype=torch.float64)
        y = (A @ s.reshape(-1)).reshape(D, C)
        s, y = s.to(dtype), y.to(dtype)
        hist.append(s, y, float((s * y).sum()), float((y * y).sum()))
        kept = (kept + [(s.double(), y.double())])[-m:]
        grad = torch.randn(D, C, generator=g, dtype=torch.float64)
        d = hist.direction(grad.to(dtype))
        assert d.dtype == dtype and d.shape == (D, C) and len(hist) == len(kept)
        torch.testing.assert_close(d.double(), _two_loop(grad, kept), **tol)
    hist.clear()
    grad = torch.randn(D, C, generator=g, dtype=dtype)
    assert len(hist) == 0 and torch.equal(hist.direction(grad), -grad)
