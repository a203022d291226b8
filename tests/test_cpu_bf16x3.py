"""precision="bf16x3" on the CPU: float32 features, every float32 GEMM of the compiled CPU kernels
as three bfloat16 GEMMs (hi hi + hi lo + lo hi of the operands' two-part splits, float32
accumulation: csrc/cpu/bf16x3.h). Held against float64 twins over shapes (ragged chunks, C = 1,
N < C, tiny, D = 0, strided x), against the float32 fit, the switch's scope (per thread, restored
after a fit, also one that raises), and refused with a clear message where it cannot run."""
import threading

import pytest
import torch

import inmap_ext
from inmap_ext import _ops, reference, verify
from testing import clip_like, unit_cols, unit_rows

needs_x3 = pytest.mark.skipif(not _ops.cpu_bf16x3_available(),
                              reason="no bfloat16 GEMM with float32 output in this build")

# n, d, c, chunk: ragged chunks, C = 1, N < C, one row, more rows than one split chunk (1024 at
# C <= 1024, bf16x3.h) with a ragged last one, and a wide class list (256-row split chunks)
SHAPES = [(300, 64, 10, 77), (37, 16, 1, 10), (5, 8, 50, 3), (1, 4, 3, 1), (600, 96, 120, 600),
          (2600, 32, 40, 5000), (700, 24, 5000, 700)]


def _ext(name):
    return getattr(torch.ops.inmap_ext, name).default


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@needs_x3
@pytest.mark.parametrize("n, d, c, chunk", SHAPES)
def test_the_split_ops_equal_their_float64_twins_to_float32_accuracy(n, d, c, chunk):
    x = unit_rows(n, d, seed=n, dtype=torch.float32)
    w = unit_cols(d, c, seed=c, dtype=torch.float32)
    bias = torch.linspace(-1.0, 1.0, c)
    x64, w64, b64 = x.double(), w.double(), bias.double()
    with _ops.cpu_bf16x3(True):
        G, lse = _ext("xt_softmax")(x, w, 25.0, chunk)
        col = _ext("softmax_column_lse")(x, w, bias, 100.0, chunk)
        B, mass, counts, conf = _ext("pseudo_label_reduce")(x, w, bias, 100.0, 0.6, chunk)
    Gr, lser = reference.xt_softmax(x64, w64, 25.0, chunk)
    assert G.dtype == torch.float32
    # the operands' splits keep ~2^-17 of each entry: near float32, far below one bfloat16
    # rounding
    assert _rel(G, Gr) < 1e-4, _rel(G, Gr)
    assert abs(float(lse) - float(lser)) <= 1e-5 * max(1.0, abs(float(lser)))
    # the logits' error, up to ~1e-5 of |x||w| (float32's own: ~1e-6), times 1/tau_t = 100
    torch.testing.assert_close(col.double(), reference.softmax_column_lse(x64, w64, b64, 100.0,
                                                                          chunk),
                               rtol=0, atol=2e-3)
    Br, massr, countsr, confr = reference.pseudo_label_reduce(x64, w64, b64, 100.0, 0.6, chunk)
    assert _rel(B, Br) < 1e-4
    torch.testing.assert_close(mass.double(), massr, rtol=1e-4, atol=1e-4)
    assert int((counts - countsr).abs().sum()) <= 2 and abs(int(conf) - int(confr)) <= 1


@needs_x3
def test_the_split_is_far_closer_than_one_bfloat16_rounding_and_differs_from_float32():
    # not float32 (the switch did something) and an order of magnitude better than bfloat16
    # features (what precision="bf16" rounds to)
    x = unit_rows(2000, 64, seed=3, dtype=torch.float32)
    w = unit_cols(64, 30, seed=4, dtype=torch.float32)
    exact = reference.xt_softmax(x.double(), w.double(), 50.0, 512)[0]
    plain = _ext("xt_softmax")(x, w, 50.0, 512)[0]
    with _ops.cpu_bf16x3(True):
        split = _ext("xt_softmax")(x, w, 50.0, 512)[0]
    one = _ext("xt_softmax")(x.bfloat16(), w, 50.0, 512)[0]
    assert not torch.equal(split, plain)
    assert _rel(split, exact) * 30 < _rel(one, exact), (_rel(split, exact), _rel(one, exact))


