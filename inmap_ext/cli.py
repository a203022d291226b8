"""The `inmap` command (also `python -m inmap_ext`).

Exit codes: 0 success; 1 a check failed (`inmap check`); 2 usage error; 3 bad input (a missing
file, an unknown class, inputs that fail validation); 4 runtime failure; 130 interrupted.
Every option, and every output path, is checked before any model is loaded or image read;
option errors and ``--version`` do not import torch (about a second). ``--debug`` (or
INMAP_DEBUG=1) prints the traceback behind an error.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys

from .errors import MissingExtraError
from .hyper import check_balancing, check_hyper, count

ALL = "\0all"   # `inmap cache --clear` without a key

EXIT_OK, EXIT_CHECK_FAILED, EXIT_USAGE, EXIT_INPUT, EXIT_RUNTIME, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130

# The library's choices, here so that option errors need no torch import (tests/test_cli_*.py
# check them against _ops.BACKENDS, rows.PRECISIONS, fit.MODES, class_prior.CLASS_PRIORS,
# solver.STOP_RULES and solver.SOLVERS).
BACKENDS = ("auto", "ext", "torch", "triton")
PRECISIONS = ("auto", "fp64", "fp32", "tf32", "bf16x3", "fp16", "bf16")
MODES = ("default", "paper")
CLASS_PRIORS = ("auto", "uniform", "estimate", "none")
STOP_RULES = ("auto", "none")
SOLVERS = ("lbfgs", "gd")
MODEL_COMMANDS = ("fit", "predict", "eval", "extract")

HYPER = [  # (flag, dest, type, default, help): every hyper-parameter of fit_vision_proxy
    ("--tau-t", "tau_t", float, 0.01, "temperature of the pseudo labels"),
    ("--tau-i", "tau_i", float, 0.04, "temperature of the vision proxy softmax"),
    ("--alpha", "alpha", float, 0.6, "confidence threshold: rows with max > alpha become one-hot"),
    ("--sinkhorn-iters", "sinkhorn_iters", int, 20, "Sinkhorn balancing iterations (0: none)"),
    ("--gamma", "gamma", float, 0.0, "class-prior exponent of the balancing (0: uniform)"),
    ("--iters", "iters", int, 2000, "the most passes of the solver (gd: gradient steps)"),
    ("--lr", "lr", float, 10.0, "initial learning rate (gd: halved when the gradient norm "
     "grows; lbfgs: its first step)"),
    ("--backend", "backend", str, "auto", "auto | ext | torch | triton"),
    ("--chunk-size", "chunk_size", int, None, "rows per chunk (default: automatic)"),
    ("--tol", "tol", float, None, "early stop when the largest per-class proxy change < tol"),
    ("--compute-precision", "precision", str, "auto",
     "GEMM precision of the fit: auto | fp64 | fp32 | tf32 | bf16x3 | fp16 | bf16 (16-bit: "
     "CUDA; bf16 also on CPUs where torch has MKL's bfloat16 GEMM: faster with AMX / "
     "AVX512-BF16; bf16x3: CPU, float32 GEMMs as three bfloat16 GEMMs, 1.5-1.9x faster passes "
     "with AMX at D >= 512 and 100+ classes)"),
    ("--class-prior", "class_prior", str, None,
     "what the pseudo labels are balanced to: auto (default: decided from the images) | "
     "uniform (published) | estimate | none | a file of 'class weight' lines or JSON "
     "{class: weight} (0 = known absent; classes not listed get 0)"),
    ("--mode", "mode", str, "default",
     "default | paper: exactly the published algorithm (uniform prior, every step)"),
    ("--stop", "stop", str, None,
     "when the solver stops: auto (default: once the objective settles) | none "
     "(every --iters pass; the paper mode's)"),
    ("--solver", "solver", str, None,
     "lbfgs (default: Riemannian L-BFGS, a few dozen passes) | gd (the published descent; "
     "the paper mode's)"),
]


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


DEFAULT_WORKERS = min(4, _usable_cores())
DEFAULT_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")   # = shards.DEFAULT_IMAGE_KEYS, no torch


def _common(p, model_required=True):
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1 (default cpu)")
    _debug(p)
    p.add_argument("--log", choices=["text", "json", "quiet"], default="text",
                   help="text with progress bars (default), json lines on stderr, or quiet")
    p.add_argument("--quiet", "-q", action="store_const", const="quiet", dest="log",
                   help="same as --log quiet")


def _debug(p):
    p.add_argument("--debug", action="store_true",
                   help="print the traceback behind an error (also INMAP_DEBUG=1)")


def _model(p, required=True):
    p.add_argument("--model", required=required, help="open_clip architecture, e.g. ViT-B-32")
    p.add_argument("--pretrained", default=None,
                   help="open_clip pretrained tag (downloaded when online, cached after), a "
                        "local checkpoint file, or 'none' for random weights (seed 0: the same "
                        "model every run). " + (
                            "Default: the weights the proxy was fitted with" if not required else
                            "Default: the model's 'openai' tag where open_clip has one (e.g. "
                            "ViT-B-32), else its first listed tag; never random unless asked"))
    p.add_argument("--precision", dest="model_precision", choices=["fp32", "amp", "amp_bf16"],
                   default="fp32", help="image/text encoder precision; amp = fp16 autocast on "
                   "CUDA (the fit's own precision: --compute-precision)")


def _images(p, features: bool = False):
    """--images (and with ``features``, --features instead of it: one of the two)."""
    where = p.add_mutually_exclusive_group(required=True) if features else p
    where.add_argument("--images", required=not features,
                       help="image folder (searched recursively), a text file listing image "
                       "paths, or webdataset tar shards: a brace pattern "
                       "'shards/{00000..00099}.tar', a folder of .tar files or a text file "
                       "listing them (needs the [wds] extra)")
    if features:
        where.add_argument("--features", default=None,
                           help="precomputed image embeddings instead of images (no image "
                           "encoder runs): a .npy file, a .safetensors file or a "
                           "clip-retrieval output folder (img_emb/*.npy, ids from "
                           "metadata/*.parquet)")
    p.add_argument("--wds-image-keys", default=",".join(DEFAULT_IMAGE_KEYS),
                   help="tar shards: the member extensions that hold a sample's image, first "
                   f"found wins (default {','.join(DEFAULT_IMAGE_KEYS)})")
    p.add_argument("--batch-size", type=int, default=64,
                   help="images per encoder batch (default 64)")
    p.add_argument("--workers", type=int, default=DEFAULT_WORKERS,
                   help=f"DataLoader worker processes (default {DEFAULT_WORKERS}: the usable "
                   "cores, at most 4)")
    p.add_argument("--cache-dir", default=None,
                   help="feature cache (default $INMAP_CACHE or ~/.cache/inmap_ext/features)")
    p.add_argument("--no-cache", dest="use_cache", action="store_false",
                   help="recompute features even if cached")


def _classes(p):
    p.add_argument("--classes", required=True,
                   help="'imagenet', a text file (one class per line) or JSON (list, or object "
                        "folder name -> class name)")
    p.add_argument("--templates", default="simple",
                   help="'simple' (the paper's 7), 'openai' (80) or a file of templates with "
                        "{} or {c}")


def _hyper(p):
    g = p.add_argument_group("InMaP hyper-parameters (published defaults)")
    for flag, dest, typ, default, help_ in HYPER:
        shown = "" if default is None else f" (default {default})"
        g.add_argument(flag, dest=dest, type=typ, default=default, help=help_ + shown)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="inmap", description="InMaP: turn a CLIP zero-shot classifier into a better one "
        "using unlabeled images of the target domain.",
        epilog="exit codes: 0 ok, 1 check failed, 2 usage, 3 bad input, 4 runtime error, "
        "130 interrupted. --debug (or INMAP_DEBUG=1) shows the traceback behind an error.")
    ap.add_argument("--version", action="version", version=_version())
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("fit", help="images + classes -> vision proxy, report, predictions",
                       description="Fit a vision proxy: writes OUT/proxy.safetensors, "
                       "OUT/report.json and OUT/predictions.csv.")
    _model(p)
    _images(p, features=True)
    _classes(p)
    p.add_argument("--prompts", default=None,
                   help="JSON class -> list of prompts (CuPL style), instead of templates")
    p.add_argument("--labels", choices=["auto", "folder", "none"], default="auto",
                   help="labels from an ImageFolder layout (auto: when folders match classes)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--topk", type=int, default=5, help="classes per image in predictions.csv")
    p.add_argument("--labeled", default=None, metavar="FILE",
                   help="labels for a few of the images, to settle the class prior: lines "
                        "'IMAGE<TAB or comma>CLASS NAME' (IMAGE: its path as listed, or its id "
                        "for shards and embeddings), or a folder CLASS/IMAGE holding copies or "
                        "links of some of the images; a small random sample is best")
    _hyper(p)
    _common(p)

    p = sub.add_parser("predict", help="saved proxy + images -> predictions CSV",
                       description="Classify images with a saved vision proxy: writes a CSV "
                       "of the top-k classes and cosines per image.")
    p.add_argument("--proxy", required=True, help="proxy.safetensors written by `inmap fit`")
    _model(p, required=False)
    _images(p, features=True)
    p.add_argument("--out", required=True, help="predictions CSV to write (and its report, "
                   "OUT without .csv + .report.json)")
    p.add_argument("--topk", type=int, default=5, help="classes per image (default 5)")
    p.add_argument("--force", action="store_true",
                   help="predict even with another model or weights than the proxy was fitted "
                   "with (otherwise an error: its classes would not match the image features)")
    _common(p)

    p = sub.add_parser("extract", help="image features only, into the cache (reused by fit)",
                       description="Encode the images into the feature cache, for later fits.")
    _model(p)
    _images(p)
    p.add_argument("--shard-size", type=int, default=None,
                   help="images per cache shard, the unit an interrupted run resumes from "
                   "(default: about 1/32 of the images, 32 to 4096; tar shards resume shard "
                   "by shard)")
    _common(p)

    p = sub.add_parser("eval", help="zero-shot vs InMaP accuracy on a labeled image folder",
                       description="Zero-shot, published InMaP and the default fit on a labeled "
                       "ImageFolder: CLIP_benchmark-shaped records.")
    _model(p)
    _images(p)
    _classes(p)
    p.add_argument("--dataset", default=None, help="dataset name for the JSON (default: folder)")
    p.add_argument("--out", default=None, help="JSON results file (CLIP_benchmark shape)")
    _hyper(p)
    _common(p)

    p = sub.add_parser("export", help="proxy -> plain (D, C) tensor for clip_benchmark --load_clfs",
                       description="Write the vision proxy as a plain D x C tensor file.")
    p.add_argument("--proxy", required=True, help="proxy.safetensors written by `inmap fit`")
    p.add_argument("--out", required=True, help="file to write (torch.save of a D x C tensor)")
    p.add_argument("--device", default="cpu", help="accepted by every subcommand; the export "
                   "itself runs on the CPU")
    _debug(p)

    p = sub.add_parser("demo", help="the built-in offline demo (synthetic problem + pipeline)")
    p.add_argument("--n", type=int, default=None, help="synthetic images (default 1000)")
    p.add_argument("--dim", type=int, default=None, help="synthetic feature dimension (128)")
    p.add_argument("--classes", type=int, default=None, help="synthetic classes (default 30)")
    p.add_argument("--iters", type=int, default=None, help="most gradient steps (default 2000)")
    p.add_argument("--model", default="ViT-B-32", help="open_clip architecture of the pipeline "
                   "stage (default ViT-B-32, random weights offline)")
    p.add_argument("--pretrained", default=None, help="weights of the pipeline stage (default: "
                   "random)")
    p.add_argument("--device", default=None, help="default: cpu, and cuda when present")
    p.add_argument("--no-pipeline", action="store_true", help="only the synthetic comparison")
    _debug(p)

    p = sub.add_parser("check", help="compiled kernels vs the pure-torch backend on this machine")
    p.add_argument("--device", action="append", default=None,
                   help="device(s) to check (default: cpu and cuda when present)")
    p.add_argument("--json", dest="json_out", default=None, help="also write the table as JSON")
    _debug(p)

    p = sub.add_parser("cache", help="list or clear the feature cache",
                       description="List the cached feature sets (key, model, weights, images, "
                       "size, date) and their total, or delete them.")
    p.add_argument("--cache-dir", default=None,
                   help="feature cache (default $INMAP_CACHE or ~/.cache/inmap_ext/features)")
    p.add_argument("--clear", nargs="?", const=ALL, default=None, metavar="KEY",
                   help="delete every cached feature set, or the one whose key starts with KEY")
    p.add_argument("--device", default="cpu", help="accepted by every subcommand; unused here")
    _debug(p)
    return ap


def _version() -> str:
    from .version import __version__

    return f"inmap_ext {__version__}"


def torch_rank(group) -> int:
    import torch.distributed as dist

    return dist.get_rank(group)


def _hyper_kwargs(args) -> dict:
    return {dest: getattr(args, dest) for _, dest, *_ in HYPER}


DEVICE = re.compile(r"cpu|cuda(:[0-9]+)?")     # the devices the commands run on


def _check_options(args) -> None:
    """Every option error before any model is loaded or image read (hours on a big set); the
    checks here need no torch, so that they answer at once."""
    if getattr(args, "batch_size", None) is not None:
        count(args.batch_size, "--batch-size", 1)
    if getattr(args, "workers", None) is not None:
        count(args.workers, "--workers", 0)
    if getattr(args, "topk", None) is not None:
        count(args.topk, "--topk", 1)
    if getattr(args, "shard_size", None) is not None:
        count(args.shard_size, "--shard-size", 1)
    if getattr(args, "wds_image_keys", None) is not None:
        args.image_keys = _image_keys(args.wds_image_keys)
    features = getattr(args, "features", None)
    if features is not None and not os.path.exists(features):
        raise ValueError(f"--features {features}: no such file or folder")
    if args.command == "demo":
        for flag, dest, least in (("--n", "n", 1), ("--dim", "dim", 1), ("--classes", "classes", 1),
                                  ("--iters", "iters", 0)):
            if getattr(args, dest, None) is not None:
                count(getattr(args, dest), flag, least)
    if hasattr(args, "tau_t"):
        _check_hyper(args)
    prompts = getattr(args, "prompts", None)
    if prompts is not None and not os.path.isfile(prompts):
        raise ValueError(f"--prompts {prompts}: no such file")
    _check_outputs(args)
    devices = getattr(args, "device", None)
    for device in ([devices] if isinstance(devices, str) else devices or []):
        if not DEVICE.fullmatch(device):
            raise ValueError(f"--device must be cpu, cuda or cuda:N, got {device!r}")
        if device.startswith("cuda") and args.command not in ("export", "cache"):
            import torch        # export and cache run on the CPU: --device is unused there

            if not torch.cuda.is_available():
                raise ValueError(f"--device {device}: no CUDA device is available here "
                                 f"(torch {torch.__version__}, CUDA build: "
                                 f"{torch.version.cuda or 'no'}); use --device cpu")
    if hasattr(args, "precision") and isinstance(devices, str):
        _check_compute(args.backend, args.precision, devices)
    if args.command in MODEL_COMMANDS and getattr(args, "model", None):
        _check_model(args)


def _image_keys(text: str) -> tuple:
    """--wds-image-keys: comma-separated member extensions (= shards.parse_image_keys)."""
    keys = tuple(k.strip().lower().lstrip(".") for k in text.split(","))
    if any(not k or "/" in k for k in keys):
        raise ValueError(f"--wds-image-keys must be comma-separated member extensions such as "
                         f"'jpg,png,webp', got {text!r}")
    return keys


def _check_compute(backend: str, precision: str, device: str) -> None:
    """--backend and --compute-precision against --device: a kernel set or precision the device
    cannot run fails here, not after every image has been encoded."""
    if precision == "bf16x3":
        from ._ops import cpu_bf16x3_available
        from .rows import no_cpu_bf16_gemm

        why = ("it splits the compiled CPU kernels' float32 GEMMs" if not device == "cpu" else
               f"it runs in the compiled CPU kernels, not on --backend {backend}"
               if backend not in ("auto", "ext") else
               None if cpu_bf16x3_available() else no_cpu_bf16_gemm())
        if why is not None:
            raise ValueError(f"--compute-precision bf16x3 needs --device cpu and the compiled "
                             f"CPU kernels: {why}")
        return _check_backend_of(backend, device)
    if precision in ("fp16", "bf16") and not device.startswith("cuda"):
        if precision == "bf16":
            from ._ops import cpu_bf16_available

            if cpu_bf16_available():    # the CPU kernels' bfloat16 GEMMs (csrc/cpu/bf16_gemm.h)
                return _check_backend_of(backend, device)
        raise ValueError(f"--compute-precision {precision} needs --device cuda (16-bit "
                         "tensor-core GEMMs" + (
                             "; bf16 also runs on a CPU where torch has MKL's bfloat16 GEMM, "
                             "not in this install" if precision == "bf16" else "")
                         + f"); on {device} use fp32 or fp64")
    _check_backend_of(backend, device)


def _check_backend_of(backend: str, device: str) -> None:
    if backend in ("ext", "triton"):
        from ._ops import resolve_backend

        try:
            resolve_backend(backend, device)
        except RuntimeError as e:
            raise ValueError(f"--backend {backend}: {e}; use --backend auto or torch") from None


def _check_hyper(args) -> None:
    """The numeric hyper-parameters (hyper.check_hyper, by flag) and the class prior /
    mode / stop / backend / precision options."""
    check_hyper(args.tau_t, args.tau_i, args.alpha, args.sinkhorn_iters, args.gamma, args.iters,
                args.lr, args.tol, args.chunk_size, name=lambda arg: "--" + arg.replace("_", "-"))
    if args.backend not in BACKENDS:
        raise ValueError(f"--backend must be one of {', '.join(BACKENDS)}, got {args.backend!r}")
    if args.precision not in PRECISIONS:
        raise ValueError(f"--compute-precision must be one of {', '.join(PRECISIONS)}, got "
                         f"{args.precision!r}")
    if args.mode not in MODES:
        raise ValueError(f"--mode must be one of {', '.join(MODES)}, got {args.mode!r}")
    cp = args.class_prior
    if cp is not None and cp not in CLASS_PRIORS:
        if not os.path.isfile(cp):
            raise ValueError(f"--class-prior must be one of {', '.join(CLASS_PRIORS)} or a file "
                             f"of class weights; {cp!r} is neither")
    if args.stop is not None and args.stop not in STOP_RULES:
        raise ValueError(f"--stop must be {' or '.join(STOP_RULES)}, got {args.stop!r}")
    if args.solver is not None and args.solver not in SOLVERS:
        raise ValueError(f"--solver must be {' or '.join(SOLVERS)}, got {args.solver!r}")
    if args.mode == "paper" and args.solver == "lbfgs":
        raise ValueError("--mode paper runs the published descent; drop --solver lbfgs")
    if args.mode == "paper" and (args.stop == "auto" or args.tol is not None):
        raise ValueError("--mode paper runs every --iters step; drop --stop auto / --tol")
    check_balancing(args.sinkhorn_iters, cp not in (None, "auto", "uniform", "none"), cp,
                    name=lambda arg: "--" + arg.replace("_", "-"), sep=" ")
    if args.mode == "paper" and cp not in (None, "uniform"):
        raise ValueError(f"--mode paper runs the published uniform prior; drop --class-prior "
                         f"{cp} (or use --mode default)")


# -- outputs: checked before any work --------------------------------------------------------
def _probe_dir(d: str, flag: str, path: str) -> None:
    """``d`` (an existing folder) accepts a new file: one is created and removed."""
    import tempfile

    try:
        fd, tmp = tempfile.mkstemp(prefix=".inmap-write-check-", dir=d)
    except OSError as e:
        raise ValueError(f"{flag} {path}: cannot write in {d} ({e.strerror or e})") from None
    os.close(fd)
    os.unlink(tmp)


def _existing_ancestor(path: str, flag: str, given: str) -> str:
    """The nearest existing folder above ``path`` (the folders below it would be made)."""
    d = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(d):
        d = os.path.dirname(d)
    if not os.path.isdir(d):
        raise ValueError(f"{flag} {given}: {d} is a file, not a folder")
    return d


def check_output(path: str, flag: str, kind: str = "file") -> None:
    """An output path the command will write: ``kind`` "dir" (a folder, made if needed) or
    "file". It must not be the other kind already, and the place must be writable; the error
    names ``flag``. Nothing is left behind."""
    p = os.path.abspath(path)
    if kind == "dir":
        if os.path.exists(p) and not os.path.isdir(p):
            raise ValueError(f"{flag} {path}: is an existing file; {flag} names a folder "
                             "(it is made if needed)")
        _probe_dir(p if os.path.isdir(p) else _existing_ancestor(p, flag, path), flag, path)
        return
    if os.path.isdir(p):
        raise ValueError(f"{flag} {path}: is a folder; {flag} names a file to write")
    if path.endswith(os.sep) or (os.altsep and path.endswith(os.altsep)):
        raise ValueError(f"{flag} {path}: names a folder; {flag} names a file to write")
    if os.path.exists(p):
        try:
            with open(p, "ab"):
                pass
        except OSError as e:
            raise ValueError(f"{flag} {path}: cannot be written ({e.strerror or e})") from None
        return
    _probe_dir(_existing_ancestor(p, flag, path), flag, path)


def _check_outputs(args) -> None:
    cmd = args.command
    out = getattr(args, "out", None)
    if cmd == "fit":
        check_output(out, "--out", "dir")
    elif cmd in ("predict", "eval", "export") and out:
        check_output(out, "--out", "file")
        if cmd == "predict":
            check_output(_predict_report_path(out), "--out (its report)", "file")
    elif cmd == "check" and getattr(args, "json_out", None):
        check_output(args.json_out, "--json", "file")


def _predict_report_path(out: str) -> str:   # = pipeline.predict_report_path, without torch
    return os.path.splitext(out)[0] + ".report.json"


def _check_model(args) -> None:
    """The architecture, and the weights (the default filled in), before any image is listed:
    an unknown model, an unknown tag or weights that cannot be had offline fail in one line."""
    from . import clip as clip_mod

    clip_mod.check_model_name(args.model)
    if args.pretrained is None and args.command != "predict":
        args.pretrained = clip_mod.default_pretrained(args.model)
        args.pretrained_default = True
    if args.pretrained is not None:
        try:
            clip_mod.check_weights(args.model, args.pretrained)
        except ValueError as e:
            if getattr(args, "pretrained_default", False):
                raise ValueError(f"{e} (no --pretrained given: {args.pretrained!r} is the "
                                 f"default for {args.model})") from None
            raise


def run(args) -> int:
    _check_options(args)
    if args.command in MODEL_COMMANDS:
        from . import pipeline

        with pipeline.Log(args.log).routing_third_party():
            return _run(args)
    return _run(args)


def _run(args) -> int:
    cmd = args.command
    if cmd in MODEL_COMMANDS:
        from . import pipeline
    if cmd in ("fit", "predict", "eval"):
        # options shared by the image commands (_model, _images, _common)
        common = dict(pretrained=args.pretrained, images=args.images, device=args.device,
                      model_precision=args.model_precision, batch_size=args.batch_size,
                      workers=args.workers, cache_dir=args.cache_dir, use_cache=args.use_cache,
                      log=pipeline.Log(args.log), model=args.model, out=args.out,
                      command=getattr(args, "command_line", None))
        sources = dict(features=args.features, image_keys=args.image_keys) \
            if cmd in ("fit", "predict") else {}
    if cmd == "fit":
        pipeline.fit_images(classes=args.classes, templates=args.templates, prompts=args.prompts,
                            labels=args.labels, topk=args.topk, labeled=args.labeled,
                            **common, **sources,
                            **_hyper_kwargs(args))
    elif cmd == "predict":
        pipeline.predict_images(proxy=args.proxy, topk=args.topk, force=args.force, **common,
                                **sources)
    elif cmd == "eval":
        pipeline.eval_images(classes=args.classes, templates=args.templates,
                             dataset=args.dataset, **common, **_hyper_kwargs(args))
    elif cmd == "extract":
        from . import clip as clip_mod

        group = pipeline._group(args.device)
        log = pipeline.Log(args.log if group is None or torch_rank(group) == 0 else "quiet")
        image_set = pipeline.list_source(args.images, labels="none",   # a bad path fails
                                         image_keys=args.image_keys)   # before
        clip = clip_mod.load_model(args.model, args.pretrained, args.device,   # the model loads
                                   args.model_precision, cache_dir=args.cache_dir)
        pipeline._log_images(image_set, log)
        pipeline._log_missing(image_set, log)
        pipeline.extract(clip, image_set, log, group=group,
                         cache_dir=args.cache_dir, use_cache=args.use_cache,
                         batch_size=args.batch_size, workers=args.workers,
                         shard_size=args.shard_size)
    elif cmd == "export":
        from . import pipeline

        w = pipeline.export_classifier(args.proxy, args.out)
        print(f"wrote {args.out}: a {tuple(w.shape)} float32 tensor (D x C)", file=sys.stderr)
    elif cmd == "demo":
        from . import demo

        return demo.main(args)
    elif cmd == "check":
        from .check import run_check

        rows = run_check(args.device)
        if args.json_out:
            with open(args.json_out, "w") as f:
                json.dump(rows, f, indent=1)
        from .check import failed

        return EXIT_CHECK_FAILED if any(failed(r) for r in rows) else EXIT_OK
    elif cmd == "cache":
        _cache_command(args.cache_dir, args.clear)
    return EXIT_OK


def _cache_command(cache_dir, clear) -> None:
    """`inmap cache`: a table of the entries and the total (stdout), or --clear [KEY]."""
    from .cache import clear_cache, default_cache_dir, list_entries

    d = cache_dir or default_cache_dir()
    if clear is not None:
        gone = clear_cache(d, None if clear == ALL else clear)
        size = sum(e.size_bytes for e in gone)
        print(f"removed {len(gone)} cached feature set(s) ({_size(size)}) from {d}"
              + "".join(f"\n  {e.key}  {e.model}  {e.n_images} images  {_shown(e.root)}"
                        for e in gone))
        return
    entries = list_entries(d)
    print(f"feature cache {d}: {len(entries)} feature set(s), "
          f"{_size(sum(e.size_bytes for e in entries))}")
    if entries:
        print(f"{'key':24}  {'model':16} {'weights':40} {'images':>15} {'size':>9}  "
              f"{'created':19}  images under")
    for e in entries:
        n = f"{e.n_images}" if e.complete else f"{e.n_cached}/{e.n_images} (partial)"
        print(f"{e.key:24}  {e.model:16} {_short(e.weights, 40):40} {n:>15} "
              f"{_size(e.size_bytes):>9}  {e.created:19}  {_shown(e.root)}")


def _shown(text: str) -> str:
    """A path for the terminal: bytes that are not UTF-8 (surrogate escapes) become U+FFFD."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def _short(s: str, width: int) -> str:
    return s if len(s) <= width else s[:width - 3] + "..."


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.command_line = shlex.join(["inmap"] + argv)
    debug = getattr(args, "debug", False) or os.environ.get("INMAP_DEBUG", "") not in ("", "0")
    try:
        return run(args)
    except BrokenPipeError:   # `inmap cache | head`: the reader left; stop quietly
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):
            pass
        return EXIT_OK
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ValueError, TypeError, FileNotFoundError, MissingExtraError) as e:
        _traceback(debug)
        print(f"inmap {args.command}: error: {e}", file=sys.stderr)
        return EXIT_INPUT
    except Exception as e:  # noqa: BLE001 - reported, never swallowed silently
        _traceback(debug)
        print(f"inmap {args.command}: failed: {type(e).__name__}: {e}"
              + ("" if debug else " (--debug or INMAP_DEBUG=1 shows the traceback)"),
              file=sys.stderr)
        return EXIT_RUNTIME


def _traceback(debug: bool) -> None:
    if debug:
        import traceback

        traceback.print_exc()


if __name__ == "__main__":
    sys.exit(main())
