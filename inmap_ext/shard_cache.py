"""The feature cache of tar shards (``--images`` given as webdataset shards, shards.py).

One entry per shard, keyed by the shard's identity (absolute path, size, modification time) and
the encoder (model, weights, preprocessing, precision, image member names): a shard that did
not change is never encoded again, whatever other shards a later run lists, and an interrupted
extraction resumes shard by shard.

Layout: <cache_dir>/wds-<key>/manifest.json (what the encoder is, for ``inmap cache``) and one
``<shard id>.safetensors`` per shard: ``features`` (rows x D float32), ``ok`` (1 where the
sample's image was read) and, in the metadata, the samples' keys and the shard's path.

Several processes may extract into one cache at once (two jobs on a machine, torchrun ranks, a
shared disk): a shard is encoded only by the process holding its lock file (``flock``; the lock
goes with its holder, so a killed job never blocks the next), and written to a temporary name
then renamed, so no entry is ever seen half written and none is encoded twice.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .cache import read_ok_masks, require_complete
from .fileio import _umask, save_safetensors

KIND = "webdataset"
LOCK = ".lock"


def shard_identity(path: str) -> str:
    """A shard as the cache sees it: its absolute path, size, modification and change times (a
    rewrite changes the change time, which ``cp -p`` or ``rsync -a`` cannot set back; the image
    cache keys files the same way)."""
    st = os.stat(path)
    return f"{os.path.abspath(path)}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}"


def safetensors_header(path: str) -> dict:
    """The JSON header of a safetensors file (tensor names, dtypes, shapes, ``__metadata__``)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(n))


class ShardLock:
    """An exclusive, non-blocking claim on one cache entry: a lock file held with ``flock``.
    The kernel drops the lock when its holder dies, so a crashed job leaves nothing to clean."""

    def __init__(self, path: str):
        self.path = path
        self.fd: Optional[int] = None

    def try_acquire(self) -> bool:
        while True:
            fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o666 & ~_umask())
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            # the last holder may have removed the file between our open and flock: the lock we
            # hold is then on a file nobody else sees; take the one now at the path instead
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self.fd = fd
                return True
            os.close(fd)

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.unlink(self.path)       # while still held: no one can hold a removed file's lock
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None


