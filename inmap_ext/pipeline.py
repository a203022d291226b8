"""The image-folder workflows behind the `inmap` command: images -> features (clip, data, cache)
-> fit (fit.py) -> proxy file, report and predictions. Each function takes plain arguments, so
it is usable from Python as well as from the CLI."""
from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import platform
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from . import clip as clip_mod
from .data import ImageSet, list_images, norm_name
from .shards import DEFAULT_IMAGE_KEYS, ShardSet, list_shards
from .fit import fit_vision_proxy
from .memory import available_bytes
from .result import VisionProxyResult, load_vision_proxy
from .version import __version__


class Log:
    """Messages for people (text on stderr), for scripts (one JSON object per line on stderr),
    or nothing (quiet). Progress bars only in text mode."""

    def __init__(self, mode: str = "text"):
        if mode not in ("text", "json", "quiet"):
            raise ValueError(f"log mode must be text, json or quiet, got {mode!r}")
        self.mode = mode

    @property
    def progress(self) -> bool:
        return self.mode == "text"

    @contextlib.contextmanager
    def routing_third_party(self):
        """Within the block, Python warnings and library log records (open_clip's
        ``WARNING:root:`` lines, torch's warnings) go through this Log: JSON lines in json mode,
        nothing in quiet mode, "warning: ..." lines in text mode."""
        log = self

        class Handler(logging.Handler):
            def emit(self, record):
                msg = record.getMessage()
                if record.name == "py.warnings":  # "file:line: Category: message\n  code"
                    msg = msg.strip().splitlines()[0].split(": ", 1)[-1]
                log("warning", f"{record.levelname.lower()}: {msg}", source=record.name,
                    level=record.levelname, text=msg)

        root = logging.getLogger()
        handlers, level = root.handlers[:], root.level
        root.handlers = [Handler(logging.WARNING)]
        root.setLevel(logging.WARNING)
        logging.captureWarnings(True)
        try:
            yield
        finally:
            logging.captureWarnings(False)
            root.handlers = handlers
            root.setLevel(level)

    def __call__(self, event: str, message: str = "", **fields) -> None:
        if self.mode == "json":
            print(json.dumps({"event": event, **fields}, default=str), file=sys.stderr,
                  flush=True)
        elif self.mode == "text" and message:
            print(message, file=sys.stderr, flush=True)


def versions() -> Dict[str, str]:
    out = {"inmap_ext": __version__, "torch": torch.__version__, "python": platform.python_version()}
    try:
        import open_clip

        out["open_clip"] = open_clip.__version__
    except ImportError:
        pass
    return out


