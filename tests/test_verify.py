"""Self-verification of the compiled ops on first use (inmap_ext/verify.py). Without a GPU the
mechanism is exercised on the CPU kernels (the same code decides for CPU, CUDA and Triton ops),
with a deliberately wrong or raising op injected for one combination; with a GPU, every CUDA
combination must pass its check."""
import math
import os
import warnings

import pytest
import torch

import dist_workers
from inmap_ext import _ops, reference, verify
from inmap_ext.check import NO_GPU, format_table, run_check
from testing import clip_like, inmap_ext, perturbed, requires_cuda, skip_if_no_ext

KW = dict(iters=40)


@pytest.fixture(autouse=True)
def _fresh_memo(monkeypatch):
    """Every test starts with nothing verified (the memo is per process) and verification on."""
    monkeypatch.delenv(verify.ENV, raising=False)
    verify.clear()
    yield
    verify.clear()


def _inject(monkeypatch, make, dtype=torch.float64):
    """Replace the compiled CPU ops for ``dtype`` inputs by ``make(real_op)``; other dtypes and
    backends are untouched. Returns the list of op names whose wrong version ran."""
    real, ran = _ops.op, []

    def op(name, backend):
        f = real(name, backend)
        if backend != "ext":
            return f
        bad = make(f)

        def dispatch(*args):
            if args[0].dtype == dtype:
                ran.append(name)
                return bad(*args)
            return f(*args)
        return dispatch

    monkeypatch.setattr(_ops, "op", op)
    return ran


def _count_checks(monkeypatch):
    calls = []
    real = verify.check_op
    monkeypatch.setattr(verify, "check_op", lambda *a: calls.append(a) or real(*a))
    return calls


def _raising(f):
    def boom(*args):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    return boom


