"""The linear engine's CPU step compiled: the weight update as one pass over memory, and
the loss arithmetic of a batch as a few loops instead of ~80 small kernels.

On a CPU a step of the stacked heads is bound by memory traffic, not arithmetic: the
weight gradient is written out by one product and read back by Adam, which then reads
and writes the weights and both moments. The gradient of a batch is rank B (``x^T G``
with B = 8 or 16 rows), so it can be formed on the fly inside the update instead:
one pass reads the weights and moments once and writes them once. torch.compile turns
:func:`adam_update` into that single loop; the arithmetic follows torch's fused Adam
kernel (lerp for the first moment, bias corrections as step size and sqrt), so the
weights match ``torch.optim.Adam`` to rounding.

Small fits run eagerly (see :func:`enabled`). When compilation is unavailable (no C++
compiler, an unsupported platform) or disabled with ``SPL_COMPILE=0``, the engine keeps
its eager path: the same functions run eagerly, and the update is a product followed by
torch's fused Adam kernel.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable

import torch

_broken = False
_functions: dict = {}

# Compiling saves about 1 ns per weight entry and step on a CPU and costs ~3 s with a warm
# cache (~26 s on a machine's first run), so by default only large sweeps are compiled:
# the paper's VOC-sized sweep is 1-2e10 per group, the demo 2e9.
AUTO_MIN_WORK = 1e10


def adam_update(
    x: torch.Tensor,
    grad_out: torch.Tensor,
    weight: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step_size: torch.Tensor,
    bias_correction2_sqrt: torch.Tensor,
    beta1: float,
    beta2: float,
    eps: float,
) -> None:
    """One Adam step, in place, of the stacked weights ``[blocks, D + 1, C]`` from the
    logit gradients ``grad_out [blocks, B, C]`` and the batch ``x [B, D + 1]``;
    ``step_size`` is ``lr / (1 - beta1^t)`` per block, ``[blocks, 1, 1]``. Meant to run
    compiled (:func:`attempt`): eagerly it would materialise a B-times larger product."""
    # grad[k, d, c] = sum_b x[b, d] * grad_out[k, b, c], never stored.
    grad = (x.t()[None, :, :, None] * grad_out[:, None, :, :]).sum(2)
    m = exp_avg.lerp(grad, 1 - beta1)
    v = exp_avg_sq * beta2 + grad * grad * (1 - beta2)
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)
    weight.sub_(step_size * m / (v.sqrt() / bias_correction2_sqrt + eps))


def setting() -> str:
    """``SPL_COMPILE`` as ``auto`` (the default), ``on`` or ``off``; anything else is an
    error (checked before a run directory is made)."""
    value = os.environ.get("SPL_COMPILE", "auto").strip().lower()
    if value in {"0", "false", "no", "off"}:
        return "off"
    if value in {"1", "true", "yes", "on"}:
        return "on"
    if value != "auto":
        from spl.data.common import SplError

        raise SplError(f"SPL_COMPILE={value!r}: use auto (the default), 1 or 0")
    return "auto"


def enabled(device: torch.device, work: float) -> bool:
    """Whether to compile a group's steps: with ``SPL_COMPILE=auto``, when ``work`` (weight
    entries x training steps) reaches AUTO_MIN_WORK. CPU only: on CUDA the engine replays
    CUDA graphs."""
    if device.type != "cpu" or _broken:
        return False
    chosen = setting()
    return chosen == "on" or (chosen == "auto" and work >= AUTO_MIN_WORK)


def _compile(function: Callable) -> Callable:
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)  # its import warns about CUDA_HOME on machines without CUDA
    try:
        import torch.utils.cpp_extension  # noqa: F401
    finally:
        logger.setLevel(level)
    return torch.compile(function, dynamic=None)


def _call_compiled(function: Callable, args: tuple) -> tuple[bool, object]:
    """(True, result) of the compiled ``function``; (False, None) once compilation fails,
    which warns once and turns compiling off for the process."""
    global _broken
    if _broken:
        return False, None
    compiled = _functions.get(function)
    if compiled is None:
        compiled = _functions[function] = _compile(function)
    try:
        return True, compiled(*args)
    except Exception as exc:  # compilation problems surface as many exception types
        _broken = True
        warnings.warn(
            f"spl: compiled CPU steps are unavailable ({type(exc).__name__}: {exc}); "
            "training eagerly (same results, slower). Set SPL_COMPILE=0 to skip the attempt.",
            stacklevel=3,
        )
        return False, None


def run(function: Callable, *args):
    """``function(*args)``, compiled while compilation works, else eagerly."""
    done, result = _call_compiled(function, args)
    return result if done else function(*args)


def attempt(function: Callable, *args) -> bool:
    """Run ``function(*args)`` compiled, for its in-place effect; False (nothing done) when
    compilation is unavailable, so the caller takes its own eager route."""
    return _call_compiled(function, args)[0]
