"""Where the class-prior decision reads the zero-shot logits Z = X T / tau_t from.

The decision (class_prior.py: EM, the Sinkhorn balancings, the scoring pass) reads the same
logits again and again, and they never change during it. ``StoredLogits`` computes them in one
pass over the features and keeps them, per row shifted by its maximum and exponentiated,
E = exp(Z - max_row Z) in [0, 1], as row chunks on the compute device. Every later read is then
N x C arithmetic instead of an N x D x C GEMM, and a Sinkhorn or EM iteration is one read of
the store (the two matrix-vector products below, fused by the compiled CPU op
``stored_column_sums``; its torch twin elsewhere) without an exponential:

    softmax(Z + beta)_ij = E_ij b_j / r_i,   b = exp(beta - max beta),  r = E b,
    log colsum_j = log b_j + log sum_i E_ij / r_i.

The store is kept only within a memory budget (``budget_bytes``: ``DEFAULT_BUDGET_BYTES``,
1 GiB, or the environment variable ``INMAP_LOGIT_STORE_BYTES``): float64 when N x C x 8 bytes
fit ``PRECISE_TIER_BYTES`` (128 MiB; with the environment variable, its budget), else float32
when N x C x 4 bytes do (the decision's arithmetic to float32 rounding), else bfloat16 when
N x C x 2 bytes fit the budget (a relative error of at most 2^-9 per probability:
log-probabilities within 0.004; its effect on the decision is measured in docs/class_prior.md).
Without the environment variable a bfloat16 store may also grow beyond 1 GiB, up to
``AVAILABLE_SHARE`` (a quarter) of the memory available on the compute device when the decision
starts (``capacity_bytes``: MemAvailable of /proc/meminfo on the CPU, within the process's
memory cgroup limit, the free memory on CUDA; shared by the ranks of a host in a sharded fit):
the same bits as the partial store below, read without computing any row again (at N = 1M,
C = 1000 a 2 GB store where 8 GB are available). Beyond that, a partial store: the bfloat16 logits of the first rows the budget holds (whole pieces of
whole chunks of the runner's, so that the rows after them make the chunks of a pass from there
on), and every
read computes the other rows' E again from their features (a GEMM over those rows, counted as a
pass: ``reads_recomputed``) and reads it as if stored, the bits of a whole bfloat16 store; one
such pass serves every bias of a read (balancings in lockstep, the scoring read's candidates).
Where the budget holds less than a chunk of rows: no store, ``PassSource`` reads the logits with
a pass over the features each time, as the decision always did. At N = 400k, C = 1000 the
bfloat16 store takes 0.8 GB; at N = 1M a partial store keeps 536k rows in 1 GiB. In a sharded
fit each rank stores its own rows (the budget is per rank, and every rank picks the dtype the
largest shard fits and, for a partial store, whether there is one from the largest chunk, so
that all store alike or none does; every rank counts a pass when one computes rows again).

Exponentials underflow below e^-87 (float32 and bfloat16 alike; e^-708 in float64). On CLIP
features a row's logits span far less than that at tau_t = 0.01 (cosines within 0.87 of the
row's best), so no entry is lost (``exact``: checked when the store is built) and every read is
exact to the store's and the arithmetic's rounding whatever the bias; the one remaining hazard
is a bias so spread that exp(bias - max bias) underflows for every class a row holds, which
shows as that row's biased mass r_i falling below C tiny / eps of the arithmetic. (The factor C:
the compiled CPU read flushes subnormal numbers to zero, for speed, and since r_i <= C an entry
below C tiny can meet one in the column sums; so "lost" means below C tiny.) Where entries
were lost (a store built with a very small tau_t), a bias that lifts a class by more than
``safe_bias_range`` above a class holding some row's largest logit could need one of them. In
either case the read could be wrong: that one read is made with a pass over the features
instead (``reads_on_passes``), so the store never changes a result beyond rounding.
"""
from __future__ import annotations

import math
import os
from typing import Callable, Iterator, Optional, Tuple

import torch

from . import _ops, verify
from .memory import available_bytes
from .reference import _logits, acc_dtype

Tensor = torch.Tensor