@needs_x3
def test_no_feature_columns_and_strided_rows_equal_the_twins():
    w = unit_cols(0, 5, seed=1, dtype=torch.float32)
    with _ops.cpu_bf16x3(True):
        G, lse = _ext("xt_softmax")(torch.zeros(7, 0), w, 10.0, 3)
    assert G.shape == (0, 5) and abs(float(lse) - 7 * float(torch.log(torch.tensor(5.0)))) < 1e-4
    xt = unit_rows(64, 40, seed=2, dtype=torch.float32).T.contiguous().T    # column-major rows
    w = unit_cols(40, 9, seed=5, dtype=torch.float32)
    with _ops.cpu_bf16x3(True):
        G = _ext("xt_softmax")(xt, w, 20.0, 16)[0]
    assert _rel(G, reference.xt_softmax(xt.double(), w.double(), 20.0, 16)[0]) < 1e-4


@needs_x3
@pytest.mark.parametrize("features", ["bf16x3", "bf16"])
def test_x_t_p_over_many_rows_does_not_drift(features):
    # N identical rows: X^T P is N x^T p exactly, and every rounding of a running sum has the
    # same sign, so an error that grows with N shows in full. The rows' products are added into
    # a block that reaches the sum every 8192 rows (chunked_cpu.h, kXtFlushRows); MKL's bfloat16
    # GEMM adding into the sum itself drifted with N (3.7e-4 at N = 1M, bf16x3, on an AMX CPU).
    # What one block's GEMM rounds depends on the CPU's kernel (AMX tiles: ~1e-5; AVX512-BF16,
    # AMD EPYC: ~7e-5), so the bound is that error's, measured here, not a constant.
    d, c = 64, 10
    row = unit_rows(1, d, seed=7, dtype=torch.float32)
    w = unit_cols(d, c, seed=8, dtype=torch.float32)
    p = torch.softmax((row.double() @ w.double()) * 25.0, dim=1)

    def error(n):
        x = row.expand(n, d)
        want = n * row.double().T @ p
        if features == "bf16":
            x, want = x.bfloat16().contiguous(), n * row.bfloat16().double().T @ p
            return _rel(_ext("xt_softmax")(x, w, 25.0, 4096)[0], want)
        with _ops.cpu_bf16x3(True):
            return _rel(_ext("xt_softmax")(x, w, 25.0, 4096)[0], want)

    block, many = error(8192), error(400_000)
    if features == "bf16":
        assert many < 5e-3, many        # the probabilities' bfloat16 rounding (2^-9)
    else:
        assert block < 2e-4, block      # the split: near float32, far below bfloat16's 4e-3
    # 49 blocks: a drift would make it ~49x one block's
    assert many <= 2 * block + 1e-5, (block, many)


@needs_x3
def test_the_switch_survives_torch_compile():
    x = unit_rows(500, 32, seed=1, dtype=torch.float32)
    w = unit_cols(32, 12, seed=2, dtype=torch.float32)
    with inmap_ext.cpu_bf16x3(True):
        split = _ext("xt_softmax")(x, w, 25.0, 128)[0]

    def f(x, w):
        with inmap_ext.cpu_bf16x3(True):
            return _ext("xt_softmax")(x, w, 25.0, 128)[0]

    torch._dynamo.reset()
    got = torch.compile(f, backend="eager")(x, w)
    assert torch.equal(got, split) and not _ops.cpu_bf16x3_active()


@needs_x3
def test_the_switch_is_per_thread_and_restored():
    assert not _ops.cpu_bf16x3_active()
    seen = {}
    with _ops.cpu_bf16x3(True):
        assert _ops.cpu_bf16x3_active()
        t = threading.Thread(target=lambda: seen.setdefault("other", _ops.cpu_bf16x3_active()))
        t.start()
        t.join()
        with _ops.cpu_bf16x3(False):
            assert not _ops.cpu_bf16x3_active()
        assert _ops.cpu_bf16x3_active()
    assert seen["other"] is False and not _ops.cpu_bf16x3_active()


@needs_x3
def test_a_bf16x3_fit_follows_the_float32_fit_and_leaves_the_switch_off():
    X, T, y = clip_like(1500, 64, 20, seed=5, dtype=torch.float32, gap=2.0, text_noise=0.4)
    full = inmap_ext.fit_vision_proxy(X, T)
    split = inmap_ext.fit_vision_proxy(X, T, precision="bf16x3")
    assert not _ops.cpu_bf16x3_active()
    assert split.hyper["precision"] == "bf16x3" and split.hyper["compute_dtype"] == "float32"
    assert split.backend == "ext", split.verification      # verified, not fallen back
    ran = split.verification["ops"]["xt_softmax"]
    assert ran["design"] == "cpu-bf16x3" and ran["verified"] == "passed"
    assert split.class_prior.chosen == full.class_prior.chosen
    agree = float((split.predict(X) == full.predict(X)).double().mean())
    assert agree >= 0.99, agree
    assert abs(split.passes["total"] - full.passes["total"]) <= 6
    # streamed: the same kernels, the same steps
    streamed = inmap_ext.fit_vision_proxy(X, T, precision="bf16x3", stream=True)
    assert streamed.passes == split.passes
    torch.testing.assert_close(streamed.proxy, split.proxy, rtol=0, atol=1e-5)


