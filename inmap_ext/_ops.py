"""Where Python meets the compiled ops: loading ``inmap_ext._C``, fake (meta) kernels for
torch.compile, and the backend choice between the compiled ops and ``reference.py``.

``op(name, backend, device)`` returns the callable that runs op ``name``; both backends take the
same arguments (see ``csrc/inmap.cpp``).
"""
from __future__ import annotations

import contextlib
import os
import warnings
from typing import Callable, Iterator

import torch

from . import reference

OP_NAMES = ("softmax_column_lse", "pseudo_label_reduce", "xt_softmax", "topk_scores")
# Ops compiled for the CPU only (csrc/inmap.cpp says why); elsewhere their torch twin runs.
CPU_ONLY_OPS = ("stored_column_sums", "stored_row_scores")
BACKENDS = ("auto", "ext", "torch", "triton")
# The CUDA kernels' design, read by the compiled ops on every call (csrc/cuda/design.cuh):
# "chunked" (default) or "fused" (fp16 / bf16 / TF32 on sm_80+; other inputs stay chunked).
DESIGN_ENV = "INMAP_CUDA_DESIGN"
CUDA_DESIGNS = ("chunked", "fused")

# The fused kernels read x in rows of a multiple of this many elements, 16-byte aligned
# (csrc/cuda/fused_tiles.cuh kPadD); other x is zero-padded into such a copy.
FUSED_PAD_D = 32

_LOAD_ERROR: "Exception | None" = None
try:
    from . import _C  # noqa: F401  (registers torch.ops.inmap_ext.*)
except Exception as e:  # pragma: no cover - exercised by the CPU-only / no-extension installs
    _LOAD_ERROR = e
    warnings.warn(
        f"inmap_ext: the compiled extension could not be loaded ({type(e).__name__}: {e}); "
        "running on the pure-torch backend (correct, slower). Reinstall with "
        "`pip install --no-build-isolation .` to build it.",
        RuntimeWarning,
        stacklevel=2,
    )


def extension_loaded() -> bool:
    return _LOAD_ERROR is None


def load_error() -> str:
    """Why the compiled extension did not load ("" when it did)."""
    return "" if _LOAD_ERROR is None else f"{type(_LOAD_ERROR).__name__}: {_LOAD_ERROR}"


def _has_kernel(name: str, dispatch_key: str) -> bool:
    if not extension_loaded():
        return False
    qualified = f"inmap_ext::{name}"
    return torch._C._dispatch_has_kernel_for_dispatch_key(qualified, dispatch_key) or \
        torch._C._dispatch_has_kernel_for_dispatch_key(qualified, "CompositeExplicitAutograd")


def ext_available(device: "torch.device | str") -> bool:
    """True when compiled kernels of every op exist for ``device``'s type (cpu, cuda)."""
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(torch.device(device).type)
    return key is not None and all(_has_kernel(n, key) for n in OP_NAMES)


def cpu_bf16_available() -> bool:
    """True when the compiled CPU kernels take bfloat16 features (precision="bf16" on the CPU):
    this torch build has a bfloat16 GEMM with float32 output (MKL's, x86-64; AMX or AVX512-BF16
    units make it fast; csrc/cpu/bf16_gemm.h)."""
    if not (_has_kernel("xt_softmax", "CPU") and hasattr(torch.ops.inmap_ext,
                                                          "cpu_bf16_gemm_available")):
        return False
    return bool(torch.ops.inmap_ext.cpu_bf16_gemm_available())


def cpu_bf16x3_available() -> bool:
    """True when the compiled CPU kernels can run float32 GEMMs as three bfloat16 GEMMs
    (precision="bf16x3": csrc/cpu/bf16x3.h; the bfloat16 GEMM of ``cpu_bf16_available``)."""
    return cpu_bf16_available() and hasattr(torch.ops.inmap_ext, "cpu_bf16x3_enabled")


