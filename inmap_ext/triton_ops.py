"""Design (c): the ops as fused Triton kernels (backend="triton", CUDA; opt-in until measured).

The same two-pass scheme as the CUDA design (a) (csrc/cuda/fused_tiles.cuh), written in Triton so
that on Hopper ``tl.dot`` compiles to wgmma with a multi-stage pipeline, which the WMMA kernel
cannot use: per tile of rows x classes, X·W is computed on tensor cores and consumed on chip.
  pass 1  ``_row_stats``: per row, the online log-sum-exp and argmax of v = x·w * inv_tau + bias
          over a split of the class tiles; splits merged in order on the host side (torch).
  pass 2  ``_probs``: the tile recomputed, P = exp(v - lse) (one-hot where confident) written in
          the input dtype for the cuBLAS GEMM x^T P; or ``_column_lse``: per-(row block, column)
          log-sum-exp partials of v - lse for the Sinkhorn statistic, merged in order.
No logits are stored and there are no atomics (reruns give the same bits). Inputs fp16, bf16
or fp32 (through TF32 when torch allows it, else exact); logits and statistics are fp32.

Signatures match ``reference.py`` / ``torch.ops.inmap_ext`` one to one. With
TRITON_INTERPRET=1 the kernels run on CPU tensors through Triton's interpreter, which is how the
tests check them on machines without a GPU.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from . import reference

Tensor = torch.Tensor
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _tile(x_ptr, w_ptr, rm, rn, row_ok, col_ok, D, sxn, sxd, swd, swc,
          BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr):
    """x[rm] @ w[:, rn] as a BM x BN fp32 tile (rows/columns outside the masks read as 0)."""
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, D, BK):
        rk = k0 + tl.arange(0, BK)
        k_ok = rk < D
        a = tl.load(x_ptr + rm[:, None] * sxn + rk[None, :] * sxd,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_ptr + rk[:, None] * swd + rn[None, :] * swc,
                    mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _logits(x_ptr, w_ptr, b_ptr, rm, rn, row_ok, col_ok, D, sxn, sxd, swd, swc, inv_tau,
            HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
            PRECISION: tl.constexpr):
    """v = x·w * inv_tau + bias for one tile, -inf in the columns past C."""
    v = _tile(x_ptr, w_ptr, rm, rn, row_ok, col_ok, D, sxn, sxd, swd, swc,
              BM, BN, BK, PRECISION) * inv_tau
    if HAS_BIAS:
        v += tl.load(b_ptr + rn, mask=col_ok, other=0.0)[None, :]
    return tl.where(col_ok[None, :], v, float("-inf"))


@triton.jit
def _row_stats(x_ptr, w_ptr, b_ptr, pm_ptr, ps_ptr, pa_ptr, N, D, C, sxn, sxd, swd, swc,
               inv_tau, tiles_per_split, HAS_BIAS: tl.constexpr, BM: tl.constexpr,
               BN: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1).to(tl.int64)
    rm = pid_m.to(tl.int64) * BM + tl.arange(0, BM)  # int64: rows x stride may pass 2^31
    row_ok = rm < N
    m = tl.full((BM,), float("-inf"), tl.float32)
    s = tl.zeros((BM,), tl.float32)
    best = tl.zeros((BM,), tl.int64)
    # A split's tiles past the last one (only in the last split) have every column masked to
    # -inf and leave the state unchanged; every split starts with a real tile.
    for i in range(0, tiles_per_split):
        t = pid_s * tiles_per_split + i
        rn = t * BN + tl.arange(0, BN)
        v = _logits(x_ptr, w_ptr, b_ptr, rm, rn, row_ok, rn < C, D, sxn, sxd, swd, swc, inv_tau,
                    HAS_BIAS, BM, BN, BK, PRECISION)
        tmax = tl.max(v, axis=1)
        targ = tl.argmax(v, axis=1, tie_break_left=True)
        m_new = tl.maximum(m, tmax)
        # shift by 0 while the row has only -inf so far (a -inf log-bias): never -inf - -inf
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - shift) + tl.sum(tl.exp(v - shift[:, None]), axis=1)
        best = tl.where(tmax > m, (t * BN + targ).to(tl.int64), best)  # ties: earlier tile
        m = m_new
    out = pid_s * N + rm
    tl.store(pm_ptr + out, m, mask=row_ok)
    tl.store(ps_ptr + out, s, mask=row_ok)
    tl.store(pa_ptr + out, best, mask=row_ok)


@triton.jit
def _tile_ids(C, BN: tl.constexpr):
    """(row block, class tile) of this program in pass 2's 1-D grid, class tiles fastest: the
    resident programs share a few row blocks of x while w stays in L2, so x is read from HBM
    about once per pass rather than once per class tile."""
    tiles = tl.cdiv(C, BN)
    pid = tl.program_id(0).to(tl.int64)
    return pid // tiles, pid % tiles


@triton.jit
def _probs(x_ptr, w_ptr, b_ptr, lse_ptr, arg_ptr, conf_ptr, p_ptr, N, D, C, sxn, sxd, swd, swc,
           spn, inv_tau, HAS_BIAS: tl.constexpr, THRESHOLD: tl.constexpr, BM: tl.constexpr,
           BN: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr):
    pid_m, pid_n = _tile_ids(C, BN)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    row_ok = rm < N
    col_ok = rn < C
    v = _logits(x_ptr, w_ptr, b_ptr, rm, rn, row_ok, col_ok, D, sxn, sxd, swd, swc, inv_tau,
                HAS_BIAS, BM, BN, BK, PRECISION)
    lse = tl.load(lse_ptr + rm, mask=row_ok, other=float("inf"))  # rows past N: p = 0
    p = tl.exp(v - lse[:, None])
    if THRESHOLD:
        conf = tl.load(conf_ptr + rm, mask=row_ok, other=0) != 0
        arg = tl.load(arg_ptr + rm, mask=row_ok, other=-1)
        p = tl.where(conf[:, None], (rn[None, :] == arg[:, None]).to(tl.float32), p)
    tl.store(p_ptr + rm[:, None] * spn + rn[None, :], p.to(p_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _column_lse(x_ptr, w_ptr, b_ptr, lse_ptr, pm_ptr, ps_ptr, N, D, C, sxn, sxd, swd, swc,
                inv_tau, HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                BK: tl.constexpr, PRECISION: tl.constexpr):
    pid_m, pid_n = _tile_ids(C, BN)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    row_ok = rm < N
    col_ok = rn < C
    v = _logits(x_ptr, w_ptr, b_ptr, rm, rn, row_ok, col_ok, D, sxn, sxd, swd, swc, inv_tau,
                HAS_BIAS, BM, BN, BK, PRECISION)
    u = v - tl.load(lse_ptr + rm, mask=row_ok, other=0.0)[:, None]
    u = tl.where(row_ok[:, None], u, float("-inf"))
    cm = tl.max(u, axis=0)
    cm_safe = tl.where(col_ok & (cm > float("-inf")), cm, 0.0)  # -inf columns: sum 0
    cs = tl.sum(tl.exp(u - cm_safe[None, :]), axis=0)
    tl.store(pm_ptr + pid_m * C + rn, cm, mask=col_ok)
    tl.store(ps_ptr + pid_m * C + rn, cs, mask=col_ok)


# -- host side --------------------------------------------------------------------------------

def _config(dtype: torch.dtype) -> dict:
    """Tile sizes: 128 x 128 tiles, K step 64 (32 for fp32), 8 warps, 3 pipeline stages."""
    bk = 32 if dtype == torch.float32 else 64
    return dict(BM=128, BN=128, BK=bk, num_warps=8, num_stages=3)


def _precision(dtype: torch.dtype) -> Optional[str]:
    """tl.dot's input_precision: fp32 follows torch's TF32 switch; 16-bit inputs take Triton's
    default (tensor cores; an explicit "ieee" there could select a slower path)."""
    if dtype != torch.float32:
        return None
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _check(x: Tensor, w: Tensor, op: str) -> None:
    if x.dtype not in DTYPES:
        raise TypeError(f"{op}: the triton backend takes float16, bfloat16 or float32 features, "
                        f"got {x.dtype} (use backend='ext' or 'torch' for float64)")
    if w.dtype != x.dtype or w.device != x.device:
        raise ValueError(f"{op}: x and w must share dtype and device, got {x.dtype} on "
                         f"{x.device} and {w.dtype} on {w.device}")


def _multiprocessors(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _row_pass(xc, w, bias, inv_tau, cfg, prec):
    """Pass 1 for one chunk, merged over the class splits in order: (lse [rows] fp32,
    argmax [rows] int64 (first maximal class), largest probability [rows])."""
    rows, D = xc.shape
    C = w.shape[1]
    row_blocks, tiles = triton.cdiv(rows, cfg["BM"]), triton.cdiv(C, cfg["BN"])
    want = max(1, min(tiles, -(-2 * _multiprocessors(xc.device) // row_blocks)))
    per_split = -(-tiles // want)
    splits = -(-tiles // per_split)
    pm = torch.empty(splits, rows, dtype=torch.float32, device=xc.device)
    ps = torch.empty_like(pm)
    pa = torch.empty(splits, rows, dtype=torch.int64, device=xc.device)
    _row_stats[(row_blocks, splits)](
        xc, w, bias if bias is not None else pm, pm, ps, pa, rows, D, C, xc.stride(0),
        xc.stride(1), w.stride(0), w.stride(1), float(inv_tau), per_split,
        HAS_BIAS=bias is not None, PRECISION=prec, **cfg)
    top = pm.max(dim=0).values
    shift = torch.where(torch.isneginf(top), torch.zeros_like(top), top)
    lse = top + torch.log((ps * torch.exp(pm - shift)).sum(dim=0))
    first = (pm == top).to(torch.int8).argmax(dim=0, keepdim=True)  # earliest split holding it
    arg = pa.gather(0, first)[0]
    return lse, arg, torch.exp(top - lse)


def _tile_grid(rows: int, C: int, cfg: dict):
    """Pass 2's 1-D grid over every (row block, class tile) (see _tile_ids)."""
    return (triton.cdiv(rows, cfg["BM"]) * triton.cdiv(C, cfg["BN"]),)


