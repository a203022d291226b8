"""A few labeled images settle class_prior='auto' (labeled.py), and every fit says what it
assumed about the set (ClassPrior.assumption)."""
import pytest
import torch

from testing import clip_like, inmap_ext


def _balanced_but_biased(seed=0):
    """A set holding every class evenly where the unlabeled rule keeps CLIP's marginal."""
    X, T, y = clip_like(2000, 64, 20, seed=seed, dtype=torch.float32, gap=2.0, text_noise=0.9)
    return X, T, y


def test_labels_choose_the_candidate_they_favour_and_record_why():
    X, T, y = _balanced_but_biased()
    free = inmap_ext.fit_vision_proxy(X, T)
    g = torch.Generator().manual_seed(1)
    idx = torch.randperm(len(y), generator=g)[:300]
    lab = inmap_ext.fit_vision_proxy(X, T, labeled=(idx, y[idx]))
    cp = lab.class_prior
    st = cp.stats["labeled"]
    assert set(st) >= {"none", "uniform"}
    assert all(0 <= v["accuracy"] <= 1 and v["se_vs_chosen"] >= 0 for v in st.values())
    assert cp.stats["unlabeled_choice"] == free.class_prior.chosen
    # here the labels favour another candidate than the unlabeled rule's: both fits were made
    # and judged on the labeled images; the one standing has strictly more right, or is kept
    assert "labeled_fits" in cp.stats, ("this set is built so that the labels favour another "
                                        "candidate than the unlabeled rule: both fits are judged")
    fits = cp.stats["labeled_fits"]
    assert len(fits) == 2 and free.class_prior.chosen in fits and cp.chosen in fits
    challenger = max(st, key=lambda c: st[c]["right"])
    assert challenger in fits
    other = next(c for c in fits if c != challenger)
    assert cp.chosen == (challenger if fits[challenger] > fits[other] else other)
    assert "judged by its fit" in cp.reason
    assert cp.stats["decided_by"] == ("unlabeled rule" if cp.chosen == free.class_prior.chosen
                                      else "labeled images")
    # the close calls are the runners-up of what stands, never itself
    assert cp.chosen not in cp.stats["margin"] and cp.chosen not in cp.close_calls
    if cp.chosen != free.class_prior.chosen:
        assert free.class_prior.chosen in cp.stats["margin"]
    # two fits were paid for: two pseudo-label passes, both solvers' passes
    assert lab.passes["pseudo_labels"] == 2 and lab.passes["descent"] > free.passes["descent"]
    pred = lab.predict(X[idx])
    assert int((pred == y[idx]).sum()) == fits[cp.chosen]
    # no label enters the fit: the same candidate chosen without labels gives the same proxy
    same = inmap_ext.fit_vision_proxy(X, T, class_prior=cp.chosen)
    torch.testing.assert_close(lab.proxy, same.proxy)


def test_the_fits_decide_a_switch_and_a_tie_keeps_the_kept():
    from inmap_ext.class_prior import ClassPrior
    from inmap_ext.labeled import confirm

    def pair():
        stats = {"unlabeled_choice": "none"}
        zs = torch.full((3,), 1 / 3)
        return (ClassPrior("auto", "uniform", "u", zs, zs, None, stats),
                ClassPrior("auto", "none", "n", None, zs, None, stats))

    c, k = pair()
    assert confirm(c, k, 7, 7, 10) is k and k.stats["decided_by"] == "unlabeled rule"
    assert "not more than none's 7: none kept" in k.reason
    c, k = pair()
    assert confirm(c, k, 8, 7, 10) is c and c.stats["decided_by"] == "labeled images"
    assert c.stats["labeled_fits"] == {"uniform": 8, "none": 7}


def test_a_tie_keeps_the_unlabeled_rule():
    from inmap_ext.labeled import decide

    R = torch.tensor([5.0, 5.0, 3.0])
    M = torch.diag(R)
    chosen, stats, why, kept = decide(("none", "uniform", "estimate"), R, M, 10, "uniform",
                                      [0, 1, 2])
    assert chosen == kept == "uniform" and "tie keeps it" in why
    chosen, _, why, kept = decide(("none", "uniform", "estimate"), torch.tensor([6.0, 5.0, 3.0]),
                                  M, 10, "uniform", [0, 1])
    assert chosen == "none" and kept == "uniform" and "the most" in why
    # a candidate the collapse guard left out is never chosen
    chosen, stats, _, _ = decide(("none", "uniform", "estimate"), torch.tensor([1.0, 2.0, 9.0]), M,
                              10, "uniform", [0, 1])
    assert chosen == "uniform" and "estimate" not in stats