@needs_x3
def test_the_switch_is_on_during_the_fit_and_off_after_one_that_raises(monkeypatch):
    import inmap_ext.fit as fit_module

    seen = []

    def failing(*args, **kwargs):
        seen.append(_ops.cpu_bf16x3_active())
        raise RuntimeError("inside the fit")

    monkeypatch.setattr(fit_module, "_fit", failing)
    x, t, _ = clip_like(50, 16, 4, seed=2, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="inside the fit"):
        inmap_ext.fit_vision_proxy(x, t, precision="bf16x3")
    with pytest.raises(RuntimeError, match="inside the fit"):
        inmap_ext.fit_vision_proxy(x, t)
    assert seen == [True, False] and not _ops.cpu_bf16x3_active()


@needs_x3
def test_the_first_use_check_covers_the_split_kernels_on_their_own():
    verify.clear()
    x, t, _ = clip_like(300, 32, 8, seed=1, dtype=torch.float32)
    inmap_ext.fit_vision_proxy(x, t)
    inmap_ext.fit_vision_proxy(x, t, precision="bf16x3")
    designs = {k[4] for k in verify.verdicts() if k[0] == "xt_softmax"}
    assert designs == {"cpu", "cpu-bf16x3"}
    assert all(v.ok for v in verify.verdicts().values())


def test_bf16x3_is_refused_where_it_cannot_run(monkeypatch):
    x, t, _ = clip_like(50, 16, 4, seed=2, dtype=torch.float32)
    with pytest.raises(ValueError, match="precision='bf16x3'.*backend='torch'"):
        inmap_ext.fit_vision_proxy(x, t, precision="bf16x3", backend="torch")
    monkeypatch.setattr(_ops, "cpu_bf16x3_available", lambda: False)
    with pytest.raises(ValueError, match="precision='bf16x3'.*no bfloat16 GEMM"):
        inmap_ext.fit_vision_proxy(x, t, precision="bf16x3")
    from inmap_ext.rows import compute_dtype

    with pytest.raises(ValueError, match="precision='bf16x3'.*on cuda use 'fp32'"):
        compute_dtype("bf16x3", torch.float32, torch.device("cuda"))


@pytest.fixture
def torch_matmul_precision():
    """Set torch's float32 matmul precision for a test and restore it after."""
    before = torch.get_float32_matmul_precision()
    yield torch.set_float32_matmul_precision
    torch.set_float32_matmul_precision(before)


@needs_x3
@pytest.mark.parametrize("setting", ["high", "medium"])
def test_auto_follows_torchs_float32_matmul_precision_on_the_cpu(torch_matmul_precision, setting,
                                                                monkeypatch):
    monkeypatch.setattr(_ops, "cpu_has_amx", lambda: True)   # the rule, on any CPU
    x, t, _ = clip_like(400, 32, 8, seed=3, dtype=torch.float32, gap=2.0, text_noise=0.4)
    default = inmap_ext.fit_vision_proxy(x, t)
    assert default.hyper["gemm"] == "float32"
    split = inmap_ext.fit_vision_proxy(x, t, precision="bf16x3")
    torch_matmul_precision(setting)
    auto = inmap_ext.fit_vision_proxy(x, t)
    assert auto.hyper["precision"] == "auto" and auto.hyper["gemm"] == "bf16x3"
    assert auto.verification["ops"]["xt_softmax"]["design"] == "cpu-bf16x3"
    # the same kernels as precision="bf16x3" asked for by name: the same bits
    # torch's own float32 matmuls (the solver's algebra) stay float32 during the fit
    # (_ops.cpu_matmul_ieee), and the user's setting is theirs again after it
    assert auto.passes == split.passes and torch.equal(auto.proxy, split.proxy)
    assert not _ops.cpu_bf16x3_active()
    assert torch.get_float32_matmul_precision() == setting
    matmul = getattr(getattr(torch.backends, "mkldnn", None), "matmul", None)
    if getattr(matmul, "fp32_precision", None) is not None:
        assert matmul.fp32_precision == {"high": "tf32", "medium": "bf16"}[setting]
    # what torch's setting does not reach stays float32: a named precision, the torch
    # backend, float64 features
    assert inmap_ext.fit_vision_proxy(x, t, precision="fp32").hyper["gemm"] == "float32"
    assert inmap_ext.fit_vision_proxy(x, t, backend="torch").hyper["gemm"] == "float32"
    assert inmap_ext.fit_vision_proxy(x.double(), t.double()).hyper["gemm"] == "float64"
    torch_matmul_precision("highest")
    assert inmap_ext.fit_vision_proxy(x, t).hyper["gemm"] == "float32"