def _softmax_chunks(x, w, bias, inv_tau, alpha, chunk, threshold):
    """Per chunk: (xc, P, arg, confident, row lse) with P = the (thresholded) softmax in x's
    dtype."""
    C = w.shape[1]
    cfg, prec = _config(x.dtype), _precision(x.dtype)
    for xc in reference._chunks(x, chunk):
        lse, arg, top = _row_pass(xc, w, bias, inv_tau, cfg, prec)
        conf = top > alpha if threshold else torch.zeros_like(arg, dtype=torch.bool)
        p = torch.empty(xc.shape[0], C, dtype=x.dtype, device=x.device)
        _probs[_tile_grid(xc.shape[0], C, cfg)](
            xc, w, bias if bias is not None else lse, lse, arg, conf.to(torch.uint8), p,
            xc.shape[0], xc.shape[1], C, xc.stride(0), xc.stride(1), w.stride(0), w.stride(1),
            p.stride(0), float(inv_tau), HAS_BIAS=bias is not None, THRESHOLD=threshold,
            PRECISION=prec, **cfg)
        yield xc, p, arg, conf, lse


_MM_OUT_DTYPE = [True]  # torch.mm(..., out_dtype=) exists (torch >= 2.8 on CUDA)


def _xt_p(xc: Tensor, p: Tensor) -> Tensor:
    """xc^T @ p with fp32 output (cuBLAS on CUDA: 16-bit inputs, fp32 accumulation and out)."""
    if xc.is_cuda and xc.dtype != torch.float32 and _MM_OUT_DTYPE[0]:
        try:
            return torch.mm(xc.T, p, out_dtype=torch.float32)
        except (TypeError, RuntimeError):
            _MM_OUT_DTYPE[0] = False
    return xc.T.float() @ p.float()


