"""open_clip glue: models, class names, prompt templates, text proxies and image features.

Everything open_clip already ships is reused (create_model_and_transforms, get_tokenizer,
build_zero_shot_classifier, IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES,
SIMPLE_IMAGENET_TEMPLATES); this module adds file formats, per-class prompts, the feature cache
and robust image loading.
"""
from __future__ import annotations

import contextlib
import os
import warnings
import zipfile
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from .cache import FeatureCache, default_cache_dir, file_fingerprint
from .data import PASSING, READ, ImageDataset, ImageSet, load_json, norm_name, read_lines

Template = Union[str, Callable[[str], str]]
TEMPLATE_SETS = ("simple", "openai")
CLASS_SETS = ("imagenet",)
# open_clip's (and OpenAI's) ImageNet names say "missile" for two classes and "sunglasses" for
# two. Their prompts stay as published (zero-shot accuracy comparable with every CLIP paper); the
# names the outputs use are WordNet's own for one of each pair, so that predictions, reports and
# class-prior files can tell the four classes apart.
IMAGENET_DISTINCT = {744: "projectile", 836: "sunglass"}   # n04008634, n04355933
IMAGENET_NOTE = ("with --classes imagenet, 'missile' is class 657 and 'sunglasses' class 837; "
                 "744 is called 'projectile' and 836 'sunglass' (open_clip's list names each "
                 "pair alike)")


def distinct_imagenet(names: Sequence[str]) -> List[str]:
    """open_clip's ImageNet list with the distinct names (the built-in set; proxies fitted
    before it was made distinct); any other list is returned as is."""
    names = list(names)
    if len(names) != 1000:
        return names
    try:
        import open_clip
    except ImportError:
        return names
    if names == list(open_clip.IMAGENET_CLASSNAMES):
        return [IMAGENET_DISTINCT.get(i, c) for i, c in enumerate(names)]
    return names


def _open_clip():
    try:
        import open_clip
    except ImportError as e:  # pragma: no cover - the clip extra is installed in tests
        raise ImportError("the CLIP pipeline needs open_clip: pip install 'inmap_ext[clip]' "
                          "(open_clip_torch)") from e
    return open_clip


# -- class names and prompts --------------------------------------------------------------------
@dataclass
class ClassSpec:
    names: List[str]                              # distinct: what outputs and files call them
    folder_map: Optional[Dict[str, str]] = None   # image folder name -> class name
    text_names: Optional[List[str]] = None        # what the prompts say, when not the names

    @property
    def prompt_names(self) -> List[str]:
        return self.text_names or self.names


def load_classnames(spec: str) -> ClassSpec:
    """``imagenet`` (open_clip's 1000 names, two made distinct: IMAGENET_DISTINCT), a text file
    (one name per line), or JSON: a list of names, or an object mapping image-folder names (e.g.
    ImageNet wnids) to class names."""
    if spec.lower() in CLASS_SETS:
        text = list(_open_clip().IMAGENET_CLASSNAMES)
        return ClassSpec(distinct_imagenet(text), text_names=text)
    if not os.path.isfile(spec):
        raise FileNotFoundError(f"--classes: {spec!r} is not a built-in set ({', '.join(CLASS_SETS)}) "
                                "nor a file")
    if spec.lower().endswith(".json"):
        data = load_json(spec, "--classes")
        if isinstance(data, list) and all(isinstance(c, str) for c in data):
            spec_ = ClassSpec(list(data))
        elif isinstance(data, dict) and all(isinstance(v, str) for v in data.values()):
            by_name: Dict[str, List[str]] = {}
            for folder, name in data.items():     # as folders are matched: case, '_', '-' aside
                by_name.setdefault(norm_name(name), []).append(folder)
            shared = {n: f for n, f in by_name.items() if len(f) > 1}
            if shared:
                shown = "; ".join(f"{', '.join(f)} -> {data[f[0]]!r}"
                                  for f in list(shared.values())[:5])
                raise ValueError(
                    f"--classes {spec}: folders map to the same class name ({shown}); each "
                    "would be one class with both folders' images. Give each class its own "
                    "name (open_clip's ImageNet names hold 'missile' and 'sunglasses' twice: "
                    "rename one of each)")
            spec_ = ClassSpec(list(data.values()), dict(data))
        else:
            raise ValueError(f"--classes {spec}: expected a JSON list of names or an object "
                             "folder -> name")
    else:
        spec_ = ClassSpec([ln.strip() for ln in read_lines(spec, "--classes") if ln.strip()])
    if not spec_.names:
        raise ValueError(f"--classes {spec}: no class names")
    dup = sorted({c for c in spec_.names if spec_.names.count(c) > 1})
    if dup:
        raise ValueError(f"--classes {spec}: duplicate class names {dup[:5]}")
    seen: Dict[str, str] = {}
    for c in spec_.names:     # folders and labels match names with case, '_' and '-' ignored
        other = seen.setdefault(norm_name(c), c)
        if other != c:
            raise ValueError(f"--classes {spec}: class names {other!r} and {c!r} differ only in "
                             "case, '_' or '-', which image folders and labels cannot tell "
                             "apart; rename one")
    return spec_


