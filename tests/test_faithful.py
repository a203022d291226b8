"""Faithful mode: fit_vision_proxy reproduces DESIGN.md's algorithm (the independent dense
float64 implementation in dense_inmap.py) on every backend."""
import pytest
import torch

from dense_inmap import dense_inmap
from testing import BACKENDS, DEVICES, clip_like, inmap_ext, skip_if_no_ext

HYPER = [
    dict(),                                                   # published defaults
    dict(sinkhorn_iters=0),                                   # no balancing
    dict(gamma=0.5),                                          # prior from zero-shot masses
    dict(gamma=1.0, sinkhorn_iters=5),
    dict(tau_t=0.02, tau_i=0.07, alpha=0.3, lr=3.0),
    dict(alpha=1.0, tau_i=0.01, lr=50.0),                     # no row confident; lr halvings
    dict(alpha=0.0, sinkhorn_iters=3),                        # every row one-hot
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("hyper", HYPER, ids=lambda h: ",".join(f"{k}={v}" for k, v in h.items())
                         or "defaults")
def test_float64_matches_dense_reference(backend, device, hyper):
    skip_if_no_ext(device) if backend == "ext" else None
    X, T, _ = clip_like(700, 40, 15, seed=len(str(hyper)))
    iters = 400
    ref = dense_inmap(X, T, iters=iters, **hyper)
    res = inmap_ext.fit_vision_proxy(X.to(device), T.to(device), iters=iters, mode="paper",
                                     backend=backend,
                                     chunk_size=97, **hyper)
    assert res.backend == backend
    torch.testing.assert_close(res.proxy.cpu(), ref["W"], rtol=0, atol=1e-8)
    torch.testing.assert_close(res.grad_norm.cpu(), ref["grad_norm"], rtol=1e-9, atol=1e-8)
    torch.testing.assert_close(res.lr.cpu(), ref["lr"], rtol=0, atol=0)
    assert res.confident_fraction == pytest.approx(ref["confident"].double().mean().item())
    assert torch.equal(res.class_counts.cpu(), torch.bincount(ref["arg"], minlength=T.shape[1]))
    torch.testing.assert_close(res.class_mass.cpu(), ref["P"].sum(0), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_published_default_iterations(backend):
    """The full published schedule (2000 steps, 20 Sinkhorn iterations) on a ragged shape."""
    skip_if_no_ext("cpu") if backend == "ext" else None
    X, T, _ = clip_like(333, 29, 7, seed=5)
    ref = dense_inmap(X, T)
    res = inmap_ext.fit_vision_proxy(X, T, backend=backend, mode="paper")
    assert res.n_iters == 2000
    torch.testing.assert_close(res.proxy, ref["W"], rtol=0, atol=1e-8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_predictions_agree_with_float64(backend):
    skip_if_no_ext("cpu") if backend == "ext" else None
    X, T, _ = clip_like(4000, 64, 20, seed=11)
    r64 = inmap_ext.fit_vision_proxy(X, T, iters=500, backend=backend)
    r32 = inmap_ext.fit_vision_proxy(X.float(), T.float(), iters=500, backend=backend)
    assert r32.proxy.dtype == torch.float32
    agree = (r32.predict(X.float()) == r64.predict(X)).double().mean().item()
    assert agree >= 0.999, agree


def test_backends_bitwise_deterministic_on_cpu():
    X, T, _ = clip_like(1500, 33, 9, seed=3, dtype=torch.float32)
    for backend in BACKENDS:
        if backend == "ext" and not inmap_ext.ext_available("cpu"):
            continue
        a = inmap_ext.fit_vision_proxy(X, T, iters=100, backend=backend, chunk_size=200)
        b = inmap_ext.fit_vision_proxy(X.clone(), T.clone(), iters=100, backend=backend,
                                       chunk_size=200)
        assert torch.equal(a.proxy, b.proxy), backend
        assert torch.equal(a.grad_norm, b.grad_norm), backend


def test_ext_result_independent_of_thread_count():
    """Rows are independent in the CPU kernels, so the thread count does not change a bit."""
    if not inmap_ext.ext_available("cpu"):
        pytest.skip("compiled cpu kernels not built")
    X, T, _ = clip_like(900, 32, 11, seed=4, dtype=torch.float32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = inmap_ext.sinkhorn_log_bias(X, T, backend="ext")
        torch.set_num_threads(max(2, threads))
        many = inmap_ext.sinkhorn_log_bias(X, T, backend="ext")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


def test_sinkhorn_balances_pseudo_label_mass():
    """After Sinkhorn (before the threshold) every class holds N/C of the pseudo-label mass."""
    X, T, _ = clip_like(800, 24, 10, seed=2, imbalance=2.0)
    beta = inmap_ext.sinkhorn_log_bias(X, T, sinkhorn_iters=200, backend="torch")
    _, mass, _, _ = inmap_ext.pseudo_label_reduce(X, T, beta, alpha=1.0, backend="torch")
    torch.testing.assert_close(mass, torch.full_like(mass, 80.0), rtol=1e-6, atol=1e-6)
