"""The CMake build (CMakeLists.txt) registers the same ops from the same sources as setup.py.

Runs where INMAP_CMAKE_LIB points at the built libinmap_ops.so (`make cmake-test` does that), in a
process that never imports inmap_ext (whose own _C would register the ops a second time)."""
import os
import subprocess
import sys

import pytest

LIB = os.environ.get("INMAP_CMAKE_LIB")

CHILD = r"""
import sys, torch
torch.ops.load_library(sys.argv[1])
x = torch.nn.functional.normalize(torch.randn(37, 11, dtype=torch.float64), dim=1)
w = torch.nn.functional.normalize(torch.randn(11, 5, dtype=torch.float64), dim=0)
ops = torch.ops.inmap_ext
G, lse_sum = ops.xt_softmax(x, w, 20.0, 8)
torch.testing.assert_close(G, x.T @ torch.softmax(x @ w * 20.0, dim=1))
torch.testing.assert_close(lse_sum, torch.logsumexp(x @ w * 20.0, dim=1).sum())
lse = ops.softmax_column_lse(x, w, None, 20.0, 8)
torch.testing.assert_close(lse, torch.log(torch.softmax(x @ w * 20.0, dim=1).sum(0)))
B, mass, counts, n = ops.pseudo_label_reduce(x, w, None, 20.0, 1.0, 8)
torch.testing.assert_close(mass, torch.softmax(x @ w * 20.0, dim=1).sum(0))
v, i = ops.topk_scores(x, w, 2, 8)
assert torch.equal(i, torch.topk(x @ w, 2, dim=1).indices)
print("cmake ops ok")
"""


@pytest.mark.skipif(not LIB, reason="INMAP_CMAKE_LIB not set (run `make cmake-test`)")
def test_cmake_library_registers_the_ops():
    out = subprocess.run([sys.executable, "-c", CHILD, LIB], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "cmake ops ok" in out.stdout
