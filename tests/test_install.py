"""What the install gives: the compiled extension when it was built, one clear warning and the
pure-torch backend when it cannot be loaded, and the CUDA kernels when CI expects them."""
import os
import subprocess
import sys

import pytest
import torch

import inmap_ext

NO_EXT = r"""
import sys, warnings
sys.modules["inmap_ext._C"] = None          # as if the .so were missing or broken
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import inmap_ext
    inmap_ext.extension_loaded          # the package loads its kernels on first use
msgs = [str(w.message) for w in caught if "inmap_ext" in str(w.message)]
assert len(msgs) == 1 and "pure-torch backend" in msgs[0], msgs
assert not inmap_ext.extension_loaded()
from inmap_ext.synthetic import make_problem
p = make_problem(300, 16, 4)
r = inmap_ext.fit_vision_proxy(p.image_features, p.text_proxies, iters=5)
assert r.backend == "torch"
try:
    inmap_ext.fit_vision_proxy(p.image_features, p.text_proxies, iters=1, backend="ext")
except RuntimeError as e:
    assert "extension failed to load" in str(e)
else:
    raise AssertionError("backend='ext' must fail without the extension")
print("fallback ok")
"""


def test_fallback_without_extension_warns_once_and_runs():
    out = subprocess.run([sys.executable, "-c", NO_EXT], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "fallback ok" in out.stdout


def test_extension_is_built_here():
    """Wherever the package was built (pip install .), the CPU kernels load."""
    if os.environ.get("INMAP_NO_EXTENSION"):
        pytest.skip("installed without the extension on purpose")
    assert inmap_ext.extension_loaded()
    assert inmap_ext.ext_available("cpu")


@pytest.mark.skipif(os.environ.get("INMAP_EXPECT_CUDA_KERNELS") != "1",
                    reason="set INMAP_EXPECT_CUDA_KERNELS=1 where the CUDA build is expected")
def test_cuda_kernels_compiled_in():
    """CI builds against the CUDA build of torch: every op must have a CUDA kernel (compiled
    and registered even though the machine has no GPU)."""
    assert torch.version.cuda is not None
    for name in inmap_ext._ops.OP_NAMES:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"inmap_ext::{name}", "CUDA") or \
            torch._C._dispatch_has_kernel_for_dispatch_key(f"inmap_ext::{name}",
                                                           "CompositeExplicitAutograd"), name