def cpu_has_amx() -> bool:
    """True when this CPU has AMX tiles (torch's own probe; False where torch has none), where
    MKL's bfloat16 GEMM makes a bf16x3 pass 0.5-0.65 of a float32 pass. With AVX512-BF16 alone
    (e.g. AMD EPYC) a bf16x3 pass took ~3x a float32 one (2026-12-06)."""
    probe = getattr(getattr(torch, "cpu", None), "_is_amx_tile_supported", None)
    try:
        return bool(probe()) if probe is not None else False
    except Exception:   # a private probe: its absence or failure means "not known to have AMX"
        return False


def _compile_disabled(f):
    """``f`` left out of torch.compile's graphs (run eagerly, with a graph break): the bf16x3
    switch's ops take no tensors, and traced they would run once while tracing, not when the
    compiled code runs."""
    disable = getattr(getattr(torch, "compiler", None), "disable", None)
    return disable(f) if disable is not None else f


@_compile_disabled
def _set_cpu_bf16x3(on: bool) -> bool:
    return bool(torch.ops.inmap_ext.cpu_bf16x3(bool(on)))


@contextlib.contextmanager
def cpu_bf16x3(enabled: bool) -> Iterator[None]:
    """Run the compiled CPU kernels' float32 GEMMs of the enclosed block, in this thread, as
    three bfloat16 GEMMs each (``enabled``) or as float32 GEMMs; the switch is restored after.
    Without the switch's op (no extension, or a build without it) only False is accepted."""
    if not cpu_bf16x3_available():
        if enabled:
            raise RuntimeError("precision='bf16x3' needs the compiled CPU kernels with a "
                               "bfloat16 GEMM (MKL's cblas_gemm_bf16bf16f32)")
        yield
        return
    before = _set_cpu_bf16x3(enabled)
    try:
        yield
    finally:
        _set_cpu_bf16x3(before)


def cpu_bf16x3_active() -> bool:
    """Whether this thread's CPU float32 GEMMs run as three bfloat16 GEMMs now."""
    return cpu_bf16x3_available() and _cpu_bf16x3_enabled()


@_compile_disabled
def _cpu_bf16x3_enabled() -> bool:
    return bool(torch.ops.inmap_ext.cpu_bf16x3_enabled())


def proxy_dtype(dtype: torch.dtype, device: "torch.device | str",
                backend: str = "ext") -> torch.dtype:
    """The dtype of the class columns w the ops take with features of ``dtype`` on ``device``:
    the features' own, but float32 for bfloat16 features on the CPU (its kernels split w into
    two bfloat16 parts, csrc/cpu/chunked_cpu.h; the torch ops multiply in float32), except on
    the Triton backend, whose ops take one dtype."""
    if dtype == torch.bfloat16 and torch.device(device).type == "cpu" and backend != "triton":
        return torch.float32
    return dtype


def store_backend(backend: str, device: "torch.device | str") -> str:
    """The backend of a CPU-only op (``CPU_ONLY_OPS``) for a fit on the resolved ``backend``:
    "ext" where its compiled kernel exists for ``device``, else "torch"."""
    ok = backend == "ext" and torch.device(device).type == "cpu" and all(
        _has_kernel(n, "CPU") for n in CPU_ONLY_OPS)
    return "ext" if ok else "torch"


def triton_version() -> "tuple | None":
    """(major, minor) of the installed Triton, or None when there is none."""
    try:
        import triton
    except ImportError:
        return None
    return tuple(int(v) for v in triton.__version__.split(".")[:2] if v.isdigit())


def triton_available(device: "torch.device | str") -> "str | None":
    """None when the Triton kernels (triton_ops.py) can run on ``device``, else why not: they
    need Triton and a CUDA device, or TRITON_INTERPRET=1 (Triton's CPU interpreter, for tests)."""
    version = triton_version()
    if version is None:
        return "Triton is not installed"
    if torch.device(device).type != "cuda":
        if os.environ.get("TRITON_INTERPRET") != "1":
            return f"it runs on CUDA tensors (got {torch.device(device).type})"
        if version < (3, 8):   # seen with 3.6 + numpy 2.4: loops with run-time bounds fail
            return (f"Triton's CPU interpreter needs Triton >= 3.8 for these kernels "
                    f"(found {'.'.join(map(str, version))})")
    return None


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def resolve_backend(backend: str, device: "torch.device | str") -> str:
    """Map "auto" / "ext" / "torch" / "triton" to the backend that will run. "auto" picks the
    compiled kernels for the device when present, else torch; "triton" is opt-in."""
    check_backend(backend)
    device = torch.device(device)
    if backend == "torch":
        return "torch"
    if backend == "triton":
        why = triton_available(device)
        if why is not None:
            raise RuntimeError(f"backend='triton' cannot run: {why}")
        return "triton"
    if ext_available(device):
        return "ext"
    if backend == "ext":
        why = (f"the extension failed to load: {_LOAD_ERROR}" if _LOAD_ERROR is not None
               else f"it was built without {device.type} kernels")
        raise RuntimeError(f"backend='ext' requested for {device.type} tensors, but {why}")
    return "torch"


