"""Precomputed image embeddings as the input of a fit (``inmap fit --features``), instead of
images and an encoder.

Sources: a ``.npy`` file (memory-mapped), a ``.safetensors`` file (its one 2-D tensor, or the
one named ``features`` / ``image_features`` / ``embeddings`` / ``img_emb``; memory-mapped;
ids from a JSON list in its metadata under ``ids`` when present), or a clip-retrieval output
folder: its ``img_emb/*.npy`` in order, ids from ``metadata/*.parquet`` (column ``image_path``,
else ``key``, else ``url``; needs pyarrow, ``pip install 'inmap_ext[parquet]'``) when present.
Rows without ids are numbered from 0. Several ``img_emb`` files are joined once, chunk by chunk,
into one memory-mapped file in the cache (keyed by the files' paths, sizes and modification
times), so that every source is one N x D tensor that ``fit_vision_proxy(x, t, stream=True)``
reads chunk by chunk without loading it whole.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import re
from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np
import torch

from .errors import MissingExtraError

PARQUET_EXTRA = "pip install 'inmap_ext[parquet]'"
TENSOR_NAMES = ("features", "image_features", "embeddings", "img_emb")
ID_COLUMNS = ("image_path", "key", "url")
CHUNK_ROWS = 65536
UNIT_ATOL = 1e-3          # |norm - 1| within this counts as unit (float16 files round to ~5e-4)
_ST_DTYPES = {"F16": np.float16, "F32": np.float32, "F64": np.float64, "BF16": np.uint16}


@dataclass
class Embeddings:
    """N x D image embeddings (memory-mapped where the source allows) and an id per row."""
    features: torch.Tensor
    ids: List[str]
    source: str
    kind: str                   # "npy", "safetensors" or "clip-retrieval"

    def __len__(self) -> int:
        return self.features.shape[0]


@dataclass
class Shape:
    rows: int
    dim: int
    kind: str


def _natural(path: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"([0-9]+)", os.path.basename(path))]


def _retrieval_files(folder: str) -> Tuple[List[str], List[str]]:
    embs = sorted(glob.glob(os.path.join(glob.escape(folder), "img_emb", "*.npy")), key=_natural)
    metas = sorted(glob.glob(os.path.join(glob.escape(folder), "metadata", "*.parquet")),
                   key=_natural)
    return embs, metas


def _npy_shape(path: str) -> Tuple[Tuple[int, ...], np.dtype]:
    with open(path, "rb") as f:
        major, _ = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if major == 1 else \
            np.lib.format.read_array_header_2_0
        shape, _, dtype = read(f)
    return shape, dtype


def _safetensors_tensor(path: str) -> Tuple[str, dict, dict]:
    from .shard_cache import safetensors_header

    try:
        header = safetensors_header(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"--features {path}: not a safetensors file ({e})") from None
    meta = header.pop("__metadata__", None) or {}
    two_d = {k: v for k, v in header.items() if len(v.get("shape", ())) == 2}
    named = [k for k in TENSOR_NAMES if k in two_d]
    if len(two_d) == 1:
        name = next(iter(two_d))
    elif named:
        name = named[0]
    else:
        raise ValueError(f"--features {path}: holds {len(two_d)} 2-D tensors "
                         f"({', '.join(sorted(two_d)) or 'none'}); name the features one of "
                         f"{', '.join(TENSOR_NAMES)}")
    if header[name]["dtype"] not in _ST_DTYPES:
        raise ValueError(f"--features {path}: tensor {name!r} is {header[name]['dtype']}; "
                         "expected F16, BF16, F32 or F64")
    return name, header, meta


def features_shape(path: str) -> Shape:
    """Rows and dimension of a features source, from its headers only (no data read)."""
    if os.path.isdir(path):
        embs, _ = _retrieval_files(path)
        if not embs:
            raise ValueError(f"--features {path}: a folder must be clip-retrieval output, with "
                             "img_emb/*.npy files; found none")
        shapes = [_npy_shape(p)[0] for p in embs]
        bad = [p for p, s in zip(embs, shapes) if len(s) != 2]
        dims = {s[1] for s in shapes if len(s) == 2}
        if bad or len(dims) != 1:
            raise ValueError(f"--features {path}: the img_emb files must all be N x D arrays "
                             f"of one D (shapes: {sorted(set(shapes))[:5]})")
        return Shape(sum(s[0] for s in shapes), dims.pop(), "clip-retrieval")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--features {path}: no such file or folder")
    if path.lower().endswith(".npy"):
        try:
            shape, dtype = _npy_shape(path)
        except (OSError, ValueError) as e:
            raise ValueError(f"--features {path}: not a .npy file ({e})") from None
        if len(shape) != 2:
            raise ValueError(f"--features {path}: expected an N x D array, got shape {shape}")
        if dtype.kind != "f" or dtype.itemsize > 8 or not dtype.isnative:
            raise ValueError(f"--features {path}: expected float16, float32 or float64 rows in "
                             f"this machine's byte order, got {dtype.str} ({dtype})")
        return Shape(shape[0], shape[1], "npy")
    if path.lower().endswith(".safetensors"):
        name, header, _ = _safetensors_tensor(path)
        rows, dim = header[name]["shape"]
        return Shape(rows, dim, "safetensors")
    raise ValueError(f"--features {path}: expected a .npy file, a .safetensors file or a "
                     "clip-retrieval output folder (img_emb/*.npy)")


def _mapped_npy(path: str) -> torch.Tensor:
    # copy-on-write mapping: writable as torch wants it, nothing ever written back
    return torch.from_numpy(np.load(path, mmap_mode="c"))


def _mapped_safetensors(path: str) -> Tuple[torch.Tensor, dict]:
    name, header, meta = _safetensors_tensor(path)
    with open(path, "rb") as f:
        header_size = int.from_bytes(f.read(8), "little")
    info = header[name]
    start, _ = info["data_offsets"]
    rows, dim = info["shape"]
    arr = np.memmap(path, dtype=_ST_DTYPES[info["dtype"]], mode="c",
                    offset=8 + header_size + start, shape=(rows, dim))
    t = torch.from_numpy(arr)
    return (t.view(torch.bfloat16) if info["dtype"] == "BF16" else t), meta


def _parquet_ids(paths: List[str], folder: str) -> List[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise MissingExtraError(f"--features {folder}: reading metadata/*.parquet (the ids) needs "
                         f"pyarrow: {PARQUET_EXTRA} (or pip install pyarrow)") from None
    ids: List[str] = []
    for p in paths:
        names = pq.read_schema(p).names
        col = next((c for c in ID_COLUMNS if c in names), None)
        if col is None:
            raise ValueError(f"--features {folder}: {p} has none of the id columns "
                             f"{', '.join(ID_COLUMNS)} (columns: {', '.join(names[:10])})")
        ids.extend(str(v) for v in pq.read_table(p, columns=[col]).column(col).to_pylist())
    return ids


def _joined(embs: List[str], cache_dir: Optional[str], source: str, rows: int) -> torch.Tensor:
    """Several img_emb files as one memory-mapped N x D array, written once into the cache as an
    entry of its own (``<cache>/emb-KEY/joined.npy`` with a manifest: ``inmap cache`` lists it,
    ``--clear`` removes it), keyed by every file's path, size, modification and change times."""
    if len(embs) == 1:
        return _mapped_npy(embs[0])
    import time

    from .cache import default_cache_dir

    h = hashlib.sha256()
    for p in embs:
        st = os.stat(p)
        h.update(f"{os.path.abspath(p)}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\n"
                 .encode("utf-8", "surrogateescape"))
    folder = os.path.join(cache_dir or default_cache_dir(), "emb-" + h.hexdigest()[:20])
    out = os.path.join(folder, "joined.npy")
    if not os.path.isfile(out):
        os.makedirs(folder, exist_ok=True)
        parts = [np.load(p, mmap_mode="r") for p in embs]
        tmp = out + f".tmp{os.getpid()}.npy"
        joined = np.lib.format.open_memmap(tmp, mode="w+", dtype=parts[0].dtype,
                                           shape=(rows, parts[0].shape[1]))
        row = 0
        for a in parts:
            for s in range(0, len(a), CHUNK_ROWS):
                block = a[s:s + CHUNK_ROWS]
                joined[row:row + len(block)] = block
                row += len(block)
        joined.flush()
        del joined
        os.replace(tmp, out)
    manifest = os.path.join(folder, "manifest.json")
    if not os.path.isfile(manifest):
        tmp = manifest + f".tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump({"kind": "embeddings", "model": "(precomputed embeddings)", "weights": "-",
                       "n": str(rows), "root": os.path.abspath(source),
                       "created": time.strftime("%Y-%m-%d %H:%M:%S")}, f, indent=1,
                      sort_keys=True, ensure_ascii=True)
        os.replace(tmp, manifest)
    return _mapped_npy(out)