def _template_from_string(t: str) -> Template:
    """A callable (open_clip decides from the first template whether all are format strings or
    all callables, so a file mixing '{}' and '{c}' lines must give one kind; a replace, not
    str.format, so that other braces in a template stay as written)."""
    for slot in ("{c}", "{}"):   # CLIP_benchmark's spelling, then open_clip's
        if slot in t:
            return lambda c, t=t, slot=slot: t.replace(slot, c)
    raise ValueError(f"template {t!r} has no class placeholder ('{{}}' or '{{c}}')")


def load_templates(spec: str) -> List[Template]:
    """``simple`` (the paper's 7), ``openai`` (OpenAI's 80), or a file (.txt one per line, or a
    JSON list) of templates with a ``{}`` or ``{c}`` placeholder."""
    oc = _open_clip()
    if spec.lower() == "simple":
        return list(oc.SIMPLE_IMAGENET_TEMPLATES)
    if spec.lower() == "openai":
        return list(oc.OPENAI_IMAGENET_TEMPLATES)
    if not os.path.isfile(spec):
        raise FileNotFoundError(f"--templates: {spec!r} is not a built-in set "
                                f"({', '.join(TEMPLATE_SETS)}) nor a file")
    items = load_json(spec, "--templates") if spec.lower().endswith(".json") else \
        [ln for ln in read_lines(spec, "--templates") if ln.strip()]
    if not items:
        raise ValueError(f"--templates {spec}: no templates")
    return [_template_from_string(t) for t in items]


def load_prompts(path: str, classnames: Sequence[str],
                 text_names: Optional[Sequence[str]] = None) -> Dict[str, List[str]]:
    """Per-class prompt lists (CuPL style): JSON object class name -> list of prompts; every
    class needs at least one. A class is looked up by its name, then by its prompt name
    (``text_names``: a CuPL file for the built-in ImageNet set uses open_clip's names)."""
    data = load_json(path, "--prompts")
    if not isinstance(data, dict):
        raise ValueError(f"--prompts {path}: expected a JSON object class -> [prompts]")
    keys = list(text_names) if text_names is not None else list(classnames)
    found = {c: data.get(c) or data.get(k) for c, k in zip(classnames, keys)}
    missing = [c for c, v in found.items() if not v]
    if missing:
        raise ValueError(f"--prompts {path}: no prompts for {len(missing)} class(es), e.g. "
                         f"{missing[:5]}")
    bad = [c for c, v in found.items()
           if not isinstance(v, list) or not all(isinstance(x, str) for x in v)]
    if bad:
        raise ValueError(f"--prompts {path}: expected a list of prompt strings per class; "
                         f"{bad[0]!r} has {type(found[bad[0]]).__name__} "
                         f"{str(found[bad[0]])[:60]!r}")
    return {c: list(v) for c, v in found.items()}


