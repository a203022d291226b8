"""precision="bf16" on the CPU: bfloat16 features through the compiled CPU kernels' bfloat16
GEMMs (MKL's, with float32 accumulation: csrc/cpu/bf16_gemm.h), the proxy split into two
bfloat16 parts. Held against the torch twins over shapes (ragged chunks, C = 1, N < C, tiny),
against the float32 fit, and refused with a clear message where the build has no such GEMM."""
import pytest
import torch

import inmap_ext
from inmap_ext import _ops, reference
from testing import clip_like, unit_cols, unit_rows

needs_bf16 = pytest.mark.skipif(not _ops.cpu_bf16_available(),
                                reason="no bfloat16 GEMM with float32 output in this build")

SHAPES = [(300, 64, 10, 77), (37, 16, 1, 10), (5, 8, 50, 3), (1, 4, 3, 1), (600, 96, 120, 600)]


def _ext(name):
    return getattr(torch.ops.inmap_ext, name).default


def _rel(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


@needs_bf16
@pytest.mark.parametrize("n, d, c, chunk", SHAPES)
def test_the_ops_on_bfloat16_features_equal_their_torch_twins(n, d, c, chunk):
    x = unit_rows(n, d, seed=n, dtype=torch.float32).bfloat16()
    w = unit_cols(d, c, seed=c, dtype=torch.float32)
    bias = torch.linspace(-1.0, 1.0, c)
    # the twins compute in float32 from the same bfloat16 features and the float32 proxy; the
    # kernels' proxy is split in two bfloat16 parts (~2^-17 of each entry) and the
    # probabilities of the second GEMM rounded to bfloat16 (2^-9)
    G, lse = _ext("xt_softmax")(x, w, 25.0, chunk)
    Gr, lser = reference.xt_softmax(x, w, 25.0, chunk)
    assert G.dtype == torch.float32 and lse.dtype == torch.float32
    assert _rel(G, Gr) < 1e-2 and abs(float(lse - lser)) <= 1e-5 * max(1.0, abs(float(lser)))
    col = _ext("softmax_column_lse")(x, w, bias, 100.0, chunk)
    torch.testing.assert_close(col, reference.softmax_column_lse(x, w, bias, 100.0, chunk),
                               rtol=0, atol=1e-3)
    B, mass, counts, conf = _ext("pseudo_label_reduce")(x, w, bias, 100.0, 0.6, chunk)
    Br, massr, countsr, confr = reference.pseudo_label_reduce(x, w, bias, 100.0, 0.6, chunk)
    assert _rel(B, Br) < 1e-2
    torch.testing.assert_close(mass, massr, rtol=1e-3, atol=1e-3)
    assert int((counts - countsr).abs().sum()) <= max(2, n // 100)
    assert abs(int(conf) - int(confr)) <= max(2, n // 100)


@needs_bf16
def test_the_proxy_split_in_two_bfloat16_parts_is_what_keeps_the_logits():
    # the same op on the proxy rounded to bfloat16 (one part) is an order of magnitude further
    # from the float32-proxy logits: the descent's small steps would vanish in that rounding
    x = unit_rows(400, 64, seed=3, dtype=torch.float32).bfloat16()
    w = unit_cols(64, 30, seed=4, dtype=torch.float32)
    ref = reference.softmax_column_lse(x, w, None, 100.0, 128)
    split = (_ext("softmax_column_lse")(x, w, None, 100.0, 128) - ref).abs().max()
    rounded = (_ext("softmax_column_lse")(x, w.bfloat16(), None, 100.0, 128) - ref).abs().max()
    assert float(split) * 10 < float(rounded)


@needs_bf16
def test_a_bf16_fit_on_the_cpu_follows_the_float32_fit():
    X, T, y = clip_like(1500, 64, 20, seed=5, dtype=torch.float32, gap=2.0, text_noise=0.4)
    full = inmap_ext.fit_vision_proxy(X, T)
    half = inmap_ext.fit_vision_proxy(X, T, precision="bf16")
    assert half.hyper["compute_dtype"] == "bfloat16" and half.proxy.dtype == torch.float32
    assert half.backend == "ext", half.verification       # verified, not fallen back
    assert half.class_prior.chosen == full.class_prior.chosen
    agree = float((half.predict(X) == full.predict(X)).double().mean())
    assert agree >= 0.98, agree
    assert abs(half.passes["total"] - full.passes["total"]) <= 10
    # streamed (the route of large memory-mapped sets): the same split proxy, the same steps
    streamed = inmap_ext.fit_vision_proxy(X, T, precision="bf16", stream=True)
    assert streamed.hyper["compute_dtype"] == "bfloat16"
    assert streamed.passes == half.passes
    torch.testing.assert_close(streamed.proxy, half.proxy, rtol=0, atol=1e-4)
    paper = inmap_ext.fit_vision_proxy(X, T, precision="bf16", class_prior="uniform",
                                       solver="gd", iters=30)
    assert paper.hyper["compute_dtype"] == "bfloat16" and torch.isfinite(paper.proxy).all()


def test_bf16_on_the_cpu_is_refused_where_there_is_no_bfloat16_gemm(monkeypatch):
    X, T, _ = clip_like(50, 8, 4, dtype=torch.float32)
    monkeypatch.setattr(_ops, "cpu_bf16_available", lambda: False)
    with pytest.raises(ValueError, match=r"precision='bf16' needs CUDA tensors \(this install "
                       r"has no bfloat16 GEMM with float32 output on the CPU"):
        inmap_ext.fit_vision_proxy(X, T, precision="bf16")
    with pytest.raises(ValueError, match=r"precision='fp16' needs CUDA tensors \(16-bit"):
        inmap_ext.fit_vision_proxy(X, T, precision="fp16")


@needs_bf16
def test_no_feature_columns_and_a_stride_0_row_equal_the_twins():
    # D = 0 (every logit 0: MKL refuses a zero leading dimension, so no call is made) and one
    # row whose stride is 0 (torch calls it contiguous): the kernels must not read past them
    w = unit_cols(4, 3, seed=2, dtype=torch.float32)
    one = unit_rows(1, 4, seed=5, dtype=torch.float32).bfloat16()
    for x, ww in ((torch.zeros(5, 0, dtype=torch.bfloat16), torch.zeros(0, 3)),
                  (one.expand(1, 4).as_strided((1, 4), (0, 1)), w)):
        for name, args in (("xt_softmax", (25.0, 2)),
                           ("softmax_column_lse", (None, 100.0, 2)),
                           ("pseudo_label_reduce", (None, 100.0, 0.6, 2))):
            got = _ext(name)(x, ww, *args)
            ref = getattr(reference, name)(x, ww, *args)
            for g, r in zip(got if isinstance(got, tuple) else (got,),
                            ref if isinstance(ref, tuple) else (ref,)):
                torch.testing.assert_close(g.double(), r.double(), rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_bf16_keeps_the_float32_fits_predictions_on_every_synthetic_kind(device, request):
    # every problem kind (ViT-like and RN50-like cosine scales, a weak classifier): with the
    # proxy in two bfloat16 parts the CPU keeps >= 96% of the float32 fit's predictions
    # (measured: 97.85-100 with AMX, Intel; 96.8 on the weak kind with AVX512-BF16, AMD EPYC,
    # whose bfloat16 GEMM rounds otherwise); rounded to one part, as the CUDA kernels take it,
    # 93.3-100 (RN50-like 10 classes 94.5, weak 93.3). On CUDA: expected to fail until the split is carried over
    # (docs/kernels.md); not yet run on a GPU.
    from inmap_ext.synthetic import KINDS, kind_problem

    if device == "cpu" and not _ops.cpu_bf16_available():
        pytest.skip("no bfloat16 GEMM with float32 output in this build")
    if device == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("needs a CUDA device")
        request.applymarker(pytest.mark.xfail(strict=False, reason="the CUDA 16-bit kernels "
                                              "round the proxy to one bfloat16 part"))
    for kind in KINDS:
        p = kind_problem(kind, "every class", device=device)
        X, T = p.image_features, p.text_proxies
        full = inmap_ext.fit_vision_proxy(X, T, precision="fp32")
        half = inmap_ext.fit_vision_proxy(X, T, precision="bf16")
        agree = float((half.predict(X) == full.predict(X)).double().mean())
        assert agree >= 0.96, (kind, agree)
