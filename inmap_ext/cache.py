"""The feature cache: image features written in safetensors shards under a key that names the
model, the weights, the preprocessing and the image list. A killed extraction resumes at the
first missing shard; any change of model, weights, preprocessing or images gives a new key, so
stale features are never reused.

Layout: <cache_dir>/<key>/manifest.json and shard_<i>.safetensors, each shard holding
``features`` (rows x D float32), ``index`` (the rows' positions in the image list) and ``ok``
(1 where the image could be read). Shards are written to a temporary name and renamed; a
shard file shorter than its header says (a crash or a full disk) is removed and encoded again,
and a shard whose images partly failed to read for a passing reason (too many open files, an
I/O error) carries a ``.again`` mark: the next run encodes it again. A damaged manifest is
written again and its shards encoded again. A shard is the unit of resumption: by default about 1/32 of
the images (32 to 4096 images), so an interrupted run keeps nearly all its work on small sets
too. The manifest also records what the entry is (model, weights, image count and folder,
creation date) for ``inmap cache``.

Per-image reuse: each entry also keeps ``fingerprints.json``, one fingerprint per row (the
image's absolute path, size, modification and change times, hashed). A new image list (a folder with a
few images added or removed) gets a new key, but before encoding, the rows whose image has the
same fingerprint in a complete shard of another entry with the same model, weights,
preprocessing and precision are copied from there; only new or changed images are encoded. A
changed file has another size, modification or change time (the change time cannot be set back:
a rewrite with the old modification time restored is seen too), so stale features are never
reused.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .fileio import save_safetensors

MAX_SHARD_SIZE = 4096
FINGERPRINTS = "fingerprints.json"
MIN_SHARD_SIZE = 32


def default_shard_size(n: int) -> int:
    """Images per shard when none is given: about n / 32, within [32, 4096]."""
    return max(MIN_SHARD_SIZE, min(MAX_SHARD_SIZE, -(-n // 32)))


def default_cache_dir() -> str:
    """$INMAP_CACHE, else $XDG_CACHE_HOME/inmap_ext/features, else ~/.cache/inmap_ext/features."""
    if os.environ.get("INMAP_CACHE"):
        return os.environ["INMAP_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache"))
    return os.path.join(base, "inmap_ext", "features")


_FILE_IDS: Dict[str, str] = {}       # file version -> fingerprint, in this process
WEIGHTS_IDS = "weights_fingerprints.json"   # the same across runs, in the cache folder


def file_fingerprint(path: str, memo_dir: Optional[str] = None) -> str:
    """Identity of a weights file: its size and a hash of every byte (two checkpoints can differ
    in a few tensors anywhere in the file). The hash (about 1 s per 600 MB) is kept per file
    version (path, size, modification and change times, inode: a rewrite changes the change
    time, which cannot be set back) in this process and in ``memo_dir``/WEIGHTS_IDS (default:
    the feature cache folder), so later runs do not read the file again."""
    st = os.stat(path)
    version = "\0".join(map(str, (os.path.abspath(path), st.st_size, st.st_mtime_ns,
                                  st.st_ctime_ns, st.st_ino)))
    if version in _FILE_IDS:
        return _FILE_IDS[version]
    memo_path = os.path.join(memo_dir or default_cache_dir(), WEIGHTS_IDS)
    try:
        with open(memo_path) as f:
            memo = dict(json.load(f))
    except (OSError, ValueError, TypeError):
        memo = {}
    if version not in memo:
        h = hashlib.blake2b(digest_size=16)
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(8 << 20), b""):
                h.update(block)
        memo[version] = f"{st.st_size}:{h.hexdigest()}"
        try:                 # a folder we cannot write only costs the hash again next run
            os.makedirs(os.path.dirname(memo_path), exist_ok=True)
            tmp = memo_path + f".tmp{os.getpid()}"
            with open(tmp, "w") as f:
                json.dump(memo, f)
            os.replace(tmp, memo_path)
        except OSError:
            pass
    _FILE_IDS[version] = memo[version]
    return memo[version]


def _bytes(text: str) -> bytes:
    """A path as the file system's bytes (a name that is not UTF-8 has surrogate escapes)."""
    return text.encode("utf-8", "surrogateescape")


