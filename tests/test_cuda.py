"""CUDA kernels against the pure-torch backend (skipped without a CUDA device): dtypes x shapes
(ragged tiles, C=1, N<C, D=1000, huge C), poisoned memory, streams, a second device, and the fit
end to end with its precision options."""
import pytest
import torch

from inmap_ext import _ops, reference
from testing import clip_like, inmap_ext, requires_cuda, unit_cols, unit_rows

pytestmark = [requires_cuda]

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# relative error ||ext - oracle|| / ||oracle|| allowed (the oracle computes logits in fp32/fp64
# from the same 16-bit inputs; ext feeds P to the second GEMM in the input's 16-bit dtype)
REL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
SHAPES = [(1, 5, 3, 4), (7, 13, 1, 3), (5, 9, 40, 2), (257, 31, 17, 64), (1000, 1000, 9, 333),
          (3000, 768, 1000, 1024), (64, 64, 100_000, 32), (300, 2047, 500, 128)]


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def _inputs(n, d, c, dtype, seed=0):
    x = unit_rows(n, d, seed=seed, dtype=torch.float32).to("cuda", dtype)
    w = unit_cols(d, c, seed=seed + 1, dtype=torch.float32).to("cuda", dtype)
    bias = torch.randn(c, generator=torch.Generator().manual_seed(seed)).to("cuda")
    return x, w, bias.to(reference.acc_dtype(dtype))


def _oracle(name, *args):
    """The pure-torch op in exact arithmetic for the dtype (TF32 off, whatever the test set)."""
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        return getattr(reference, name)(*args)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


@pytest.fixture(autouse=True)
def _ext():
    if not _ops.ext_available("cuda"):
        pytest.skip("compiled CUDA kernels not built")


@pytest.fixture(params=["chunked", "fused"])
def design(request, monkeypatch):
    """Both CUDA designs (csrc/cuda/design.cuh). With "fused", fp32 runs through TF32 (the fused
    kernels' fp32 mode; exact fp32 and fp64 stay on the chunked design)."""
    monkeypatch.setenv("INMAP_CUDA_DESIGN", request.param)
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = request.param == "fused"
    yield request.param
    torch.backends.cuda.matmul.allow_tf32 = prev


def _tf32(t):
    """fp32 rounded to TF32 (10-bit mantissa, to nearest, ties away from zero) as the fused
    kernels round their fp32 inputs: products of these are exact in fp32, so the oracle on the
    rounded inputs computes the kernels' logits up to summation order."""
    if t.dtype != torch.float32:
        return t
    return ((t.contiguous().view(torch.int32) + 0x1000) & ~0x1FFF).view(torch.float32)


def _tf32_inputs(design, dtype, *ts):
    return tuple(_tf32(t) for t in ts) if design == "fused" and dtype == torch.float32 else ts


