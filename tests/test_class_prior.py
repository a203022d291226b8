"""The class prior (class_prior.py): auto's three promises on synthetic sets that hold every
class, part of the class list, or hold it unevenly; zero and tiny target mass never give
NaN/Inf in any backend; mode="paper"; the record of what ran; every guarantee for every option."""
import math

import pytest
import torch

from testing import BACKENDS, clip_like, inmap_ext, skip_if_no_ext
from inmap_ext.class_prior import CLASS_PRIORS
from inmap_ext.synthetic import HOLDS as SYNTHETIC_HOLDS, KINDS, kind_problem

# Synthetic problems that differ the way real CLIP models and sets differ: inmap_ext.synthetic's
# KINDS (cosine scale, class count, zero-shot strength) and HOLDS (what the set holds).
MODELS, HOLDS = KINDS, SYNTHETIC_HOLDS
PRIORS = ("auto", "uniform", "estimate", "none")


def _problem(model, holds, seed=1):
    p = kind_problem(model, holds, seed=seed)
    return None if p is None else (p.image_features, p.text_proxies, p.labels)


def _acc(pred, y):
    return float((pred == y).double().mean())


@pytest.fixture(scope="module")
def outcomes():
    """(zero-shot, each prior's accuracy, auto's choice) on every model x set."""
    out = {}
    for model in MODELS:
        for holds in HOLDS:
            p = _problem(model, holds)
            if p is None:
                continue
            X, T, y = p
            row = {"zero_shot": _acc((X @ T).argmax(1), y)}
            for prior in PRIORS:
                r = inmap_ext.fit_vision_proxy(X, T, class_prior=prior, iters=300)
                row[prior] = _acc(r.predict(X), y)
                if prior == "auto":
                    row["chose"] = r.class_prior.chosen
            out[(model, holds)] = row
    return out


# Where the promises are known not to hold (docs/class_prior.md, "Limits"). The tests assert them
# everywhere else; a set leaving these lists is progress, a set joining them a regression.
# - RN50-like cosines over 10 classes (softmax(S / 0.01) nearly flat: mean top posterior ~0.4):
#   on a partial or long-tailed set no candidate prior is expected to beat "none", and the
#   InMaP fit on those flat, unbalanced pseudo labels itself loses 8-9 points.
# - A weak zero-shot classifier (~16%) on a set holding every class evenly, and two classes:
#   the data cannot tell CLIP's per-class bias from class proportions, the candidates' models
#   disagree evenly, and auto keeps the zero-shot labels where the published uniform target
#   would gain.
# - The weak classifier on a long tail: auto keeps the zero-shot labels ("none") and the InMaP
#   fit on them is itself below zero-shot (15.8%): all 2000 published steps 15.5%, the L-BFGS
#   solver 15.15% (59 passes), its minimum 15.35%: the objective's minimum, not the solver
#   (the published descent's stop, 280 steps from the text proxies, stayed nearer zero-shot).
BELOW_ZERO_SHOT = {("rn50, C=10", "half the classes"), ("rn50, C=10", "a fifth of the classes"),
                   ("rn50, C=10", "long tail"), ("weak, C=100", "long tail")}
MISSES_PUBLISHED_GAIN = {"weak, C=100", "vit, C=2"}


def test_auto_is_never_more_than_half_a_point_below_zero_shot(outcomes):
    below = {key for key, row in outcomes.items() if row["auto"] < row["zero_shot"] - 0.005}
    assert below <= BELOW_ZERO_SHOT, {k: outcomes[k] for k in below - BELOW_ZERO_SHOT}


def test_auto_keeps_the_published_gain_where_the_set_holds_every_class_evenly(outcomes):
    for model in set(MODELS) - MISSES_PUBLISHED_GAIN:
        row = outcomes[(model, "every class")]
        assert row["auto"] >= row["uniform"] - 0.005, (model, row)


def test_auto_gains_on_average_at_least_as_much_as_the_best_fixed_prior(outcomes):
    gain = {p: sum(r[p] - r["zero_shot"] for r in outcomes.values()) / len(outcomes)
            for p in PRIORS}
    assert gain["auto"] >= 0.01, gain
    assert gain["auto"] >= max(gain["uniform"], gain["estimate"], gain["none"]) - 1e-9, gain


