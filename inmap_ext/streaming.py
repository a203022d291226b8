"""Out-of-core fitting: image features that stay in host memory or on disk (a memory-mapped
tensor, e.g. ``safetensors.safe_open`` or ``torch.from_file``) and are streamed to the compute
device chunk by chunk, every pass.

On CUDA, chunks go through two pinned staging buffers and a side stream: while the GPU computes
on chunk k, the host copies chunk k+1 into the other pinned buffer and the side stream copies it
to the device, so host-to-device traffic overlaps compute. Rows are L2-normalised on the device
per chunk (the norms come from one streamed validation pass), so the host array is never copied
whole. Every op of the method is a sum (or a log-sum-exp merge) over rows, so chunk results
compose exactly like the in-memory ones.
"""
from __future__ import annotations

from typing import Iterator, Optional

import torch

from .functional import Runner
from .reference import acc_dtype

Tensor = torch.Tensor

class StreamingRunner(Runner):
    """A Runner whose ``x`` lives in host memory; ops run on ``device`` one chunk at a time."""

    streams = True

    def __init__(self, device, backend, chunk_size, n, c, compute_dtype, process_group=None,
                 row_scale: Optional[Tensor] = None):
        super().__init__(device, backend, chunk_size, n, c, compute_dtype, process_group)
        self.row_scale = None if row_scale is None else row_scale.to(self.device)
        self._bufs = None

    def _buffers(self, x: Tensor):
        if self._bufs is None:
            cs, D = self.chunk, x.shape[1]
            pinned = [torch.empty(cs, D, dtype=x.dtype, pin_memory=True) for _ in range(2)]
            dev = [torch.empty(cs, D, dtype=x.dtype, device=self.device) for _ in range(2)]
            events = [[torch.cuda.Event() for _ in range(2)] for _ in range(2)]
            self._bufs = (pinned, dev, events, torch.cuda.Stream(self.device))
        return self._bufs

    def chunks(self, x: Tensor, start: int = 0) -> Iterator[Tensor]:
        """Device copies of consecutive row chunks from row ``start`` on, normalised, in the
        compute dtype."""
        n = x.shape[0]
        if self.device.type != "cuda":
            for s in range(start, n, self.chunk):
                yield self._finish(x[s:s + self.chunk], s)
            return
        pinned, dev, (copied, consumed), side = self._buffers(x)
        main = torch.cuda.current_stream(self.device)
        for i, s in enumerate(range(start, n, self.chunk)):
            k, rows = i % 2, min(self.chunk, n - s)
            copied[k].synchronize()              # the last H2D copy out of pinned[k] is done
            pinned[k][:rows].copy_(x[s:s + rows])
            with torch.cuda.stream(side):
                side.wait_event(consumed[k])     # compute is done with dev[k]
                dev[k][:rows].copy_(pinned[k][:rows], non_blocking=True)
                copied[k].record(side)
            main.wait_event(copied[k])
            yield self._finish(dev[k][:rows], s)
            consumed[k].record(main)

    row_chunks = chunks

    def _finish(self, xc: Tensor, start: int) -> Tensor:
        if self.row_scale is not None:
            scale = self.row_scale[start:start + xc.shape[0], None]
            return (xc.to(acc_dtype(self.dtype)) * scale).to(self.dtype)
        return xc.to(self.dtype)

    # -- the ops, composed over chunks ------------------------------------------------------
    def column_lse(self, x, w, bias, inv_tau):
        out = torch.full((w.shape[1],), float("-inf"), dtype=acc_dtype(self.dtype),
                         device=self.device)
        f = self.op("softmax_column_lse", inv_tau)
        for xc in self.chunks(x):
            out = torch.logaddexp(out, f(xc, self._w(w, xc), bias, inv_tau, self.chunk))
        return self.lse_(out)

    def pseudo_labels(self, x, w, bias, inv_tau, alpha):
        f = self.op("pseudo_label_reduce", inv_tau)
        D, C = w.shape
        acc = acc_dtype(self.dtype)
        tot = [torch.zeros(D, C, dtype=acc, device=self.device),
               torch.zeros(C, dtype=acc, device=self.device),
               torch.zeros(C, dtype=torch.int64, device=self.device),
               torch.zeros((), dtype=torch.int64, device=self.device)]
        for xc in self.chunks(x):
            for t, part in zip(tot, f(xc, self._w(w, xc), bias, inv_tau, alpha, self.chunk)):
                t += part
        return tuple(self.sum_(t) for t in tot)

    def xt_softmax(self, x, w, inv_tau):
        f = self.op("xt_softmax", inv_tau)
        G = torch.zeros(w.shape, dtype=acc_dtype(self.dtype), device=self.device)
        lse_sum = torch.zeros((), dtype=acc_dtype(self.dtype), device=self.device)
        for xc in self.chunks(x):
            g, s = f(xc, self._w(w, xc), inv_tau, self.chunk)
            G += g
            lse_sum += s
        return self.sum_(G), self.sum_(lse_sum)

    def topk(self, x, w, k):
        f = self.op("topk_scores")
        parts = [f(xc, self._w(w, xc), k, self.chunk) for xc in self.chunks(x)]
        if not parts:      # an empty shard
            return (torch.empty(0, k, dtype=acc_dtype(self.dtype), device=self.device),
                    torch.empty(0, k, dtype=torch.int64, device=self.device))
        vals, idx = zip(*parts)
        return torch.cat(vals), torch.cat(idx)
