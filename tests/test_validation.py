"""Bad input gets a ValueError or TypeError naming the argument and what was expected."""
import math

import pytest
import torch

from testing import clip_like, inmap_ext

X, T, _ = clip_like(50, 8, 4, dtype=torch.float32)
fit = inmap_ext.fit_vision_proxy


def _with(tensor, index, value):
    t = tensor.clone()
    t[index] = value
    return t


@pytest.mark.parametrize("args, err, match", [
    ((_with(X, (3, 2), math.nan), T), ValueError, r"image_features contains NaN or Inf \(first in row 3\)"),
    ((X, _with(T, (1, 2), math.inf)), ValueError, r"text_proxies contains NaN or Inf \(first in column 2\)"),
    ((X[0], T), ValueError, r"image_features must be 2-D \(N x D"),
    ((X, T[:, 0]), ValueError, r"text_proxies must be 2-D \(D x C"),
    ((X, T[:7]), ValueError, r"image_features has D=8 but text_proxies has D=7"),
    ((X[:0], T), ValueError, r"image_features is empty"),
    ((X, T[:, :0]), ValueError, r"text_proxies is empty"),
    (((X * 100).int(), T), TypeError, r"image_features must be a floating tensor"),
    ((X, T.long()), TypeError, r"text_proxies must be a floating tensor"),
    ((X.numpy(), T), TypeError, r"image_features must be a torch.Tensor"),
    ((X, T.to("meta")), ValueError, r"image_features is on cpu but text_proxies is on meta"),
    ((_with(X, 4, 0.0), T), ValueError, r"image_features has an all-zero row \(row 4\)"),
    ((X, _with(T, (slice(None), 1), 0.0)), ValueError, r"text_proxies has an all-zero column"),
])
def test_bad_tensors(args, err, match):
    with pytest.raises(err, match=match):
        fit(*args, iters=1)


@pytest.mark.parametrize("kw, match", [
    (dict(tau_t=0.0), r"tau_t must be a finite number > 0, got 0.0"),
    (dict(tau_t=-1), r"tau_t must be a finite number > 0"),
    (dict(tau_i=math.nan), r"tau_i must be a finite number > 0"),
    (dict(alpha=1.5), r"alpha must be a number in \[0, 1\], got 1.5"),
    (dict(alpha=-0.1), r"alpha must be a number in \[0, 1\]"),
    (dict(iters=-1), r"iters must be an integer >= 0, got -1"),
    (dict(iters=2.5), r"iters must be an integer >= 0"),
    (dict(sinkhorn_iters=-3), r"sinkhorn_iters must be an integer >= 0"),
    (dict(gamma=-0.5), r"gamma must be a finite number >= 0"),
    (dict(lr=0), r"lr must be a finite number > 0"),
    (dict(chunk_size=0), r"chunk_size must be an integer >= 1"),
    (dict(tol=-1.0), r"tol must be a finite number > 0"),
    (dict(backend="gpu"), r"backend must be one of"),
    (dict(tau_t=1e-40), r"tau_t must be in \[1e-12, 1e\+12\]"),     # 1/tau_t overflows float32
    (dict(tau_i=1e13), r"tau_i must be in \[1e-12, 1e\+12\]"),
    (dict(lr=1e300), r"lr must be at most 1e\+12"),
    (dict(gamma=1e300), r"gamma must be at most 1e\+12"),
    (dict(sinkhorn_iters=0, class_prior="estimate"), r"sinkhorn_iters=0 turns balancing off"),
    (dict(sinkhorn_iters=0, class_prior=torch.tensor([1.0, 0, 1, 1])),
     r"class_prior=given proportions balances .* sinkhorn_iters=0"),
])
def test_bad_hyper_parameters(kw, match):
    with pytest.raises(ValueError, match=match):
        fit(X, T, **{"iters": 1, **kw})


def test_non_unit_inputs_are_normalised():
    """Scaled features and proxies give the same fit as unit ones (documented behaviour)."""
    scale = torch.linspace(0.5, 3.0, X.shape[0])[:, None]
    a = fit(X.double(), T.double(), iters=50)
    b = fit(X.double() * scale, T.double() * 7.0, iters=50)
    # the normalised copies differ from X, T by float64 rounding (1e-16), which 50 L-BFGS passes
    # carry along the objective's flat directions to a few 1e-12
    torch.testing.assert_close(a.proxy, b.proxy, rtol=0, atol=1e-10)
    assert torch.equal(X, clip_like(50, 8, 4, dtype=torch.float32)[0])  # input untouched