def test_auto_without_amx_or_a_bfloat16_gemm_stays_float32(torch_matmul_precision, monkeypatch):
    from inmap_ext.rows import compute_dtype
    from inmap_ext._ops import torch_allows_reduced_cpu_matmul

    torch_matmul_precision("high")
    assert torch_allows_reduced_cpu_matmul()
    x, t, _ = clip_like(100, 16, 4, seed=2, dtype=torch.float32)
    # no AMX: bf16x3 would be slower than float32 (AVX512-BF16 alone: ~3x a float32 pass)
    monkeypatch.setattr(_ops, "cpu_has_amx", lambda: False)
    assert inmap_ext.fit_vision_proxy(x, t).hyper["gemm"] == "float32"
    monkeypatch.setattr(_ops, "cpu_has_amx", lambda: True)
    monkeypatch.setattr(_ops, "cpu_bf16x3_available", lambda: False)
    assert compute_dtype("auto", torch.float32, torch.device("cpu")) == (torch.float32, None,
                                                                          False)
    assert inmap_ext.fit_vision_proxy(x, t).hyper["gemm"] == "float32"
    torch_matmul_precision("highest")
    assert not torch_allows_reduced_cpu_matmul()


@needs_x3
@pytest.mark.parametrize("precision", ["bf16x3", "bf16"])
def test_a_bfloat16_precision_asked_for_without_amx_warns_that_it_is_slower(monkeypatch,
                                                                            precision):
    x, t, _ = clip_like(60, 16, 4, seed=2, dtype=torch.float32)
    monkeypatch.setattr(_ops, "cpu_has_amx", lambda: False)
    with pytest.warns(UserWarning, match=f"precision='{precision}': this CPU has no AMX"):
        res = inmap_ext.fit_vision_proxy(x, t, precision=precision)
    assert res.hyper["gemm"] == ("bf16x3" if precision == "bf16x3" else "bfloat16")
    monkeypatch.setattr(_ops, "cpu_has_amx", lambda: True)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        inmap_ext.fit_vision_proxy(x, t, precision=precision)


def test_a_cuda_only_tf32_switch_leaves_cpu_fits_in_float32(monkeypatch):
    # torch.backends.cuda.matmul.allow_tf32 = True (a common first line of a script) makes
    # torch's legacy getter say "high" but leaves the CPU's own setting alone: no bf16x3
    monkeypatch.setattr(_ops, "cpu_has_amx", lambda: True)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        before = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
    try:
        from inmap_ext._ops import torch_allows_reduced_cpu_matmul

        assert not torch_allows_reduced_cpu_matmul()
        x, t, _ = clip_like(100, 16, 4, seed=2, dtype=torch.float32)
        assert inmap_ext.fit_vision_proxy(x, t).hyper["gemm"] == "float32"
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.backends.cuda.matmul.allow_tf32 = before


NEW_API_SCRIPT = """
import warnings, torch, inmap_ext
from inmap_ext.synthetic import make_problem
if not hasattr(torch.backends.cuda.matmul, "fp32_precision"):
    print("no per-backend API"); raise SystemExit(0)
torch.backends.cuda.matmul.fp32_precision = "tf32"
p = make_problem(200, 16, 4)
for precision in ("auto", "fp32", "fp64"):
    x = p.image_features.double() if precision == "fp64" else p.image_features
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        r = inmap_ext.fit_vision_proxy(x, p.text_proxies, precision=precision)
    assert r.backend == "ext", (precision, r.verification)
    assert not [w for w in seen if "inmap_ext" in str(w.message)], [str(w.message) for w in seen]
    print(precision, r.hyper["gemm"])
assert torch.backends.cuda.matmul.fp32_precision == "tf32"
"""


def test_cpu_fits_run_where_torchs_per_backend_api_set_cuda_tf32(tmp_path):
    # torch >= 2.9: with torch.backends.cuda.matmul.fp32_precision set, the legacy TF32 switch
    # and getter raise ("mix of the legacy and new APIs"); a CPU fit (its TF32 switch for
    # precision="fp32", the first-use check's exact reference) must not. In a subprocess: the
    # setting is process-wide and cannot be unset.
    import subprocess
    import sys

    if not _ops.ext_available("cpu"):
        pytest.skip("needs the compiled CPU kernels")
    out = subprocess.run([sys.executable, "-c", NEW_API_SCRIPT], capture_output=True, text=True,
                         cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() in (["no", "per-backend", "API"],
                                  ["auto", "float32", "fp32", "float32", "fp64", "float64"])