def template_strings(templates: Sequence[Template]) -> List[str]:
    """Printable form of templates (callables rendered on a placeholder) for metadata."""
    return [t if isinstance(t, str) else t("{}") for t in templates]


# -- models ---------------------------------------------------------------------------------------
@dataclass
class ClipModel:
    model: torch.nn.Module
    preprocess: Callable
    tokenizer: Callable
    name: str
    pretrained: Optional[str]
    weights_id: str
    device: torch.device
    precision: str

    def autocast(self):
        if self.device.type == "cuda" and self.precision in ("amp", "amp_bf16"):
            dt = torch.bfloat16 if self.precision == "amp_bf16" else torch.float16
            return torch.autocast("cuda", dtype=dt)
        return contextlib.nullcontext()


def _looks_like_openai_checkpoint(path: str) -> bool:
    if "openai" in os.path.basename(path).lower():
        return True
    try:  # OpenAI released TorchScript archives
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


RANDOM_SEED = 0
RANDOM_WEIGHTS = ("none", "random")
REACH_TIMEOUT_S = 3.0


def is_random(pretrained: Optional[str]) -> bool:
    return pretrained is None or pretrained.strip().lower() in RANDOM_WEIGHTS


def check_model_name(name: str) -> None:
    oc = _open_clip()
    if name not in oc.list_models():
        close = [m for m in oc.list_models() if name.lower().replace("/", "-") in m.lower()][:5]
        raise ValueError(f"--model {name!r} is not an open_clip architecture"
                         + (f" (did you mean {', '.join(close)}?)" if close else
                            " (see open_clip.list_models())"))


def embed_dim(name: str) -> Optional[int]:
    """The dimension of the architecture's joint embedding space, from its open_clip config
    (None when open_clip has no local config for it, e.g. a hub model)."""
    cfg = _open_clip().get_model_config(name)
    return int(cfg["embed_dim"]) if cfg and "embed_dim" in cfg else None


def default_pretrained(name: str) -> str:
    """The weights ``inmap`` uses when --pretrained is not given: 'openai' where open_clip has
    it for the model, else its first listed tag. A model without released weights is an error
    that says what to pass (random weights are never chosen silently)."""
    tags = _open_clip().list_pretrained_tags_by_model(name)
    if not tags:
        raise ValueError(f"--model {name} has no pretrained weights in open_clip: pass "
                         "--pretrained FILE (a checkpoint), or --pretrained none for random "
                         "weights")
    return "openai" if "openai" in tags else tags[0]


def _weights_cached(cfg: dict) -> Tuple[bool, str]:
    """(the tag's weights are in the local cache, the host they would be downloaded from)."""
    from urllib.parse import urlparse

    if cfg.get("file"):
        return os.path.isfile(cfg["file"]), ""
    oc_pre = _open_clip().pretrained
    hub, url = cfg.get("hf_hub", ""), cfg.get("url", "")
    if hub and oc_pre.has_hf_hub():
        from huggingface_hub import try_to_load_from_cache

        repo, filename = os.path.split(hub)
        filename = filename or getattr(oc_pre, "HF_WEIGHTS_NAME", "open_clip_pytorch_model.bin")
        alts = list(getattr(oc_pre, "_get_safe_alternatives", lambda f: [])(filename))
        for f in alts + [filename]:
            try:
                if isinstance(try_to_load_from_cache(repo, f), str):
                    return True, ""
            except Exception:  # noqa: BLE001 - an odd cache layout: treat as not cached
                pass
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
        return False, urlparse(endpoint).hostname or endpoint
    if url:
        target = os.path.join(os.path.expanduser("~/.cache/clip"), os.path.basename(url))
        return os.path.isfile(target), urlparse(url).netloc
    return True, ""


