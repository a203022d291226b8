"""The fit's numeric hyper-parameters and the scalar checks behind them, without torch: the
library checks its arguments here and the CLI its flags (so that option errors answer before
torch is imported). Each error names the argument and what was expected."""
from __future__ import annotations

import math
import numbers

# The largest scale a temperature's inverse, the learning rate or gamma may have: far outside
# any sensible value (published: tau 0.01 / 0.04, eta 10, gamma 0-1), and small enough that
# logits, Sinkhorn log-biases and the step eta / (N tau_i) stay finite in float32 (max 3.4e38)
# whatever the other arguments are.
LARGEST_SCALE = 1e12


def check_hyper(tau_t, tau_i, alpha, sinkhorn_iters, gamma, iters, lr, tol, chunk_size,
                name=lambda arg: arg):
    """The numeric hyper-parameters of ``fit_vision_proxy``, checked and converted; errors name
    each by ``name(argument)`` (the CLI passes its flags, so it can check before any work)."""
    return (temperature(tau_t, name("tau_t")),
            temperature(tau_i, name("tau_i")),
            in_unit_interval(alpha, name("alpha")),
            count(sinkhorn_iters, name("sinkhorn_iters")),
            at_most(non_negative(gamma, name("gamma")), LARGEST_SCALE, name("gamma")),
            count(iters, name("iters")),
            at_most(positive(lr, name("lr")), LARGEST_SCALE, name("lr")),
            None if tol is None else positive(tol, name("tol")),
            None if chunk_size is None else count(chunk_size, name("chunk_size"), 1))


def check_balancing(sinkhorn_iters: int, balances: bool, prior: str, name=lambda arg: arg,
                    sep: str = "=") -> None:
    """A class prior that is a Sinkhorn target (the estimate, given proportions) contradicts
    sinkhorn_iters=0 (no balancing): refused rather than silently dropped."""
    if sinkhorn_iters == 0 and balances:
        cp, si = name("class_prior"), name("sinkhorn_iters")
        raise ValueError(f"{cp}{sep}{prior} balances the pseudo labels, but {si}{sep}0 turns "
                         f"balancing off; set {si} above 0 (default 20) or {cp}{sep}none")


def _real(value) -> bool:
    """A real number (Python or numpy scalar), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def temperature(value, name: str) -> float:
    """A temperature in [1 / LARGEST_SCALE, LARGEST_SCALE]."""
    value = positive(value, name)
    if not 1 / LARGEST_SCALE <= value <= LARGEST_SCALE:
        raise ValueError(f"{name} must be in [{1 / LARGEST_SCALE:g}, {LARGEST_SCALE:g}] (its "
                         f"inverse scales float32 logits), got {value!r}")
    return value


def at_most(value: float, largest: float, name: str) -> float:
    if value > largest:
        raise ValueError(f"{name} must be at most {largest:g} (larger overflows float32), "
                         f"got {value!r}")
    return value


def positive(value, name: str) -> float:
    if not _real(value) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def in_unit_interval(value, name: str) -> float:
    if not _real(value) or not 0 <= value <= 1:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


def non_negative(value, name: str) -> float:
    if not _real(value) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def count(value, name: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)
