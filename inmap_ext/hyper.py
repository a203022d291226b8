"""The fit's numeric hyper-parameters and the scalar checks behind them, without torch: the
library checks its arguments here and the CLI its flags (so that option errors answer before
torch is imported). Each error names the argument and what was expected."""
from __future__ import annotations

import math


def check_hyper(tau_t, tau_i, alpha, sinkhorn_iters, gamma, iters, lr, tol, chunk_size,
                name=lambda arg: arg):
    """The numeric hyper-parameters of ``fit_vision_proxy``, checked and converted; errors name
    each by ``name(argument)`` (the CLI passes its flags, so it can check before any work)."""
    return (positive(tau_t, name("tau_t")),
            positive(tau_i, name("tau_i")),
            in_unit_interval(alpha, name("alpha")),
            count(sinkhorn_iters, name("sinkhorn_iters")),
            non_negative(gamma, name("gamma")),
            count(iters, name("iters")),
            positive(lr, name("lr")),
            None if tol is None else positive(tol, name("tol")),
            None if chunk_size is None else count(chunk_size, name("chunk_size"), 1))


def positive(value, name: str) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) \
            or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def in_unit_interval(value, name: str) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= 1:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


def non_negative(value, name: str) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) \
            or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def count(value, name: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)
