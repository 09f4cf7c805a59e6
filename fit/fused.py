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

import contextlib
import ctypes
import logging
import os
import warnings
from collections.abc import Callable, Iterator

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


def adam_apply(
    stacks: tuple,
    bias_correction2_sqrt: torch.Tensor,
    beta1: float,
    beta2: float,
    eps: float,
) -> None:
    """One Adam step, in place, of stacked parameters with their gradients already formed:
    ``stacks`` holds ``(param, grad, exp_avg, exp_avg_sq, step_size)`` per stack, each
    tensor ``[n, ...]`` and ``step_size`` ``lr / (1 - beta1^t)`` per leading index, shaped to
    broadcast. torch's fused Adam arithmetic (as :func:`adam_update`), all stacks in one
    compiled call instead of one kernel call per parameter group."""
    for param, grad, exp_avg, exp_avg_sq, step_size in stacks:
        m = exp_avg.lerp(grad, 1 - beta1)
        v = exp_avg_sq * beta2 + grad * grad * (1 - beta2)
        exp_avg.copy_(m)
        exp_avg_sq.copy_(v)
        param.sub_(step_size * m / (v.sqrt() / bias_correction2_sqrt + eps))


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


@contextlib.contextmanager
def denormals_flushed(enabled: bool = True) -> Iterator[bool]:
    """Treat denormal floats as zero (FTZ/DAZ) on every thread torch computes with, for the
    duration; yields whether all threads were reached.

    Adam's second moments and the gradients of saturated heads (s = p(1 - p) ~ 1e-20 and
    below) fall into the denormal range, where some CPUs (Intel's) take a microcode assist
    per operation: the sweep ran 2-3x slower there. Flushing them changes nothing a
    weight can hold (they are 1e-38 and below, far under the rounding of any weight
    update, since Adam divides by sqrt(v) + 1e-8). torch.set_flush_denormal sets only the
    calling thread; the intra-op (OpenMP) threads are reached through libgomp's
    GOMP_parallel, running the same call on each. Without libgomp, the calling thread
    alone. Afterwards denormals are handled again (torch's default).
    """
    if not enabled:
        yield False
        return
    reached = _set_flush_everywhere(True)
    try:
        yield reached
    finally:
        _set_flush_everywhere(False)


def _set_flush_everywhere(on: bool) -> bool:
    torch.set_flush_denormal(on)
    gomp = _libgomp()
    if gomp is not None:
        callback = _GOMP_CALLBACK(lambda _: torch.set_flush_denormal(on))
        threads = ctypes.c_uint(torch.get_num_threads())
        gomp.GOMP_parallel(callback, None, threads, ctypes.c_uint(0))
    return on and _flushed_everywhere()


def _flushed_everywhere() -> bool:
    """Whether a parallel product flushes denormals on every thread that computes it."""
    tiny = torch.full((max(torch.get_num_threads(), 1) * 65536,), 1e-39)
    return bool((tiny * 1.0 == 0).all())


_GOMP_CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
_gomp: list = []


def _libgomp():
    """torch's own libgomp (the OpenMP runtime its intra-op threads belong to), or None."""
    if not _gomp:
        library = None
        folder = os.path.join(os.path.dirname(torch.__file__), "lib")
        for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
            if name.startswith("libgomp") and ".so" in name:
                try:
                    library = ctypes.CDLL(os.path.join(folder, name))
                    library.GOMP_parallel  # noqa: B018 - present in every libgomp since GCC 4.9
                except (OSError, AttributeError):
                    library = None
                break
        _gomp.append(library)
    return _gomp[0]


def broken() -> bool:
    """Whether compiling failed in this process (the engine then stays eager)."""
    return _broken


UPDATE_MODES = ("eager", "gemm", "inpass")
_chosen: dict[str, str] = {}


