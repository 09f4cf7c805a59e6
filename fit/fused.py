"""The linear engine's CPU step compiled: the weight update as one pass over memory, and
the loss arithmetic of a batch as a few loops instead of ~80 small kernels.

On a CPU a step of the stacked heads is bound by memory traffic, not arithmetic: the
weight gradient is written out by one product and read back by Adam, which then reads
and writes the weights and both moments. The gradient of a batch is rank B (``x^T G``
with B = 8 or 16 rows), so it can be formed on the fly inside the update instead:
one pass reads the weights and moments once and writes them once. torch.compile turns
:func:`_update` into that single loop; the arithmetic follows torch's fused Adam kernel
(lerp for the first moment, bias corrections as step size and sqrt), so the weights
match ``torch.optim.Adam`` to rounding.

Small fits run eagerly (see :func:`enabled`). When compilation is unavailable (no C++
compiler, an unsupported platform) or disabled with ``SPL_COMPILE=0``, the engine keeps its eager path: the same functions run eagerly,
and the update is a product followed by torch's fused Adam kernel.
"""

from __future__ import annotations

import logging
import os
import warnings

import torch

_compiled = None
_broken = False
_functions: dict = {}


def _update(
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
    # grad[k, d, c] = sum_b x[b, d] * grad_out[k, b, c], never stored.
    grad = (x.t()[None, :, :, None] * grad_out[:, None, :, :]).sum(2)
    m = exp_avg.lerp(grad, 1 - beta1)
    v = exp_avg_sq * beta2 + grad * grad * (1 - beta2)
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)
    weight.sub_(step_size * m / (v.sqrt() / bias_correction2_sqrt + eps))


def _compile(function=None):
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)  # its import warns about CUDA_HOME on machines without CUDA
    try:
        import torch.utils.cpp_extension  # noqa: F401
    finally:
        logger.setLevel(level)
    return torch.compile(function or _update, dynamic=None)


# Compiling saves about 1 ns per weight entry and step on a CPU and costs ~3 s with a warm
# cache (~26 s on a machine's first run), so by default only large sweeps are compiled:
# the paper's VOC-sized sweep is 1-2e10 per group, the demo 2e9.
AUTO_MIN_WORK = 1e10


def enabled(device: torch.device, work: float) -> bool:
    """Whether to compile a group's steps: ``SPL_COMPILE`` = ``auto`` (the default: when
    ``work``, weight entries x training steps, reaches AUTO_MIN_WORK), ``1`` or ``0``.
    CPU only: on CUDA the engine replays CUDA graphs."""
    if device.type != "cpu" or _broken:
        return False
    setting = os.environ.get("SPL_COMPILE", "auto").strip().lower()
    if setting in {"0", "false", "no", "off"}:
        return False
    if setting in {"1", "true", "yes", "on"}:
        return True
    return work >= AUTO_MIN_WORK


def _give_up(exc: Exception) -> None:
    global _broken
    _broken = True
    warnings.warn(
        f"spl: compiled CPU steps are unavailable ({type(exc).__name__}: {exc}); "
        "training eagerly (same results, slower). Set SPL_COMPILE=0 to skip the attempt.",
        stacklevel=3,
    )


def run(function, *args):
    """``function(*args)``, compiled while compilation works, else eagerly."""
    if not _broken:
        compiled = _functions.get(function)
        if compiled is None:
            compiled = _functions[function] = _compile(function)
        try:
            return compiled(*args)
        except Exception as exc:  # compilation problems surface as many exception types
            _give_up(exc)
    return function(*args)


def weight_update(
    x: torch.Tensor,
    grad_out: torch.Tensor,
    weight: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step_size: torch.Tensor,
    bias_correction2_sqrt: float,
    betas: tuple[float, float],
    eps: float,
) -> bool:
    """One Adam step of the stacked weights ``[blocks, D + 1, C]`` from the logit
    gradients ``grad_out [blocks, B, C]`` and the batch ``x [B, D + 1]``; ``step_size``
    is ``lr / (1 - beta1^t)`` per block, ``[blocks, 1, 1]``. Returns False (and changes
    nothing) when compilation fails, so the caller falls back to the eager update."""
    global _compiled
    if _broken:
        return False
    if _compiled is None:
        _compiled = _compile()
    try:
        _compiled(
            x, grad_out, weight, exp_avg, exp_avg_sq, step_size,
            torch.tensor(bias_correction2_sqrt, dtype=weight.dtype), betas[0], betas[1], eps,
        )  # fmt: skip
    except Exception as exc:  # compilation problems surface as many exception types
        _give_up(exc)
        return False
    return True