@contextlib.contextmanager
def cuda_design(design: str) -> Iterator[None]:
    """Run the CUDA ops of the enclosed block with ``design`` ("chunked" or "fused")."""
    if design not in CUDA_DESIGNS:
        raise ValueError(f"design must be one of {CUDA_DESIGNS}, got {design!r}")
    before = os.environ.get(DESIGN_ENV)
    os.environ[DESIGN_ENV] = design
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(DESIGN_ENV, None)
        else:
            os.environ[DESIGN_ENV] = before


def cuda_tf32_enabled() -> bool:
    """Whether torch lets float32 matmuls on CUDA run through TF32: the legacy switch
    torch.backends.cuda.matmul.allow_tf32, or, where the user set torch's per-backend API
    (``torch.backends.cuda.matmul.fp32_precision``, torch >= 2.9) and the legacy switch refuses
    to mix with it, that API."""
    matmul = torch.backends.cuda.matmul
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return bool(matmul.allow_tf32)
        except RuntimeError:
            return matmul.fp32_precision == "tf32"


@contextlib.contextmanager
def allow_tf32(enabled: "bool | None") -> Iterator[None]:
    """Set torch.backends.cuda.matmul.allow_tf32 for the enclosed block (None: leave it). Where
    the user set torch's per-backend API (``torch.backends.cuda.matmul.fp32_precision``, torch
    >= 2.9), the legacy switch refuses to mix with it: that API is set instead."""
    if enabled is None:
        yield
        return
    matmul = torch.backends.cuda.matmul
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            legacy, before = True, matmul.allow_tf32
            matmul.allow_tf32 = enabled
        except RuntimeError:
            legacy, before = False, matmul.fp32_precision
            matmul.fp32_precision = "tf32" if enabled else "ieee"
    try:
        yield
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if legacy:
                matmul.allow_tf32 = before
            else:
                matmul.fp32_precision = before


def _cpu_matmul_setting():
    """torch.backends.mkldnn.matmul (torch >= 2.9: its ``fp32_precision`` is torch's own setting
    for float32 matmuls on the CPU), or None where torch has no such setting."""
    matmul = getattr(getattr(torch.backends, "mkldnn", None), "matmul", None)
    return matmul if getattr(matmul, "fp32_precision", None) is not None else None


def torch_allows_reduced_cpu_matmul() -> bool:
    """Whether torch's own setting lets float32 matmuls on the CPU compute below float32:
    ``torch.backends.mkldnn.matmul.fp32_precision`` "tf32" or "bf16" (torch >= 2.9), which
    ``torch.set_float32_matmul_precision("high")`` and ``("medium")`` set. "none" (the default,
    also after only a CUDA switch such as ``torch.backends.cuda.matmul.allow_tf32 = True``) and
    "ieee": no. Older torch has no CPU setting of its own: no (its legacy getter reads the CUDA
    switch, and raises where the new per-backend API was used)."""
    matmul = _cpu_matmul_setting()
    return matmul is not None and matmul.fp32_precision in ("tf32", "bf16")


