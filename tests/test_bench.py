"""The benchmark suite runs end to end (so that it does not rot between GPU sessions): a tiny
CPU sweep through bench/run.py writes its JSON and markdown with every implementation agreeing
with the chunked torch one. The numbers themselves are not checked: benchmarks measure."""
import json
import os
import subprocess
import sys

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