def test_labels_classes_leave_uniform_out_when_the_set_is_not_balanced():
    from inmap_ext.labeled import decide, uniform_vetoed

    names, M = ("none", "uniform", "estimate"), torch.eye(3)
    R = torch.tensor([4.0, 6.0, 5.0])
    # the labels are likelier under CLIP's class shares than under 1/C: uniform is out, even
    # with the most right; auto's choice (uniform) is replaced by the best of the rest
    L = torch.tensor([-20.0, -23.0])
    assert uniform_vetoed(L)
    chosen, stats, why, kept = decide(names, R, M, 10, "uniform", [0, 1, 2], L)
    assert chosen == "estimate" and kept == "none" and "uniform" not in stats and \
        "uniform left out" in why
    chosen, _, why, kept = decide(names, torch.tensor([5.0, 6.0, 5.0]), M, 10, "uniform", [0, 1],
                                  L)
    assert chosen == kept == "none" and "did not favour another candidate over none" in why
    # likelier under 1/C (or as likely): uniform stays and wins on its count
    for L in (torch.tensor([-23.0, -20.0]), torch.tensor([-20.0, -20.0])):
        assert not uniform_vetoed(L)
        assert decide(names, R, M, 10, "none", [0, 1, 2], L)[0] == "uniform"


def test_a_fit_with_labels_reports_the_balance_test():
    # a set holding 2 of 6 classes: its labels are far likelier under CLIP's class shares
    X, T, y = clip_like(600, 16, 6, seed=4)
    keep = y < 2
    X, y = X[keep], y[keep]
    idx = torch.arange(0, X.shape[0], 7)
    res = inmap_ext.fit_vision_proxy(X, T, labeled=(idx, y[idx]))
    bal = res.class_prior.stats["labeled_balance"]
    assert bal["uniform_left_out"] and \
        bal["log_likelihood_uniform"] < bal["log_likelihood_zero_shot_shares"]
    assert res.class_prior.chosen != "uniform" and "uniform" not in res.class_prior.stats["labeled"]


def test_paired_standard_error():
    from inmap_ext.labeled import decide

    right = torch.tensor([[1, 1, 0, 0, 1, 0], [1, 0, 0, 1, 1, 1]], dtype=torch.float64)
    chosen, stats, _, _ = decide(("none", "uniform"), right.sum(1), right @ right.T, 6, "none",
                                 [0, 1])
    assert chosen == "uniform"
    d = right[1] - right[0]
    want = float((d.var(unbiased=False) / 6).sqrt())
    assert stats["none"]["se_vs_chosen"] == pytest.approx(want, abs=1e-4)


@pytest.mark.parametrize("labeled, match", [
    ((torch.tensor([0, 1]), torch.tensor([0])), "2 indices but 1 labels"),
    ((torch.tensor([0, 5000]), torch.tensor([0, 1])), r"in \[0, 300\)"),
    ((torch.tensor([3, 3]), torch.tensor([0, 1])), "repeat"),
    ((torch.tensor([0, 1]), torch.tensor([0, 6])), r"class indices in \[0, 6\)"),
    ((torch.tensor([0.5]), torch.tensor([0])), "integers"),
    ([1, 2, 3], "a pair"),
    (([], []), "holds no images"),
])
def test_bad_labels_are_refused_before_any_work(labeled, match):
    X, T, _ = clip_like(300, 16, 6, seed=2)
    with pytest.raises((ValueError, TypeError), match=match):
        inmap_ext.fit_vision_proxy(X, T, labeled=labeled)


def test_labels_need_the_auto_decision():
    X, T, y = clip_like(300, 16, 6, seed=2)
    for kw in (dict(class_prior="uniform"), dict(mode="paper"), dict(sinkhorn_iters=0)):
        with pytest.raises(ValueError, match="labeled|mode='paper'"):
            inmap_ext.fit_vision_proxy(X, T, labeled=(torch.arange(10), y[:10]), **kw)


@pytest.mark.parametrize("prior, words", [("none", "class marginal kept"),
                                          ("uniform", "every listed class about equally"),
                                          ("estimate", "proportions estimated from it"),
                                          ("given", "proportions you gave")])
def test_every_fit_states_its_assumption(prior, words):
    X, T, _ = clip_like(400, 16, 6, seed=4)
    cp = torch.ones(6) if prior == "given" else prior
    r = inmap_ext.fit_vision_proxy(X, T, class_prior=cp, iters=5)
    a = r.class_prior.assumption
    assert a.startswith("Assumed:") and words in a
    assert r.class_prior.summary()["assumption"] == a
    if prior != "given":
        assert "class_prior=" in a       # what to pass if the user knows otherwise