DEFAULT_BUDGET_BYTES = 1 << 30
PRECISE_TIER_BYTES = 128 << 20  # without ENV: the float64 / float32 tiers hold at most this many
                                # bytes. A read is bound by memory bandwidth (~12 GB/s here), so
                                # a float64 store of 800 MB (N = 100k, C = 1000) made each of the
                                # decision's ~85 reads 4x as long as a bfloat16 one; beyond this
                                # size the bfloat16 store's rounding averages out over the rows
                                # (every decision of the robustness bench the same with every set
                                # read from bfloat16: docs/class_prior.md)
AVAILABLE_SHARE = 0.25      # without ENV: a bfloat16 store may take up to this share of the
                            # memory available on the compute device (at least the 1 GiB above)
ENV = "INMAP_LOGIT_STORE_BYTES"
DTYPE_ENV = "INMAP_LOGIT_STORE_DTYPE"   # float64 / float32 / bfloat16: force the store's dtype
                                        # whatever the budget (benchmarks of its rounding)


def kept_floor(store: torch.dtype, c: int) -> float:
    """The smallest stored entry every read keeps: C tiny (module docstring)."""
    return c * torch.finfo(store).tiny


def safe_bias_range(store: torch.dtype, work: torch.dtype, c: int = 1) -> float:
    """The largest lift of a class's log-bias over a class holding some row's largest logit that
    a read of the store allows: an entry a read may lose is below log(C tiny) of its row's
    largest (about e^-80 in float32 and bfloat16 at C = 1000, e^-701 in float64); under a lift
    of at most log(C tiny) - log(eps of the arithmetic) (64 for float32 at C = 1000) it weighs
    less than the arithmetic's rounding of the row's largest biased term."""
    return -math.log(kept_floor(store, c)) - math.log(1 / torch.finfo(work).eps)


class OutOfRange(RuntimeError):
    """A log-bias spread the exponentiated store cannot represent: recompute on passes."""


def budget_bytes() -> int:
    """The store's memory budget: INMAP_LOGIT_STORE_BYTES if set (0 turns the store off), else
    DEFAULT_BUDGET_BYTES."""
    v = os.environ.get(ENV)
    if v is None or not v.strip():
        return DEFAULT_BUDGET_BYTES
    try:
        b = int(float(v))
    except ValueError:
        raise ValueError(f"{ENV} must be a number of bytes, got {v!r}") from None
    if b < 0:
        raise ValueError(f"{ENV} must be >= 0 bytes, got {v!r}")
    return b


def precise_budget_bytes() -> int:
    """The bytes of a float64 or float32 store: INMAP_LOGIT_STORE_BYTES if set (one budget for
    every dtype), else the least of ``budget_bytes`` and ``PRECISE_TIER_BYTES``."""
    v = os.environ.get(ENV)
    if v is not None and v.strip():
        return budget_bytes()
    return min(budget_bytes(), PRECISE_TIER_BYTES)


def _ranks_sharing(group, device: torch.device) -> int:
    """How many ranks of a sharded fit may share this rank's memory: on the CPU the ranks on
    this host (LOCAL_WORLD_SIZE, as torchrun sets it), else every rank of the group; on a GPU
    (one per rank) and in one process 1."""
    if group is None or torch.device(device).type != "cpu":
        return 1
    local = os.environ.get("LOCAL_WORLD_SIZE", "").strip()
    if local.isdigit() and int(local) >= 1:
        return int(local)
    return max(1, torch.distributed.get_world_size(group))


def capacity_bytes(device: torch.device, group=None) -> int:
    """The most bytes a bfloat16 store may take: INMAP_LOGIT_STORE_BYTES if set (the budget for
    every dtype, as given), else ``AVAILABLE_SHARE`` of ``available_bytes``, shared by the ranks
    of a sharded fit on one host's CPU memory (``_ranks_sharing``), and at least
    ``DEFAULT_BUDGET_BYTES``."""
    v = os.environ.get(ENV)
    if v is not None and v.strip():
        return budget_bytes()
    free = available_bytes(device)
    share = int(AVAILABLE_SHARE * free) // _ranks_sharing(group, device) if free else 0
    return max(DEFAULT_BUDGET_BYTES, share)


def store_dtype(rows: int, c: int, budget: int, capacity: Optional[int] = None
                ) -> Optional[torch.dtype]:
    """The dtype of a store of rows x c within ``budget`` bytes, or None (no store): float64
    (range e^-708) when it fits, else float32, else bfloat16 (both range e^-87); a bfloat16 store
    may also take up to ``capacity`` bytes (default: the budget)."""
    for dt in (torch.float64, torch.float32, torch.bfloat16):
        room = max(budget, capacity or 0) if dt == torch.bfloat16 else budget
        if rows * c * torch.finfo(dt).bits // 8 <= room:
            return dt
    return None