def _mutating(f):
    """Right about the input it leaves behind: zeroes rows of x, then computes on them."""
    def mutate(*args):
        args[0][: max(1, args[0].shape[0] // 4)] = 0
        return f(*args)
    return mutate


# -- the probe ----------------------------------------------------------------------------------
@pytest.mark.parametrize("p", verify.PROBES, ids=["ragged", "aligned"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16,
                                   "tf32"])
def test_probe_hits_the_awkward_cases_and_has_no_near_ties(dtype, p):
    """Ragged chunks and tiles, odd D (the first probe) or the aligned layout of real features
    (the second), a -inf column, rows above and below alpha; no row near a tie or near alpha
    (pseudo-label counts are compared exactly), in every input dtype."""
    x, w, bias = verify.probe_inputs("cpu", torch.float32 if dtype == "tf32" else dtype, p)
    if dtype == "tf32":                       # as the probe rounds fp32 on CUDA
        x, w = verify._tf32_round(x), verify._tf32_round(w)
    assert p["n"] % p["chunk"] and p["c"] > 128 and p["c"] % 128
    if p is verify.PROBE:
        assert p["c"] % 8 and p["d"] % 8 and p["d"] > 32
    else:
        assert p["c"] % 8 == 0 and p["d"] % 32 == 0
    assert torch.isneginf(bias).sum() == 1
    v = (x.double() @ w.double()) * p["inv_tau_t"] + bias.double()
    top2 = v.topk(2, dim=1).values
    prob = torch.softmax(v, dim=1).amax(dim=1)
    assert float((top2[:, 0] - top2[:, 1]).min()) > 1e-3             # logits; fp32 error ~1e-5
    assert float((prob - p["alpha"]).abs().min()) > 1e-4
    assert 0 < int((prob > p["alpha"]).sum()) < p["n"]                 # one-hot and soft rows
    B, mass, counts, n_conf = reference.pseudo_label_reduce(x, w, bias, p["inv_tau_t"],
                                                            p["alpha"], p["chunk"])
    assert counts[p["dead_class"]] == 0 and mass[p["dead_class"]] == 0


def test_a_kernel_wrong_only_on_the_aligned_layout_fails_its_check(monkeypatch):
    """The first-use check runs both probes: a kernel right on the ragged probe and wrong where
    D and C are aligned (the fused design's in-place path) is caught."""
    skip_if_no_ext("cpu")

    def aligned_only(f):
        def g(*args):
            out = f(*args)
            if args[0].shape[1] % 32 == 0:
                return tuple(o * 1.001 if o.is_floating_point() else o for o in out) \
                    if isinstance(out, tuple) else out * 1.001
            return out
        return g
    _inject(monkeypatch, aligned_only, torch.float64)
    v = verify.check_op("xt_softmax", "ext", "cpu", torch.float64)
    assert not v.ok and "probe D=64 C=136" in v.error
    assert verify.check_op("xt_softmax", "ext", "cpu", torch.float32).ok


def test_compare_catches_what_matters():
    x, w, bias = verify.probe_inputs("cpu", torch.float64)
    calls = verify.probe_calls(x, w, bias)
    for name, args in calls.items():
        want = getattr(reference, name)(*args)
        ok, err, _ = verify.compare(name, want, want, args, 1e-10)
        assert ok and err == 0
        ok, err, _ = verify.compare(name, perturbed(getattr(reference, name), 1.001)(*args),
                                    want, args, 1e-4)
        assert not ok and err > 1e-4
    lse = reference.softmax_column_lse(*calls["softmax_column_lse"])
    assert torch.isneginf(lse).sum() == 1
    assert verify.rel_err(torch.where(torch.isneginf(lse), 0.0, lse), lse) == math.inf
    assert verify.rel_err(lse.clone().fill_(float("nan")), lse) == math.inf
    B, mass, counts, n = reference.pseudo_label_reduce(*calls["pseudo_label_reduce"])
    shifted = counts.roll(1)
    ok, _, what = verify.compare("pseudo_label_reduce", (B, mass, shifted, n), (B, mass, counts, n),
                                 calls["pseudo_label_reduce"], 1e-4)
    assert not ok and what == "argmax counts"
    vals, idx = reference.topk_scores(*calls["topk_scores"])
    ok, _, what = verify.compare("topk_scores", (vals, (idx + 1) % w.shape[1]), (vals, idx),
                                 calls["topk_scores"], 1e-4)
    assert not ok and what == "indices"


# -- the mechanism, on the CPU kernels ---------------------------------------------------------
def test_compiled_cpu_ops_pass_once_per_combination(monkeypatch):
    skip_if_no_ext("cpu")
    checks = _count_checks(monkeypatch)
    X, T, _ = clip_like(300, 24, 7, dtype=torch.float32)
    for _ in range(2):
        res = inmap_ext.fit_vision_proxy(X, T, backend="ext", **KW)
        res.predict(X)
    assert res.backend == "ext"
    ops = res.verification["ops"]
    assert res.verification["enabled"] and res.verification["requested"] == "ext"
    assert {r["verified"] for r in ops.values()} == {"passed"}
    assert {r["ran"] for r in ops.values()} == {"ext"} and {r["design"] for r in ops.values()} \
        == {"cpu"}
    assert all(r["rel_err"] <= r["tol"] for r in ops.values())
    # one check per (op, device, dtype, design): 2 fits + predictions (topk_scores, which the
    # default fit does not use) did not add any
    assert sorted(c[0] for c in checks) == sorted(set(ops) | {"topk_scores"})
    assert len(verify.verdicts()) == len(ops) + 1
    stored = set(_ops.CPU_ONLY_OPS)
    assert {(n, "ext", torch.device("cpu"), torch.float64) for n in stored} <= set(checks)
    inmap_ext.fit_vision_proxy(X.double(), T.double(), backend="ext", **KW)  # a new dtype
    # ... for every op but the stored logits' reads, whose dtype is the store's (float64 for a
    # set this small, in both fits: logit_store.py), already checked
    assert len(checks) == 2 * len(ops) + 1 - len(stored)


@pytest.mark.parametrize("fault", ["wrong", "raises", "mutates"])
def test_a_bad_compiled_op_warns_once_and_the_fit_is_the_torch_fit(monkeypatch, fault):
    skip_if_no_ext("cpu")
    ran = _inject(monkeypatch, {"wrong": perturbed, "raises": _raising,
                                "mutates": _mutating}[fault], torch.float64)
    X, T, _ = clip_like(300, 24, 7, seed=3)
    want = inmap_ext.fit_vision_proxy(X, T, backend="torch", **KW)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = inmap_ext.fit_vision_proxy(X, T, backend="ext", **KW)
        again = inmap_ext.fit_vision_proxy(X, T, backend="ext", **KW)
    msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    ops = got.verification["ops"]
    assert len(msgs) == len(ops)                      # once per op, not per call or per fit
    msg = next(m for m in msgs if "xt_softmax" in m)
    assert "ext backend, cpu design" in msg and "float64" in msg and " on cpu " in msg
    assert {"wrong": "relative error", "raises": "raised RuntimeError: CUDA",
            "mutates": "modified its input 0"}[fault] in msg
    assert "pure-torch backend for the rest of this process" in msg and "inmap check" in msg
    # the wrong op ran only in its check: the fit is exactly the pure-torch fit
    assert sorted(ran) == sorted(ops)
    assert torch.equal(got.proxy, want.proxy) and torch.equal(again.proxy, want.proxy)
    assert got.backend == "torch"
    for r in ops.values():
        assert r["verified"] == "failed" and r["ran"] == "torch" and r["requested"] == "ext"
        assert (r["rel_err"] > r["tol"]) if fault == "wrong" else (r["rel_err"] is None)
    if fault == "mutates":       # the fit's own inputs were never given to the bad kernel
        assert torch.equal(X, clip_like(300, 24, 7, seed=3)[0])
    # float32 is another combination: checked on its own, passes, runs the compiled ops; only
    # the stored logits' read, whose dtype is the store's (float64 at this size:
    # logit_store.py), is the failed float64 combination and runs its torch twin
    r32 = inmap_ext.fit_vision_proxy(X.float(), T.float(), backend="ext", **KW)
    assert r32.backend == "ext+torch"
    assert {n for n, r in r32.verification["ops"].items() if r["ran"] == "torch"} == \
        set(_ops.CPU_ONLY_OPS)


def test_one_bad_op_falls_back_alone(monkeypatch, tmp_path):
    skip_if_no_ext("cpu")
    real = _ops.op
    monkeypatch.setattr(_ops, "op", lambda name, backend: perturbed(real(name, backend))
                        if (name, backend) == ("xt_softmax", "ext") else real(name, backend))
    X, T, _ = clip_like(300, 24, 7, seed=3)
    with pytest.warns(RuntimeWarning, match=r"xt_softmax \(ext backend, cpu design\)"):
        res = inmap_ext.fit_vision_proxy(X, T, backend="ext", **KW)
    want = inmap_ext.fit_vision_proxy(X, T, backend="torch", **KW)
    torch.testing.assert_close(res.proxy, want.proxy, rtol=0, atol=1e-8)
    assert res.backend == "ext+torch"
    ops = res.verification["ops"]
    assert ops["xt_softmax"]["ran"] == "torch" and ops["xt_softmax"]["verified"] == "failed"
    assert ops["pseudo_label_reduce"]["ran"] == "ext"
    res.save(tmp_path / "p.safetensors")                      # the record survives a reload
    loaded = inmap_ext.load_vision_proxy(tmp_path / "p.safetensors")
    assert loaded.verification == res.verification and loaded.backend == "ext+torch"


def test_functional_api_and_streaming_are_verified_too(monkeypatch):
    skip_if_no_ext("cpu")
    _inject(monkeypatch, perturbed, torch.float64)
    X, T, _ = clip_like(300, 24, 7, seed=3)
    with pytest.warns(RuntimeWarning, match="topk_scores"):
        vals, idx = inmap_ext.zero_shot_topk(X, T, 3, backend="ext")
    torch.testing.assert_close(vals, reference.topk_scores(X, T, 3, 300)[0])
    want = inmap_ext.fit_vision_proxy(X, T, backend="torch", **KW)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        streamed = inmap_ext.fit_vision_proxy(X, T, backend="ext", stream=True, chunk_size=64,
                                              **KW)
    torch.testing.assert_close(streamed.proxy, want.proxy, rtol=0, atol=1e-10)
    assert streamed.backend == "torch"


def test_verify_off(monkeypatch):
    """INMAP_VERIFY=0 (benchmarks): no check, the compiled op runs as it is."""
    skip_if_no_ext("cpu")
    monkeypatch.setenv(verify.ENV, "0")
    checks = _count_checks(monkeypatch)
    ran = _inject(monkeypatch, perturbed, torch.float64)
    X, T, _ = clip_like(300, 24, 7, seed=3)
    res = inmap_ext.fit_vision_proxy(X, T, backend="ext", iters=3)
    assert not checks and ran and res.backend == "ext"
    assert not res.verification["enabled"]
    assert all(r["verified"].startswith("off") for r in res.verification["ops"].values())


def test_pure_torch_is_never_checked(monkeypatch):
    checks = _count_checks(monkeypatch)
    X, T, _ = clip_like(300, 24, 7, seed=3)
    res = inmap_ext.fit_vision_proxy(X, T, backend="torch", iters=3)
    assert not checks and res.backend == "torch"
    assert {r["verified"] for r in res.verification["ops"].values()} == {"-"}


def test_sharded_fit_ranks_agree_on_the_fallback(tmp_path):
    """Rank 1's compiled ops are wrong, rank 0's are right: both ranks run pure torch."""
    skip_if_no_ext("cpu")
    import torch.multiprocessing as mp

    mp.start_processes(dist_workers.verify_worker,
                       args=(2, str(tmp_path / "init"), str(tmp_path), 1), nprocs=2, join=True,
                       start_method="spawn")
    errs = [p for p in os.listdir(tmp_path) if p.endswith(".err")]
    assert not errs, (tmp_path / errs[0]).read_text()
    out = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    X, T, _ = clip_like(301, 24, 7, seed=13)
    single = inmap_ext.fit_vision_proxy(X, T, backend="torch", iters=100)
    for o in out:
        assert o["backend"] == "torch"
        assert torch.equal(o["proxy"], out[0]["proxy"])
        torch.testing.assert_close(o["proxy"], single.proxy, rtol=0, atol=1e-8)
        assert {r["ran"] for r in o["verification"]["ops"].values()} == {"torch"}
    assert {r["verified"] for r in out[0]["verification"]["ops"].values()} == \
        {"failed on another rank"}
    assert {r["verified"] for r in out[1]["verification"]["ops"].values()} == {"failed"}
    assert any("another rank" in m for m in out[0]["warnings"])
    assert any("relative error" in m for m in out[1]["warnings"])


# -- inmap check: the long form -------------------------------------------------------------------
def test_check_uses_the_probe_and_says_when_cuda_was_not_checked(monkeypatch, capsys):
    skip_if_no_ext("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    real = _ops.ext_available
    monkeypatch.setattr(_ops, "ext_available", lambda d: True if torch.device(d).type == "cuda"
                        else real(d))
    monkeypatch.setattr("inmap_ext.check._cases", lambda dev: (
        ("probe", dt, verify.probe_calls(*verify.probe_inputs(dev, dt)), True)
        for dt in (torch.float32, torch.float64)))
    rows = run_check()
    out = capsys.readouterr().out
    cuda = [r for r in rows if r["device"] == "cuda"]
    assert len(cuda) == 1 and cuda[0]["note"] == NO_GPU and not cuda[0]["ok"]
    assert "CUDA kernels were NOT checked" in out and "1 not checked" in out
    assert f"{2 * len(_ops.OP_NAMES + _ops.CPU_ONLY_OPS) + _split_rows()} passed, 0 failed" in out
    assert "PASS" not in format_table(cuda)


def test_check_flags_a_wrong_kernel(monkeypatch):
    skip_if_no_ext("cpu")
    _inject(monkeypatch, perturbed, torch.float64)
    monkeypatch.setattr("inmap_ext.check._cases", lambda dev: (
        ("probe", dt, verify.probe_calls(*verify.probe_inputs(dev, dt)), True)
        for dt in (torch.float32, torch.float64)))
    rows = run_check(["cpu"], verbose=False)
    assert {r["dtype"] for r in rows if not r["ok"]} == {"float64"}
    assert sum(r["ok"] for r in rows) == len(_ops.OP_NAMES + _ops.CPU_ONLY_OPS) + _split_rows()
    assert all(r["ok"] for r in rows if r["design"] == "bf16x3")     # float32 only


def _split_rows() -> int:
    """Rows `inmap check` adds for float32 on the CPU with precision="bf16x3" (the ops with a
    GEMM to split: not the top-k, not the reads of stored logits), where the build has it."""
    return (len([n for n in _ops.OP_NAMES if n != "topk_scores"])
            if _ops.cpu_bf16x3_available() else 0)


# -- on a GPU: every combination must pass -------------------------------------------------------
CUDA_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES + ["tf32"])
@pytest.mark.parametrize("design", ["chunked", "fused"])
def test_every_cuda_combination_passes(monkeypatch, design, dtype):
    if not _ops.ext_available("cuda"):
        pytest.skip("compiled CUDA kernels not built")
    monkeypatch.setenv(_ops.DESIGN_ENV, design)
    tf32 = dtype == "tf32"
    dtype = torch.float32 if tf32 else dtype
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        for name in _ops.OP_NAMES:
            v = verify.check_op(name, "ext", "cuda", dtype)
            assert v.ok, v.describe()
            assert v.design == _ops.cuda_design_of("cuda", dtype)
        X, T, _ = clip_like(3000, 64, 50, dtype=torch.float32, device="cuda")
        res = inmap_ext.fit_vision_proxy(X, T, precision={torch.float16: "fp16",
                                                          torch.bfloat16: "bf16"}.get(
                                                              dtype, "tf32" if tf32 else "fp32"),
                                         **KW)
        assert res.backend == "ext", res.verification
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
def test_every_triton_combination_passes(dtype):
    if _ops.triton_available("cuda") is not None:
        pytest.skip(_ops.triton_available("cuda"))
    for name in ("softmax_column_lse", "pseudo_label_reduce", "xt_softmax"):
        v = verify.check_op(name, "triton", "cuda", dtype)
        assert v.ok, v.describe()


@requires_cuda
@pytest.mark.cuda
def test_first_use_cost_is_milliseconds():
    if not _ops.ext_available("cuda"):
        pytest.skip("compiled CUDA kernels not built")
    for name in _ops.OP_NAMES:
        verify.check_op(name, "ext", "cuda", torch.float16)          # warm-up (CUDA context)
    ms = [verify.check_op(name, "ext", "cuda", torch.float16).ms for name in _ops.OP_NAMES]
    assert max(ms) < 50, ms