def choose_update(stacks: list, batch_size: int) -> str:
    """The fastest Adam update path for these shapes on this machine: ``eager`` (a GEMM
    for the weight gradient, then torch's fused Adam per parameter group), ``gemm`` (the
    GEMM, then one compiled Adam pass over every stack) or ``inpass`` (the gradient formed
    inside the compiled Adam pass). Which wins depends on the CPU (its vector units, caches
    and how the compiler's loops suit them), so it is measured: a few steps of each on
    scratch copies of the stacks, once per machine; the choice is kept in the process and
    in ``~/.cache/spl/update-paths.json`` (delete it to measure again), so that every run on
    a machine takes the same path and gives the same results. All paths agree to rounding.
    """
    key = _tuning_key(stacks, batch_size)
    if key not in _chosen:
        stored = _read_choices()
        if stored.get(key) in UPDATE_MODES:
            _chosen[key] = stored[key]
        else:
            times = {mode: _time_update(mode, stacks, batch_size) for mode in UPDATE_MODES}
            times = {mode: t for mode, t in times.items() if t is not None}
            _chosen[key] = min(times, key=times.get)
            _write_choice(key, _chosen[key], times)
    return _chosen[key]


def _tuning_key(stacks: list, batch_size: int) -> str:
    import platform

    shapes = ";".join("x".join(map(str, param.shape)) for param, _, _ in stacks)
    dtype = str(stacks[0][0].dtype).replace("torch.", "")
    return (
        f"{_cpu_model()}|threads {torch.get_num_threads()}|torch {torch.__version__}|"
        f"{platform.machine()}|{dtype}|batch {batch_size}|{shapes}"
    )


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown CPU"


def _time_update(mode: str, stacks: list, batch_size: int, repeats: int = 7) -> float | None:
    """Median seconds of one update on this path, on scratch tensors shaped as ``stacks``
    (None when the path cannot run here)."""
    import time

    weight = stacks[0][0]
    blocks, width, columns = weight.shape
    generator = torch.Generator().manual_seed(0)

    def scratch(tensor, scale):
        return (torch.randn(tensor.shape, generator=generator) * scale).to(tensor)

    params = [(scratch(p, 0.01), scratch(p, 1e-3), torch.zeros_like(p), torch.zeros_like(p))
              for p, _, _ in stacks]  # fmt: skip
    sizes = [torch.full((len(lrs),) + (1,) * (p.dim() - 1), 1e-3, dtype=p.dtype)
             for p, _, lrs in stacks]  # fmt: skip
    x = scratch(torch.empty(batch_size, width, dtype=weight.dtype), 1.0)
    grad_out = scratch(torch.empty(blocks, batch_size, columns, dtype=weight.dtype), 1e-3)
    constants = (torch.tensor(0.5, dtype=weight.dtype), 0.9, 0.999, 1e-8)
    steps = [torch.ones((), dtype=torch.float32) for _ in range(sum(len(s[2]) for s in stacks))]

    def one_update() -> bool:
        full = tuple((p, g, m, v, size) for (p, g, m, v), size in zip(params, sizes, strict=True))
        if mode == "inpass":
            p, _, m, v = params[0]
            return attempt(adam_update, x, grad_out, p, m, v, sizes[0], *constants) and (
                len(full) == 1 or attempt(adam_apply, full[1:], *constants)
            )
        torch.matmul(x.t(), grad_out, out=params[0][1])
        if mode == "gemm":
            return attempt(adam_apply, full, *constants)
        step = iter(steps)
        for p, g, m, v in params:
            for index in range(p.shape[0]):
                torch._fused_adam_([p[index]], [g[index]], [m[index]], [v[index]], [],
                                   [next(step)], lr=1e-3, beta1=0.9, beta2=0.999,
                                   weight_decay=0.0, eps=1e-8, amsgrad=False, maximize=False)  # fmt: skip
        return True

    for _ in range(2):  # compiles on the first call
        if not one_update():
            return None
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        one_update()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _choices_path() -> str:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "spl", "update-paths.json")


def _read_choices() -> dict:
    import json

    try:
        with open(_choices_path()) as handle:
            stored = json.load(handle)
        return {k: v["mode"] for k, v in stored.items() if isinstance(v, dict) and "mode" in v}
    except (OSError, ValueError, AttributeError):
        return {}


def _write_choice(key: str, mode: str, times: dict[str, float]) -> None:
    import json

    from spl.data.common import atomic_path

    path = _choices_path()
    try:
        try:
            with open(path) as handle:
                stored = json.load(handle)
        except (OSError, ValueError):
            stored = {}
        stored[key] = {"mode": mode, "seconds": {m: round(t, 6) for m, t in times.items()}}
        # through a temporary name (atomic_path also removes those of killed writers)
        with atomic_path(path, force=True) as tmp, open(tmp, "w") as handle:
            json.dump(stored, handle, indent=2, sort_keys=True)
    except OSError:
        pass  # a read-only home: measure again next time