def test_zero_iterations_return_text_proxies():
    r = fit(X, T, iters=0, sinkhorn_iters=0)
    assert r.n_iters == 0 and r.grad_norm.numel() == 0
    torch.testing.assert_close(r.proxy, T)


def test_building_block_errors():
    with pytest.raises(ValueError, match=r"k must be <= the number of classes C=4"):
        inmap_ext.zero_shot_topk(X, T, k=5)
    with pytest.raises(ValueError, match=r"log_bias must be a tensor of shape \(4,\)"):
        inmap_ext.pseudo_label_reduce(X, T, torch.zeros(3))
    with pytest.raises(ValueError, match=r"target must be a tensor of shape \(8, 4\)"):
        inmap_ext.proxy_gradient(X, T, torch.zeros(4, 8))
    with pytest.raises(ValueError, match=r"proxies has D=8"):
        inmap_ext.zero_shot_topk(X[:, :7], T)


def test_precision_argument():
    with pytest.raises(ValueError, match=r"precision must be one of"):
        fit(X, T, iters=1, precision="int8")
    with pytest.raises(ValueError, match=r"precision='fp16' needs CUDA tensors"):
        fit(X, T, iters=1, precision="fp16")
    r = fit(X, T, iters=3, precision="fp64")
    assert r.proxy.dtype == torch.float64 and r.hyper["compute_dtype"] == "float64"


def test_inputs_that_require_grad():
    """A fit is not differentiated: inputs from a model's forward (requires_grad) are fine and
    no autograd graph is kept."""
    x = X.clone().requires_grad_()
    r = fit(x, T, iters=5)
    assert not r.proxy.requires_grad
    torch.testing.assert_close(r.proxy, fit(X, T, iters=5).proxy)
    assert not inmap_ext.zero_shot_topk(x, T, k=2)[0].requires_grad


def test_huge_but_finite_features_are_normalised():
    X = torch.randn(50, 256) * 1e30            # every value finite; squared norms overflow
    T = torch.nn.functional.normalize(torch.randn(256, 6), dim=0)
    r = inmap_ext.fit_vision_proxy(X, T, iters=3)
    ref = inmap_ext.fit_vision_proxy(torch.nn.functional.normalize(X.double(), dim=1).float(),
                                     T, iters=3)
    assert torch.isfinite(r.proxy).all()
    torch.testing.assert_close(r.proxy, ref.proxy, rtol=1e-4, atol=1e-5)


def test_transposed_square_text_proxies_are_detected():
    T = torch.nn.functional.normalize(torch.randn(16, 16, dtype=torch.float64), dim=1)  # C x D
    with pytest.raises(ValueError, match=r"pass text_proxies\.T"):
        inmap_ext.fit_vision_proxy(torch.randn(30, 16, dtype=torch.float64), T, iters=1)
    inmap_ext.fit_vision_proxy(torch.randn(30, 16, dtype=torch.float64), T.T, iters=1)


@pytest.mark.parametrize("xd,td,want", [(torch.float32, torch.float64, torch.float32),
                                        (torch.float64, torch.float32, torch.float64)])
def test_dtype_follows_the_features(xd, td, want):
    X = torch.randn(40, 8, dtype=xd)
    T = torch.nn.functional.normalize(torch.randn(8, 3, dtype=td), dim=0)
    assert inmap_ext.fit_vision_proxy(X, T, iters=2).proxy.dtype == want
    doc = inmap_ext.fit_vision_proxy.__doc__
    assert "follow the *features*" in doc and "Raises:" in doc and "Example:" in doc


@pytest.mark.parametrize("b", ["torch", "ext"])
def test_extreme_but_allowed_hyper_parameters_give_finite_fits(b):
    """The ends of the allowed ranges (hyper.LARGEST_SCALE) keep logits, log-biases and the step
    finite in float32, for either temperature, the learning rate and gamma together."""
    if b == "ext" and not inmap_ext._ops.ext_available("cpu"):
        pytest.skip("no compiled CPU kernels")
    for tt, ti, lr, g in [(1e-12, 1e-12, 1e12, 1e12), (1e12, 1e12, 1e-12, 0.0),
                          (1e-12, 1e12, 1e12, 0.0), (1e12, 1e-12, 1e-12, 1e12)]:
        for cp in ("uniform", "auto"):
            r = fit(X, T, tau_t=tt, tau_i=ti, lr=lr, gamma=g, class_prior=cp, iters=10,
                    backend=b)
            assert torch.isfinite(r.proxy).all() and torch.isfinite(r.objective).all()