def _reachable(host: str, timeout: float = REACH_TIMEOUT_S) -> bool:
    """A TCP connection to host:443 within ``timeout`` seconds (name lookup included)."""
    import socket
    import threading

    ok = []

    def probe():
        try:
            with socket.create_connection((host, 443), timeout=timeout):
                ok.append(True)
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    return bool(ok)


def check_weights(name: str, pretrained: Optional[str]) -> None:
    """Fail fast, in one line, on weights that cannot be had: a checkpoint path that does not
    exist, a tag open_clip does not know for the model, or a tag whose weights are not cached
    while offline (HF_HUB_OFFLINE=1, or the download host cannot be reached within a few
    seconds) — instead of minutes of download retries."""
    if pretrained is not None and not pretrained.strip():
        raise ValueError("--pretrained is empty (an unset variable?); give a tag, a checkpoint "
                         "file, or 'none' for random weights")
    if is_random(pretrained) or os.path.isfile(pretrained):
        return
    oc = _open_clip()
    looks_like_path = os.sep in pretrained or pretrained.lower().endswith(
        (".pt", ".pth", ".bin", ".safetensors", ".ckpt"))
    tags = oc.list_pretrained_tags_by_model(name)
    cfg = oc.get_pretrained_cfg(name, pretrained)
    if not cfg:
        if looks_like_path:
            raise FileNotFoundError(f"--pretrained {pretrained}: no such checkpoint file")
        raise ValueError(f"--pretrained {pretrained!r} is neither a file nor an open_clip tag of "
                         f"{name} (its tags: {', '.join(tags) or 'none'}; or 'none' for random "
                         "weights)")
    cached, host = _weights_cached(cfg)
    if cached:
        return
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    if offline or not _reachable(host):
        why = "HF_HUB_OFFLINE is set" if offline else f"{host} cannot be reached"
        raise ValueError(f"--pretrained {pretrained}: the {name} weights {pretrained!r} are not "
                         f"in the local cache and {why}; download them once online, pass a local "
                         "checkpoint file, or --pretrained none for random weights")


@contextlib.contextmanager
def _quiet_downloads():
    """No retry/progress log lines from huggingface_hub while open_clip fetches weights."""
    import logging

    lg = logging.getLogger("huggingface_hub")
    level = lg.level
    lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        lg.setLevel(level)


def weights_name(pretrained: Optional[str]) -> str:
    """How the weights are written into a proxy's metadata and the reports: a checkpoint file
    as its absolute path (so that ``inmap predict`` finds it from any folder), else as given."""
    if pretrained is not None and not is_random(pretrained) and os.path.isfile(pretrained):
        return os.path.abspath(pretrained)
    return str(pretrained)


def load_model(name: str, pretrained: Optional[str], device="cpu",
               precision: str = "fp32", seed: int = RANDOM_SEED,
               cache_dir: Optional[str] = None) -> ClipModel:
    """An open_clip model by architecture name with a pretrained tag (downloaded by open_clip
    when online; ``check_weights`` fails fast offline), a local checkpoint file, or None /
    "none": random weights drawn from
    ``seed`` (the caller's random state is left as it was), so that the same call gives the
    same model and the feature cache, keyed by the seed, never mixes two random models. A
    checkpoint file's hash is remembered in ``cache_dir`` (default: the feature cache folder)."""
    oc = _open_clip()
    if precision not in ("fp32", "amp", "amp_bf16"):
        raise ValueError(f"--precision must be fp32, amp or amp_bf16, got {precision!r}")
    check_model_name(name)
    if is_random(pretrained):
        pretrained = None
    check_weights(name, pretrained)
    device = torch.device(device)
    if pretrained is not None and os.path.isfile(pretrained):
        weights_id = "file:" + file_fingerprint(pretrained, cache_dir)
        if "quickgelu" not in name.lower() and _looks_like_openai_checkpoint(pretrained):
            warnings.warn(
                f"{pretrained} looks like an OpenAI checkpoint but {name} is not a QuickGELU "
                f"config: open_clip would silently lose accuracy; use {name}-quickgelu",
                UserWarning, stacklevel=2)
    elif pretrained:
        weights_id = f"tag:{pretrained}"
    else:   # the initialisation depends on open_clip's code as well as the seed
        weights_id = f"random-init:seed={seed}:open_clip={oc.__version__}"
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=cuda):
            if pretrained is None:
                torch.manual_seed(seed)
            with _quiet_downloads():
                model, _, preprocess = oc.create_model_and_transforms(
                    name, pretrained=pretrained, device=device)
    except Exception as e:  # noqa: BLE001 - a file open_clip cannot read: say so, not KeyError
        if pretrained is not None and os.path.isfile(pretrained):
            raise ValueError(f"--pretrained {pretrained} is not a checkpoint open_clip can load "
                             f"into {name} ({type(e).__name__}: {e}); pass a state_dict saved "
                             "with torch.save, an open_clip tag, or 'none'") from e
        if pretrained is not None and _is_download_error(e):
            raise ValueError(f"--pretrained {pretrained}: the {name} weights could not be "
                             f"downloaded ({type(e).__name__}); download them once online, pass "
                             "a local checkpoint file, or --pretrained none") from e
        raise
    model.eval()
    return ClipModel(model, preprocess, oc.get_tokenizer(name), name, pretrained, weights_id,
                     device, precision)


