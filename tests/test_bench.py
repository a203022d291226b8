"""The benchmark suite runs end to end (so that it does not rot between GPU sessions): a tiny
CPU sweep through bench/run.py writes its JSON and markdown with every implementation agreeing
with the chunked torch one. The numbers themselves are not checked: benchmarks measure."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..")


def test_bench_run_writes_json_and_markdown(tmp_path):
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "run.py"), "--device", "cpu", "--n", "600",
         "--d", "24", "--c", "30", "--repeat", "1", "--out", str(tmp_path), "--tag", "smoke"],
        capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    data = json.loads((tmp_path / "smoke.json").read_text())
    assert {"device", "torch", "date"} <= set(data["info"])
    rows = {r["backend"]: r for r in data["rows"]}
    assert {"torch", "published-dense"} <= set(rows)
    for name, r in rows.items():
        assert r["step_ms"] > 0 and r["N"] == 600 and r["C"] == 30, name
        if name != "published-dense":
            assert r["rel_err_vs_torch"] <= 1e-5, name
            # a whole fit is measured where the estimate says it takes < 5 s (a loaded
            # machine can push the estimate past that: then it is left out, by design)
            assert (r["fit_measured_s"] > 0) if r["fit_s"] < 5 else r["fit_measured_s"] is None
    md = (tmp_path / "smoke.md").read_text()
    assert "| 600 | 24 | 30 | fp32 |" in md and "Fastest gradient step" in md


def test_robustness_bench_runs_every_file_and_summarises(tmp_path):
    """bench/robustness.py on two synthetic .npz files (X, y, T as the real ones): one table per
    file, every subset kind, the summary (mean / worst gain, regret, full sets) and the decision
    cost on the largest set; the accuracies of auto are those of the prior it chose."""
    import numpy as np
    import torch

    from testing import clip_like

    paths = []
    for i, (n, c) in enumerate([(120, 10), (200, 20)]):
        X, T, y = clip_like(n, 16, c, seed=i, dtype=torch.float32, gap=2.0, text_noise=0.4)
        path = tmp_path / f"synthetic{i}.npz"
        np.savez(path, X=X.numpy().astype(np.float16), y=y.numpy(),
                 T=T.numpy().astype(np.float16))
        paths.append(str(path))
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "robustness.py"), *paths, "--seeds", "0",
         "--batches", "1", "--out", str(tmp_path), "--labeled", "20", "--draws", "2"],
        capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    (js,) = tmp_path.glob("robustness_*.json")
    data = json.loads(js.read_text())
    assert [f["data"] for f in data["files"]] == ["synthetic0.npz", "synthetic1.npz"]
    kinds = {r["set"].split(" (")[0] for f in data["files"] for r in f["rows"]}
    assert {"full", "half of the classes", "a fifth of the classes", "a tenth of the classes",
            "long tail, imbalance 10", "long tail, imbalance 100",
            "batches of 4 classes x 4 images"} <= kinds
    s = data["summary"]
    assert s["sets"] == sum(len(f["rows"]) for f in data["files"])
    for f in data["files"]:
        for r in f["rows"]:
            if "batches" not in r["set"]:
                assert r["auto"] == r[r["auto_chose"]], r  # auto ran the prior it chose
    cost = s["decision_cost_on_largest_set"]
    assert cost["data"] == "synthetic1.npz" and cost["set"] == "full"
    # the labeled-sample mode: every set of at least 40 images, 2 draws of 20 labels each
    lab = s["labeled"]["20"]
    big = [r for f in data["files"] for r in f["rows"] if r["n"] >= 40 and "batches" not in r["set"]]
    assert lab["sets"] == len(big) and lab["fits"] == 2 * len(big)
    for r in big:
        assert all(c in ("none", "uniform", "estimate") for c in r["labeled"]["20"])
    assert lab["mean_regret_vs_best_per_set"] >= 0
    assert 0 < cost["decision_s"] < cost["fit_s"] and 0 < cost["share"] < 1
    assert len(s["auto_minus_uniform_on_full_sets"]) == 2
    for c in s["close_calls"]:
        (r,) = [r for f in data["files"] if f["data"] == c["data"] for r in f["rows"]
                if r["set"] == c["set"] and r["seed"] == c["seed"]]
        assert c["runner_up"] in r["auto_stats"]["margin"] and c["chosen"] == r["auto_chose"]
        assert c["runner_up_minus_auto"] == pytest.approx(r[c["runner_up"]] - r["auto"], abs=0.01)
    by = s["below_zero_shot_by_size"]
    rows = [r for f in data["files"] for r in f["rows"]]
    assert s["sets_by_size"] == {"large": sum(r["n"] >= 200 for r in rows),
                                 "small": sum(r["n"] < 200 for r in rows)}
    assert len(by["large"]) + len(by["small"]) == \
        s["auto"]["sets_below_zero_shot_by_more_than_0.5"]
    for b in by["large"] + by["small"]:
        assert b["gain"] < -0.5 and b["images_lost"] == pytest.approx(-b["gain"] * b["n"] / 100,
                                                                      abs=0.06)
    md = js.with_suffix(".md").read_text()
    assert "## synthetic0.npz" in md and "## synthetic1.npz" in md
    assert "Cost of the default's class-prior decision on the largest set" in md
    assert "Close calls (a runner-up within two standard errors" in md
    assert "more than 0.5 point below zero-shot, by set size" in md
    # --from-json rewrites the same summary and tables from the stored rows, without fitting
    js.with_suffix(".md").unlink()
    again = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "robustness.py"), str(js), "--from-json",
         "--out", str(tmp_path)], capture_output=True, text=True, timeout=120, cwd=str(tmp_path))
    assert again.returncode == 0, again.stderr[-3000:]
    assert js.with_suffix(".md").read_text() == md
    assert json.loads(js.read_text())["summary"] == s


def test_speed_bench_counts_passes_side_by_side(tmp_path):
    """bench/speed.py on a tiny synthetic set: the previous default, the default, the default
    with the uniform prior and the paper fit, each with passes by phase, time and top-1."""
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "speed.py"), "--synthetic", "300x16x10",
         "--out", str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    (js,) = tmp_path.glob("speed_*.json")
    (row,) = json.loads(js.read_text())["rows"]
    runs = row["runs"]
    assert set(runs) == {"previous default", "default", "default, uniform", "paper"}
    assert runs["paper"]["passes"]["descent"] == 2000 and runs["paper"]["solver"] == "gd"
    assert runs["previous default"]["solver"] == "gd" and runs["default"]["solver"] == "lbfgs"
    assert runs["default"]["passes"]["decision"] == 1
    assert runs["default"]["passes"]["total"] < runs["previous default"]["passes"]["total"]
    for r in runs.values():
        assert r["passes"]["total"] == sum(v for k, v in r["passes"].items() if k != "total")
        assert r["seconds"] > 0 and 0 <= r["top1"] <= 100 and "agreement_with_paper" in r


def test_speed_bench_runs_another_build_beside(tmp_path):
    """--baseline DIR runs the default fit of the inmap_ext package in DIR (here the checkout's,
    the package bench/speed.py itself runs, so the baseline's fit is the default's own, bit for
    bit) in a subprocess on the same features; a folder without the package is refused before
    any work."""
    folder = os.path.abspath(ROOT)
    cmd = [sys.executable, os.path.join(ROOT, "bench", "speed.py"), "--synthetic", "300x16x10",
           "--paper-max-n", "0", "--out", str(tmp_path)]
    out = subprocess.run(cmd + ["--baseline", folder, "--baseline-label", "same build"],
                         capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    (js,) = tmp_path.glob("speed_*.json")
    data = json.loads(js.read_text())
    runs = data["rows"][0]["runs"]
    assert data["meta"]["baseline"]["label"] == "same build"
    base, cur = runs["same build"], runs["default"]
    assert base["baseline"] and base["seconds"] > 0
    assert base["top1"] == cur["top1"] and base["passes"] == cur["passes"]
    assert "of the time of the default at same build" in (tmp_path / js.name.replace(
        ".json", ".md")).read_text()
    bad = subprocess.run(cmd + ["--baseline", str(tmp_path)], capture_output=True, text=True,
                         timeout=600, cwd=str(tmp_path))
    assert bad.returncode == 2 and "no inmap_ext package" in bad.stderr


def test_stopping_bench_compares_solvers_on_files_and_synthetic_kinds(tmp_path):
    """bench/stopping.py on a small .npz file and one synthetic kind: every set against all
    2000 published steps (the same class prior in every run), each solver's passes, top-1
    difference and agreement, one summary per group (real, synthetic)."""
    import numpy as np
    import torch

    from testing import clip_like

    X, T, y = clip_like(150, 16, 10, seed=3, dtype=torch.float32, gap=2.0, text_noise=0.4)
    path = tmp_path / "small_rn50.npz"
    np.savez(path, X=X.numpy(), y=y.numpy(), T=T.numpy())
    script = os.path.join(ROOT, "bench", "stopping.py")
    bad = subprocess.run([sys.executable, script, "--synthetic", "--kinds", "vit, C=7"],
                         capture_output=True, text=True, timeout=120, cwd=str(tmp_path))
    assert bad.returncode == 2 and "--kinds: unknown ['vit, C=7']" in bad.stderr
    out = subprocess.run([sys.executable, script, str(path), "--synthetic", "--kinds",
                          "vit, C=10", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=900, cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    (js,) = tmp_path.glob("stopping_*.json")
    rows = json.loads(js.read_text())["rows"]
    real = [r for r in rows if r["data"] == "small_rn50.npz"]
    synthetic = [r for r in rows if r["data"] == "synthetic vit, C=10"]
    assert len(real) >= 5 and real[0]["set"] == "full" and real[0]["n"] == 150
    assert len(synthetic) == 4 and len(real) + len(synthetic) == len(rows)
    assert {r["set"] for r in synthetic} == {"every class", "half the classes",
                                            "a fifth of the classes", "long tail"}
    for r in rows:
        assert r["published"]["passes"] == 2000 and r["prior"] in ("uniform", "estimate", "none")
        for k in ("gd stopped", "lbfgs", "lbfgs@40"):
            assert r[k]["difference"] == pytest.approx(r[k]["acc"] - r["published"]["acc"])
            assert 0 <= r[k]["agreement"] <= 100 and r[k]["passes"] > 0
        assert r["lbfgs"]["passes"] <= 80 and r["lbfgs@40"]["passes"] <= 40
        assert r["gd stopped"]["passes"] < 2000 + 200   # its steps and a check per 10
    md = js.with_suffix(".md").read_text()
    assert "| synthetic vit, C=10 | long tail |" in md and "| small | full | 150 |" in md
    assert "real sets:" in md and "synthetic sets:" in md


def test_precision_bench_compares_every_set_with_the_float32_fit(tmp_path):
    """bench/precision.py on a small .npz file: every set of the robustness bench fitted in
    float32 and with each run, the prior, passes, top-1 and agreement with the float32 fit, and
    a summary per run."""
    import numpy as np
    import torch

    from testing import clip_like

    X, T, y = clip_like(150, 16, 10, seed=3, dtype=torch.float32, gap=2.0, text_noise=0.4)
    path = tmp_path / "small.npz"
    np.savez(path, X=X.numpy(), y=y.numpy(), T=T.numpy())
    # (the bench imports the package from the source tree, which may have no compiled kernels:
    # runs that need none)
    runs = ["chunk512", "fp64"]
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "precision.py"), str(path),
                          "--seeds", "0", "--runs", *runs, "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr[-3000:]
    (js,) = tmp_path.glob("precision_*.json")
    data = json.loads(js.read_text())
    rows = data["rows"]
    assert rows[0]["set"] == "full" and rows[0]["n"] == 150 and len(rows) >= 5
    for r in rows:
        assert r["fp32"]["agreement"] == 100.0
        for k in runs:
            assert 0 <= r[k]["agreement"] <= 100 and r[k]["passes"] > 0
    # 512 rows per chunk on sets of at most 150 rows: one chunk either way, the same bits
    assert all(r["chunk512"]["agreement"] == 100.0 for r in rows)
    assert set(data["summary"]) == set(runs) and data["summary"]["fp64"]["sets"] == len(rows)
    md = js.with_suffix(".md").read_text()
    assert "| small.npz | full | 0 | 150 |" in md