def test_numpy_scalars_are_accepted():
    np = pytest.importorskip("numpy")
    r = fit(X, T, iters=np.int64(3), tau_t=np.float32(0.01), sinkhorn_iters=np.int32(5))
    assert r.n_iters <= 3 and r.predict(X, k=np.int64(2)).shape == (X.shape[0], 2)


def test_tiny_but_non_zero_vectors_are_normalised():
    """A row whose squared norm underflows (entries ~1e-27) is not 'all-zero': it is
    normalised like any other; a row of zeros is still refused."""
    x = X.clone()
    x[0] = x[0] * 1e-25
    torch.testing.assert_close(fit(x, T, iters=3).proxy, fit(X, T, iters=3).proxy)
    x[0] = 0
    with pytest.raises(ValueError, match=r"image_features has an all-zero row \(row 0\)"):
        fit(x, T, iters=1)
    x[0] = X[0] * 1e-40          # a norm below float32's smallest normal: refused, on every path
    for stream in (False, True):
        with pytest.raises(ValueError, match=r"image_features row 0 has norm .* below the "
                                             r"smallest normal float32"):
            fit(x, T, iters=1, stream=stream)


def test_near_unit_float32_rows_are_normalised():
    X, T, _ = clip_like(200, 16, 5, seed=3, dtype=torch.float32)
    kw = dict(iters=30, stop="none", solver="gd")   # gd: a rounding-stable path (test_streaming)
    a = inmap_ext.fit_vision_proxy(X, T, **kw)
    scale = 1 + 5e-3 * torch.linspace(-1, 1, 200)[:, None]        # fp16-rounding-sized norms
    b = inmap_ext.fit_vision_proxy(X * scale, T, **kw)
    torch.testing.assert_close(b.proxy, a.proxy, rtol=0, atol=1e-5)


def test_a_norm_beyond_the_dtype_is_named_not_called_nan():
    X = torch.nn.functional.normalize(torch.randn(20, 16), dim=1)
    X[7] = torch.sign(X[7]) * 1e38                    # finite entries, a norm above float32's
    T = torch.nn.functional.normalize(torch.randn(16, 4), dim=0)
    with pytest.raises(ValueError, match="image_features row 7 has a norm above the largest "
                                         "float32"):
        inmap_ext.fit_vision_proxy(X, T)
    X[7, 0] = float("nan")
    with pytest.raises(ValueError, match="contains NaN or Inf"):
        inmap_ext.fit_vision_proxy(X, T)


def test_cheap_refusals_come_before_any_work(monkeypatch):
    # rows.check_rows checks before expensive work: a precision the device cannot run is
    # refused before the streamed check of host features reads them; a class prior or labels
    # of the wrong size before the rows are copied for the kernels (Rows.open)
    from inmap_ext import functional, validation

    X, T, _ = clip_like(64, 8, 5, seed=1)

    def never(*a, **k):
        raise AssertionError("expensive work before a cheap refusal")

    monkeypatch.setattr(validation, "check_host_features", never)
    with pytest.raises(ValueError, match="precision='fp16' needs CUDA"):
        inmap_ext.fit_vision_proxy(X.float(), T.float(), stream=True, precision="fp16")
    with pytest.raises(ValueError, match="precision must be one of"):
        inmap_ext.fit_vision_proxy(X.float(), T.float(), stream=True, precision="fp8")
    # ... and a class prior, labels or a backend of the wrong kind before the streamed check
    for kw, match in ((dict(class_prior=torch.ones(4)), "class_prior"),
                      (dict(labeled=([0, 99], [0, 1])), "labeled"),
                      (dict(backend="cuda"), "backend must be one of")):
        with pytest.raises(ValueError, match=match):
            inmap_ext.fit_vision_proxy(X.float(), T.float(), stream=True, **kw)
    monkeypatch.setattr(functional.Runner, "own_features", never)
    with pytest.raises(ValueError, match="class_prior"):
        inmap_ext.fit_vision_proxy(X, T, class_prior=torch.ones(4))
    with pytest.raises(ValueError, match="labeled"):
        inmap_ext.fit_vision_proxy(X, T, labeled=(torch.tensor([0, 99]), torch.tensor([0, 1])))
