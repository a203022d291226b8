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