def load_features(path: str, *, cache_dir: Optional[str] = None) -> Embeddings:
    """Precomputed image embeddings and their ids (module docstring: the sources). The tensor is
    memory-mapped (copy-on-write: the file is never modified), in the file's dtype, rows as
    stored (``check_rows`` says which are not unit-norm; the fit normalises them)."""
    shape = features_shape(path)
    ids: Optional[List[str]] = None
    if shape.kind == "clip-retrieval":
        embs, metas = _retrieval_files(path)
        x = _joined(embs, cache_dir, path, shape.rows)
        if metas:
            ids = _parquet_ids(metas, path)
            if len(ids) != shape.rows:
                raise ValueError(f"--features {path}: metadata/*.parquet has {len(ids)} rows but "
                                 f"img_emb/*.npy {shape.rows}; they must match row for row")
    elif shape.kind == "npy":
        x = _mapped_npy(path)
    else:
        x, meta = _mapped_safetensors(path)
        if "ids" in meta:
            try:
                ids = json.loads(meta["ids"])
            except ValueError:
                ids = None
            if not isinstance(ids, list):
                raise ValueError(f"--features {path}: metadata 'ids' is not a JSON list") \
                    from None
            ids = [str(v) for v in ids]
            if len(ids) != shape.rows:
                raise ValueError(f"--features {path}: metadata 'ids' has {len(ids)} entries for "
                                 f"{shape.rows} rows")
    if ids is None:
        ids = [str(i) for i in range(shape.rows)]
    return Embeddings(x, ids, os.path.abspath(path), shape.kind)


