import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

# Without a GPU, the Triton backend's kernels run on CPU tensors through Triton's interpreter
# (read when inmap_ext.triton_ops is first imported, which only backend="triton" does).
try:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover
    pass


if "torch" in sys.modules:
    import pytest

    @pytest.fixture(autouse=True)
    def _seeded_global_rng():
        """Every test starts from the same global random state: a test drawing torch.randn
        without a generator gets the same numbers whatever ran before it."""
        torch.manual_seed(0)
        yield
