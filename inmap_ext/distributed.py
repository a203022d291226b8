"""Sharded fitting with torch.distributed (NCCL on GPUs, gloo on CPUs, launched by torchrun).

Each rank passes its own rows of image features to ``fit_vision_proxy(..., process_group=g)``;
the text proxies are broadcast from rank 0. Per Sinkhorn iteration the column log-sum-exps
(2 x C floats) are all-reduced, per gradient step the gradient's data term (D x C floats), and
at the end the pseudo-label statistics. Every rank ends with the same proxy, equal to a
single-process fit on the concatenated features. A rank may hold zero rows.

A rank that dies makes the collectives of the others fail after the process group's timeout
(``init_from_env(timeout_s=...)``, default 300 s); a mismatched shard (different D, dtype or class
count) raises the same ValueError on every rank before any work.
"""
from __future__ import annotations

import datetime
import os
from typing import Optional

import torch
import torch.distributed as dist

from . import validation
from .collective import collective as _collective
from .reference import acc_dtype


def init_from_env(backend: Optional[str] = None, timeout_s: float = 300.0):
    """Initialise the default process group from torchrun's environment (RANK, WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT); NCCL when CUDA is available, else gloo. Returns the group
    (``dist.group.WORLD``), or None outside torchrun."""
    if "WORLD_SIZE" not in os.environ:
        return None
    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return dist.group.WORLD


def rank_and_world(group=None):
    if group is None or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def check_shard(image_features, text_proxies, group, device=None):
    """Validate this rank's shard and agree on the problem across ranks.

    Returns (x, t, row_scale): this rank's rows (possibly zero), rank 0's text proxies
    (broadcast) and, when streaming (``device``: the compute device the rows are streamed to),
    the rows' 1/norm for per-chunk normalisation (x then stays where it is, unnormalised); in
    memory x comes back L2-normalised and row_scale is None. Any rank's bad input raises the same
    ValueError on every rank."""
    if not dist.is_initialized():
        raise ValueError("process_group was given but torch.distributed is not initialised")
    rank = dist.get_rank(group)
    meta, x, t, scale = {}, None, None, None
    try:
        if not isinstance(image_features, torch.Tensor) or image_features.dim() != 2:
            raise ValueError("image_features must be a 2-D tensor (N x D)")
        if image_features.dtype not in validation.FLOAT_DTYPES:
            raise TypeError(f"image_features must be a floating tensor, got {image_features.dtype}")
        if device is not None:
            x = image_features
            if x.shape[0]:
                scale = validation.check_host_features(x)
            compute = torch.device(device)
        else:
            x = validation.cpu_upcast(image_features)
            if x.shape[0]:
                x = validation.normalise(x, validation.check_finite(x, "image_features", 1), 1)
            compute = x.device
        meta.update(D=x.shape[1], N=x.shape[0], dtype=str(x.dtype), device=compute.type)
        if rank == 0:
            probe = torch.ones(1, x.shape[1], dtype=x.dtype, device=compute)
            _, t = validation.check_features_and_proxies(probe, text_proxies.to(compute)
                                                         if isinstance(text_proxies,
                                                                       torch.Tensor)
                                                         else text_proxies)
            meta["C"] = t.shape[1]
        elif isinstance(text_proxies, torch.Tensor) and text_proxies.dim() == 2:
            meta["C"] = text_proxies.shape[1]
    except (ValueError, TypeError) as e:
        meta["error"] = f"rank {rank}: {e}"
    metas = [None] * dist.get_world_size(group)
    _collective(dist.all_gather_object, metas, meta, group=group)
    errors = [m["error"] for m in metas if "error" in m]
    if errors:
        raise ValueError("sharded fit: " + "; ".join(errors))
    ref = metas[0]
    for r, m in enumerate(metas):
        for key in ("D", "dtype", "device"):
            if m[key] != ref[key]:
                raise ValueError(f"sharded fit: rank {r} has image_features {key}={m[key]} but "
                                 f"rank 0 has {key}={ref[key]}; every shard must match")
        if m.get("C") is not None and m["C"] != ref["C"]:
            raise ValueError(f"sharded fit: rank {r} has {m['C']} classes but rank 0 has "
                             f"{ref['C']}; every rank must use the same class list")
    if sum(m["N"] for m in metas) == 0:
        raise ValueError("sharded fit: image_features is empty on every rank")
    t_dtype = acc_dtype(x.dtype)      # proxies are never rounded to 16 bits on the way
    if rank == 0:
        t = t.to(device=compute, dtype=t_dtype).contiguous()
    else:
        t = torch.empty(ref["D"], ref["C"], dtype=t_dtype, device=compute)
    _collective(dist.broadcast, t, src=dist.get_global_rank(group, 0), group=group)
    return x, t, scale


def shard_rows(n: int, rank: int, world: int) -> range:
    """The contiguous block of rows [start, stop) that ``rank`` holds of n rows (sizes differ by
    at most one; concatenating ranks 0..world-1 gives the original order)."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))
