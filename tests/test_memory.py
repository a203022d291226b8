"""Bounded memory: no N x C matrix is ever allocated. Fitting N=400,000, D=128, C=1,000 float32 on
the CPU (one N x C float32 matrix is 1.6 GB) adds less than 1 GB to the process's peak RSS."""
import json
import os
import subprocess
import sys

import pytest

from testing import inmap_ext

CHILD = r"""
import json, resource, sys, torch
import inmap_ext
backend = sys.argv[1]
N, D, C = 400_000, 128, 1000
torch.manual_seed(0)
x = torch.randn(N, D)
x.div_(torch.linalg.vector_norm(x, dim=1, keepdim=True))
t = torch.nn.functional.normalize(torch.randn(D, C), dim=0)
inmap_ext.fit_vision_proxy(x[:500], t, iters=2, sinkhorn_iters=2, backend=backend)  # warm up
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
r = inmap_ext.fit_vision_proxy(x, t, iters=2, sinkhorn_iters=2, backend=backend)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
assert torch.isfinite(r.proxy).all()
print(json.dumps({"added_mb": (after - before) / 1024, "chunk": r.hyper["chunk_size"]}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "ext"])
def test_fit_adds_less_than_1gb_peak_rss(backend):
    if backend == "ext" and not inmap_ext.ext_available("cpu"):
        pytest.skip("compiled cpu kernels not built")
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    out = subprocess.run([sys.executable, "-c", CHILD, backend], capture_output=True, text=True,
                         env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    print(backend, report)
    assert report["added_mb"] < 1024, report
