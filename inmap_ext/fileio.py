"""Writing files the way users expect: safetensors files (the proxy, cache shards) with the
same permissions as every other output, i.e. 0666 minus the user's umask (safetensors itself
creates them 0600, so a cache shared by a group would be unreadable to it)."""
from __future__ import annotations

import os
from typing import Dict, Optional

import torch


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_safetensors(tensors: Dict[str, torch.Tensor], path: str,
                     metadata: Optional[Dict[str, str]] = None) -> None:
    from safetensors.torch import save_file

    if metadata is not None:
        metadata = {k: _utf8(v) for k, v in metadata.items()}
    save_file(tensors, str(path), metadata=metadata)
    os.chmod(path, 0o666 & ~_umask())


def _utf8(text: str) -> str:
    """``text`` as safetensors can store it (UTF-8): a file name that is not UTF-8 (its bytes as
    surrogate escapes) keeps those bytes as \\xNN escapes; metadata is for reading, not parsing."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
