"""webdataset tar shards as an image source.

``--images`` names shards as a brace pattern (``shards/{00000..00099}.tar``), a .tar file, a
folder holding .tar files (and no images), or a text file listing shard paths. The shards are
read with the webdataset library (``pip install 'inmap_ext[wds]'``): a sample is the tar members
sharing a key (the member's path up to the first dot of its base name); its image is its first
member named by ``image_keys`` (jpg, jpeg, png, webp by default). A sample without an image
member, or whose image cannot be decoded, is skipped and listed like a corrupt file.

DataLoader workers split the shards among themselves (worker w reads shards w, w + workers,
...); each shard's features go into the shard cache (shard_cache.py) as soon as its last
sample is encoded, so an interrupted extraction resumes shard by shard.
"""
from __future__ import annotations

import io
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .errors import MissingExtraError
from .data import IMAGE_EXTENSIONS, PASSING, READ, _walk, read_lines, read_status
from .shard_cache import ShardCache

DEFAULT_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
NO_IMAGE = -2            # a sample without an image member (a read status, beside data.py's)
WDS_EXTRA = "pip install 'inmap_ext[wds]'"


def webdataset():
    try:
        import webdataset as wds
    except ImportError:
        raise MissingExtraError(f"reading tar shards needs the webdataset library: {WDS_EXTRA} "
                                "(or pip install webdataset)") from None
    return wds


def is_shard(path: str) -> bool:
    return path.lower().endswith(".tar")


@dataclass
class ShardSet:
    """Tar shards, in order (absolute paths), and where they were named."""
    shards: List[str]
    source: str
    image_keys: Tuple[str, ...] = DEFAULT_IMAGE_KEYS
    is_list: bool = False
    missing: List[str] = field(default_factory=list)   # named but not on disk: skipped
    labels = None                    # shards carry no folder labels
    ignored: List[str] = field(default_factory=list)
    folder_to_class: Dict[str, int] = field(default_factory=dict)
    note: str = ""

    @property
    def root(self) -> str:
        return self.source

    def __len__(self) -> int:
        return len(self.shards)

    def describe(self) -> str:
        how = "listed in" if self.is_list else "from"
        return f"in {len(self.shards)} tar shard(s) {how} {self.source}"


def _brace(pattern: str) -> bool:
    return "{" in pattern and "}" in pattern and not os.path.exists(pattern)


def list_shards(images: str, image_keys: Sequence[str] = DEFAULT_IMAGE_KEYS
                ) -> Optional[ShardSet]:
    """The shards ``images`` names, or None when it names images (a folder of images, a list of
    image paths): the caller lists those (data.list_images)."""
    keys = tuple(image_keys)
    if _brace(images):
        webdataset()
        import braceexpand   # webdataset's own dependency
        paths = [os.path.abspath(p) for p in braceexpand.braceexpand(images)]
        return _checked(ShardSet(paths, images, keys), images)
    if os.path.isfile(images) and is_shard(images):
        webdataset()
        return ShardSet([os.path.abspath(images)], os.path.abspath(images), keys)
    if os.path.isdir(images):
        tars = sorted(os.path.join(images, f) for f in os.listdir(images)   # .tar, .TAR, ...
                      if is_shard(f) and os.path.isfile(os.path.join(images, f)))
        if not tars or _walk(os.path.abspath(images)):
            return None          # a folder of images (any .tar files beside them are not read)
        webdataset()
        return ShardSet([os.path.abspath(t) for t in tars], os.path.abspath(images), keys)
    if os.path.isfile(images) and images.lower().endswith(IMAGE_EXTENSIONS):
        return None              # one image, not a list
    if os.path.isfile(images):
        lines = [ln.strip() for ln in read_lines(images, "--images")]
        lines = [ln for ln in lines if ln and not ln.startswith("#")]
        shards = [ln for ln in lines if is_shard(ln)]
        if not shards:
            return None
        if len(shards) != len(lines):
            other = next(ln for ln in lines if not is_shard(ln))
            raise ValueError(f"--images {images}: lists tar shards and other files ({other!r}); "
                             "a list names either images or .tar shards")
        webdataset()
        base = os.path.dirname(os.path.abspath(images))
        paths = [os.path.abspath(p if os.path.isabs(p) else os.path.join(base, p))
                 for p in shards]
        if len(set(paths)) != len(paths):
            twice = next(p for p in paths if paths.count(p) > 1)
            raise ValueError(f"--images {images}: {twice} is listed twice; list each shard once")
        return _checked(ShardSet(paths, os.path.abspath(images), keys, is_list=True), images)
    return None