def _stat_lines(paths: Sequence[str]) -> List[Optional[str]]:
    """Per image "path\0size\0mtime_ns\0ctime_ns" (None for a file that does not exist). The
    change time cannot be set back, so a file rewritten with its old size and modification time
    restored (cp -p, rsync -a, tar) is still seen as changed."""
    out = []
    for p in paths:
        try:
            st = os.stat(p)
            out.append(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}")
        except OSError:
            out.append(None)
    return out


def _list_key(paths: Sequence[str], stats: Sequence[Optional[str]]) -> str:
    h = hashlib.sha256()
    for p, line in zip(paths, stats):
        h.update(_bytes(f"{line}\n" if line is not None else f"{p}\0missing\n"))
    return h.hexdigest()


def images_fingerprint(paths: Sequence[str]) -> str:
    """Identity of an image list: every path with its size, modification and change times, in
    order."""
    return _list_key(paths, _stat_lines(paths))


def image_fingerprints(paths: Sequence[str]) -> List[Optional[str]]:
    """Identity of each image: its absolute path, size, modification and change times, hashed
    (None for a missing file). A row of one cached feature set is reused for another set of the same
    model, weights and preprocessing only when these match."""
    return [None if line is None else
            hashlib.blake2b(_bytes(line), digest_size=12).hexdigest()
            for line in _stat_lines([os.path.abspath(p) for p in paths])]


def _n_shards(n: int, shard_size: int) -> int:
    return (n + shard_size - 1) // shard_size


def _shard_rows(i: int, n: int, shard_size: int) -> range:
    return range(i * shard_size, min(n, (i + 1) * shard_size))


SHARD_FILE = re.compile(r"shard_[0-9]+\.safetensors(\.again)?")
AGAIN = ".again"          # beside a shard: encode it again in the next run


def _shard_path(entry_dir: str, i: int) -> str:
    return os.path.join(entry_dir, f"shard_{i:06d}.safetensors")


