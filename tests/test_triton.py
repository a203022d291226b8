"""The Triton backend (inmap_ext/triton_ops.py) against the pure-torch oracle. On a machine
without a GPU the kernels run on CPU tensors through Triton's interpreter (TRITON_INTERPRET=1,
set here before the kernels are first imported), so their logic is checked everywhere; on a GPU
they run compiled (conftest.py sets TRITON_INTERPRET=1 where there is no GPU). bf16 runs only
compiled: the interpreter's bf16 tl.dot is wrong."""
import pytest
import torch

pytest.importorskip("triton")

from inmap_ext import _ops, reference  # noqa: E402
from testing import clip_like, inmap_ext, unit_cols, unit_rows  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if _ops.triton_available(DEVICE) is not None:
    pytest.skip(_ops.triton_available(DEVICE), allow_module_level=True)
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
REL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
# (N, D, C, chunk): D not a multiple of 16 (up to 2047), C = 1, N < C, several row blocks,
# class tiles and class splits (C = 1000 over 8 tiles of 128), ragged last tiles everywhere.
SHAPES = [(1, 5, 3, 4), (7, 13, 1, 3), (5, 9, 40, 2), (257, 31, 17, 64), (300, 64, 300, 128),
          (64, 40, 1000, 64), (150, 2047, 200, 128)]


@pytest.fixture(autouse=True)
def _exact_fp32():
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = prev


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def _inputs(n, d, c, dtype, seed=0):
    x = unit_rows(n, d, seed=seed, dtype=torch.float32).to(DEVICE, dtype)
    w = unit_cols(d, c, seed=seed + 1, dtype=torch.float32).to(DEVICE, dtype)
    bias = torch.randn(c, generator=torch.Generator().manual_seed(seed)).to(DEVICE)
    return x, w, bias


def _triton(name, *args):
    return _ops.op(name, _ops.resolve_backend("triton", DEVICE))(*args)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_ops_match_oracle(dtype, shape):
    n, d, c, chunk = shape
    x, w, bias = _inputs(n, d, c, dtype)
    tol = REL[dtype]
    lse = _triton("softmax_column_lse", x, w, bias, 100.0, chunk)
    want = reference.softmax_column_lse(x, w, bias, 100.0, chunk)
    assert lse.dtype == torch.float32 and torch.isfinite(lse).all()
    torch.testing.assert_close(lse, want, rtol=tol * 10, atol=tol * 10)
    G, lse_sum = _triton("xt_softmax", x, w, 25.0, chunk)
    G_ref, lse_ref = reference.xt_softmax(x, w, 25.0, chunk)
    assert _rel(G, G_ref) <= tol
    assert abs(float(lse_sum) - float(lse_ref)) <= tol * 10 * max(1.0, abs(float(lse_ref)))
    for alpha in (0.0, 0.6, 1.0):
        got = _triton("pseudo_label_reduce", x, w, bias, 100.0, alpha, chunk)
        ref = reference.pseudo_label_reduce(x, w, bias, 100.0, alpha, chunk)
        assert _rel(got[0], ref[0]) <= tol and _rel(got[1], ref[1]) <= tol
        assert torch.equal(got[2], ref[2]) and int(got[3]) == int(ref[3])


def test_strided_inputs_and_reruns_are_bitwise_equal():
    big = unit_rows(400, 90, seed=3, dtype=torch.float32).to(DEVICE)
    x = big[1::2, 5:80]
    w = unit_cols(75, 400, seed=4, dtype=torch.float32).to(DEVICE)[:, ::2]
    assert not x.is_contiguous() and not w.is_contiguous()
    bias = torch.randn(200, device=DEVICE)
    runs = [_triton("pseudo_label_reduce", x, w, bias, 100.0, 0.6, 77) for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    ref = reference.pseudo_label_reduce(x, w, bias, 100.0, 0.6, 77)
    assert _rel(runs[0][0], ref[0]) <= 1e-5 and torch.equal(runs[0][2], ref[2])


def test_fit_with_the_triton_backend_matches_torch():
    X, T, _ = clip_like(600, 48, 12, seed=2, dtype=torch.float32, device=DEVICE)
    kw = dict(iters=60, sinkhorn_iters=5, chunk_size=256, solver="gd")
    got = inmap_ext.fit_vision_proxy(X, T, backend="triton", **kw)
    want = inmap_ext.fit_vision_proxy(X, T, backend="torch", **kw)
    assert got.backend == "triton"
    torch.testing.assert_close(got.proxy, want.proxy, rtol=1e-4, atol=1e-5)
    assert (got.predict(X) == want.predict(X)).double().mean() >= 0.999
    # the default fit (stored logits, L-BFGS): float32 rounding moves L-BFGS along flat
    # directions (test_streaming.py), so predictions, not proxies, are held
    kw = dict(sinkhorn_iters=5, chunk_size=256)
    got = inmap_ext.fit_vision_proxy(X, T, backend="triton", **kw)
    want = inmap_ext.fit_vision_proxy(X, T, backend="torch", **kw)
    assert got.class_prior.chosen == want.class_prior.chosen
    assert (got.predict(X) == want.predict(X)).double().mean() >= 0.99


def test_bad_input_is_a_clear_error(monkeypatch):
    x, w, _ = _inputs(10, 8, 4, torch.float32)
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        _triton("xt_softmax", x.double(), w.double(), 1.0, 4)
    if DEVICE == "cpu":
        monkeypatch.delenv("TRITON_INTERPRET")
        with pytest.raises(RuntimeError, match="backend='triton' cannot run: .*CUDA"):
            _ops.resolve_backend("triton", "cpu")



def test_kernels_compile_to_tensor_core_code():
    """The compiled (not interpreted) kernels, built for Hopper and Ampere without a GPU (in a
    process without TRITON_INTERPRET; tests/triton_aot.py): on sm_90 every kernel's tiles run on
    wgmma fed by a cp.async pipeline, on sm_80 on mma.sync."""
    import json
    import os
    import subprocess
    import sys

    if _ops.triton_version() < (3, 8):
        pytest.skip(f"triton_aot.py uses Triton 3.8's compile API (found {_ops.triton_version()})")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "triton_aot.py")],
                         capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    table = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(table) == 3 * 3 * 2      # dtypes x kernels x targets
    for row in table:
        if row["cc"] == 90:
            assert row["wgmma"] > 0 and row["cp_async"] > 0, row
        else:
            assert row["mma_sync"] > 0 and row["wgmma"] == 0, row


def test_minus_inf_log_bias_stays_finite():
    """A -inf log-bias on whole first class tiles (a class known absent): pass 1's online
    log-sum-exp and the column partials must not compute exp(-inf - -inf)."""
    x, w, _ = _inputs(150, 32, 300, torch.float32, seed=3)
    bias = torch.zeros(300, device=DEVICE)
    bias[:260] = float("-inf")
    lse = _triton("softmax_column_lse", x, w, bias, 100.0, 64)
    want = reference.softmax_column_lse(x, w, bias, 100.0, 64)
    assert torch.isneginf(lse[:260]).all()
    torch.testing.assert_close(lse[260:], want[260:], rtol=1e-4, atol=1e-4)
    B, mass, counts, _ = _triton("pseudo_label_reduce", x, w, bias, 100.0, 0.6, 64)
    assert torch.isfinite(B).all() and float(mass[:260].abs().max()) == 0.0
    assert int(counts[:260].sum()) == 0