def _checked(s: ShardSet, images: str) -> ShardSet:
    s.missing = [p for p in s.shards if not os.path.isfile(p)]
    if len(s.missing) == len(s.shards):
        raise FileNotFoundError(f"--images {images!r}: none of the {len(s.shards)} shards "
                                f"exists (first: {s.shards[0]!r})")
    s.shards = [p for p in s.shards if p not in set(s.missing)]
    return s


# -- reading ------------------------------------------------------------------------------------
class ShardBatches(torch.utils.data.IterableDataset):
    """Batches of preprocessed images from tar shards, for a DataLoader with ``batch_size=None``.
    Worker w reads shards w, w + workers, ... in order. A batch is a dict: ``x`` (images),
    ``shard`` and ``status`` (per image), ``key`` (the sample keys) and ``done``: the shards whose
    last sample is in this batch or an earlier one of this worker, each as (shard, error,
    passing): error "" when the whole tar was read; passing when a read failed for a passing
    reason (an I/O error, too many open files: data.PASSING_ERRNOS)."""

    def __init__(self, shards: Sequence[Tuple[int, str]], preprocess, image_keys: Sequence[str],
                 batch_size: int):
        self.shards = list(shards)
        self.preprocess = preprocess
        self.image_keys = tuple(image_keys)
        self.batch_size = batch_size
        self._blank = None

    def _image(self, sample: dict) -> Tuple[Optional[torch.Tensor], int]:
        from PIL import Image

        data = next((sample[k] for k in self.image_keys if k in sample), None)
        if data is None:
            return None, NO_IMAGE
        try:
            with Image.open(io.BytesIO(data)) as im:
                return self.preprocess(im.convert("RGB")), READ
        except Exception as e:  # noqa: BLE001 - undecodable: listed by the caller
            return None, read_status(e)

    def _batch(self, items: list, done: list) -> dict:
        if self._blank is None and any(x is None for x, *_ in items):
            from PIL import Image

            self._blank = torch.zeros_like(self.preprocess(Image.new("RGB", (8, 8))))
        xs = [x if x is not None else self._blank for x, *_ in items]
        return {"x": torch.stack(xs) if xs else torch.zeros(0),
                "shard": torch.tensor([s for _, s, _, _ in items], dtype=torch.int64),
                "key": [k for _, _, k, _ in items],
                "status": torch.tensor([st for *_, st in items], dtype=torch.int64),
                "done": list(done)}

    def __iter__(self):
        wds = webdataset()
        info = torch.utils.data.get_worker_info()
        mine = self.shards if info is None else self.shards[info.id::info.num_workers]
        items, done = [], []
        for i, path in mine:
            errors: List[BaseException] = []

            def handler(e, errors=errors):
                errors.append(e)
                return True            # go on with the next member / stop this shard cleanly

            for sample in wds.tariterators.tarfile_samples([{"url": path}], handler=handler):
                x, status = self._image(sample)
                items.append((x, i, sample["__key__"], status))
                if len(items) == self.batch_size:
                    yield self._batch(items, done)
                    items, done = [], []
            passing = any(read_status(e) == PASSING for e in errors)
            done.append((i, "; ".join(f"{type(e).__name__}: {e.args[0] if e.args else e}"
                                      for e in errors[:3]), passing))
            if not items:          # say so now: the shard is written without waiting for
                yield self._batch(items, done)    # the next batch
                done = []
        if items:
            yield self._batch(items, done)


