"""A class far from every image: its float32 softmax column underflows to 0, the published
in-place Sinkhorn divides by zero there, and the log-domain Sinkhorn must still match float64."""
import pytest
import torch

from dense_inmap import dense_inmap
from testing import BACKENDS, clip_like, inmap_ext, skip_if_no_ext


def _problem():
    X, T, _ = clip_like(1200, 32, 8, seed=9, cone=4.0, image_noise=0.7)
    dead = -torch.nn.functional.normalize(X.mean(0), dim=0)      # opposite every image
    return X, torch.cat([T, dead[:, None]], dim=1)


def _published_float32_sinkhorn(X, T, tau_t=0.01, iters=20):
    P = torch.softmax((X @ T) / tau_t, dim=1) / X.shape[0]
    q = torch.full((T.shape[1],), 1.0 / T.shape[1])
    for _ in range(iters):
        P = P / P.sum(0, keepdim=True) * q
        P = P / P.sum(1, keepdim=True) / X.shape[0]
    return P


def test_the_case_is_real():
    X, T = _problem()
    col = torch.softmax((X.float() @ T.float()) / 0.01, dim=1)[:, -1]
    assert col.sum() == 0                                   # underflows in float32
    assert torch.isnan(_published_float32_sinkhorn(X.float(), T.float())).any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gamma", [0.0, 0.5])
def test_dead_class_float32_matches_float64(backend, gamma):
    skip_if_no_ext("cpu") if backend == "ext" else None
    X, T = _problem()
    r64 = inmap_ext.fit_vision_proxy(X, T, iters=300, gamma=gamma, backend=backend,
                                     mode="paper")
    ref = dense_inmap(X, T, iters=300, gamma=gamma)
    torch.testing.assert_close(r64.proxy, ref["W"], rtol=0, atol=1e-8)
    r32 = inmap_ext.fit_vision_proxy(X.float(), T.float(), iters=300, gamma=gamma, mode="paper",
                                     backend=backend)
    for t in (r32.proxy, r32.log_bias, r32.class_mass, r32.grad_norm):
        assert torch.isfinite(t).all()
    torch.testing.assert_close(r32.log_bias.double(), r64.log_bias, rtol=1e-3, atol=2e-2)
    torch.testing.assert_close(r32.class_mass.double(), r64.class_mass, rtol=1e-3, atol=1e-2)
    torch.testing.assert_close(r32.proxy.double(), r64.proxy, rtol=0, atol=2e-4)
    assert (r32.predict(X.float()) == r64.predict(X)).double().mean() >= 0.999


def test_dead_class_with_the_triton_backend():
    """The fused Triton kernels (interpreted on a CPU-only machine) keep the dead class finite
    too: float32 on the triton backend against the float64 fit."""
    pytest.importorskip("triton")
    from inmap_ext import _ops

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if _ops.triton_available(device) is not None:
        pytest.skip(_ops.triton_available(device))
    X, T = _problem()
    r64 = inmap_ext.fit_vision_proxy(X, T, iters=100, backend="torch", mode="paper")
    r32 = inmap_ext.fit_vision_proxy(X.float().to(device), T.float().to(device), iters=100,
                                     backend="triton", mode="paper")
    for t in (r32.proxy, r32.log_bias, r32.class_mass, r32.grad_norm):
        assert torch.isfinite(t).all()
    torch.testing.assert_close(r32.log_bias.double().cpu(), r64.log_bias, rtol=1e-3, atol=2e-2)
    torch.testing.assert_close(r32.proxy.double().cpu(), r64.proxy, rtol=0, atol=2e-4)