def _is_download_error(e: BaseException) -> bool:
    mod = type(e).__module__ or ""
    return isinstance(e, (ConnectionError, TimeoutError)) or \
        mod.startswith(("huggingface_hub", "requests", "urllib3", "urllib"))


@torch.no_grad()
def text_proxies(clip: ClipModel, classnames: Sequence[str],
                 templates: Optional[Sequence[Template]] = None,
                 prompts: Optional[Dict[str, List[str]]] = None,
                 progress: bool = False) -> torch.Tensor:
    """D x C text proxies: per class, encode every prompt, L2-normalise each, average,
    L2-normalise (open_clip.build_zero_shot_classifier for templates; per-class prompt lists
    the same way, one class at a time)."""
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(classnames), desc="text proxies", unit="class")
    cols = []
    try:
        if prompts is None:
            names, step = list(classnames), 10      # open_clip's classes per batch
            for i in range(0, len(names), step):
                with clip.autocast():
                    w = _open_clip().build_zero_shot_classifier(
                        clip.model, clip.tokenizer, names[i:i + step], list(templates),
                        num_classes_per_batch=step, device=clip.device, use_tqdm=False)
                cols.append(w.float())
                if bar is not None:
                    bar.update(len(names[i:i + step]))
            return torch.cat(cols, dim=1)
        for c in classnames:
            with clip.autocast():
                e = clip.model.encode_text(clip.tokenizer(prompts[c]).to(clip.device),
                                           normalize=True)
            cols.append(torch.nn.functional.normalize(e.float().mean(0), dim=0))
            if bar is not None:
                bar.update(1)
        return torch.stack(cols, dim=1)
    finally:
        if bar is not None:
            bar.close()