@pytest.mark.slow
@pytest.mark.parametrize("holds", ["every class", "a fifth of the classes"])
def test_auto_promises_at_a_thousand_classes(holds):
    """C = 1000 with 3 images per class (the shape of an ImageNet-sized class list on a small
    set): never below zero-shot, the published gain where every class is held evenly."""
    n = 3000 if holds == "every class" else 600
    kw = {} if holds == "every class" else dict(present=200)
    X, T, y = clip_like(n, 128, 1000, seed=2, dtype=torch.float32, gap=2.0, text_noise=0.4,
                        **kw)
    zs = _acc((X @ T).argmax(1), y)
    auto = _acc(inmap_ext.fit_vision_proxy(X, T, iters=300).predict(X), y)
    assert auto >= zs - 0.005, (zs, auto)
    if holds == "every class":
        uniform = inmap_ext.fit_vision_proxy(X, T, iters=300, class_prior="uniform")
        assert auto >= _acc(uniform.predict(X), y) - 0.005


def test_the_published_uniform_target_wrecks_partial_sets():
    # why auto exists: the published algorithm on a set holding 10 of 100 classes
    X, T, y = _problem("vit, C=100", "a fifth of the classes")
    paper = inmap_ext.fit_vision_proxy(X, T, iters=200, mode="paper")
    assert _acc(paper.predict(X), y) < _acc((X @ T).argmax(1), y) - 0.2


def test_estimate_finds_the_present_classes():
    X, T, y = clip_like(150, 128, 100, seed=1, dtype=torch.float32, gap=2.0, text_noise=0.4,
                        present=5)
    r = inmap_ext.fit_vision_proxy(X, T, iters=50, class_prior="estimate")
    p = r.class_prior.estimated_proportions
    present = torch.unique(y)
    assert float(p[present].sum()) > 0.9                 # the mass is on the present classes
    assert r.class_prior.effective_classes < 15
    assert r.class_prior.few_classes


@pytest.mark.parametrize("model, holds", [("vit, C=100", "every class"),
                                          ("vit, C=100", "a fifth of the classes"),
                                          ("rn50, C=10", "long tail"),
                                          ("weak, C=100", "half the classes")])