class FeatureCache:
    def __init__(self, cache_dir: str, identity: Dict[str, str], paths: Sequence[str],
                 shard_size: Optional[int] = None):
        if shard_size is None:
            shard_size = default_shard_size(len(paths))
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.identity_base = dict(identity)
        # The key is what the features are (model, weights, preprocessing, precision, images),
        # not how they are stored: the shard size lives in the manifest, and a cache written with
        # another shard size (`inmap extract --shard-size`) is found and kept as it is.
        stats = _stat_lines(paths)
        self.identity = dict(identity, images=_list_key(paths, stats), n=str(len(paths)))
        self._paths = list(paths)
        self.reused = 0          # rows the last extraction took from other cached sets
        self.encoded = 0         # images the last extraction encoded (not taken from a cache)
        self.key = hashlib.sha256(json.dumps(self.identity, sort_keys=True).encode()).hexdigest()[:24]
        self.dir = os.path.join(os.path.abspath(cache_dir), self.key)
        self.n = len(paths)
        self.shard_size = shard_size
        self._complete: Dict[int, tuple] = {}   # shard -> (size, mtime, inode) seen whole
        os.makedirs(self.dir, exist_ok=True)
        manifest = os.path.join(self.dir, "manifest.json")
        stored = _read_manifest(manifest, shard_size)
        if stored is not None:
            self.shard_size = stored
        else:
            if os.path.exists(manifest):   # damaged (a crash mid-write): its shards' size is
                for name in os.listdir(self.dir):    # unknown, so they are encoded again
                    if SHARD_FILE.fullmatch(name):
                        os.remove(os.path.join(self.dir, name))
            tmp = manifest + f".tmp{os.getpid()}"
            root = os.path.commonpath([os.path.abspath(p) for p in paths]) if paths else ""
            with open(tmp, "w") as f:
                json.dump(dict(self.identity, shard_size=str(shard_size), root=root,
                               created=time.strftime("%Y-%m-%d %H:%M:%S")), f, indent=1,
                          sort_keys=True)
            os.replace(tmp, manifest)
        self._write_fingerprints()

    # -- per-image reuse across feature sets ----------------------------------------------------
    def _write_fingerprints(self) -> None:
        """FINGERPRINTS: each row's image fingerprint, so that later sets (the folder with a few
        images added or removed) can take this set's rows instead of encoding them again."""
        path = os.path.join(self.dir, FINGERPRINTS)
        if os.path.exists(path):
            return
        tmp = path + f".tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(image_fingerprints(self._paths), f)
        os.replace(tmp, path)

    def _same_features(self, manifest: dict) -> bool:
        return all(manifest.get(k) == v for k, v in self.identity_base.items())

    def reuse_plan(self, rows: Sequence[int]) -> Dict[int, Tuple[str, int]]:
        """For each of ``rows`` whose image (same path, size and modification time) has readable
        features in a complete shard of another cached set with the same model, weights,
        preprocessing and precision: (that shard's file, the row within it)."""
        if not rows:
            return {}
        mine = image_fingerprints([self._paths[r] for r in rows])
        want = {fp: r for fp, r in zip(mine, rows) if fp is not None}
        if not want:
            return {}
        plan: Dict[int, Tuple[str, int]] = {}
        base = os.path.dirname(self.dir)
        for name in sorted(os.listdir(base)) if os.path.isdir(base) else []:
            d = os.path.join(base, name)
            if d == self.dir or not want:
                continue
            try:
                with open(os.path.join(d, "manifest.json")) as f:
                    m = json.load(f)
                if not self._same_features(m):
                    continue
                with open(os.path.join(d, FINGERPRINTS)) as f:
                    theirs = json.load(f)
                shard = max(1, int(m.get("shard_size", MAX_SHARD_SIZE)))
            except (OSError, ValueError, TypeError):
                continue
            for j, fp in enumerate(theirs):
                r = want.get(fp)
                if r is None:
                    continue
                path = _shard_path(d, j // shard)
                if os.path.exists(path):
                    plan[r] = (path, j - (j // shard) * shard)
                    del want[fp]
        return plan

    @staticmethod
    def read_planned(plan_rows: Sequence[Tuple[str, int]], dim: Optional[int] = None
                     ) -> Tuple[torch.Tensor, torch.Tensor]:
        """(features, ok) of planned rows; rows that turn out unreadable in their shard (or a
        shard that went away) come back with ok False, for the caller to encode."""
        from safetensors.torch import load_file

        loaded: Dict[str, Optional[Dict[str, torch.Tensor]]] = {}
        feats, oks = [], []
        for path, j in plan_rows:
            if path not in loaded:
                if len(loaded) > 2:
                    loaded.pop(next(iter(loaded)))
                try:
                    loaded[path] = load_file(path)
                except Exception:  # noqa: BLE001 - removed or damaged meanwhile: encode instead
                    loaded[path] = None
            t = loaded[path]
            good = t is not None and j < t["ok"].shape[0] and bool(t["ok"][j])
            if good:
                dim = t["features"].shape[1]
            feats.append(t["features"][j] if good else None)
            oks.append(good)
        if dim is None:
            return torch.zeros(len(plan_rows), 0), torch.zeros(len(plan_rows), dtype=torch.bool)
        return (torch.stack([f if f is not None else torch.zeros(dim) for f in feats])
                if feats else torch.zeros(0, dim), torch.tensor(oks, dtype=torch.bool))

    @property
    def n_shards(self) -> int:
        return _n_shards(self.n, self.shard_size)

    def shard_rows(self, i: int) -> range:
        return _shard_rows(i, self.n, self.shard_size)

    def shard_path(self, i: int) -> str:
        return _shard_path(self.dir, i)

    def missing_shards(self) -> List[int]:
        """Shards not yet written. A damaged shard file (shorter than its header says: a crash
        or a full disk mid-write) is removed and counts as missing, so it is encoded again.
        A shard's header is read again only when its file changed since it was last seen whole
        (a run asks several times)."""
        missing = []
        for i in range(self.n_shards):
            path = self.shard_path(i)
            try:
                st = os.stat(path)
            except OSError:
                missing.append(i)
                continue
            seen = (st.st_size, st.st_mtime_ns, st.st_ino)
            if self._complete.get(i) == seen:
                continue
            if _complete_safetensors(path):
                self._complete[i] = seen
                continue
            try:
                os.remove(path)
            except OSError:
                pass
            missing.append(i)
        return missing

    def cached_rows(self) -> int:
        """How many images already have their features here."""
        missing = self.missing_shards()
        return self.n - sum(len(self.shard_rows(i)) for i in missing)

    def write_shard(self, i: int, features: torch.Tensor, ok: torch.Tensor,
                    again: bool = False) -> None:
        """Write shard ``i``. ``again``: some of its images failed to read for a passing reason
        (too many open files, an I/O error): the shard serves this run and is marked to be
        encoded again by the next (``encode_again``)."""
        rows = self.shard_rows(i)
        if features.shape[0] != len(rows) or ok.shape[0] != len(rows):
            raise ValueError(f"shard {i} needs {len(rows)} rows, got {features.shape[0]}")
        tmp = self.shard_path(i) + f".tmp{os.getpid()}"
        save_safetensors({"features": features.float().contiguous().cpu(),
                          "index": torch.arange(rows.start, rows.stop, dtype=torch.int64),
                          "ok": ok.to(torch.uint8).cpu()}, tmp)
        mark = self.shard_path(i) + AGAIN
        if again:
            open(mark, "w").close()
        os.replace(tmp, self.shard_path(i))
        if not again and os.path.exists(mark):
            os.remove(mark)

    def encode_again(self) -> List[int]:
        """Shards written with images that failed to read for a passing reason."""
        return [i for i in range(self.n_shards) if os.path.exists(self.shard_path(i) + AGAIN)]

    def _require_complete(self) -> None:
        require_complete(self.dir, self.missing_shards(), self.n_shards)

    def load_ok(self) -> torch.Tensor:
        """The ok mask (N bool) alone: each shard's "ok" tensor is read, not its features."""
        self._require_complete()
        return read_ok_masks([self.shard_path(i) for i in range(self.n_shards)])

    def load(self, rows: Optional[range] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """(features float32, ok bool) of the images ``rows`` (default: all N) in image-list
        order, reading only the shards that hold them; those shards must exist."""
        from safetensors.torch import load_file

        rows = range(self.n) if rows is None else rows
        self._require_complete()
        if self.n == 0:
            return torch.zeros(0, 0), torch.zeros(0, dtype=torch.bool)
        # an empty block still reads one shard: its rows have the features' width
        first = min(rows.start, self.n - 1) // self.shard_size
        last = max(first, (rows.stop - 1) // self.shard_size)
        feats, oks = [], []
        for i in range(first, last + 1):
            t = load_file(self.shard_path(i))
            if not torch.equal(t["index"], torch.arange(self.shard_rows(i).start,
                                                        self.shard_rows(i).stop)):
                raise RuntimeError(f"feature cache shard {self.shard_path(i)} is for other rows")
            feats.append(t["features"])
            oks.append(t["ok"].bool())
        lo = rows.start - first * self.shard_size
        return torch.cat(feats)[lo:lo + len(rows)], torch.cat(oks)[lo:lo + len(rows)]


def require_complete(where: str, missing: Sequence, n_shards: int) -> None:
    """Refuse to read a cache entry whose shards are not all written."""
    if missing:
        raise RuntimeError(f"feature cache {where} is incomplete: {len(missing)} of {n_shards} "
                           "shards missing (run the extraction again)")


def read_ok_masks(paths: Sequence[str]) -> torch.Tensor:
    """The "ok" masks of safetensors shard files, concatenated (their features are not read)."""
    from safetensors import safe_open

    oks = []
    for path in paths:
        with safe_open(path, framework="pt") as f:
            oks.append(f.get_tensor("ok").bool())
    return torch.cat(oks) if oks else torch.zeros(0, dtype=torch.bool)


def _read_manifest(path: str, default: int) -> Optional[int]:
    """The shard size a manifest records (``default`` if it records none); None when there is
    no manifest or it cannot be read."""
    try:
        with open(path) as f:
            return int(json.load(f).get("shard_size", default))
    except (OSError, ValueError, TypeError, AttributeError):
        return None


def _complete_safetensors(path: str) -> bool:
    """The file holds its whole safetensors header and every byte the header points to."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else 0
            if n <= 0 or 8 + n > size:
                return False
            header = json.loads(f.read(n))
    except OSError:          # could not look (too many open files, a network disk): keep it
        return True
    except ValueError:
        return False
    try:
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
        return 8 + n + max(ends, default=0) <= size
    except (TypeError, KeyError, IndexError, AttributeError):
        return False


@dataclass
class CacheEntry:
    """One cached feature set, as ``inmap cache`` lists it."""
    key: str
    path: str
    model: str
    weights: str
    n_images: int
    n_cached: int
    root: str
    created: str
    size_bytes: int

    @property
    def complete(self) -> bool:
        return self.n_cached == self.n_images


def list_entries(cache_dir: Optional[str] = None) -> List[CacheEntry]:
    """Every feature set under ``cache_dir`` (a folder with a manifest), newest first."""
    cache_dir = cache_dir or default_cache_dir()
    if not os.path.isdir(cache_dir):
        return []
    out = []
    for name in sorted(os.listdir(cache_dir)):
        d = os.path.join(cache_dir, name)
        manifest = os.path.join(d, "manifest.json")
        if not os.path.isfile(manifest):
            continue
        try:
            with open(manifest) as f:
                m = json.load(f)
            n, shard = int(m.get("n", 0)), max(1, int(m.get("shard_size", MAX_SHARD_SIZE)))
        except (OSError, ValueError, TypeError):
            m, n, shard = {}, 0, 1
        if m.get("kind") == "webdataset":     # one entry per tar shard (shard_cache.py)
            from .shard_cache import entry_counts

            n = n_cached = entry_counts(d)
        elif m.get("kind") == "embeddings":   # img_emb files joined into one (embeddings.py)
            n_cached = n if os.path.isfile(os.path.join(d, "joined.npy")) else 0
        else:
            n_cached = sum(len(_shard_rows(i, n, shard)) for i in range(_n_shards(n, shard))
                           if os.path.exists(_shard_path(d, i)))
        files = [os.path.join(d, f) for f in os.listdir(d)]
        created = m.get("created") or time.strftime(
            "%Y-%m-%d %H:%M:%S", time.localtime(os.path.getmtime(manifest)))
        out.append(CacheEntry(name, d, m.get("model", "?"), m.get("weights", "?"), n, n_cached,
                              m.get("root", ""), created,
                              sum(os.path.getsize(f) for f in files if os.path.isfile(f))))
    return sorted(out, key=lambda e: e.created, reverse=True)


def clear_cache(cache_dir: Optional[str] = None, key: Optional[str] = None) -> List[CacheEntry]:
    """Delete every cached feature set under ``cache_dir``, or the one whose key starts with
    ``key``; returns what was removed. An unknown or ambiguous key is an error."""
    entries = list_entries(cache_dir)
    if key is not None:
        entries = [e for e in entries if e.key.startswith(key)]
        if len(entries) != 1:
            raise ValueError(f"--clear {key!r} matches {len(entries)} cache entries "
                             f"({', '.join(e.key for e in entries) or 'none'}); `inmap cache` "
                             "lists the keys")
    for e in entries:
        shutil.rmtree(e.path)
    return entries