def classification_metrics(indices: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict:
    """acc1, acc5 and mean per-class recall, as CLIP_benchmark reports them; acc5 only when
    there are more than 5 classes (with 5 or fewer it is 1 by definition)."""
    labels = labels.to(indices.device)
    hit1 = indices[:, 0] == labels
    present = torch.bincount(labels, minlength=num_classes) > 0
    recall = torch.zeros(num_classes, dtype=torch.float64)
    recall.index_add_(0, labels.cpu(), hit1.double().cpu())
    recall = recall[present.cpu()] / torch.bincount(labels.cpu(), minlength=num_classes)[present.cpu()]
    out = {"acc1": hit1.double().mean().item()}
    if num_classes > 5 and indices.shape[1] >= 5:
        out["acc5"] = (indices[:, :5] == labels[:, None]).any(dim=1).double().mean().item()
    out["mean_per_class_recall"] = recall.mean().item()
    return out


def write_predictions(path: str, paths: Sequence[str], classnames: Sequence[str],
                      inmap: Tuple[torch.Tensor, torch.Tensor],
                      zero_shot: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                      labels: Optional[Sequence[int]] = None, id_column: str = "path") -> None:
    """CSV, one row per readable image: path (``id_column``: "id" for tar samples and
    precomputed features), [label,] inmap_class_1, inmap_cosine_1, ...
    inmap_class_k, inmap_cosine_k (the InMaP vision proxy's top k, classes by name, cosines),
    then zero_shot_class_1, zero_shot_cosine_1 ... for the zero-shot (text proxy) classifier's
    top classes when given, for comparison."""
    columns = [("inmap", *inmap)] + ([("zero_shot", *zero_shot)] if zero_shot is not None else [])
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    # a file name that is not UTF-8 is written as its own bytes (surrogate escapes)
    with open(path, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
        w = csv.writer(f)
        head = [id_column] + (["label"] if labels is not None else [])
        for name, _, idx in columns:
            for j in range(1, idx.shape[1] + 1):
                head += [f"{name}_class_{j}", f"{name}_cosine_{j}"]
        w.writerow(head)
        lists = [(v.tolist(), i.tolist()) for _, v, i in columns]
        for r, p in enumerate(paths):
            row = [p] + ([classnames[labels[r]]] if labels is not None else [])
            for vals, idx in lists:
                for j in range(len(idx[r])):
                    row += [classnames[idx[r][j]], f"{vals[r][j]:.6f}"]
            w.writerow(row)


def list_source(images: str, classnames: Optional[Sequence[str]] = None, labels: str = "auto",
                folder_map: Optional[Dict[str, str]] = None,
                image_keys: Sequence[str] = DEFAULT_IMAGE_KEYS) -> "ImageSet | ShardSet":
    """What ``--images`` names: tar shards (shards.list_shards) or images (data.list_images)."""
    shards = list_shards(images, image_keys)
    if shards is None:
        return list_images(images, classnames, labels, folder_map)
    if labels == "folder":
        raise ValueError(f"--images {images}: tar shards carry no folder labels (--labels folder "
                         "and `inmap eval` need an image folder with one folder per class)")
    return shards


def _log_images(image_set: "ImageSet | ShardSet", log: "Log",
                num_classes: Optional[int] = None) -> None:
    """What was found where; loose files left out beside the class folders; why the images are
    unlabeled when class folders were found."""
    labeled = image_set.labels is not None
    classes = f"; classes: {num_classes}" if num_classes is not None else ""
    count = "" if isinstance(image_set, ShardSet) else f"{len(image_set)} "
    log("images", f"images: {count}{image_set.describe()} "
        f"({'labeled by folder' if labeled else 'unlabeled'}){classes}", n=len(image_set),
        labeled=labeled, images=image_set.source or image_set.root)
    if image_set.ignored:
        log("warning", f"warning: {len(image_set.ignored)} file(s) at the top level of "
            f"{image_set.root}, outside the class folders, are left out: "
            f"{_some(image_set.ignored)}", ignored=image_set.ignored)
    if getattr(image_set, "repeated", None):
        log("warning", f"warning: {len(image_set.repeated)} image file(s) under "
            f"{image_set.root} are the same file as another image there (a link between "
            f"them), and are left out so that no image counts twice: "
            f"{_some(image_set.repeated)}", repeated=image_set.repeated)
    if image_set.note:
        log("warning", f"warning: unlabeled: {image_set.note}", note=image_set.note)


def _now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _log_missing(images: ImageSet, log: "Log") -> None:
    """Paths of a file list that do not exist: named now, skipped at extraction."""
    if images.missing:
        what = "shards" if isinstance(images, ShardSet) else "images"
        n = len(images) + (len(images.missing) if isinstance(images, ShardSet) else 0)
        log("missing", f"warning: {len(images.missing)} of the {n} listed {what} do "
            f"not exist and will be skipped: {_some(images.missing)}",
            missing=images.missing, n=len(images))


def _some(paths: Sequence[str], k: int = 5) -> str:
    shown = ", ".join(paths[:k])
    return shown + (f" and {len(paths) - k} more" if len(paths) > k else "")


@dataclass
class Features:
    """Image features of an image set, the readable images only, and what was skipped."""
    images: ImageSet
    features: torch.Tensor          # n_ok x D (or the rows ``rows`` of them)
    keep: torch.Tensor              # N bool
    skipped: List[str] = field(default_factory=list)
    rows: Optional[range] = None    # which readable rows ``features`` holds (None: all)
    stats: dict = field(default_factory=dict)   # how they were had: counts, seconds, images/s
    mapped: bool = False            # ``features`` is a memory-mapped file (stream it)
    id_column: str = "path"         # what predictions.csv calls ``paths``: path, or id

    @property
    def paths(self) -> List[str]:
        return [p for p, k in zip(self.images.paths, self.keep.tolist()) if k]

    @property
    def labels(self) -> Optional[torch.Tensor]:
        if self.images.labels is None:
            return None
        return torch.tensor(self.images.labels)[self.keep]


def extract(clip: "clip_mod.ClipModel", images: ImageSet, log: Log, group=None,
            rank_rows_only: bool = False, **kw) -> Features:
    """Features of every image (from the cache where present). Under torchrun (``group``), rank
    r extracts cache shards r, r + world, ... into the shared cache; after a barrier every rank
    reads the set back in the original order: all of it, or with ``rank_rows_only`` (ranks
    other than 0) only its block of the readable rows (``distributed.shard_rows``), so that
    host memory per rank is N / world x D. ``images`` may be tar shards (ShardSet): the
    Features then list the samples' keys as their paths."""
    t0 = time.perf_counter()
    rows = None
    features_of = clip_mod.image_features
    if isinstance(images, ShardSet):
        from .shards import shard_features as features_of
    if group is not None:
        import torch.distributed as dist

        from .distributed import rank_and_world, shard_rows

        rank, world = rank_and_world(group)
        _, _, cache = features_of(clip, images, progress=log.progress and rank == 0,
                                              shard_filter=lambda i: i % world == rank,
                                              log=log if rank == 0 else None, **kw)
        dist.barrier(group)   # every rank's shards are now in `cache`
        kw = dict(kw, use_cache=True)
        if rank_rows_only:
            ok = cache.load_ok()
            readable = torch.nonzero(ok).flatten()
            rows = shard_rows(len(readable), rank, world)
            span = range(0, 0) if not len(rows) else \
                range(int(readable[rows.start]), int(readable[rows.stop - 1]) + 1)
            block, block_ok = cache.load(span)
            feats = block[block_ok]
    if rows is None:
        feats, ok, cache = features_of(
            clip, images, progress=log.progress, log=log if group is None else None, **kw)
    missing = []
    is_shards = isinstance(images, ShardSet)
    if is_shards:
        missing = images.missing
        for shard, error in cache.errors():
            log("warning", f"warning: {shard} could not be read to its end ({error}); its "
                "samples before the damage are used", shard=shard, error=error)
        images = ImageSet(images.source, cache.keys(), source=images.source,
                          is_list=images.is_list)
    skipped = [p for p, o in zip(images.paths, ok.tolist()) if not o] + missing
    what = f"{len(skipped)} unreadable, skipped: {_some(skipped)}" if skipped else "none skipped"
    seconds = time.perf_counter() - t0
    encoded = cache.encoded
    rate = encoded / seconds if encoded and seconds > 0 else None
    shown = f", {encoded} encoded at {rate:.1f} images/s" if rate else ""
    log("features", f"features: {int(ok.sum())} images ({what}) in {seconds:.1f}s{shown}; "
        f"cache {cache.dir}", n=int(ok.sum()), skipped=len(skipped), skipped_paths=skipped,
        cache=cache.dir, reused=cache.reused, encoded=encoded, seconds=seconds,
        images_per_s=rate)
    if not bool(ok.any()):
        raise ValueError(f"none of the {len(images)} images could be read")
    stats = {"n": len(images), "readable": int(ok.sum()), "encoded": encoded,
             "seconds": seconds, "images_per_s": rate, "cache": cache.dir}
    return Features(images, feats if rows is not None else feats[ok], ok, skipped, rows, stats,
                    id_column="id" if is_shards else "path")


# -- precomputed features (--features) ------------------------------------------------------
FEATURES_IN_MEMORY_BYTES = 2 << 30   # larger --features files stay memory-mapped and stream


def _one_source(images: Optional[str], features: Optional[str]) -> None:
    if (images is None) == (features is None):
        raise ValueError("give the images (--images) or precomputed features (--features), "
                         "one of them")


def _check_features_dim(path: str, dim: Optional[int], against: str) -> None:
    """Features whose dimension is not ``dim`` (the text model's, the proxy's): an input error
    naming both, from the file's header, before any work."""
    from .embeddings import features_shape

    shape = features_shape(path)
    if dim is not None and shape.dim != dim:
        raise ValueError(f"--features {path}: rows of dimension {shape.dim}, but {against} has "
                         f"dimension {dim}")


def features_from_file(path: str, log: Log, cache_dir: Optional[str] = None) -> Features:
    """``--features``: the embeddings (embeddings.load_features), checked in one streamed pass
    (non-finite rows refused with their row numbers; rows that are not unit-norm normalised,
    and said so). Up to FEATURES_IN_MEMORY_BYTES they are read into memory as float32 unit
    rows; larger ones stay memory-mapped (``Features.mapped``: the fit streams them)."""
    from .embeddings import check_rows, load_features, unit_rows

    t0 = time.perf_counter()
    emb = load_features(path, cache_dir=cache_dir)
    x = emb.features
    rows = check_rows(x, path)
    log("features", f"features: {x.shape[0]} x {x.shape[1]} ({str(x.dtype)[6:]}, {emb.kind}) "
        f"from {emb.source}", n=x.shape[0], dim=x.shape[1], kind=emb.kind, source=emb.source)
    if rows.not_unit:
        log("normalised", f"features: {rows.not_unit} of {x.shape[0]} rows were not unit-norm "
            "and are normalised", not_unit=rows.not_unit, n=x.shape[0])
    mapped = x.shape[0] * x.shape[1] * 4 > FEATURES_IN_MEMORY_BYTES
    if not mapped:
        x = unit_rows(x)
    images = ImageSet(emb.source, emb.ids, source=emb.source)
    stats = {"n": x.shape[0], "readable": x.shape[0], "source": emb.source, "kind": emb.kind,
             "dim": x.shape[1], "normalised_rows": rows.not_unit, "memory_mapped": mapped,
             "seconds": time.perf_counter() - t0}
    return Features(images, x, torch.ones(x.shape[0], dtype=torch.bool), [], None, stats,
                    mapped=mapped, id_column="id")


def _chunked(topk, x: torch.Tensor, k: int, device, mapped: bool
             ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``topk(x, k)`` (a VisionProxyResult method); a memory-mapped ``x`` goes through in chunks
    of unit rows on ``device``, never copied whole."""
    if not mapped:
        return topk(x, k)
    from .embeddings import CHUNK_ROWS

    parts = [topk(torch.nn.functional.normalize(x[s:s + CHUNK_ROWS].float(), dim=1)
                  .to(device), k) for s in range(0, x.shape[0], CHUNK_ROWS)]
    return torch.cat([v for v, _ in parts]), torch.cat([i for _, i in parts])


def fit_images(*, model: str, pretrained: Optional[str], images: Optional[str] = None,
               classes: str, out: str, templates: str = "simple", prompts: Optional[str] = None,
               labels: str = "auto", device: str = "cpu", model_precision: str = "fp32",
               batch_size: int = 64, workers: int = 4, cache_dir: Optional[str] = None,
               use_cache: bool = True, topk: int = 5, log: Optional[Log] = None,
               command: Optional[str] = None, features: Optional[str] = None,
               image_keys: Sequence[str] = DEFAULT_IMAGE_KEYS, labeled: Optional[str] = None,
               **hyper) -> dict:
    """``inmap fit``: writes out/proxy.safetensors, out/report.json, out/predictions.csv and
    returns the report (``command``: the command line, recorded in it). The image features
    come from ``images`` (a folder, a file list or tar shards, encoded by ``model``) or from
    ``features`` (precomputed embeddings: embeddings.py; ``model`` then gives the text side)."""
    _one_source(images, features)
    log = log or Log()
    started = _now_iso()
    group = _group(device)
    rank = 0 if group is None else torch.distributed.get_rank(group)
    if rank != 0:
        log = Log("quiet")
    timings = {}
    t0 = time.perf_counter()
    spec = clip_mod.load_classnames(classes)
    tmpl = clip_mod.load_templates(templates)
    per_class = clip_mod.load_prompts(prompts, spec.names, spec.text_names) if prompts else None
    prior_file = _class_prior_file(hyper)
    hyper = _class_prior_option(hyper, spec, log)
    if labeled is not None:
        cp = hyper.get("class_prior")
        if hyper.get("mode") == "paper" or not (cp is None or cp == "auto"):
            raise ValueError("--labeled settles the default class prior (auto); drop "
                             "--class-prior / --mode paper, or drop --labeled")
        if not os.path.exists(labeled):
            raise ValueError(f"--labeled {labeled}: no such file or folder")
    coverage = None
    if features is not None:            # read and checked before the model loads
        _check_features_dim(features, clip_mod.embed_dim(model), f"--model {model}'s text side")
        t_read = time.perf_counter()
        feats = features_from_file(features, log, cache_dir)
        image_set = feats.images
        timings["features_s"] = time.perf_counter() - t_read
        t0 += timings["features_s"]
    else:
        image_set = list_source(images, spec.names, labels, spec.folder_map, image_keys)
        _imagenet_folders_note(spec, image_set, log)
        _log_images(image_set, log, len(spec.names))
        _log_missing(image_set, log)
        coverage = _label_coverage(image_set, spec.names, log)
    labeled_pairs = None
    if labeled is not None:             # class names and images checked before any encoding
        roots = ([os.path.dirname(image_set.source) if image_set.is_list else image_set.source]
                 if isinstance(image_set, ImageSet) and features is None else [])
        labeled_pairs = parse_labeled(labeled, spec.names, spec.folder_map, roots)
        if isinstance(image_set, ImageSet):      # shards: their ids are known once read
            match_labeled(labeled_pairs, image_set.paths, labeled)
    clip = clip_mod.load_model(model, pretrained, device, model_precision, cache_dir=cache_dir)
    timings["load_model_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    text = clip_mod.text_proxies(clip, spec.names if per_class else spec.prompt_names, tmpl,
                                 per_class, progress=log.progress)   # per_class: keyed by names
    timings["text_proxies_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    if features is not None:
        _check_features_dim(features, text.shape[0], f"--model {model}'s text side")
    else:
        feats = extract(clip, image_set, log, group=group, rank_rows_only=rank != 0,
                        cache_dir=cache_dir, use_cache=use_cache, batch_size=batch_size,
                        workers=workers)
        timings["features_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    x = feats.features
    if group is not None and feats.rows is None:
        # sharded fit: this rank's block of rows (rank 0 keeps every row for the predictions)
        from .distributed import rank_and_world, shard_rows

        rows = shard_rows(x.shape[0], *rank_and_world(group))
        x = x[rows.start:rows.stop]
    if labeled is not None:
        ids = feats.paths                # the rows of the features, in order
        lab = match_labeled(labeled_pairs, ids, labeled, feats.skipped)
        log("labeled", f"labeled images: {len(lab[0])} of {len(ids)} ({len(set(lab[1].tolist()))}"
            f" classes) from {labeled}; they choose the class prior (no label enters the fit)",
            labeled=len(lab[0]))
        if group is not None and feats.rows is None:     # this rank's rows, renumbered
            keep = (lab[0] >= rows.start) & (lab[0] < rows.stop)
            lab = (lab[0][keep] - rows.start, lab[1][keep])
        hyper = dict(hyper, labeled=lab)
    if feats.mapped:        # a memory-mapped file: streamed chunk by chunk, never copied whole
        log("stream", f"features ({x.numel() * x.element_size() / 2**30:.1f} GiB) stay "
            f"memory-mapped and are streamed to {clip.device}", device=str(clip.device))
        hyper = dict(hyper, device=clip.device, stream=True)
    elif _fits_on_device(x, clip.device):
        x = x.to(clip.device)
    else:                   # larger than half the free device memory: stream it (out-of-core)
        log("stream", f"features ({x.numel() * x.element_size() / 2**30:.1f} GiB) stay in host "
            f"memory and are streamed to {clip.device}", device=str(clip.device))
        hyper = dict(hyper, device=clip.device)
    res = fit_vision_proxy(x, text.to(clip.device), progress=log.progress, process_group=group,
                           **hyper)
    if rank != 0:
        return {}
    if group is not None or x.device != clip.device:   # predictions for every image (rank 0)
        x = feats.features
        if _fits_on_device(x, clip.device) and not feats.mapped:
            x = x.to(clip.device)
    timings["fit_s"] = time.perf_counter() - t0
    by_phase = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in res.passes.items()
                         if k != "total" and v)
    log("fit", f"fit: {res.passes['total']} passes over the features ({by_phase}) on the "
        f"{res.backend} backend in {timings['fit_s']:.2f}s; {res.hyper['solver']}: "
        f"{res.stop_reason}", n_iters=res.n_iters, passes=res.passes, backend=res.backend,
        seconds=timings["fit_s"], how_it_ended=res.stop_reason)
    _log_class_prior(res, log)

    t0 = time.perf_counter()
    k, k_metrics = min(topk, len(spec.names)), min(5, len(spec.names))
    # the CSV's k; acc5 whatever --topk is
    vals, idx = _chunked(res.topk, x, max(k, k_metrics), clip.device, feats.mapped)
    zs_vals, zs_idx = _chunked(res.zero_shot_topk, x, k_metrics, clip.device, feats.mapped)
    timings["predict_s"] = time.perf_counter() - t0

    os.makedirs(out, exist_ok=True)
    weights = clip_mod.weights_name(pretrained)
    meta = {"model": model, "pretrained": weights, "weights_id": clip.weights_id,
            "classnames": json.dumps(spec.names),
            "templates": json.dumps(clip_mod.template_strings(tmpl) if per_class is None
                                    else "per-class prompts: " + os.path.abspath(prompts)),
            "versions": json.dumps(versions())}
    res.save(os.path.join(out, "proxy.safetensors"), metadata=meta)
    lab = feats.labels
    write_predictions(os.path.join(out, "predictions.csv"), feats.paths, spec.names,
                      (vals[:, :k], idx[:, :k]),
                      (zs_vals[:, :1], zs_idx[:, :1]), lab.tolist() if lab is not None else None,
                      id_column=feats.id_column)
    counts = res.class_counts.tolist()
    report = {
        "command": command, "timestamp": started, "finished": _now_iso(),
        "model": model, "pretrained": weights, "weights_id": clip.weights_id,
        "model_precision": model_precision, "device": str(clip.device),
        "images": image_set.source or image_set.root, "n_images": len(feats.images),
        "n_used": int(feats.keep.sum()), "features": feats.stats,
        "n_skipped": len(feats.skipped), "skipped": feats.skipped,
        "num_classes": len(spec.names), "backend": res.backend,
        "verification": res.verification, "hyper": res.hyper,
        "mode": res.hyper["mode"], "class_prior": _prior_report(res, spec.names),
        "pseudo_labels": {
            "confident_fraction": res.confident_fraction,
            "class_counts_min": int(res.class_counts.min()),
            "class_counts_max": int(res.class_counts.max()),
            "classes_without_pseudo_label": int((res.class_counts == 0).sum()),
            "class_counts": dict(zip(spec.names, (int(c) for c in counts))),
        },
        "passes": res.passes,
        "descent": {"solver": res.hyper["solver"], "stop": res.hyper["stop"],
                    "n_iters": res.n_iters, "converged": res.converged,
                    "how_it_ended": res.stop_reason,
                    "final_objective": float(res.objective[-1]) if res.n_iters else None,
                    "final_grad_norm": float(res.grad_norm[-1]) if res.n_iters else None,
                    "final_lr": float(res.lr[-1]) if res.n_iters else None,
                    "objective": [round(float(v), 7) for v in res.objective.tolist()],
                    "grad_norm": [round(float(v), 7) for v in res.grad_norm.tolist()]},
        "timings": {**timings, **{f"fit.{k}": v for k, v in res.timings.items()}},
        "outputs": {"proxy": os.path.join(out, "proxy.safetensors"),
                    "predictions": os.path.join(out, "predictions.csv")},
        "versions": versions(),
    }
    if prior_file is not None:       # --class-prior FILE: which file, and what it gave
        report["class_prior"]["given_file"] = os.path.abspath(prior_file)
        report["class_prior"]["given_proportions"] = dict(zip(
            spec.names, (round(float(v), 6) for v in res.class_prior.target.tolist())))
    if image_set.ignored:
        report["ignored"] = image_set.ignored
    if getattr(image_set, "repeated", None):
        report["repeated"] = image_set.repeated
    if coverage is not None:
        report["label_coverage"] = coverage
    if lab is not None:
        report["zero_shot"] = classification_metrics(zs_idx.cpu(), lab, len(spec.names))
        report["inmap"] = classification_metrics(idx[:, :k_metrics].cpu(), lab, len(spec.names))
        log("accuracy", f"top-1: zero-shot {report['zero_shot']['acc1']:.4f} -> InMaP "
            f"{report['inmap']['acc1']:.4f}", zero_shot=report["zero_shot"], inmap=report["inmap"])
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    log("done", f"wrote {out}/proxy.safetensors, report.json, predictions.csv", out=out)
    return report


def _label_coverage(image_set: ImageSet, names: Sequence[str], log: Log) -> Optional[dict]:
    """When folder labels cover only part of the class list: how much, and which are absent
    (logged as a warning, and returned for the report)."""
    if image_set.labels is None:
        return None
    present = sorted(set(image_set.labels))
    if len(present) == len(names):
        return None
    held = set(present)
    absent = [n for i, n in enumerate(names) if i not in held]
    coverage = {"classes_with_images": len(present), "num_classes": len(names),
                "classes_without_images": absent,
                "note": f"the image folders cover {len(present)} of the {len(names)} classes "
                        f"(no folder for {_some(absent)}); accuracy is over those classes only"}
    log("warning", f"warning: {coverage['note']}", **coverage)
    return coverage


def parse_labeled(path: str, names: Sequence[str], folder_map: Optional[Dict[str, str]] = None,
                  roots: Sequence[str] = ()) -> List[Tuple[str, str, int]]:
    """``--labeled``, read and its class names checked (no image needed yet): (where, image,
    class index) per labeled image. A file of lines 'IMAGE<TAB or comma>CLASS NAME' (a line
    starting with '#', or the rest of a line after a '#' that follows a space, is a comment;
    a relative IMAGE is also looked for beside the file and in ``roots``: the image folder, or
    the folder of the file list that named the images) or a folder CLASS/.../IMAGE of links
    or copies of some of the images. A class is named as class folders are matched: by name
    (case, '_' and '-' ignored) or by its folder name in the ``--classes`` JSON map."""
    from .data import norm_name, read_text, strip_comment

    by_name = {}
    for j, n in enumerate(names):
        by_name.setdefault(norm_name(n), j)
    index = {c: j for j, c in enumerate(names)}
    for folder, cls in (folder_map or {}).items():
        if cls in index:
            by_name.setdefault(norm_name(folder), index[cls])
    raw = []                           # (where, image, class name)
    if os.path.isdir(path):
        for cls in sorted(os.listdir(path)):
            sub = os.path.join(path, cls)
            if not os.path.isdir(sub):
                continue
            for dirpath, _, files in os.walk(sub, followlinks=True):
                for f in sorted(files):
                    raw.append((os.path.join(dirpath, f),) * 2 + (cls,))
    else:
        here = os.path.dirname(os.path.abspath(path))
        for n, line in enumerate(read_text(path, "--labeled").splitlines(), 1):
            line = strip_comment(line)
            if not line:
                continue
            sep = "\t" if "\t" in line else ","
            image, _, cls = (v.strip() for v in line.rpartition(sep))
            if not image or not cls:
                raise ValueError(f"{path}:{n}: expected 'IMAGE<TAB or comma>CLASS', got {line!r}")
            if not os.path.isabs(image) and not os.path.exists(image):
                image = next((os.path.join(r, image) for r in (here, *roots)
                              if os.path.exists(os.path.join(r, image))), image)
            raw.append((f"{path}:{n}", image, cls))
    pairs = []
    for where, image, cls in raw:
        j = by_name.get(norm_name(cls))
        if j is None:
            raise ValueError(f"--labeled {where}: class {cls!r} is not in the class list "
                             f"(first classes: {list(names)[:5]})")
        pairs.append((where, image, j))
    if not pairs:
        raise ValueError(f"--labeled {path}: no labeled image found")
    return pairs


def match_labeled(pairs: Sequence[Tuple[str, str, int]], ids: Sequence[str], path: str,
                  skipped: Sequence[str] = ()) -> Tuple[torch.Tensor, torch.Tensor]:
    """(row indices, class indices) of ``parse_labeled``'s images among the fit's rows ``ids``
    (image paths, or ids for shards and embeddings). An image is found by its path as listed,
    its real path, its id, or (a copy) as the one image of the same name and bytes. An unknown
    image, an image that could not be read (``skipped``) or an image labeled twice is an error
    naming the line."""
    import filecmp

    row, repeats = {}, {}
    for i, p in enumerate(ids):
        if row.setdefault(str(p), i) != i:
            repeats[str(p)] = repeats.get(str(p), 1) + 1
    real = None                        # real path -> row, and file name -> rows: built once
    idx, lab, seen = [], [], {}
    for where, image, j in pairs:
        i = row.get(image)
        if image in repeats:
            raise ValueError(f"--labeled {where}: {image!r} names {repeats[image]} of the fit's "
                             "rows (a key repeated across shards); give every sample its own key")
        if i is None and os.path.exists(image):
            if real is None:
                real, by_base = {}, {}
                for k, p in enumerate(map(str, ids)):
                    if os.path.exists(p):
                        real.setdefault(os.path.realpath(p), k)
                        by_base.setdefault(os.path.basename(p), []).append(k)
            i = real.get(os.path.realpath(image))
            if i is None:              # a copy: the one image of the same name and bytes
                same = [k for k in by_base.get(os.path.basename(image), [])
                        if filecmp.cmp(str(ids[k]), image, shallow=False)]
                if len(same) > 1:
                    raise ValueError(f"--labeled {where}: {image!r} has the bytes of "
                                     f"{len(same)} of the fit's images ({ids[same[0]]!r}, "
                                     f"{ids[same[1]]!r}, ...); label one of them by its path")
                i = same[0] if same else None
        if i is None:
            why = (" could not be read and was skipped" if image in set(map(str, skipped))
                   else " is not one of the fit's images (give its path as listed, or its id "
                   "for shards and embeddings)")
            raise ValueError(f"--labeled {where}: image {image!r}{why}")
        if i in seen:
            raise ValueError(f"--labeled {where}: image {image!r} is labeled twice (also at "
                             f"{seen[i]})")
        seen[i] = where
        idx.append(i)
        lab.append(j)
    return torch.tensor(idx, dtype=torch.long), torch.tensor(lab, dtype=torch.long)


def read_class_weights(path: str, names: Sequence[str]) -> torch.Tensor:
    """Class proportions from a file: JSON {class: weight}, or lines 'class weight' (the last
    whitespace- or comma-separated field is the weight; '#' starts a comment). Classes not
    listed get weight 0 (known absent); an unknown class name is an error."""
    from .data import parse_json, read_text, strip_comment

    text = read_text(path, "--class-prior")
    pairs = []
    if text.lstrip().startswith("{"):
        data = parse_json(text, path, "--class-prior")
        if not isinstance(data, dict):
            raise ValueError(f"--class-prior {path}: expected a JSON object class -> weight")
        pairs = list(data.items())
    else:
        for n, line in enumerate(text.splitlines(), 1):
            line = strip_comment(line)
            if not line:
                continue
            fields = re.match(r"^(.*?)[\s,]+([^\s,]+)$", line)
            if fields is None:
                raise ValueError(f"{path}:{n}: expected 'class weight', got {line!r}")
            pairs.append((fields.group(1).strip(), fields.group(2)))
    index = {c: i for i, c in enumerate(names)}
    w = torch.zeros(len(names), dtype=torch.float64)
    seen = set()
    for name, weight in pairs:
        if name in seen:
            raise ValueError(f"{path}: class {name!r} is listed twice; give each class one weight")
        seen.add(name)
        if name not in index:
            raise ValueError(f"{path}: class {name!r} is not in the class list "
                             f"(first classes: {list(names)[:5]})")
        try:
            w[index[name]] = float(weight)
        except (TypeError, ValueError):
            raise ValueError(f"{path}: weight of {name!r} must be a number, got {weight!r}")
    return w


def _counts_by_name(names: Sequence[str], idx: torch.Tensor) -> Dict[str, int]:
    """How many images were predicted as each class, by name (a name listed twice sums)."""
    out: Dict[str, int] = {}
    for name, c in zip(names, torch.bincount(idx.cpu(), minlength=len(names)).tolist()):
        out[name] = out.get(name, 0) + int(c)
    return out


def _imagenet_folders_note(spec: "clip_mod.ClassSpec", image_set: ImageSet, log: Log) -> None:
    """Folders named like one of the built-in ImageNet set's renamed pairs: say which class each
    name is (folders labelled 'missile' or 'sunglasses' by open_clip's list were ambiguous)."""
    if spec.text_names is None:
        return
    pairs = {norm_name(n[i]) for n in (spec.names, spec.text_names) for i in
             clip_mod.IMAGENET_DISTINCT}
    if any(norm_name(f) in pairs for f in image_set.folder_to_class):
        log("labels", f"class folders: {clip_mod.IMAGENET_NOTE}")


def _class_prior_file(hyper: dict) -> Optional[str]:
    """The file --class-prior names, or None (a name of CLASS_PRIORS, a tensor or nothing)."""
    from .class_prior import CLASS_PRIORS

    cp = hyper.get("class_prior")
    return cp if isinstance(cp, str) and cp not in CLASS_PRIORS else None


def _class_prior_option(hyper: dict, spec: "clip_mod.ClassSpec", log: Log) -> dict:
    """--class-prior FILE -> the proportions tensor (checked before any model is loaded)."""
    from .class_prior import check_class_prior

    cp = _class_prior_file(hyper)
    if cp is None:                                        # None, a name or a tensor already
        return hyper
    names = spec.names
    if spec.text_names is not None:
        log("class_prior", f"class prior {cp}: {clip_mod.IMAGENET_NOTE}")
    w = check_class_prior(read_class_weights(cp, names), len(names))
    missing = int((w == 0).sum())
    if missing:
        log("class_prior", f"class prior {cp}: {missing} of {len(names)} classes have weight 0 "
            "(treated as absent)", absent=missing)
    return dict(hyper, class_prior=w)


def _prior_report(res: VisionProxyResult, names: Sequence[str]) -> dict:
    """report.json's class_prior: what ran, why, the effective number of classes and the
    estimated proportions by class name."""
    p = res.class_prior
    out = p.summary()
    est = out.pop("estimated_proportions", None)
    if est is not None:
        out["estimated_proportions"] = dict(zip(names, est))
    out["few_classes"] = p.few_classes
    out["close_calls"] = p.close_calls
    return out


CLOSE_CALL_ADVICE = {   # what the user may know that the unlabeled images cannot show
    "uniform": "If the images hold every listed class about evenly, --class-prior uniform (or "
               "--mode paper, the published method) usually gains.",
    "estimate": "If the images hold only part of the class list, --class-prior estimate (or the "
                "known proportions: --class-prior FILE) usually gains.",
    "none": "If the images hold every listed class, unevenly, --class-prior none keeps CLIP's "
            "own labels (no balancing).",
}


def _log_class_prior(res: VisionProxyResult, log: Log) -> None:
    p = res.class_prior
    log("class_prior", f"class prior: {p.chosen} ({p.reason})", chosen=p.chosen,
        effective_classes=p.effective_classes)
    log("assumption", p.assumption, chosen=p.chosen)
    for other in p.close_calls:
        log("note", f"note: the class prior was a close call: under the candidates' own models "
            f"'{other}' was within two standard errors (the images' sampling noise, not the doubt "
            f"about which model is right) of '{p.chosen}'. {CLOSE_CALL_ADVICE[other]}",
            chosen=p.chosen, close_call=other)
    if p.few_classes:
        C = res.num_classes
        log("warning", f"warning: the images appear to hold only about {p.effective_classes:.0f} "
            f"of the {C} listed classes; the pseudo labels were balanced to the class "
            "proportions estimated from them. If you know which classes are present, pass "
            "--class-prior FILE", chosen=p.chosen, effective_classes=p.effective_classes,
            num_classes=C)


def _fits_on_device(x: torch.Tensor, device: torch.device) -> bool:
    """True unless ``device`` is a GPU with less than twice x's size free."""
    if device.type != "cuda":
        return True
    free = available_bytes(device)
    return free is None or x.numel() * x.element_size() * 2 <= free


def _group(device: str = "cpu"):
    """The torchrun process group when launched by torchrun (WORLD_SIZE set), else None:
    NCCL for CUDA devices, gloo for the CPU."""
    if "WORLD_SIZE" not in os.environ:
        return None
    from .distributed import init_from_env

    return init_from_env("nccl" if str(device).startswith("cuda") else "gloo")


def predict_images(*, proxy: str, images: Optional[str] = None, out: str,
                   model: Optional[str] = None, pretrained: Optional[str] = None,
                   device: str = "cpu", model_precision: str = "fp32", batch_size: int = 64,
                   workers: int = 4, cache_dir: Optional[str] = None, use_cache: bool = True,
                   topk: int = 5, log: Optional[Log] = None, force: bool = False,
                   command: Optional[str] = None, features: Optional[str] = None,
                   image_keys: Sequence[str] = DEFAULT_IMAGE_KEYS) -> dict:
    """``inmap predict``: a saved proxy + images -> predictions CSV (``write_predictions``) and
    a report beside it (``predict_report_path``: counts, skipped files, timings); returns the
    report. The model and weights come from the proxy's metadata unless given; other ones
    than the proxy was fitted with are an error (its classes would not match the features)
    unless ``force``, then a warning. With ``features`` (precomputed embeddings) no encoder is
    loaded: the proxy classifies them directly."""
    _one_source(images, features)
    log = log or Log()
    started = _now_iso()
    res = load_vision_proxy(proxy)
    meta = res.metadata
    if features is not None:
        return _predict_features(res, proxy, features, out, model, topk, log, force, command,
                                 started, cache_dir, pretrained)
    model = model or meta.get("model")
    if not model:
        raise ValueError(f"{proxy} names no model in its metadata: pass --model and --pretrained")
    clip_mod.check_model_name(model)
    if pretrained is None:
        pretrained = meta.get("pretrained")
        if pretrained is None:   # never random weights unless asked: predictions would be noise
            raise ValueError(f"{proxy} names no weights in its metadata: pass --pretrained (the "
                             "open_clip tag or checkpoint it was fitted with; 'none' for random "
                             "weights)")
        try:
            clip_mod.check_weights(model, pretrained)
        except (ValueError, FileNotFoundError) as e:
            raise ValueError(f"{e} (the weights {proxy} was fitted with, from its metadata; a "
                             "relative path is relative to the folder the fit ran in; pass "
                             "--pretrained to use others)") from None
    if meta.get("model") and meta["model"] != model:
        _mismatch(force, log, f"the proxy {proxy} was fitted with --model {meta['model']}, not "
                  f"{model}", fitted=meta["model"], using=model)
    names = clip_mod.distinct_imagenet(json.loads(meta["classnames"])) if "classnames" in meta \
        else [str(i) for i in range(res.num_classes)]
    image_set = list_source(images, names, "none", image_keys=image_keys)
    _log_images(image_set, log)
    _log_missing(image_set, log)
    t0 = time.perf_counter()
    clip = clip_mod.load_model(model, pretrained, device, model_precision, cache_dir=cache_dir)
    from .classifier import VisionProxyClassifier

    VisionProxyClassifier(res.proxy, names)._check_model(clip.model)
    fitted_weights = meta.get("weights_id")
    if fitted_weights and fitted_weights != clip.weights_id:
        _mismatch(force, log, f"the proxy {proxy} was fitted on other weights ({fitted_weights}) "
                  f"than the model predicting now ({clip.weights_id}): its classes would not "
                  f"match these image features; pass the --pretrained it was fitted with "
                  f"({meta.get('pretrained')})", fitted=fitted_weights, using=clip.weights_id)
    feats = extract(clip, image_set, log, cache_dir=cache_dir, use_cache=use_cache,
                    batch_size=batch_size, workers=workers)
    x = feats.features.to(clip.device)
    report = {"proxy": os.path.abspath(proxy),
              "pretrained": clip_mod.weights_name(pretrained), "weights_id": clip.weights_id,
              "device": str(clip.device), "images": image_set.source or image_set.root}
    return _write_predictions(res, names, feats, x, out, dict(report, model=model), topk, log,
                              force, command, started, t0, False)


def _predict_features(res: VisionProxyResult, proxy: str, features: str, out: str,
                      model: Optional[str], topk: int, log: Log, force: bool,
                      command: Optional[str], started: str, cache_dir: Optional[str],
                      pretrained: Optional[str] = None) -> dict:
    """``inmap predict --features``: the proxy classifies precomputed embeddings (no encoder).
    A --model or --pretrained given says which encoder made them: other than the proxy's is an
    error (a warning with --force), as for images."""
    meta = res.metadata
    if model and meta.get("model") and meta["model"] != model:
        _mismatch(force, log, f"the proxy {proxy} was fitted with --model {meta['model']}, not "
                  f"{model}", fitted=meta["model"], using=model)
    named = clip_mod.weights_name(pretrained) if pretrained is not None else None
    if named is not None and meta.get("pretrained") and meta["pretrained"] != named:
        _mismatch(force, log, f"the proxy {proxy} was fitted with --pretrained "
                  f"{meta['pretrained']}, not {named}: features from other weights do not "
                  "match its classes", fitted=meta["pretrained"], using=named)
    _check_features_dim(features, res.proxy.shape[0], f"the proxy {proxy}")
    names = clip_mod.distinct_imagenet(json.loads(meta["classnames"])) if "classnames" in meta \
        else [str(i) for i in range(res.num_classes)]
    t0 = time.perf_counter()
    feats = features_from_file(features, log, cache_dir)
    report = {"proxy": os.path.abspath(proxy),
              "pretrained": meta.get("pretrained"), "weights_id": meta.get("weights_id"),
              "device": "cpu", "features": os.path.abspath(features)}
    return _write_predictions(res, names, feats, feats.features, out,
                              dict(report, model=model or meta.get("model")), topk, log, force,
                              command, started, t0, feats.mapped)


def _write_predictions(res: VisionProxyResult, names: Sequence[str], feats: Features,
                       x: torch.Tensor, out: str, fields: dict, topk: int, log: Log,
                       force: bool, command: Optional[str], started: str, t0: float,
                       mapped: bool) -> dict:
    """predict's CSV and its report (``fields``: model, weights, device, source)."""
    inmap = _chunked(res.topk, x, min(topk, len(names)), x.device, mapped)
    zero_shot = _chunked(res.zero_shot_topk, x, 1, x.device, mapped)
    write_predictions(out, feats.paths, names, inmap, zero_shot, id_column=feats.id_column)
    report = {"command": command, "timestamp": started,
              **fields, "forced": bool(force),
              "n_images": len(feats.images),
              "n_used": int(feats.keep.sum()), "n_skipped": len(feats.skipped),
              "skipped": feats.skipped, "num_classes": len(names),
              "changed_from_zero_shot": float((inmap[1][:, 0] != zero_shot[1][:, 0])
                                              .double().mean()),
              "predicted_class_counts": _counts_by_name(names, inmap[1][:, 0]),
              "features": feats.stats,
              "seconds": time.perf_counter() - t0, "predictions": os.path.abspath(out),
              "versions": versions()}
    report_path = predict_report_path(out)
    with open(report_path, "w") as f:
        json.dump(report, f, indent=2)
    skipped = f"; {len(feats.skipped)} skipped, listed in it" if feats.skipped else ""
    log("done", f"wrote {out} ({len(feats.paths)} images) and {report_path}{skipped}", out=out,
        report=report_path, n_skipped=len(feats.skipped))
    return report


def _mismatch(force: bool, log: Log, message: str, **fields) -> None:
    """Another model or weights than the proxy's: an input error, or with --force a warning."""
    if not force:
        raise ValueError(message + " (--force predicts anyway)")
    log("warning", f"warning: {message} (--force)", **fields)


def predict_report_path(out: str) -> str:
    """Where ``inmap predict --out X.csv`` writes its report: X.report.json."""
    return os.path.splitext(out)[0] + ".report.json"


def eval_images(*, model: str, pretrained: Optional[str], images: str, classes: str,
                out: Optional[str] = None, templates: str = "simple", device: str = "cpu",
                model_precision: str = "fp32", batch_size: int = 64, workers: int = 4,
                cache_dir: Optional[str] = None, use_cache: bool = True,
                dataset: Optional[str] = None, log: Optional[Log] = None,
                command: Optional[str] = None, **hyper) -> List[dict]:
    """``inmap eval``: zero-shot vs InMaP (without and with Sinkhorn) on a labeled folder; one
    CLIP_benchmark-shaped record per method."""
    log = log or Log()
    spec = clip_mod.load_classnames(classes)
    hyper = _class_prior_option(hyper, spec, log)
    image_set = list_source(images, spec.names, "folder", spec.folder_map)
    _imagenet_folders_note(spec, image_set, log)
    _log_images(image_set, log, len(spec.names))
    _label_coverage(image_set, spec.names, log)
    clip = clip_mod.load_model(model, pretrained, device, model_precision, cache_dir=cache_dir)
    text = clip_mod.text_proxies(clip, spec.prompt_names, clip_mod.load_templates(templates),
                                 progress=log.progress)
    feats = extract(clip, image_set, log, cache_dir=cache_dir, use_cache=use_cache,
                    batch_size=batch_size, workers=workers)
    x, t, y = feats.features.to(clip.device), text.to(clip.device), feats.labels
    k = min(5, len(spec.names))
    sinkhorn = hyper.pop("sinkhorn_iters", None)
    sinkhorn = 20 if sinkhorn is None else sinkhorn      # fit_vision_proxy's default
    paper = {k: v for k, v in hyper.items()           # the published runs: their own solver
             if k not in ("class_prior", "mode", "tol", "stop", "solver")}
    runs = {"text proxy (zero-shot)": None,
            "vision proxy (InMaP)": dict(paper, sinkhorn_iters=0, mode="paper")}
    if sinkhorn:
        runs["vision proxy + Sinkhorn (InMaP)"] = dict(paper, sinkhorn_iters=sinkhorn, mode="paper")
    else:
        log("note", "note: --sinkhorn-iters 0: the published Sinkhorn run is left out"
            + ("" if hyper.get("mode") == "paper" else " and the default fit is not balanced"),
            sinkhorn_iters=0)
    if hyper.get("mode", "default") != "paper":
        runs["vision proxy, class prior (inmap_ext default)"] = dict(hyper, sinkhorn_iters=sinkhorn)
    from .functional import zero_shot_topk

    records, weights = [], clip_mod.weights_name(pretrained)
    for method, kw in runs.items():
        if kw is None:
            idx = zero_shot_topk(x, t, k)[1]
        else:
            res = fit_vision_proxy(x, t, progress=log.progress, **kw)
            idx = res.predict(x, k=k)
            idx = idx[:, None] if idx.dim() == 1 else idx
        m = classification_metrics(idx.cpu(), y, len(spec.names))
        records.append({"dataset": dataset or os.path.basename(os.path.abspath(images)),
                        "model": model, "pretrained": weights,
                        "task": "zeroshot_classification", "method": method, "metrics": m,
                        "n_images": int(feats.keep.sum()), "n_skipped": len(feats.skipped)})
        if kw is not None:
            records[-1]["mode"] = res.hyper["mode"]
            records[-1]["class_prior"] = _prior_report(res, spec.names)
        acc5 = f"acc5 {m['acc5']:.4f}  " if "acc5" in m else ""
        log("eval", f"{method:34s} acc1 {m['acc1']:.4f}  {acc5}"
            f"mean recall {m['mean_per_class_recall']:.4f}", method=method, metrics=m)
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump(records, f, indent=2)
        log("done", f"wrote {out} ({len(records)} records: {', '.join(runs)})", out=out,
            n_records=len(records))
    else:
        log("done", "results not written (pass --out FILE.json to keep them)", out=None)
    return records


def export_classifier(proxy: str, out: str) -> torch.Tensor:
    """The proxy as the plain (D, C) float32 tensor file that ``clip_benchmark eval --load_clfs``
    reads (torch.save of a tensor; loadable with weights_only=True)."""
    res: VisionProxyResult = load_vision_proxy(proxy)
    w = res.proxy.float().contiguous().cpu()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    torch.save(w, out)
    return w
