"""The class prior (class_prior.py): auto's three promises on synthetic sets that hold every
class, part of the class list, or hold it unevenly; zero and tiny target mass never give
NaN/Inf in any backend; mode="paper"; the record of what ran; every guarantee for every option."""
import math

import pytest
import torch

from testing import BACKENDS, clip_like, inmap_ext, skip_if_no_ext
from inmap_ext.class_prior import CLASS_PRIORS

# CLIP-calibrated synthetic sets (cosines ~0.4 through a modality gap, zero-shot ~65%), C = 100
# listed classes: every class; 30 / 10 present; a long tail over 45 classes.
C = 100
SETS = {"full": dict(n=2000), "30 of 100": dict(n=600, present=30),
        "10 of 100": dict(n=300, present=10), "5 of 100": dict(n=150, present=5),
        "long tail": dict(n=900, present=45, imbalance=3.0)}


def _set(name, seed=1):
    kw = dict(SETS[name])
    n = kw.pop("n")
    return clip_like(n, 128, C, seed=seed, dtype=torch.float32, gap=2.0, text_noise=0.4, **kw)


def _acc(pred, y):
    return float((pred == y).double().mean())


@pytest.fixture(scope="module")
def accuracies():
    out = {}
    for name in SETS:
        X, T, y = _set(name)
        zs = _acc((X @ T).argmax(1), y)
        r = inmap_ext.fit_vision_proxy(X, T, iters=200)
        out[name] = (zs, _acc(r.predict(X), y), r.class_prior.chosen)
    return out


def test_auto_never_below_zero_shot(accuracies):
    for name, (zs, auto, chosen) in accuracies.items():
        assert auto >= zs, (name, zs, auto, chosen)


def test_auto_keeps_the_published_gain_on_a_full_balanced_set(accuracies):
    X, T, y = _set("full")
    paper = inmap_ext.fit_vision_proxy(X, T, iters=200, mode="paper")
    zs, auto, chosen = accuracies["full"]
    assert chosen == "uniform"
    assert auto >= _acc(paper.predict(X), y) - 0.001
    assert auto > zs + 0.05


def test_auto_gains_on_average_on_partial_and_imbalanced_sets(accuracies):
    gains = [auto - zs for name, (zs, auto, _) in accuracies.items() if name != "full"]
    assert sum(gains) / len(gains) > 0.005, accuracies


def test_the_published_uniform_target_wrecks_partial_sets():
    # why auto exists: the published algorithm on a set holding 10 of 100 classes
    X, T, y = _set("10 of 100")
    paper = inmap_ext.fit_vision_proxy(X, T, iters=200, mode="paper")
    assert _acc(paper.predict(X), y) < _acc((X @ T).argmax(1), y) - 0.2


def test_estimate_finds_the_present_classes():
    X, T, y = _set("5 of 100")
    r = inmap_ext.fit_vision_proxy(X, T, iters=50, class_prior="estimate")
    p = r.class_prior.estimated_proportions
    present = torch.unique(y)
    assert float(p[present].sum()) > 0.9                 # the mass is on the present classes
    assert r.class_prior.effective_classes < 15
    assert r.class_prior.few_classes


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
    b = inmap_ext.fit_vision_proxy(X, T, iters=20, class_prior="uniform")
    assert torch.equal(a.proxy, b.proxy)
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
    assert p.reason and 1 <= p.effective_classes <= 8
    assert (r.log_bias is None) == (p.chosen == "none")
    s = p.summary()
    assert s["chosen"] == p.chosen and "coverage" in s
    if prior in ("estimate",):
        assert len(s["estimated_proportions"]) == 8
        assert sum(s["estimated_proportions"]) == pytest.approx(1, abs=1e-5)
    r.save(tmp_path / "p.safetensors")
    back = inmap_ext.load_vision_proxy(tmp_path / "p.safetensors")
    assert back.class_prior.chosen == p.chosen and back.class_prior.reason == p.reason
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
    classes) makes few classes *appear* present; the EM estimate then collapses the pseudo
    labels onto a few hub classes (far below zero-shot). auto sees the collapse (the balanced
    pseudo labels keep < 60% of the zero-shot predictions' effective classes) and does not
    balance."""
    X, T, y = clip_like(1000, 128, 100, seed=1, dtype=torch.float32, gap=2.0, text_noise=1.0)
    zs = _acc((X @ T).argmax(1), y)
    est = inmap_ext.fit_vision_proxy(X, T, iters=100, class_prior="estimate")
    auto = inmap_ext.fit_vision_proxy(X, T, iters=100)
    p = auto.class_prior
    assert p.stats["coverage"] <= 0.42 and p.stats["estimate_kept_classes"] < 0.6
    assert p.chosen == "none" and "collapse" in p.reason and p.few_classes
    assert _acc(est.predict(X), y) < zs - 0.05                  # what auto avoided
    assert _acc(auto.predict(X), y) >= zs - 0.01


@pytest.mark.parametrize("chosen,words", [("estimate", "balanced to the estimated class"),
                                          ("none", "not balanced (the estimate could not")])
def test_cli_warns_when_few_classes_appear_present(capsys, chosen, words):
    from types import SimpleNamespace

    from inmap_ext.class_prior import ClassPrior
    from inmap_ext.pipeline import Log, _log_class_prior

    p = ClassPrior("auto", chosen, "why", None, torch.full((100,), 0.01),
                   torch.full((100,), 0.01), {"coverage": 0.2})
    _log_class_prior(SimpleNamespace(class_prior=p, num_classes=100), Log("text"))
    err = capsys.readouterr().err
    assert "appear to hold only about 100 of the 100 listed classes" in err and words in err