class ShardCache:
    """Per-shard feature entries of one encoder under ``cache_dir``."""

    def __init__(self, cache_dir: str, identity: Dict[str, str], shards: Sequence[str],
                 source: str = ""):
        self.identity_base = dict(identity, kind=KIND)
        key = hashlib.sha256(json.dumps(self.identity_base, sort_keys=True).encode()).hexdigest()
        self.key = "wds-" + key[:20]
        self.dir = os.path.join(os.path.abspath(cache_dir), self.key)
        self.shards = list(shards)
        self.ids = [hashlib.sha256(shard_identity(s).encode("utf-8", "surrogateescape"))
                    .hexdigest()[:24] for s in self.shards]
        self.n_shards = len(self.shards)
        self.reused = 0          # the image-folder cache's field (rows taken from other sets)
        self.encoded = 0         # images encoded by this process in the last extraction
        self._locks: Dict[int, ShardLock] = {}
        os.makedirs(self.dir, exist_ok=True)
        manifest = os.path.join(self.dir, "manifest.json")
        if not os.path.isfile(manifest):
            tmp = manifest + f".tmp{os.getpid()}"
            with open(tmp, "w") as f:
                json.dump(dict(self.identity_base, root=source,
                               created=time.strftime("%Y-%m-%d %H:%M:%S")), f, indent=1,
                          sort_keys=True)
            os.replace(tmp, manifest)

    # -- entries -------------------------------------------------------------------------------
    def entry_path(self, i: int) -> str:
        return os.path.join(self.dir, self.ids[i] + ".safetensors")

    def has(self, i: int) -> bool:
        return os.path.isfile(self.entry_path(i))

    def missing_shards(self) -> List[int]:
        return [i for i in range(self.n_shards) if not self.has(i)]

    def to_encode(self) -> List[int]:
        """Shards without an entry, or whose entry is marked to be encoded again (a read failed
        for a passing reason when it was written)."""
        return [i for i in range(self.n_shards) if not self.has(i) or self.marked_again(i)]

    def marked_again(self, i: int) -> bool:
        try:
            return self._header(i).get("__metadata__", {}).get("again") == "1"
        except (OSError, ValueError):
            return True

    def claim(self, i: int) -> bool:
        """Take shard ``i``'s lock if no other process holds it."""
        lock = ShardLock(self.entry_path(i) + LOCK)
        if not lock.try_acquire():
            return False
        self._locks[i] = lock
        return True

    def release(self, i: int) -> None:
        lock = self._locks.pop(i, None)
        if lock is not None:
            lock.release()

    def release_all(self) -> None:
        for i in list(self._locks):
            self.release(i)

    def write(self, i: int, features: torch.Tensor, ok: torch.Tensor, keys: Sequence[str],
              error: str = "", again: bool = False) -> None:
        """Write shard ``i``'s entry (to a temporary name, then renamed) and release its lock.
        ``again``: the next run encodes the shard again (a read failed for a passing reason)."""
        meta = {"keys": json.dumps(list(keys)), "shard": self.shards[i], "error": error,
                "again": "1" if again else "0"}
        tmp = self.entry_path(i) + f".tmp{os.getpid()}"
        save_safetensors({"features": features.float().contiguous().cpu(),
                          "ok": ok.to(torch.uint8).cpu()}, tmp, metadata=meta)
        os.replace(tmp, self.entry_path(i))
        self.release(i)

    # -- reading -------------------------------------------------------------------------------
    def _header(self, i: int) -> dict:
        return safetensors_header(self.entry_path(i))

    def rows_per_shard(self) -> List[int]:
        return [self._header(i)["ok"]["shape"][0] for i in range(self.n_shards)]

    def keys(self) -> List[str]:
        """Every sample's key, in shard order."""
        return [k for i in range(self.n_shards)
                for k in json.loads(self._header(i)["__metadata__"]["keys"])]

    def errors(self) -> List[Tuple[str, str]]:
        """(shard, error) of the shards whose reading stopped early."""
        out = []
        for i in range(self.n_shards):
            err = self._header(i).get("__metadata__", {}).get("error", "")
            if err:
                out.append((self.shards[i], err))
        return out

    def _require_complete(self) -> None:
        require_complete(self.dir, self.missing_shards(), self.n_shards)

    def load_ok(self) -> torch.Tensor:
        self._require_complete()
        return read_ok_masks([self.entry_path(i) for i in range(self.n_shards)])

    def load(self, rows: Optional[range] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """(features, ok) of the samples ``rows`` (default: all), reading only their shards."""
        from safetensors.torch import load_file

        self._require_complete()
        counts = self.rows_per_shard()
        n = sum(counts)
        rows = range(n) if rows is None else rows
        feats, oks, start = [], [], 0
        lo = None
        for i, c in enumerate(counts):
            stop = start + c
            if c and start < max(rows.stop, rows.start + 1) and stop > rows.start:
                t = load_file(self.entry_path(i))
                lo = start if lo is None else lo
                feats.append(t["features"])
                oks.append(t["ok"].bool())
            start = stop
        if not feats:
            return torch.zeros(0, 0), torch.zeros(0, dtype=torch.bool)
        f, o = torch.cat(feats), torch.cat(oks)
        return f[rows.start - lo:rows.stop - lo], o[rows.start - lo:rows.stop - lo]


def entry_counts(entry_dir: str) -> int:
    """Samples held by a shard cache folder (for ``inmap cache``)."""
    n = 0
    for name in os.listdir(entry_dir):
        if name.endswith(".safetensors"):
            try:
                n += safetensors_header(os.path.join(entry_dir, name))["ok"]["shape"][0]
            except (OSError, ValueError, KeyError, TypeError):
                pass
    return n