def test_estimate_is_the_em_iterate_and_balanced_to_itself(model, holds):
    """The estimate (SQUAREM-accelerated EM finished by plain EM) is the same on passes and on
    stored logits, near the dense plain EM iterate stopped at the same tolerance, reached in no
    more reads, and softmax(L + log pi) has column means pi to within that tolerance."""
    from inmap_ext.class_prior import EM_TOL, estimate_log_proportions
    from inmap_ext.functional import Runner
    from inmap_ext.logit_store import PassSource, StoredLogits

    X, T, _ = _problem(model, holds)
    X, T = X.double(), T.double()
    n, C = X.shape[0], T.shape[1]
    runner = Runner("cpu", "torch", 97, n, C, torch.float64)
    got = torch.exp(estimate_log_proportions(PassSource(runner, X, T, 100.0), C, n,
                                             torch.float64, "cpu"))
    reads = runner.passes["other"]
    stored = torch.exp(estimate_log_proportions(StoredLogits(runner, X, T, 100.0, torch.float64),
                                                C, n, torch.float64, "cpu"))
    L = X @ T / 0.01
    pi = torch.full((C,), 1.0 / C, dtype=torch.float64)
    em = 0
    while True:                                    # plain dense EM, same stopping rule
        new = torch.softmax(L + pi.log(), 1).mean(0)
        em += 1
        settled = float((new - pi).abs().max()) * C < EM_TOL
        pi = new
        if settled:
            break
    torch.testing.assert_close(stored, got, rtol=1e-9, atol=1e-12)
    # its first step from the uniform start is the zero-shot shares the decision read first:
    # given them, one read fewer and, on stored logits, the same bits
    store = StoredLogits(runner, X, T, 100.0, torch.float64)
    log_zs = store.column_lse(None) - math.log(n)
    seen = []
    store.on_read = lambda: seen.append(1)
    again = estimate_log_proportions(store, C, n, torch.float64, "cpu")
    without = len(seen)
    given = estimate_log_proportions(store, C, n, torch.float64, "cpu", log_zs)
    assert torch.equal(given, again) and len(seen) - without == without - 1
    assert float((got - pi).abs().max()) * C < 10 * EM_TOL and reads <= em + 2
    balanced = torch.softmax(L + got.log(), 1).mean(0)
    assert float((balanced - got).abs().max()) * C < EM_TOL


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("tiny", [0.0, 1e-30, 1e-300])
def test_zero_and_tiny_target_mass_stay_finite(backend, dtype, tiny):
    skip_if_no_ext("cpu") if backend == "ext" else None
    X, T, y = clip_like(400, 32, 10, seed=3, dtype=dtype)
    prior = torch.ones(10, dtype=torch.float64)
    prior[[2, 7]] = tiny
    r = inmap_ext.fit_vision_proxy(X, T, iters=30, class_prior=prior, backend=backend)
    assert r.class_prior.chosen == "given"
    for t in (r.proxy, r.class_mass, r.grad_norm):
        assert torch.isfinite(t).all()
    assert not torch.isnan(r.log_bias).any() and not torch.isposinf(r.log_bias).any()
    if tiny == 0.0:
        assert torch.isneginf(r.log_bias[[2, 7]]).all()
        assert float(r.class_mass[[2, 7]].abs().max()) == 0.0   # exactly no pseudo-label mass
        assert int(r.class_counts[[2, 7]].sum()) == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_ops_take_a_minus_inf_log_bias(backend):
    skip_if_no_ext("cpu") if backend == "ext" else None
    X, T, _ = clip_like(300, 16, 9, seed=5)
    bias = torch.zeros(9, dtype=torch.float64)
    bias[[0, 4]] = -math.inf
    lse = inmap_ext.softmax_column_lse(X, T, 0.01, bias, backend=backend, chunk_size=64)
    ref = torch.logsumexp(torch.log_softmax(X @ T / 0.01 + bias, dim=1), dim=0)
    assert torch.isneginf(lse[[0, 4]]).all()
    keep = torch.isfinite(ref)
    torch.testing.assert_close(lse[keep], ref[keep], rtol=1e-10, atol=1e-10)
    B, mass, counts, _ = inmap_ext.pseudo_label_reduce(X, T, bias, backend=backend,
                                                       chunk_size=64)
    assert torch.isfinite(B).all() and float(mass[[0, 4]].abs().max()) == 0.0
    with pytest.raises(ValueError, match="every class"):
        inmap_ext.softmax_column_lse(X, T, 0.01, torch.full((9,), -math.inf, dtype=torch.float64),
                                     backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sinkhorn_to_given_proportions_reaches_them(backend):
    skip_if_no_ext("cpu") if backend == "ext" else None
    X, T, _ = clip_like(500, 24, 6, seed=2)
    q = torch.tensor([0.3, 0.0, 0.2, 0.1, 0.25, 0.15], dtype=torch.float64)
    beta = inmap_ext.sinkhorn_log_bias(X, T, sinkhorn_iters=500, class_prior=q, backend=backend)
    shares = torch.softmax(X @ T / 0.01 + beta, dim=1).mean(0)
    torch.testing.assert_close(shares, q, rtol=0, atol=1e-6)


def test_paper_mode_is_the_published_algorithm_and_refuses_other_priors():
    X, T, _ = clip_like(300, 16, 8, seed=4)
    a = inmap_ext.fit_vision_proxy(X, T, iters=20, mode="paper")
    b = inmap_ext.fit_vision_proxy(X, T, iters=20, class_prior="uniform", solver="gd",
                                   stop="none")   # the default's stored logits: same to rounding
    torch.testing.assert_close(a.proxy, b.proxy, rtol=0, atol=1e-10)
    assert a.hyper["mode"] == "paper" and a.hyper["class_prior"] == "uniform"
    assert a.class_prior.chosen == "uniform"
    with pytest.raises(ValueError, match="class_prior"):
        inmap_ext.fit_vision_proxy(X, T, mode="paper", class_prior="estimate")
    with pytest.raises(ValueError, match="tol"):
        inmap_ext.fit_vision_proxy(X, T, mode="paper", tol=1e-3)
    with pytest.raises(ValueError, match="mode"):
        inmap_ext.fit_vision_proxy(X, T, mode="fast")


@pytest.mark.parametrize("bad,err,match", [
    ("balanced", ValueError, "class_prior must be one of"),
    (torch.ones(5), ValueError, r"shape \(8,\)"),
    (-torch.ones(8), ValueError, "non-negative"),
    (torch.zeros(8), ValueError, "sums to 0"),
    (torch.tensor([float("nan")] * 8), ValueError, "finite"),
    ([0.5] * 8, TypeError, "class_prior must be"),
])
def test_bad_class_prior_is_refused_before_any_work(bad, err, match):
    X, T, _ = clip_like(50, 8, 8, seed=0)
    with pytest.raises(err, match=match):
        inmap_ext.fit_vision_proxy(X, T, class_prior=bad)


@pytest.mark.parametrize("prior", CLASS_PRIORS)
def test_result_records_what_ran_and_saves_it(tmp_path, prior):
    X, T, _ = clip_like(300, 16, 8, seed=6)
    r = inmap_ext.fit_vision_proxy(X, T, iters=10, class_prior=prior)
    p = r.class_prior
    assert p.requested == prior and p.chosen in ("uniform", "estimate", "none")
    assert r.hyper["class_prior"] == p.chosen and r.hyper["mode"] == "default"
    q = (p.estimated_proportions if p.estimated_proportions is not None
         else p.zero_shot_proportions).double()
    assert p.reason and p.effective_classes == pytest.approx(
        float(torch.exp(-(q[q > 0] * q[q > 0].log()).sum())), rel=1e-9)
    assert (r.log_bias is None) == (p.chosen == "none")
    s = p.summary()
    assert s["chosen"] == p.chosen and "coverage" in s
    if prior in ("estimate",):
        assert len(s["estimated_proportions"]) == 8
        assert sum(s["estimated_proportions"]) == pytest.approx(1, abs=1e-5)
    r.save(tmp_path / "p.safetensors")
    back = inmap_ext.load_vision_proxy(tmp_path / "p.safetensors")
    assert back.class_prior.chosen == p.chosen and back.class_prior.reason == p.reason
    assert back.class_prior.stats == p.stats and back.class_prior.close_calls == p.close_calls
    assert back.hyper["class_prior"] == p.chosen
    if p.estimated_proportions is not None:
        torch.testing.assert_close(back.class_prior.estimated_proportions,
                                   p.estimated_proportions)


@pytest.mark.parametrize("prior", ["auto", "estimate", "given"])
def test_streamed_fit_equals_in_memory_for_every_prior(tmp_path, prior):
    X, T, _ = clip_like(500, 24, 10, seed=8, present=3)
    cp = torch.tensor([1.0, 0, 2, 0, 1, 1, 0, 3, 1, 1]) if prior == "given" else prior
    ref = inmap_ext.fit_vision_proxy(X, T, iters=60, class_prior=cp, backend="torch")
    got = inmap_ext.fit_vision_proxy(X, T, iters=60, class_prior=cp, backend="torch",
                                     stream=True, chunk_size=77)
    assert got.class_prior.chosen == ref.class_prior.chosen
    torch.testing.assert_close(got.proxy, ref.proxy, rtol=0, atol=1e-8)


def test_auto_does_not_trust_a_collapsing_estimate():
    """A weak, biased zero-shot classifier (noisy text proxies: zero-shot ~15% over 100
    classes): the EM estimate collapses the pseudo labels onto a few hub classes (far below
    zero-shot) and is confident in itself. auto sees the collapse (the balanced predictions keep
    less than half of the zero-shot predictions' effective classes), leaves it out of the
    choice and says so."""
    from inmap_ext.class_prior import KEPT_CLASSES

    X, T, y = clip_like(1000, 128, 100, seed=1, dtype=torch.float32, gap=2.0, text_noise=1.0)
    zs = _acc((X @ T).argmax(1), y)
    est = inmap_ext.fit_vision_proxy(X, T, iters=100, class_prior="estimate")
    auto = inmap_ext.fit_vision_proxy(X, T, iters=100)
    p = auto.class_prior
    assert p.stats["estimate_kept_classes"] < KEPT_CLASSES
    assert p.chosen != "estimate" and "collapsed" in p.reason
    assert set(p.stats["expected_accuracy"]) == {"none", "uniform"}
    assert _acc(est.predict(X), y) < zs - 0.05                  # what auto avoided
    assert _acc(auto.predict(X), y) >= zs - 0.01


def test_auto_chooses_by_the_expected_accuracy_it_records():
    """The record holds each candidate's expected accuracy under the candidates' mixture, and
    the choice is the largest; a set holding every class evenly goes to the published uniform
    target, one holding a fifth of them does not."""
    for holds, want in (("every class", "uniform"), ("a fifth of the classes", None)):
        X, T, _ = _problem("vit, C=100", holds)
        p = inmap_ext.fit_vision_proxy(X, T, iters=20).class_prior
        ea = p.stats["expected_accuracy"]
        assert p.chosen == max(ea, key=ea.get) and set(ea) >= {"none", "uniform"}
        assert p.chosen == want if want else p.chosen != "uniform"


def test_expected_accuracies_is_one_pass_equal_on_every_runner():
    """The scoring pass equals the dense computation, chunked, streamed or not, on passes or on
    the stored logits (one pass either way)."""
    from inmap_ext.class_prior import expected_accuracies
    from inmap_ext.functional import Runner
    from inmap_ext.logit_store import PassSource, StoredLogits
    from inmap_ext.streaming import StreamingRunner

    X, T, _ = clip_like(333, 24, 17, seed=9)
    betas = [torch.zeros(17, dtype=torch.float64), torch.randn(17, dtype=torch.float64),
             torch.randn(17, dtype=torch.float64)]
    betas[2][3] = -math.inf
    L = X @ T / 0.01
    P = [torch.softmax(L + b, 1) for b in betas]
    top = [p.argmax(1) for p in P]
    want = torch.tensor([[float(P[h].gather(1, top[c][:, None]).sum()) for h in range(3)]
                         for c in range(3)], dtype=torch.float64)
    v = torch.stack([P[h].gather(1, top[c][:, None])[:, 0] for c in range(3) for h in range(3)],
                    1)                                   # v[i, c * 3 + h] = P_h(argmax P_c | x_i)
    runners = [Runner("cpu", "torch", 50, 333, 17, torch.float64),
               StreamingRunner("cpu", "torch", 64, 333, 17, torch.float64)]
    for runner, source in [(r, kind(r, X, T, 100.0, *dt)) for r in runners
                           for kind, dt in ((PassSource, ()), (StoredLogits, (torch.float64,)))]:
        before = dict(runner.passes)
        A, counts, M = expected_accuracies(runner, source, 17, betas)
        assert sum(runner.passes.values()) - sum(before.values()) == (0 if source.stored else 1)
        torch.testing.assert_close(A, want, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(M, v.T @ v, rtol=1e-10, atol=1e-10)
        for c in range(3):
            assert torch.equal(counts[c], torch.bincount(top[c], minlength=17))


@pytest.mark.parametrize("chosen", ["estimate", "none"])
def test_cli_warns_when_few_classes_appear_present(capsys, chosen):
    from types import SimpleNamespace

    from inmap_ext.class_prior import ClassPrior
    from inmap_ext.pipeline import Log, _log_class_prior

    est = torch.zeros(100, dtype=torch.float64)
    est[:10] = 0.1                                   # the estimate holds 10 of 100 classes
    p = ClassPrior("auto", chosen, "why", None, torch.full((100,), 0.01), est, {})
    assert p.few_classes == (chosen == "estimate")
    _log_class_prior(SimpleNamespace(class_prior=p, num_classes=100), Log("text"))
    err = capsys.readouterr().err
    warned = "appear to hold only about 10 of the 100 listed classes" in err
    assert warned == (chosen == "estimate")


def test_margins_are_the_mean_and_standard_error_of_the_judged_differences():
    """_margins: for each other allowed candidate, the mean over the images of the
    mixture-judged accuracy difference to the chosen one and its standard error, from the first
    and second moments of the pass, equal to the direct computation."""
    from inmap_ext.class_prior import _margins

    g = torch.Generator().manual_seed(3)
    n = 500
    v = torch.rand(n, 9, generator=g, dtype=torch.float64)
    A, M = v.sum(0).reshape(3, 3) / n, (v.T @ v) / n
    for allowed, best in (([0, 1, 2], 1), ([0, 1], 0)):
        got = _margins(A, M, allowed, best, n)
        assert set(got) == {("none", "uniform", "estimate")[c] for c in allowed if c != best}
        for c in allowed:
            if c == best:
                continue
            d = sum(v[:, best * 3 + h] - v[:, c * 3 + h] for h in allowed) / len(allowed)
            m = got[("none", "uniform", "estimate")[c]]
            assert m["margin"] == pytest.approx(float(d.mean()), abs=1e-6)
            assert m["se"] == pytest.approx(float(d.std(unbiased=False)) / n ** 0.5, abs=1e-6)


def test_auto_reports_close_calls_and_the_cli_says_what_would_decide(capsys):
    """A fit records each runner-up's margin and standard error; a runner-up within CLOSE_CALL
    standard errors is a close call: in the reason, in report.json's class_prior and as a note
    naming the option that the user's knowledge of the set would pick."""
    from types import SimpleNamespace

    from inmap_ext.class_prior import CLOSE_CALL, ClassPrior
    from inmap_ext.pipeline import Log, _log_class_prior, _prior_report

    X, T, _ = _problem("vit, C=100", "half the classes")
    p = inmap_ext.fit_vision_proxy(X, T, iters=20).class_prior
    margins = p.stats["margin"]
    assert p.chosen not in margins and len(margins) == len(p.stats["expected_accuracy"]) - 1
    for c, m in margins.items():
        ea = p.stats["expected_accuracy"]
        assert m["margin"] == pytest.approx(ea[p.chosen] - ea[c], abs=2e-4)
        assert m["se"] > 0
    assert p.close_calls == [c for c, m in margins.items() if m["margin"] < CLOSE_CALL * m["se"]]
    assert ("close call" in p.reason) == bool(p.close_calls)

    stats = {"margin": {"uniform": {"margin": 0.001, "se": 0.002},
                        "estimate": {"margin": 0.05, "se": 0.002}}}
    q = ClassPrior("auto", "none", "why", None, torch.full((10,), 0.1), None, stats)
    assert q.close_calls == ["uniform"]
    res = SimpleNamespace(class_prior=q, num_classes=10)
    _log_class_prior(res, Log("text"))
    err = capsys.readouterr().err
    assert ("close call: under the candidates' own models 'uniform' was within two standard "
            "errors" in err and "not the doubt about which model is right" in err)
    assert q.assumption in err                                  # stated on every fit
    assert "--class-prior uniform" in err and "estimate" not in err
    assert _prior_report(res, [str(i) for i in range(10)])["close_calls"] == ["uniform"]



@pytest.mark.parametrize("n,c", [(1, 3), (2, 5), (7, 40), (50, 1), (1, 1)])
@pytest.mark.parametrize("prior", CLASS_PRIORS + ("given",))
def test_every_prior_on_tiny_shapes(n, c, prior):
    """One image, fewer images than classes, a single class: every class prior gives a finite
    unit proxy, a recorded choice and predictions of the right shape."""
    X, T, _ = clip_like(max(n, 2), 16, c, seed=3)
    X = X[:n]
    cp = torch.arange(1.0, c + 1) if prior == "given" else prior
    r = inmap_ext.fit_vision_proxy(X, T, iters=20, class_prior=cp)
    assert torch.isfinite(r.proxy).all() and r.proxy.shape == (16, c)
    torch.testing.assert_close(r.proxy.norm(dim=0), torch.ones(c, dtype=r.proxy.dtype))
    assert r.class_prior.chosen in ("uniform", "estimate", "none", "given")
    assert r.predict(X).shape == (n,) and int(r.class_counts.sum()) == n
