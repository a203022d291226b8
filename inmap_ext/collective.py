"""torch.distributed collectives with one clear error: the only place the package calls them
(functional.Runner's reductions, distributed.check_shard, verify's agreement on a fallback)."""
from __future__ import annotations


def collective(fn, *args, **kwargs):
    """Run a torch.distributed collective; a failure (a rank exited, or the process group's
    timeout passed) becomes one clear error instead of a backend-specific message."""
    try:
        return fn(*args, **kwargs)
    except RuntimeError as e:
        raise RuntimeError(
            "sharded fit: communication with the other ranks failed (a rank exited or the "
            f"process group's timeout passed): {type(e).__name__}: {e}") from e