# Rows of the storing pass's blocks on the CPU: its logits block (rows x C in the decision's
# dtype) stays within this many bytes, about a core's share of the last-level cache, so that the
# row max, the exponential and the conversion into the store read what the GEMM just wrote from
# cache instead of memory (measured at N = 400k, C = 1000: docs/method.md). The store is the
# same up to the GEMM's rounding (a BLAS may round a block's rows differently from the whole
# chunk's: within float32 rounding; on the real files and a 50k synthetic set, bit for bit).
# On CUDA one block per chunk.
STORE_BLOCK_BYTES = 1 << 21


def _store_block(rows: int, c: int, dtype: torch.dtype, device: torch.device) -> int:
    if device.type != "cpu":
        return max(rows, 1)
    return max(1, STORE_BLOCK_BYTES // (max(c, 1) * torch.finfo(dtype).bits // 8))


# Rows of the store's pieces: whole chunks of the runner's, as many as make 64 MiB of float32
# logits (at least one chunk; a partial store's pieces at most its kept rows). A read takes a
# piece per call of its op; pieces this size keep the reads' per-call costs (a few ms a read at
# N = 400k with the CPU's 4194-row chunks) out of the way. A partial store keeps whole pieces,
# and its rows computed again are read in pieces of the same rows.
STORE_PIECE_BYTES = 64 << 20


def piece_rows(chunk: int, c: int, kept: Optional[int] = None) -> int:
    rows = STORE_PIECE_BYTES // (4 * max(c, 1))
    if kept is not None:
        rows = min(rows, kept)
    return max(1, rows // chunk) * chunk


def _tick(source) -> None:
    """One read of ``source``'s logits begins: tell its ``on_read`` (a progress bar's)."""
    if source.on_read is not None:
        source.on_read()


class PassSource:
    """The logits read with a pass over the features every time (no memory beyond a chunk)."""

    stored = False
    dtype = None
    on_read: Optional[Callable[[], None]] = None    # called as every read begins (progress)

    def __init__(self, runner, x: Tensor, t: Tensor, inv_tau: float):
        self.runner, self.x, self.t, self.inv_tau = runner, x, t, inv_tau

    def column_lse(self, bias: Optional[Tensor]) -> Tensor:
        """log of the column sums of softmax(Z + bias) over the rows of every rank; a K x C
        bias (balancings in lockstep) gives K x C, a pass per row of it."""
        if bias is not None and bias.dim() == 2:
            return torch.stack([self.column_lse(b) for b in bias])
        _tick(self)
        return self.runner.column_lse(self.x, self.t, bias, self.inv_tau)

    def logit_chunks(self, betas=()) -> Iterator[Tensor]:
        """Z a row chunk at a time (one pass over the features)."""
        self.runner.count_pass()
        for xc in self.runner.row_chunks(self.x):
            yield _logits(xc, self.runner._w(self.t, xc), self.inv_tau, None)

    def scoring_chunks(self, betas=()) -> Iterator[Tuple[str, Tensor]]:
        """("log", Z) a row chunk at a time (one pass over the features)."""
        _tick(self)
        for z in self.logit_chunks(betas):
            yield "log", z


class StoredLogits:
    """exp(Z - row max) of this rank's rows, computed in one pass and kept (module docstring)."""

    stored = True
    capacity: Optional[int] = None      # the bytes ``build`` allowed a store of its dtype
    on_read: Optional[Callable[[], None]] = None    # called as every read begins (progress)

    def __init__(self, runner, x: Tensor, t: Tensor, inv_tau: float, dtype: torch.dtype,
                 kept: Optional[int] = None):
        self.runner, self.dtype = runner, dtype
        self.acc = acc_dtype(runner.dtype)                 # the decision's dtype
        self.work = torch.float64 if dtype == torch.float64 else self.acc   # the reads'
        # the exponentials are taken in the logits' dtype (acc) and stored in ``dtype``: what
        # can be lost is set by whichever of the two has the smaller range
        self.range = max(dtype, self.acc, key=lambda d: torch.finfo(d).tiny)
        self.safe_range = safe_bias_range(self.range, self.work, t.shape[1])
        self.fallback = PassSource(runner, x, t, inv_tau)  # for a read out of the store's range
        self.reads_on_passes = 0
        self.reads_recomputed = 0                           # reads of a partial store
        self._spare: Optional[Tensor] = None                # ... and its recomputed chunk
        # the ops of the reads (stored_column_sums, stored_row_scores: compiled on the CPU and
        # verified on first use against their torch twins, the twins elsewhere); resolved here,
        # on every rank, since a rank without rows never reads but takes part in the ranks'
        # agreement on the backend. The compiled reads compute in the store's own work dtype
        # (float64 for float64, else float32); a float64 fit over a float32 or bfloat16 store
        # reads in float64 with the twins.
        backend = _ops.store_backend(runner.backend, runner.device)
        if self.work != acc_dtype(dtype):
            backend = "torch"
        ops = {}
        for name in _ops.CPU_ONLY_OPS:
            ops[name], record = verify.resolve(name, backend, runner.device, dtype, runner.group)
            if backend == "ext":       # the torch twin by design (CUDA) is no fallback
                runner.ran[name] = record
        self._read, self.row_scores = ops["stored_column_sums"], ops["stored_row_scores"]
        self.c = t.shape[1]
        self.x, self.t, self.inv_tau = x, t, inv_tau
        # the rows kept: all (``kept`` None or at least this rank's rows), or (a partial store)
        # the whole pieces within the first ``kept`` rows (``piece_rows``: whole chunks, so that
        # the rows computed again make the chunks of a pass from there on and the pieces a whole
        # store would hold)
        local = x.shape[0]
        self.piece = piece_rows(runner.chunk, self.c, kept)
        self.kept = local if kept is None or kept >= local else kept // self.piece * self.piece
        # every rank reads again if one does, so that every rank counts the same passes
        again = torch.tensor(float(self.kept < local), device=runner.device)
        self.recomputes = float(runner.max_(again)) > 0
        self.rows_kept, self.rows_total = (int(v) for v in runner.sum_(torch.tensor(
            [self.kept, local], dtype=torch.float64, device=runner.device)).tolist())
        runner.count_pass()
        self.top = torch.zeros(self.c, dtype=torch.bool, device=runner.device)  # some row's max
        self._depth = torch.zeros((), dtype=self.acc, device=runner.device)
        self.chunks = list(self._pieces(runner.row_chunks(x), self.kept, track=True))
        # every stored entry at least C tiny of the store's dtype: nothing was lost, and every
        # read is exact to its arithmetic's rounding whatever the bias (on real CLIP features
        # a row's logits span far less than the 80 of float32's range at tau_t = 0.01)
        self.depth = float(self._depth)      # this rank's; every rank agrees on ``exact``
        lost = torch.tensor(float(self.depth <= math.log(kept_floor(self.range, self.c))),
                            device=runner.device)
        self.exact = float(runner.sum_(lost)) == 0
        # a row whose biased mass r_i falls below C tiny / eps of the arithmetic could be missing
        # the terms its exp(bias) underflowed: read with a pass instead
        self.r_floor = kept_floor(self.work, self.c) / torch.finfo(self.work).eps

    def _exp_chunk(self, xc: Tensor, into: Optional[Tensor] = None, track: bool = False
                   ) -> None:
        """E = exp(Z - row max) of one chunk of rows written into ``into`` (a buffer of the
        store's dtype with at least the chunk's rows), computed in row blocks whose logits stay
        in cache (``_store_block``); ``track``: also note each row's largest class and the rows'
        least logit below their largest (the range checks); ``into`` None: only that."""
        w = self.runner._w(self.t, xc)
        rows = xc.shape[0]
        into = None if into is None else into[:rows]
        block = _store_block(rows, self.c, self.acc, self.runner.device)
        for s in range(0, rows, block):
            z = _logits(xc[s:s + block], w, self.inv_tau, None)
            if track:
                zmax, top = z.max(dim=1)   # one sweep: each row's largest and where it is
                self.top[top] = True
                self._depth = torch.minimum(self._depth, (z.amin(dim=1) - zmax).min())
            else:
                zmax = z.amax(dim=1)
            if into is not None:           # E written in the store's dtype
                torch.exp(z.sub_(zmax[:, None]), out=into[s:s + block])

    def _pieces(self, chunks, keep_rows: int, track: bool = False, into=None
                ) -> Iterator[Tensor]:
        """E of the rows of ``chunks`` (the runner's row chunks), a piece (``piece_rows``) at a
        time: the first ``keep_rows`` rows, each piece in a buffer of its own (``into`` None: the
        store's) or in ``into`` (one piece's buffer, written again for every piece: each piece
        is read before the next is asked for); the rows after them only ``track``ed (the
        build's range checks), not kept."""
        buf, filled, start = None, 0, 0
        for xc in chunks:
            rows = xc.shape[0]
            if start + rows > keep_rows:               # past the kept rows (whole pieces)
                self._exp_chunk(xc, track=track)
                start += rows
                continue
            if buf is None:
                buf = into if into is not None else torch.empty(
                    min(self.piece, keep_rows - start), self.c, dtype=self.dtype,
                    device=self.runner.device)
            self._exp_chunk(xc, buf[filled:], track)
            filled += rows
            start += rows
            if filled == buf.shape[0]:
                yield buf
                buf, filled = None, 0
        if filled:
            yield buf[:filled]

    def _blocks(self) -> Iterator[Tensor]:
        """Every row's E, a piece at a time: the stored pieces, then (a partial store) the
        pieces of the rows not kept, computed again from their features into one buffer kept
        for it (fresh memory every read is page-faulted in again: a read at N = 1M, C = 1000
        took 1.9 s instead of 1.0 s). The pass this costs is counted by the read
        (``_charge``)."""
        yield from self.chunks
        if self.recomputes:
            if self._spare is None:
                self._spare = torch.empty(self.piece, self.c, dtype=self.dtype,
                                          device=self.runner.device)
            left = self.x.shape[0] - self.kept
            yield from self._pieces(self.runner.row_chunks(self.x, self.kept), left,
                                    into=self._spare)

    def _charge(self) -> None:
        """A read of a partial store is a pass over the rows not kept: counted on every rank
        before anything rank-local can end the read early (a read out of range then counts
        its pass over the features as well)."""
        if self.recomputes:
            self.runner.count_pass()
            self.reads_recomputed += 1

    @classmethod
    def build(cls, runner, x: Tensor, t: Tensor, inv_tau: float,
              budget: Optional[int] = None, dtype: Optional[torch.dtype] = None):
        """A StoredLogits within the budget, else a PassSource. ``dtype`` forces the store's
        dtype (benchmarks)."""
        # the budget of the float64 and float32 tiers, and the room of a bfloat16 one (beyond
        # 1 GiB only where the memory available allows it, the least of every rank's)
        given = budget is not None          # a budget given here holds for every dtype
        capacity = (budget if budget is not None
                    else capacity_bytes(runner.device, runner.group))
        budget = budget_bytes() if budget is None else budget
        forced = os.environ.get(DTYPE_ENV, "").strip()
        if dtype is None and forced:
            if forced not in ("float64", "float32", "bfloat16"):
                raise ValueError(f"{DTYPE_ENV} must be float64, float32 or bfloat16, got "
                                 f"{forced!r}")
            dtype = getattr(torch, forced)
        # every rank decides on its largest shard: all store (in the same dtype) or none reads
        # with passes, so that the ranks' collectives stay in step
        rows, chunk, least = (int(v) for v in runner.max_(torch.tensor(
            [x.shape[0], runner.chunk, -capacity], dtype=torch.float64,
            device=runner.device)).tolist())
        capacity = max(budget, -least)
        precise = budget if given else min(budget, precise_budget_bytes())
        kept = None
        if dtype is None:
            dtype = store_dtype(rows, t.shape[1], precise, capacity)
        if dtype is None:
            # a partial store: the first rows whose bfloat16 logits the capacity holds, if that
            # is at least a chunk on every rank (``__init__`` keeps whole pieces of whole
            # chunks); else passes
            kept = capacity // (2 * t.shape[1])
            if kept < chunk:
                return PassSource(runner, x, t, inv_tau)
            dtype = torch.bfloat16
        store = cls(runner, x, t, inv_tau, dtype, kept)
        # the budget this store's dtype was held to: the bfloat16 room, or the float64 / float32
        # tiers' budget
        store.capacity = capacity if dtype == torch.bfloat16 else precise
        return store

    @property
    def nbytes(self) -> int:
        return sum(c.numel() * c.element_size() for c in self.chunks)

    def _shift(self, bias: Optional[Tensor]) -> Tensor:
        """bias - max(bias) (log b, <= 0; -inf for an absent class), after the range check."""
        if bias is None:
            return torch.zeros(self.c, dtype=self.work, device=self.runner.device)
        bias = bias.to(device=self.runner.device, dtype=self.work)
        if bool(torch.isnan(bias).any() | torch.isposinf(bias).any()):
            raise OutOfRange("a log-bias is NaN or +inf")
        top = bias[torch.isfinite(bias)].max()
        if self.exact:
            return bias - top
        lowest = bias[self.top & torch.isfinite(bias)]      # the classes that hold a row's 1
        spread = float(top - lowest.min()) if lowest.numel() else 0.0
        if spread > self.safe_range:
            raise OutOfRange(f"a class's log-bias exceeds that of a class holding some row's "
                             f"largest logit by {spread:.1f} > {self.safe_range:.0f}")
        return bias - top

    def column_lse(self, bias: Optional[Tensor]) -> Tensor:
        """log of the column sums of softmax(Z + bias) over the rows of every rank: one read of
        each chunk (``stored_column_sums``); a bias out of the store's range is read with a pass
        over the features instead (counted in ``reads_on_passes``). Every rank takes the same
        branch (the bias is the same on every rank; a row without mass on one rank sends every
        rank to the pass). A K x C bias (K balancings in lockstep) gives K x C, each row what
        that row of the bias alone gives (in one process, bit for bit): the compiled CPU read
        reads each chunk once for the K of them, its torch twin once per row; if one of them is
        out of range, each is read on its own."""
        _tick(self)
        self._charge()
        try:
            out = self._column_lse(bias)
            bad = torch.zeros((), device=out.device)
        except OutOfRange:
            out, bad = None, torch.ones((), device=self.runner.device)
        if float(self.runner.sum_(bad)) == 0:
            out = self.runner.lse_(out)
            # a class with a finite bias whose every stored entry underflowed, on every rank
            # (a rank without rows, or whose rows' entries of a class underflowed, adds
            # nothing; judged on the all-reduced sums, so every rank takes the same branch)
            possible = torch.ones_like(out, dtype=torch.bool) if bias is None else \
                torch.isfinite(bias.to(out.device))
            if bool(torch.isfinite(out[possible]).all()):
                return out.to(self.acc)
        if bias is not None and bias.dim() == 2:
            return torch.stack([self.column_lse(b) for b in bias])
        self.reads_on_passes += 1
        return self.fallback.column_lse(bias)

    def _column_lse(self, bias: Optional[Tensor]) -> Tensor:
        many = bias is not None and bias.dim() == 2
        shift = torch.stack([self._shift(b) for b in bias]) if many else self._shift(bias)
        b = torch.exp(shift)           # a class far below the top may underflow to 0 here: its
        col = torch.zeros(shift.shape, dtype=self.work, device=b.device)  # log b is kept exact
        # a bfloat16 store is read in float32 arithmetic (the compiled CPU op widens each row
        # as it reads it; the torch twin converts chunk by chunk): bfloat16 matrix-vector products
        # round every sum to 2^-9, and moved one decision of the robustness bench's 66 across the
        # collapse guard (docs/class_prior.md)
        for e in self._blocks():
            col_c, rmin = self._read(e, b)
            if not bool((rmin >= self.r_floor).all()):
                raise OutOfRange("a row has almost no mass left under the log-bias (its "
                                 "underflowed terms could matter)")
            col += col_c
        return torch.log(col) + shift      # -inf where this rank's entries add nothing

    def scoring_chunks(self, betas=()) -> Iterator[Tuple[str, Tensor]]:
        """("exp", E) a stored chunk at a time, in the store's dtype (no pass over the features;
        ``row_scores`` reads it);
        ("log", Z) read with a pass instead if one of ``betas`` (the biases the caller will add)
        is out of the store's range."""
        _tick(self)
        bad = torch.zeros((), device=self.runner.device)
        for beta in betas:
            try:
                self._shift(beta)
            except OutOfRange:
                bad += 1
        if float(self.runner.sum_(bad)) > 0:
            self.reads_on_passes += 1
            yield from self.fallback.scoring_chunks()
            return
        self._charge()
        for e in self._blocks():
            yield "exp", e
