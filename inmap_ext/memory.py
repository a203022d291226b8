"""How much memory a device has free for new allocations now: one home for the fit's memory
decisions (the logit store's room, logit_store.capacity_bytes; the padded copy of the features,
functional.Runner.own_features; whether the CLI moves features onto the GPU, pipeline.py).

On a GPU: its free memory (``torch.cuda.mem_get_info``). On a Linux CPU: MemAvailable of
/proc/meminfo, and no more than the process's memory cgroups still allow (its own and every
parent's limit less their use without reclaimable page cache: a container's or a batch job's
``--mem``)."""
from __future__ import annotations

import os
from typing import Optional

import torch


def _cgroup_dirs(proc: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup"):
    """The memory cgroup folders that bound this process, its own first and then each parent up
    to the mount's root, with the files of their limit and use: cgroup v2 (memory.max,
    memory.current) and v1 (memory/.../memory.limit_in_bytes, memory.usage_in_bytes)."""
    try:
        with open(proc) as f:
            lines = f.read().splitlines()
    except OSError:
        lines = []
    found = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":                                    # v2
            found.append((root, path, "memory.max", "memory.current"))
        elif "memory" in controllers.split(","):                 # v1
            found.append((os.path.join(root, "memory"), path, "memory.limit_in_bytes",
                          "memory.usage_in_bytes"))
    if not found:      # no /proc/self/cgroup: the mount's roots as they are
        found = [(root, "/", "memory.max", "memory.current"),
                 (os.path.join(root, "memory"), "/", "memory.limit_in_bytes",
                  "memory.usage_in_bytes")]
    for base, path, limit, usage in found:
        parts = [p for p in path.split("/") if p]
        for k in range(len(parts), -1, -1):    # a cgroup namespace shows "/": the root then
            yield os.path.join(base, *parts[:k]), limit, usage


def _inactive_file(folder: str) -> int:
    """Reclaimable page cache of a memory cgroup: inactive_file of its memory.stat (v2; v1's
    hierarchical total_inactive_file), 0 where unknown."""
    try:
        with open(os.path.join(folder, "memory.stat")) as f:
            stat = dict(line.split()[:2] for line in f if len(line.split()) >= 2)
    except OSError:
        return 0
    for key in ("total_inactive_file", "inactive_file"):
        if stat.get(key, "").isdigit():
            return int(stat[key])
    return 0


def _cgroup_room(proc: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup"
                 ) -> Optional[int]:
    """Bytes this process's memory cgroups still allow (the least over its own and its parents'
    limits less their use: a container's or a batch job's --mem), or None without a limit. The
    use leaves out the page cache the kernel reclaims first (inactive_file of memory.stat), as
    MemAvailable does: a feature file just read does not shrink the room."""
    room = None
    for folder, limit, usage in _cgroup_dirs(proc, root):
        try:
            with open(os.path.join(folder, limit)) as f:
                cap = f.read().strip()
            with open(os.path.join(folder, usage)) as f:
                used = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if cap == "max" or not cap.isdigit() or int(cap) >= 1 << 60:   # no limit here
            continue
        used -= min(used, _inactive_file(folder))
        left = max(0, int(cap) - used)
        room = left if room is None else min(room, left)
    return room


def available_bytes(device: torch.device) -> Optional[int]:
    """Memory available for new allocations on ``device`` now, or None where unknown: the free
    memory of a CUDA device; on a Linux CPU MemAvailable of /proc/meminfo (else the free
    physical pages the OS reports), and no more than the process's memory cgroup still allows
    (a container's or a batch job's limit)."""
    device = torch.device(device)
    try:
        if device.type == "cuda":
            return int(torch.cuda.mem_get_info(device)[0])
        if device.type != "cpu":
            return None
        free = None
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        free = int(line.split()[1]) * 1024
                        break
        except OSError:
            pass
        if free is None:
            free = int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
        room = _cgroup_room()
        return free if room is None else min(free, room)
    except (ValueError, OSError, RuntimeError, AttributeError):
        return None