# -- extraction ---------------------------------------------------------------------------------
@torch.no_grad()
def shard_features(clip, shard_set: ShardSet, *, cache_dir: Optional[str] = None,
                   use_cache: bool = True, batch_size: int = 64, workers: int = 4,
                   progress: bool = True, shard_filter: Optional[Callable[[int], bool]] = None,
                   log: Optional[Callable[..., None]] = None, wait_s: float = 0.5,
                   shard_size: Optional[int] = None
                   ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], ShardCache]:
    """Features of every sample of the shards (clip.image_features for tar shards): (N x D,
    ok N bool, cache); the keys are ``cache.keys()``. Cached shards are read back; the others are
    encoded by this process, except those another process is encoding (their lock is held):
    this one waits for them (and encodes one itself if its holder dies). ``shard_filter``:
    the shards this process may encode (torchrun ranks); it then returns (None, None, cache)
    while other shards are missing. ``shard_size`` (image folders' cache unit) has no use here:
    each tar shard is its own unit of resumption."""
    from .cache import default_cache_dir

    identity = {"model": clip.name, "weights": clip.weights_id,
                "preprocess": repr(clip.preprocess), "precision": clip.precision,
                "image_keys": ",".join(shard_set.image_keys)}
    cache = ShardCache(cache_dir or default_cache_dir(), identity, shard_set.shards,
                       shard_set.source)
    cache.encoded = 0
    todo = cache.to_encode() if use_cache else list(range(cache.n_shards))
    if log is not None and use_cache and len(todo) < cache.n_shards:
        done = cache.n_shards - len(todo)
        log("resume" if todo else "cached",
            f"resuming: {done}/{cache.n_shards} shards cached in {cache.dir}" if todo else
            f"features: all {cache.n_shards} shards cached in {cache.dir}",
            cached_shards=done, shards=cache.n_shards, cache=cache.dir)
    if shard_filter is not None:
        todo = [i for i in todo if shard_filter(i)]
    bar = None
    if progress and todo:
        from tqdm.auto import tqdm

        bar = tqdm(desc="image features", unit="img")
    try:
        waiting = list(todo)
        told = False
        while waiting:
            mine, held = [], []
            for i in waiting:
                if not cache.claim(i):
                    held.append(i)
                elif use_cache and cache.has(i) and not cache.marked_again(i):   # written meanwhile
                    cache.release(i)
                else:
                    mine.append(i)
            if mine:
                _encode(clip, shard_set, cache, mine, batch_size, workers, bar)
                use_cache = True       # --no-cache: encoded once now; the rest is this run's
            waiting = [i for i in held if not cache.has(i)]
            if waiting:
                if log is not None and not told:
                    log("waiting", f"waiting for {len(waiting)} shard(s) another process is "
                        f"encoding into {cache.dir}", shards=len(waiting), cache=cache.dir)
                    told = True
                time.sleep(wait_s)
    finally:
        cache.release_all()
        if bar is not None:
            bar.close()
    if cache.missing_shards():
        return None, None, cache
    feats, ok = cache.load()
    return feats, ok, cache


def _encode(clip, shard_set: ShardSet, cache: ShardCache, todo: List[int], batch_size: int,
            workers: int, bar) -> None:
    """Encode the claimed shards ``todo`` through one DataLoader; each shard is written (and its
    lock released) as soon as its last sample is encoded."""
    ds = ShardBatches([(i, shard_set.shards[i]) for i in todo], clip.preprocess,
                      shard_set.image_keys, batch_size)
    loader = torch.utils.data.DataLoader(ds, batch_size=None,
                                         num_workers=min(workers, len(todo)),
                                         pin_memory=clip.device.type == "cuda")
    rows: Dict[int, list] = {i: [] for i in todo}      # shard -> [(features, ok, key)]
    dim = None
    for batch in loader:
        x, status = batch["x"], batch["status"]
        if len(status):
            with clip.autocast():
                f = clip.model.encode_image(x.to(clip.device, non_blocking=True), normalize=True)
            read = status == READ
            f = (f.float() * read.to(f.device)[:, None]).cpu()
            dim = f.shape[1]
            for fr, s, k, st in zip(f, batch["shard"].tolist(), batch["key"], status.tolist()):
                rows[s].append((fr, st, k))
            cache.encoded += len(status)
            if bar is not None:
                bar.update(len(status))
        for i, error, passing in batch["done"]:
            got = rows.pop(i)
            if dim is None:
                dim = _embed_dim(clip)
            feats = torch.stack([f for f, _, _ in got]) if got else torch.zeros(0, dim)
            ok = torch.tensor([st == READ for _, st, _ in got], dtype=torch.bool)
            # a read that failed for a passing reason: the entry serves this run and is
            # encoded again by the next
            again = passing or any(st == PASSING for _, st, _ in got)
            cache.write(i, feats, ok, [k for *_, k in got], error, again=again)


def _embed_dim(clip) -> int:
    from PIL import Image

    x = clip.preprocess(Image.new("RGB", (8, 8)))[None]
    return int(clip.model.encode_image(x.to(clip.device)).shape[1])