def _tol(dtype, design):
    # fused fp32: the second GEMM (cuBLAS) also runs in TF32
    return 2e-3 if design == "fused" and dtype == torch.float32 else REL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_ops_match_oracle(dtype, shape, design):
    n, d, c, chunk = shape
    tol = _tol(dtype, design)
    x, w, bias = _inputs(n, d, c, dtype)
    x, w = _tf32_inputs(design, dtype, x, w)
    ext = lambda name, *a: _ops.op(name, "ext")(*a)  # noqa: E731
    lse = ext("softmax_column_lse", x, w, bias, 100.0, chunk)
    want = _oracle("softmax_column_lse", x, w, bias, 100.0, chunk)
    assert lse.dtype == want.dtype and torch.isfinite(lse).all()
    torch.testing.assert_close(lse, want, rtol=tol * 10, atol=tol * 10)
    G, lse_sum = ext("xt_softmax", x, w, 25.0, chunk)
    G_ref, lse_ref = _oracle("xt_softmax", x, w, 25.0, chunk)
    assert _rel(G, G_ref) <= tol and lse_sum.dtype == G.dtype
    assert abs(float(lse_sum) - float(lse_ref)) <= tol * 10 * max(1.0, abs(float(lse_ref)))
    for alpha in (0.0, 0.6, 1.0):
        got = ext("pseudo_label_reduce", x, w, bias, 100.0, alpha, chunk)
        ref = _oracle("pseudo_label_reduce", x, w, bias, 100.0, alpha, chunk)
        assert _rel(got[0], ref[0]) <= tol and _rel(got[1], ref[1]) <= tol
        assert int(got[2].sum()) == n and int(got[3]) <= n
        if dtype in (torch.float32, torch.float64):
            assert torch.equal(got[2], ref[2]) and int(got[3]) == int(ref[3])
    vals, idx = ext("topk_scores", x, w, min(3, c), chunk)
    rv, _ = _oracle("topk_scores", x, w, min(3, c), chunk)
    torch.testing.assert_close(vals, rv, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_every_element_written_on_poisoned_memory(design, dtype):
    """Fill the caching allocator's blocks with NaN first: an element a kernel failed to write
    would carry the NaN into the result."""
    x, w, bias = _inputs(777, 96, 301, dtype, seed=4)
    poison = torch.full((64 << 20,), float("nan"), device="cuda")
    del poison
    for name, args in [("xt_softmax", (x, w, 25.0, 100)),
                       ("softmax_column_lse", (x, w, bias, 100.0, 100)),
                       ("pseudo_label_reduce", (x, w, bias, 100.0, 0.6, 100))]:
        out = _ops.op(name, "ext")(*args)
        for t in out if isinstance(out, tuple) else (out,):
            assert torch.isfinite(t.double()).all(), name


def test_non_contiguous_inputs_and_side_stream(design):
    big, wbig = _tf32_inputs(design, torch.float32, unit_rows(300, 90, dtype=torch.float32).cuda(),
                             unit_cols(75, 60, dtype=torch.float32).cuda())
    x, w = big[1::2, 5:80], wbig[:, ::2]
    assert not x.is_contiguous() and not w.is_contiguous()
    want = _oracle("xt_softmax", x, w, 25.0, 50)[0]
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        got = _ops.op("xt_softmax", "ext")(x, w, 25.0, 50)[0]
    s.synchronize()
    assert _rel(got, want) <= _tol(torch.float32, design) / 10


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_misaligned_offset_inputs(design, dtype):
    """x starting 3 elements into its storage (not 16-byte aligned), D a multiple of 32: the
    fused design must not read it with 16-byte copies in place."""
    n, d, c = 300, 64, 50
    flat = unit_rows(n + 1, d, seed=7, dtype=torch.float32).to("cuda", dtype).flatten()
    x = flat[3:3 + n * d].view(n, d)
    w = unit_cols(d, c, seed=8, dtype=torch.float32).to("cuda", dtype)
    bias = torch.randn(c, device="cuda")
    for chunk in (64, 1000):
        got = _ops.op("pseudo_label_reduce", "ext")(x, w, bias, 100.0, 0.6, chunk)
        ref = _oracle("pseudo_label_reduce", x, w, bias, 100.0, 0.6, chunk)
        assert _rel(got[0], ref[0]) <= REL[dtype] and _rel(got[1], ref[1]) <= REL[dtype]
        lse = _ops.op("softmax_column_lse", "ext")(x, w, bias, 100.0, chunk)
        want = _oracle("softmax_column_lse", x, w, bias, 100.0, chunk)
        torch.testing.assert_close(lse, want, rtol=REL[dtype] * 10, atol=REL[dtype] * 10)


def test_fused_design_is_deterministic_and_close_to_chunked(monkeypatch):
    """Same inputs, same bits on a rerun (no atomics in either design), and the two designs
    agree to 16-bit rounding on a problem with many class tiles and row blocks."""
    x, w, bias = _inputs(5000, 200, 3000, torch.bfloat16, seed=9)
    out = {}
    for design in ("chunked", "fused"):
        monkeypatch.setenv("INMAP_CUDA_DESIGN", design)
        runs = [_ops.op("pseudo_label_reduce", "ext")(x, w, bias, 100.0, 0.6, 1500)
                for _ in range(2)]
        lses = [_ops.op("softmax_column_lse", "ext")(x, w, bias, 100.0, 1500) for _ in range(2)]
        for a, b in zip(runs[0], runs[1]):
            assert torch.equal(a, b), design
        assert torch.equal(lses[0], lses[1]), design
        out[design] = runs[0], lses[0]
    assert _rel(out["fused"][0][0], out["chunked"][0][0]) <= 1e-2
    torch.testing.assert_close(out["fused"][1], out["chunked"][1], rtol=1e-2, atol=1e-2)
    agree = (out["fused"][0][2] - out["chunked"][0][2]).abs().sum().item() / 2 / 5000
    assert agree <= 0.01  # argmax counts: at most 1% of rows change class under bf16 rounding


def test_unknown_design_is_an_error(monkeypatch):
    x, w, _ = _inputs(10, 8, 4, torch.float16)
    monkeypatch.setenv("INMAP_CUDA_DESIGN", "fastest")
    with pytest.raises(RuntimeError, match="INMAP_CUDA_DESIGN"):
        _ops.op("xt_softmax", "ext")(x, w, 1.0, 4)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second GPU")
def test_second_device():
    x, w, bias = _inputs(500, 64, 30, torch.float32)
    x1, w1 = x.to("cuda:1"), w.to("cuda:1")
    got = _ops.op("xt_softmax", "ext")(x1, w1, 25.0, 128)[0]
    assert got.device == torch.device("cuda:1")
    assert _rel(got.cpu(), _oracle("xt_softmax", x.cpu(), w.cpu(), 25.0, 128)[0]) <= 1e-5


def test_device_mismatch_is_an_error():
    x, w, _ = _inputs(10, 8, 4, torch.float32)
    with pytest.raises(RuntimeError, match="same device"):
        _ops.op("xt_softmax", "ext")(x, w.cpu(), 1.0, 4)


def test_fit_end_to_end_and_precisions(design):
    X, T, y = clip_like(20000, 256, 100, seed=1, dtype=torch.float32)
    # the kernels' precision through the published descent (solver="gd": the path is rounding-
    # stable); the default L-BFGS on CUDA in test_default_fit_on_cuda_matches_the_cpu_fit
    gd = dict(iters=300, solver="gd")
    ref = inmap_ext.fit_vision_proxy(X.double(), T.double(), backend="torch", **gd)
    r32 = inmap_ext.fit_vision_proxy(X.cuda(), T.cuda(), precision="fp32", **gd)
    assert r32.backend == "ext" and r32.proxy.is_cuda
    p32 = r32.predict(X.cuda()).cpu()
    assert (p32 == ref.predict(X.double())).double().mean() >= 0.999
    for precision in ("tf32", "fp16", "bf16"):
        r = inmap_ext.fit_vision_proxy(X.cuda(), T.cuda(), precision=precision, **gd)
        assert r.proxy.dtype == torch.float32 and torch.isfinite(r.proxy).all()
        changed = (r.predict(X.cuda()).cpu() != p32).double().mean().item()
        assert changed <= 0.001, (precision, changed)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_default_fit_on_cuda_matches_the_cpu_fit(precision):
    """The default fit (logits stored on the GPU, L-BFGS) on CUDA against the same fit in float64
    on the CPU: the same class prior, the passes within a few, predictions within 0.5%."""
    X, T, _ = clip_like(20000, 256, 100, seed=1, dtype=torch.float32, gap=2.0, text_noise=0.4)
    ref = inmap_ext.fit_vision_proxy(X.double(), T.double(), backend="torch")
    r = inmap_ext.fit_vision_proxy(X.cuda(), T.cuda(), precision=precision)
    assert r.proxy.is_cuda and r.class_prior.chosen == ref.class_prior.chosen
    assert r.passes["decision"] == 1 and abs(r.n_iters - ref.n_iters) <= 10
    agree = (r.predict(X.cuda()).cpu() == ref.predict(X.double())).double().mean().item()
    assert agree >= 0.995, agree


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_fit_pads_odd_d_once(monkeypatch, dtype):
    """D = 100 under the fused design: the Runner pads X to 128 columns once per fit (not the
    kernels on every call) and the fit equals the chunked design's."""
    from inmap_ext.functional import Runner

    precision = {torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
    X, T, _ = clip_like(5000, 100, 40, seed=4, dtype=torch.float32)
    x = X.cuda().to(dtype)
    monkeypatch.setenv("INMAP_CUDA_DESIGN", "fused")
    runner = Runner("cuda", "ext", None, 5000, 40, dtype)
    owned = runner.own_features(x)
    assert owned.shape == (5000, 128) and runner.pad_cols == 28
    fused = inmap_ext.fit_vision_proxy(X.cuda(), T.cuda(), iters=200, precision=precision,
                                       solver="gd")
    monkeypatch.setenv("INMAP_CUDA_DESIGN", "chunked")
    chunked = inmap_ext.fit_vision_proxy(X.cuda(), T.cuda(), iters=200,
                                         precision=precision, solver="gd")
    assert fused.proxy.shape == (100, 40)
    changed = (fused.predict(X.cuda()) != chunked.predict(X.cuda())).double().mean().item()
    assert changed <= 0.002, changed


def test_fit_float64_on_cuda_matches_dense_reference():
    from dense_inmap import dense_inmap

    X, T, _ = clip_like(700, 40, 15, seed=3)
    ref = dense_inmap(X, T, iters=400)
    res = inmap_ext.fit_vision_proxy(X.cuda(), T.cuda(), iters=400, backend="ext", chunk_size=97,
                                     mode="paper")
    torch.testing.assert_close(res.proxy.cpu(), ref["W"], rtol=0, atol=1e-8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_minus_inf_log_bias_stays_finite(design, dtype):
    """A class known absent has a -inf log-bias: every log-sum-exp merge must skip it (a thread
    or tile whose first value is -inf computed exp(-inf - -inf) = NaN before)."""
    n, c = 333, 300                                  # several class tiles / threads per row
    x, w, _ = _inputs(n, 64, c, dtype, seed=9)
    x, w = _tf32_inputs(design, dtype, x, w)
    bias = torch.zeros(c, device="cuda")
    bias[:200] = float("-inf")                       # whole first tiles and thread strides
    lse = _ops.op("softmax_column_lse", "ext")(x, w, bias, 100.0, 100)
    want = _oracle("softmax_column_lse", x, w, bias, 100.0, 100)
    assert torch.isneginf(lse[:200]).all() and torch.isfinite(lse[200:]).all()
    torch.testing.assert_close(lse[200:], want[200:], rtol=_tol(dtype, design) * 10,
                               atol=_tol(dtype, design) * 10)
    B, mass, counts, _ = _ops.op("pseudo_label_reduce", "ext")(x, w, bias, 100.0, 0.6, 100)
    assert torch.isfinite(B).all() and float(mass[:200].abs().max()) == 0.0
    assert int(counts[:200].sum()) == 0 and int(counts.sum()) == n
