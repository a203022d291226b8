"""Out-of-core fitting: features memory-mapped from disk (or in host memory) streamed to the
compute device chunk by chunk give the in-memory fit; the CUDA path (pinned buffers, side stream)
runs where a GPU is present."""
import numpy as np
import pytest
import torch

from testing import BACKENDS, clip_like, inmap_ext, requires_cuda, skip_if_no_ext


def _memmap(tmp_path, X):
    path = tmp_path / "features.f32"
    X.numpy().tofile(path)
    mm = np.memmap(path, dtype=np.float32, mode="c", shape=tuple(X.shape))
    return torch.from_numpy(mm)            # a view of the file (copy-on-write), no copy


@pytest.mark.parametrize("backend", BACKENDS)
def test_memory_mapped_features_match_in_memory_fit(tmp_path, backend):
    if backend == "ext":
        skip_if_no_ext("cpu")
    X, T, _ = clip_like(2500, 32, 9, seed=8, dtype=torch.float32)
    X = X * torch.linspace(0.5, 2.0, len(X))[:, None]          # not unit: normalised per chunk
    mm = _memmap(tmp_path, X)
    # the published descent: the streamed passes equal the in-memory ones to float32 rounding
    ref = inmap_ext.fit_vision_proxy(X, T, iters=200, backend=backend, solver="gd")
    got = inmap_ext.fit_vision_proxy(mm, T, iters=200, backend=backend, stream=True,
                                     chunk_size=333, solver="gd")
    assert got.hyper["streamed"] and not ref.hyper["streamed"]
    torch.testing.assert_close(got.proxy, ref.proxy, rtol=0, atol=1e-5)
    assert (got.predict(X) == ref.predict(X)).all()
    torch.testing.assert_close(got.log_bias, ref.log_bias, rtol=1e-5, atol=1e-4)
    assert torch.equal(got.class_counts, ref.class_counts)
    # L-BFGS amplifies float32 rounding along the objective's flat directions (measured here:
    # proxies 2.5e-4 apart after 30 passes, objectives 1e-5; the stop a pass apart): the same
    # fit to that rounding; in float64 (test_streaming_float64_is_faithful) to 1e-9
    ref = inmap_ext.fit_vision_proxy(X, T, backend=backend)
    got = inmap_ext.fit_vision_proxy(mm, T, backend=backend, stream=True, chunk_size=333)
    assert abs(got.n_iters - ref.n_iters) <= 2
    torch.testing.assert_close(got.proxy, ref.proxy, rtol=0, atol=5e-3)
    assert float((got.predict(X) == ref.predict(X)).double().mean()) >= 0.995
    assert abs(float(got.objective[-1]) - float(ref.objective[-1])) <= 1e-4


def test_streaming_float64_is_faithful():
    from dense_inmap import dense_inmap

    X, T, _ = clip_like(600, 20, 6, seed=2)
    ref = dense_inmap(X, T, iters=300)
    got = inmap_ext.fit_vision_proxy(X * 2.5, T, iters=300, stream=True, chunk_size=71,
                                    mode="paper")
    torch.testing.assert_close(got.proxy, ref["W"], rtol=0, atol=1e-8)
    # the default fit (stored logits, L-BFGS) streamed equals the in-memory one in float64
    mem = inmap_ext.fit_vision_proxy(X, T)
    got = inmap_ext.fit_vision_proxy(X * 2.5, T, stream=True, chunk_size=71)
    assert got.n_iters == mem.n_iters and got.passes == mem.passes
    torch.testing.assert_close(got.proxy, mem.proxy, rtol=0, atol=1e-9)


def test_half_precision_text_proxies_are_widened_before_normalising_on_both_routes():
    # fp16 / bf16 text proxies on the CPU are normalised in float32 whether the features are
    # in memory or streamed (the streamed route once normalised them in 16 bits)
    X, T, _ = clip_like(300, 16, 5, seed=4, dtype=torch.float32)
    for dt in (torch.float16, torch.bfloat16):
        Th = (T * 3).to(dt)
        mem = inmap_ext.fit_vision_proxy(X, Th, mode="paper", iters=0)
        got = inmap_ext.fit_vision_proxy(X, Th, mode="paper", iters=0, stream=True)
        torch.testing.assert_close(got.proxy, mem.proxy, rtol=0, atol=1e-7)


def test_streaming_validates_every_chunk():
    X, T, _ = clip_like(500, 8, 3, dtype=torch.float32)
    X = X.clone()
    X[437, 1] = float("inf")
    with pytest.raises(ValueError, match="image_features contains NaN or Inf"):
        inmap_ext.fit_vision_proxy(X, T, iters=1, stream=True, chunk_size=100)


@requires_cuda
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_host_features_streamed_to_cuda(precision):
    X, T, _ = clip_like(20000, 64, 50, seed=5, dtype=torch.float32)
    ref = inmap_ext.fit_vision_proxy(X.cuda(), T.cuda(), iters=100, precision=precision)
    got = inmap_ext.fit_vision_proxy(X.half() if precision == "fp16" else X, T, iters=100,
                                     device="cuda", precision=precision, chunk_size=3000)
    assert got.proxy.is_cuda and got.hyper["streamed"]
    agree = (got.predict(X.cuda()) == ref.predict(X.cuda())).double().mean()
    assert agree >= 0.999
