"""The image features as a fit reads them: one source of feature rows for the three routes.

Features reach ``fit_vision_proxy`` by one of three routes:

- **in memory**, one process: checked (shape, dtype, NaN/Inf, zero rows) and L2-normalised once
  (``validation.check_features_and_proxies``);
- **sharded** (``process_group``): each rank passes its own rows; the shards are checked to agree
  (D, dtype, device, class count) and rank 0's text proxies are broadcast
  (``distributed.check_shard``); the passes sum over every rank's rows;
- **streamed** (``device`` other than the features', or ``stream=True``): the rows stay where
  they are (host memory, a memory map) and are checked chunk by chunk without a copy
  (``validation.check_host_features``), then copied to the compute device a chunk at a time on
  every pass and normalised there (``streaming.StreamingRunner``); sharded or not.

``check_rows`` picks the route and checks the inputs before any expensive work (the caller
then checks its own arguments against ``Rows.local_rows`` and ``Rows.classes``); ``Rows.open``
makes the rows what the ops read (any copy the kernels would make per call, made once) and
counts them over every rank. ``Rows`` holds the rows, the text proxies, the number of rows and
the ``Runner`` that owns the ops' backend, the chunking and the reductions across ranks.
Everything after it (the class-prior decision, the pseudo labels, the solver) reads the rows
only through ``Rows.runner``: the method is one code path for the three routes.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional

import torch

from . import _ops, validation
from .distributed import check_shard
from .functional import Runner
from .reference import acc_dtype
from .streaming import StreamingRunner

Tensor = torch.Tensor

PRECISIONS = ("auto", "fp64", "fp32", "tf32", "bf16x3", "fp16", "bf16")
_PRECISION_DTYPES = {"fp64": torch.float64, "fp32": torch.float32, "tf32": torch.float32,
                     "bf16x3": torch.float32,
                     "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Rows:
    runner: Runner              # backend, chunking, reductions over ranks (StreamingRunner: streams)
    x: Tensor                   # this rank's rows as the ops read them (streamed: where they live)
    text: Tensor                # D x C text proxies, unit columns, compute device, float32/64
    tf32: Optional[bool]        # the TF32 switch the fit runs under (None: leave torch's)
    n: Optional[int] = None     # rows over every rank (``open``)
    bf16x3: bool = False        # CPU kernels: float32 GEMMs as three bfloat16 GEMMs

    @property
    def classes(self) -> int:
        return self.text.shape[1]

    @property
    def gemm(self) -> str:
        """What the feature GEMMs compute in: "bf16x3" (the CPU kernels' three bfloat16 GEMMs),
        "tf32" (float32 on CUDA with TF32 on, asked for or torch's switch), else the compute
        dtype ("float32", "float64", "float16", "bfloat16")."""
        name = str(self.runner.dtype).replace("torch.", "")
        if self.bf16x3:
            return "bf16x3"
        if self.runner.device.type == "cuda" and self.runner.dtype == torch.float32:
            on = self.tf32 if self.tf32 is not None else _ops.cuda_tf32_enabled()
            return "tf32" if on else name
        return name

    @property
    def local_rows(self) -> int:
        """This rank's rows."""
        return self.x.shape[0]

    def open(self) -> "Rows":
        """The rows as every op of the fit will read them (``Runner.own_features``: a padded
        copy made once where the fused CUDA kernels would make one per call) and their number
        over every rank (an all-reduce in a sharded fit: every rank calls it)."""
        if not self.runner.streams:
            self.x = self.runner.own_features(self.x)
        self.n = int(self.runner.sum_(torch.tensor(self.local_rows,
                                                   device=self.runner.device)).item())
        return self


def check_rows(image_features, text_proxies, *, device=None, stream: bool = False,
               process_group=None, backend: str = "auto", chunk_size: Optional[int] = None,
               precision: str = "auto") -> Rows:
    """Check the features and the text proxies on the route the arguments name (module
    docstring) and return their ``Rows`` (not yet ``open``: nothing copied, no collective
    beyond the shards' agreement on the problem)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if (device is not None and torch.device(device).type == "cuda"
            and not torch.cuda.is_available()):
        raise ValueError(f"device={device!r}: no CUDA device is available here (torch "
                         f"{torch.__version__}, CUDA build: {torch.version.cuda or 'no'})")
    streaming = stream or (device is not None and isinstance(image_features, torch.Tensor)
                           and torch.device(device) != image_features.device)
    if isinstance(image_features, torch.Tensor) and process_group is None:
        # the cheap refusal before the checks (sharded: after check_shard, where every rank
        # raises alike, since the ranks' devices may differ)
        compute_dtype(precision, image_features.dtype,
                      torch.device(device if device is not None else image_features.device),
                      backend, warn=False)     # the route's own call below warns once
    if streaming:
        compute = torch.device(device if device is not None else image_features.device)
        if process_group is not None:
            x, t, scale = check_shard(image_features, text_proxies, process_group, compute)
        else:
            x, t = validation.check_shapes(image_features, text_proxies)
            t = validation.cpu_upcast(t.to(compute))    # as in memory: never 16-bit on the CPU
            t = validation.normalise(t, validation.check_finite(t, "text_proxies", 0), 0)
            scale = validation.check_host_features(x)
        dtype, tf32, split = compute_dtype(precision, x.dtype, compute, backend)
        runner = StreamingRunner(compute, backend, chunk_size, x.shape[0], t.shape[1], dtype,
                                 process_group, scale)
    else:
        if process_group is None:
            x, t = validation.check_features_and_proxies(image_features, text_proxies)
        else:
            x, t, _ = check_shard(image_features, text_proxies, process_group)
        dtype, tf32, split = compute_dtype(precision, x.dtype, x.device, backend)
        x = x.to(dtype)
        if dtype == torch.bfloat16 and x.device.type == "cpu":
            x = x.contiguous()     # row-major for the CPU's bfloat16 GEMMs (once, not per pass)
        runner = Runner(x.device, backend, chunk_size, x.shape[0], t.shape[1], dtype,
                        process_group)
    t = t.to(device=runner.device, dtype=acc_dtype(runner.dtype))
    return Rows(runner, x, t, tf32, bf16x3=split)


def no_cpu_bf16_gemm() -> str:
    """Why the CPU kernels have no bfloat16 GEMM here (precision="bf16" / "bf16x3" refused)."""
    return ("this install has no bfloat16 GEMM with float32 output on the CPU: "
            + ("the compiled extension did not load" if not _ops.extension_loaded() else
               "torch's build lacks MKL's cblas_gemm_bf16bf16f32"))


def _slower_without_amx(precision: str) -> None:
    """Warn where a bfloat16 precision asked for on the CPU runs slower than float32."""
    if not _ops.cpu_has_amx():
        warnings.warn(f"precision={precision!r}: this CPU has no AMX, and MKL's bfloat16 GEMM "
                      "is slower than float32 without it (a bf16x3 pass ~3x, a bf16 pass ~1.4x "
                      "a float32 one on an AMD EPYC with AVX512-BF16); precision='auto' or "
                      "'fp32' is faster here", UserWarning, stacklevel=6)


def compute_dtype(precision: str, dtype: torch.dtype, device: torch.device,
                  backend: str = "auto", warn: bool = True):
    """(compute dtype of the features, TF32 switch: True/False, or None = leave torch's,
    bf16x3: whether the CPU kernels run their float32 GEMMs as three bfloat16 GEMMs).
    precision="bf16" on the CPU: bfloat16 features for the compiled CPU kernels' bfloat16 GEMMs
    (``_ops.cpu_bf16_available``), refused where this build has none. precision="bf16x3":
    float32 features, on the CPU's compiled kernels only (``_ops.cpu_bf16x3_available``).
    precision="auto" follows torch's float32 matmul setting on every device: on CUDA its TF32
    switch is left as it is; on the CPU, where torch allows float32 matmuls below float32
    (``_ops.torch_allows_reduced_cpu_matmul``: ``torch.set_float32_matmul_precision("high")``
    or ``("medium")``; torch >= 2.9), the compiled kernels run and the CPU has AMX
    (``_ops.cpu_has_amx``: where bf16x3 is faster than float32), bf16x3 (about 16 bits of
    mantissa: at least what "high" and "medium" allow), else float32."""
    if precision == "bf16x3":
        why = None
        if device.type != "cpu":
            why = (f"it splits the compiled CPU kernels' GEMMs; on {device.type} use 'fp32' "
                   "(or 'tf32')")
        elif backend not in ("auto", "ext"):
            why = f"it runs in the compiled CPU kernels, not on backend={backend!r}"
        elif not _ops.cpu_bf16x3_available():
            why = no_cpu_bf16_gemm()
        if why is not None:
            raise ValueError(f"precision='bf16x3' needs CPU tensors and the compiled CPU "
                             f"kernels: {why}")
        if warn:
            _slower_without_amx(precision)
        return torch.float32, None, True
    if precision == "bf16" and device.type == "cpu" and _ops.cpu_bf16_available():
        if warn:
            _slower_without_amx(precision)
        return torch.bfloat16, None, False
    if precision in ("fp16", "bf16") and device.type != "cuda":
        why = ("16-bit tensor-core GEMMs" if precision == "fp16" or device.type != "cpu" else
               no_cpu_bf16_gemm())
        raise ValueError(f"precision={precision!r} needs CUDA tensors ({why}); on "
                         f"{device.type} use 'fp32' or 'fp64'")
    dtype = _PRECISION_DTYPES.get(precision, dtype)
    if device.type != "cuda" and dtype in (torch.float16, torch.bfloat16):
        dtype = torch.float32          # "auto" on the CPU: its kernels compute in float32
    split = (precision == "auto" and device.type == "cpu" and dtype == torch.float32
             and backend in ("auto", "ext") and _ops.torch_allows_reduced_cpu_matmul()
             and _ops.cpu_has_amx() and _ops.cpu_bf16x3_available())
    return dtype, {"fp32": False, "tf32": True}.get(precision), split