@dataclass
class RowCheck:
    not_unit: int               # rows whose norm is not 1 (the fit normalises them)


def check_rows(x: torch.Tensor, source: str = "features", chunk: int = CHUNK_ROWS) -> RowCheck:
    """One streamed pass over the rows: rows holding NaN or Inf, or all zeros, are refused
    with their row numbers; rows that are not unit-norm are counted."""
    bad: List[int] = []
    n_bad = not_unit = 0
    for s in range(0, x.shape[0], chunk):
        block = x[s:s + chunk]
        acc = torch.float64 if block.dtype == torch.float64 else torch.float32
        finite = torch.isfinite(block).all(dim=1)
        norms = torch.linalg.vector_norm(block.to(acc), dim=1)
        wrong = ~finite | (norms == 0)
        if bool(wrong.any()):
            rows = (wrong.nonzero().flatten() + s).tolist()
            n_bad += len(rows)
            bad.extend(rows[:max(0, 10 - len(bad))])
        not_unit += int(((norms - 1).abs() > UNIT_ATOL)[~wrong].sum())
    if n_bad:
        more = f" and {n_bad - len(bad)} more" if n_bad > len(bad) else ""
        raise ValueError(f"--features {source}: {n_bad} row(s) are not finite or are all zeros "
                         f"(rows {', '.join(map(str, bad))}{more}); remove or recompute them")
    return RowCheck(not_unit)


def unit_rows(x: torch.Tensor, chunk: int = CHUNK_ROWS) -> torch.Tensor:
    """A float32 copy of ``x`` with unit rows, made chunk by chunk."""
    out = torch.empty(x.shape, dtype=torch.float32)
    for s in range(0, x.shape[0], chunk):
        out[s:s + chunk] = torch.nn.functional.normalize(x[s:s + chunk].float(), dim=1)
    return out