def softmax_column_lse(x: Tensor, w: Tensor, bias: Optional[Tensor], inv_tau: float,
                       chunk: int) -> Tensor:
    _check(x, w, "softmax_column_lse")
    C = w.shape[1]
    cfg, prec = _config(x.dtype), _precision(x.dtype)
    run = torch.full((1, C), float("-inf"), dtype=torch.float32, device=x.device)
    bias = None if bias is None else bias.to(torch.float32).contiguous()
    for xc in reference._chunks(x, chunk):
        lse, _, _ = _row_pass(xc, w, bias, inv_tau, cfg, prec)
        grid = _tile_grid(xc.shape[0], C, cfg)
        pm = torch.empty(triton.cdiv(xc.shape[0], cfg["BM"]), C, dtype=torch.float32,
                         device=x.device)
        ps = torch.empty_like(pm)
        _column_lse[grid](xc, w, bias if bias is not None else lse, lse, pm, ps, xc.shape[0],
                          xc.shape[1], C, xc.stride(0), xc.stride(1), w.stride(0), w.stride(1),
                          float(inv_tau), HAS_BIAS=bias is not None, PRECISION=prec, **cfg)
        run = torch.logsumexp(torch.cat([run, pm + torch.log(ps)]), dim=0, keepdim=True)
    return run[0]


def pseudo_label_reduce(x: Tensor, w: Tensor, bias: Optional[Tensor], inv_tau: float,
                        alpha: float, chunk: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    _check(x, w, "pseudo_label_reduce")
    D, C = w.shape
    B = torch.zeros(D, C, dtype=torch.float32, device=x.device)
    mass = torch.zeros(C, dtype=torch.float32, device=x.device)
    counts = torch.zeros(C, dtype=torch.int64, device=x.device)
    n_confident = torch.zeros((), dtype=torch.int64, device=x.device)
    bias = None if bias is None else bias.to(torch.float32).contiguous()
    for xc, p, arg, conf, _ in _softmax_chunks(x, w, bias, inv_tau, alpha, chunk, True):
        mass += p.sum(dim=0, dtype=torch.float32)
        counts.index_add_(0, arg, torch.ones_like(arg))   # on the device: no sync per chunk
        n_confident += conf.sum()
        B += _xt_p(xc, p)
    return B, mass, counts, n_confident


def xt_softmax(x: Tensor, w: Tensor, inv_tau: float, chunk: int) -> Tuple[Tensor, Tensor]:
    _check(x, w, "xt_softmax")
    G = torch.zeros(w.shape, dtype=torch.float32, device=x.device)
    lse_sum = torch.zeros((), dtype=torch.float64, device=x.device)
    for xc, p, _, _, lse in _softmax_chunks(x, w, None, inv_tau, 0.0, chunk, False):
        G += _xt_p(xc, p)
        lse_sum += lse.double().sum()       # pass 1's row log-sum-exps: no second GEMM
    return G, lse_sum.float()


topk_scores = reference.topk_scores  # one GEMM + torch.topk per chunk, as in every backend