@contextlib.contextmanager
def cpu_matmul_ieee() -> Iterator[None]:
    """torch's own float32 matmuls on the CPU in float32 for the enclosed block
    (``torch.backends.mkldnn.matmul.fp32_precision = "ieee"``, restored after; nothing where
    torch has no such setting, torch < 2.9, or it is "ieee" or "none" already).
    ``torch.set_float32_matmul_precision("medium")`` lets oneDNN compute them in bfloat16: a
    fit's own D x C algebra (the solver's inner products with its history, the decision's sums)
    must not follow it; its feature GEMMs follow ``precision`` (rows.compute_dtype: "auto" runs
    bf16x3 there). The setting is process-wide: fits running at once in several threads share
    it (the first to end restores the user's value while another runs)."""
    matmul = _cpu_matmul_setting()
    before = None if matmul is None else matmul.fp32_precision
    if before is None or before in ("ieee", "none"):
        yield
        return
    # the getter gives the value matmul inherits from torch.backends.mkldnn where it has none of
    # its own: put "none" back then, so that it keeps inheriting
    inherited = before == getattr(torch.backends.mkldnn, "fp32_precision", None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        matmul.fp32_precision = "ieee"
    try:
        yield
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            matmul.fp32_precision = "none" if inherited else before


def fused_design_requested(x: torch.Tensor) -> bool:
    """True when the compiled CUDA ops would run ``x`` through the fused design
    (csrc/cuda/design.cuh ``use_fused``: INMAP_CUDA_DESIGN=fused, fp16 / bf16 / TF32-allowed
    fp32, sm_80+), short of its check of the loaded kernels' PTX version."""
    return x.device.type == "cuda" and cuda_design_of(x.device, x.dtype) == "fused"


def cuda_design_of(device: "torch.device | str", dtype: torch.dtype) -> str:
    """The design ("chunked" or "fused") the compiled CUDA ops run for ``dtype`` on the CUDA
    ``device`` under the current INMAP_CUDA_DESIGN and TF32 setting."""
    chosen = os.environ.get(DESIGN_ENV)
    if chosen not in (None, "", *CUDA_DESIGNS):     # the kernels refuse it (design.cuh): say so
        raise ValueError(f"{DESIGN_ENV}={chosen!r}: expected one of {CUDA_DESIGNS}")
    if chosen != "fused":
        return "chunked"
    if not (dtype in (torch.float16, torch.bfloat16) or
            (dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32)):
        return "chunked"
    return "fused" if torch.cuda.get_device_capability(device)[0] >= 8 else "chunked"


def op(name: str, backend: str) -> Callable:
    """The callable running op ``name`` on a resolved backend ("ext", "torch" or "triton")."""
    if backend == "ext":
        return getattr(torch.ops.inmap_ext, name).default
    if backend == "triton":
        from . import triton_ops  # imports Triton: only when asked for

        return getattr(triton_ops, name)
    return getattr(reference, name)


if extension_loaded():
    # Shape functions, so that torch.compile / FakeTensor see through the ops.
    def _acc(x):
        return reference.acc_dtype(x.dtype)

    @torch.library.register_fake("inmap_ext::softmax_column_lse")
    def _(x, w, bias, inv_tau, chunk):
        return x.new_empty((w.shape[1],), dtype=_acc(x))

    @torch.library.register_fake("inmap_ext::pseudo_label_reduce")
    def _(x, w, bias, inv_tau, alpha, chunk):
        D, C = w.shape
        return (x.new_empty((D, C), dtype=_acc(x)), x.new_empty((C,), dtype=_acc(x)),
                x.new_empty((C,), dtype=torch.int64), x.new_empty((), dtype=torch.int64))

    @torch.library.register_fake("inmap_ext::xt_softmax")
    def _(x, w, inv_tau, chunk):
        return x.new_empty(w.shape, dtype=_acc(x)), x.new_empty((), dtype=_acc(x))

    @torch.library.register_fake("inmap_ext::stored_column_sums")
    def _(e, b):
        return b.new_empty(b.shape), b.new_empty(b.shape[:-1])

    @torch.library.register_fake("inmap_ext::stored_row_scores")
    def _(e, b):
        return (b.new_empty((e.shape[0], b.shape[0])),
                b.new_empty((e.shape[0], b.shape[0]), dtype=torch.int64))

    @torch.library.register_fake("inmap_ext::topk_scores")
    def _(x, w, k, chunk):
        return (x.new_empty((x.shape[0], k), dtype=_acc(x)),
                x.new_empty((x.shape[0], k), dtype=torch.int64))