@torch.no_grad()
def image_features(clip: ClipModel, images: ImageSet, *, cache_dir: Optional[str] = None,
                   use_cache: bool = True, batch_size: int = 64, workers: int = 4,
                   shard_size: Optional[int] = None, progress: bool = True,
                   shard_filter: Optional[Callable[[int], bool]] = None,
                   log: Optional[Callable[..., None]] = None
                   ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], FeatureCache]:
    """Features (N x D float32, unit rows) of every image, and an ``ok`` mask (False for files
    that could not be read; their rows are zero). Finished shards of the cache are reused (a
    killed run resumes; ``log(event, message, **fields)`` is told how many images were found);
    each shard is written as soon as its images are encoded. ``shard_filter`` restricts which
    shards this process computes (ranks of a sharded extraction); it then returns
    (None, None, cache) when other shards are missing."""
    identity = {"model": clip.name, "weights": clip.weights_id,
                "preprocess": repr(clip.preprocess), "precision": clip.precision}
    cache = FeatureCache(cache_dir or default_cache_dir(), identity, images.paths, shard_size)
    todo = sorted(set(cache.missing_shards()) | set(cache.encode_again())) if use_cache \
        else list(range(cache.n_shards))
    if log is not None and use_cache and len(todo) < cache.n_shards:
        cached = cache.cached_rows()
        if todo:
            log("resume", f"resuming: {cached}/{cache.n} images cached in {cache.dir}",
                cached=cached, n=cache.n, cache=cache.dir)
        else:
            log("cached", f"features: all {cache.n} images cached in {cache.dir}",
                cached=cached, n=cache.n, cache=cache.dir)
    if shard_filter is not None:
        todo = [i for i in todo if shard_filter(i)]
    if todo:
        _encode_shards(clip, images, cache, todo, batch_size, workers, progress,
                       reuse=use_cache, log=log)
    if cache.missing_shards():
        return None, None, cache
    feats, ok = cache.load()
    return feats, ok, cache


def _encode_shards(clip: ClipModel, images: ImageSet, cache: FeatureCache, todo: List[int],
                   batch_size: int, workers: int, progress: bool, reuse: bool = False,
                   log: Optional[Callable[..., None]] = None) -> None:
    """Encode the images of shards ``todo`` through one DataLoader (workers start once), writing
    each shard as soon as its last image is ready. With ``reuse``, images whose features another
    cached set holds (same model/weights/preprocessing, unchanged file: FeatureCache.reuse_plan)
    are copied from it instead of encoded."""
    rows = [r for i in todo for r in cache.shard_rows(i)]
    ready: Dict[int, Tuple[torch.Tensor, int]] = {}   # row -> (features, read status), not written
    plan = cache.reuse_plan(rows) if reuse else {}
    if plan:
        got, got_ok = FeatureCache.read_planned(list(plan.values()))
        for r, f, o in zip(plan, got, got_ok.tolist()):
            if o:
                ready[r] = (f, READ)
    cache.reused = len(ready)
    encode = [r for r in rows if r not in ready]
    cache.encoded = len(encode)
    if log is not None and ready:
        log("reuse", f"features: {len(ready)} of {len(rows)} images taken from earlier cached "
            f"sets (same model and weights, files unchanged); encoding {len(encode)}",
            reused=len(ready), encode=len(encode), n=len(rows))
    pending = list(todo)

    def flush():
        while pending and all(r in ready for r in cache.shard_rows(pending[0])):
            i = pending.pop(0)
            got = [ready.pop(r) for r in cache.shard_rows(i)]
            # a shard with an image that failed for a passing reason is used now and encoded
            # again by the next run (FeatureCache.write_shard(again=True))
            cache.write_shard(i, torch.stack([f for f, _ in got]),
                              torch.tensor([o == READ for _, o in got], dtype=torch.bool),
                              again=any(o == PASSING for _, o in got))

    flush()
    if not encode:
        return
    loader = torch.utils.data.DataLoader(
        ImageDataset(images.paths, clip.preprocess, encode), batch_size=batch_size,
        num_workers=workers, shuffle=False, pin_memory=clip.device.type == "cuda")
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(encode), desc="image features", unit="img")
    passing = 0
    try:
        for x, idx, status in loader:
            with clip.autocast():
                f = clip.model.encode_image(x.to(clip.device, non_blocking=True), normalize=True)
            f = (f.float() * (status == READ).to(f.device)[:, None]).cpu()
            passing += int((status == PASSING).sum())
            for r, fr, o in zip(idx.tolist(), f, status.tolist()):
                ready[r] = (fr, o)
            flush()
            if bar is not None:
                bar.update(len(x))
    finally:
        if bar is not None:
            bar.close()
    if passing and log is not None:
        log("warning", f"warning: {passing} image(s) could not be read for a passing reason "
            "(too many open files, an I/O or network error, memory); they are left out of this "
            "run and read again by the next", passing=passing)
