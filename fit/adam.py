"""Adam over a group's stacked tensors: one torch.optim.Adam param group per leading index of
each stack (one lr per weight block, one per head for a loss's trainable state), updated
eagerly by torch's fused kernel or, on a CPU, by the compiled passes of :mod:`.fused`.

Every path keeps its moments in torch.optim's own state, so checkpoints and the parity with
a plain ``torch.optim.Adam`` loop hold whichever path ran.
"""

from __future__ import annotations

import math

import torch

from spl.data import protocol
from spl.fit import fused

# (the parameters [n, ...], their gradient [n, ...], one lr per leading index)
Stack = tuple[torch.Tensor, torch.Tensor, list[float]]


class StackedAdam:
    """Adam over ``stacks``; the first stack is the weights ``[blocks, D + 1, C]``, whose
    gradient :meth:`update` forms from the batch, the others come with their gradients in
    place. ``capturable``: a CUDA graph replays the step (Adam's step count on the device).
    """

    def __init__(self, stacks: list[Stack], *, capturable: bool) -> None:
        self.stacks = stacks
        self.capturable = capturable
        self.blocks = len(stacks[0][2])
        self.optimizer = self._make_optimizer()
        self.mode = "eager"  # or a compiled path (fused.UPDATE_MODES), see compile_update
        self.moments: list[tuple[torch.Tensor, torch.Tensor]] = []

    @property
    def fused(self) -> bool:
        """Whether torch's fused Adam kernel serves this device and dtype (the compiled
        paths follow its arithmetic)."""
        return bool(self.optimizer.param_groups[0].get("fused"))

    def _make_optimizer(self) -> torch.optim.Optimizer:
        groups = []
        for param_stack, grad_stack, lrs in self.stacks:
            for index, lr in enumerate(lrs):
                param = _view_param(param_stack[index], grad_stack[index])
                groups.append({"params": [param], "lr": lr})
        options = {"betas": protocol.ADAM_BETAS, "eps": protocol.ADAM_EPS, "weight_decay": 0.0}
        try:
            return torch.optim.Adam(groups, fused=True, capturable=self.capturable, **options)
        except (RuntimeError, TypeError):  # fused kernel missing for this device or dtype
            return torch.optim.Adam(groups, foreach=True, **options)

    def compile_update(self, update: str, batch_size: int) -> bool:
        """Take a compiled update path on a CPU: ``update`` (``inpass``, ``gemm``, ``eager``)
        or, for ``auto``, the fastest on this machine (:func:`spl.fit.fused.choose_update`).
        False when compiling is unavailable here (the update stays eager)."""
        chosen = update if update != "auto" else fused.choose_update(self.stacks, batch_size)
        if fused.broken():
            return False
        self.mode = chosen
        if self.mode != "eager":
            self.bind_moments()
        return True

    def bind_moments(self) -> None:
        """Adam's state created up front, with each stack's moments as views of two stacked
        tensors that the compiled update reads and writes in one pass; torch.optim
        (checkpoints, the eager fallback) sees the very same state."""
        optimizer = self.optimizer
        groups = iter(optimizer.param_groups)
        self.moments = []
        for param_stack, _, lrs in self.stacks:
            stacked = (torch.zeros_like(param_stack), torch.zeros_like(param_stack))
            for index in range(len(lrs)):
                param = next(groups)["params"][0]
                state = optimizer.state[param]
                if not state:  # what torch.optim.Adam(fused=True) creates on its first step
                    state["step"] = torch.zeros((), dtype=torch.float32, device=param.device)
                    state["exp_avg"] = torch.zeros_like(param)
                    state["exp_avg_sq"] = torch.zeros_like(param)
                for key, moment in zip(("exp_avg", "exp_avg_sq"), stacked, strict=True):
                    moment[index].copy_(state[key])
                    state[key] = moment[index]
            self.moments.append(stacked)

    def update(self, x: torch.Tensor, grad_out: torch.Tensor) -> bool:
        """Adam step of every stack from the batch ``x [B, D + 1]`` and the weights' logit
        gradients ``grad_out [blocks, B, per * L]``, the other stacks' gradients already in
        place. False when a compiled path failed (eager from here on; the step is done)."""
        if self.mode == "eager":
            self._weight_gradient(x, grad_out)
            self.adam_step()
            return True
        stacks, constants, steps = self._compiled_arguments()
        if self.mode == "inpass":
            weight, _, exp_avg, exp_avg_sq, size = stacks[0]
            if fused.attempt(
                fused.adam_update, x, grad_out, weight, exp_avg, exp_avg_sq, size, *constants
            ):
                rest = tuple(stacks[1:])
                if not rest or fused.attempt(fused.adam_apply, rest, *constants):
                    torch._foreach_add_(steps, 1)
                    return True
                # the weights are updated; the rest eagerly
                torch._foreach_add_(steps[: self.blocks], 1)
                self.mode = "eager"
                self.adam_step(first=self.blocks)
                return False
        else:  # "gemm"
            self._weight_gradient(x, grad_out)
            if fused.attempt(fused.adam_apply, tuple(stacks), *constants):
                torch._foreach_add_(steps, 1)
                return True
            self.mode = "eager"
            self.adam_step()
            return False
        self.mode = "eager"
        self._weight_gradient(x, grad_out)
        self.adam_step()
        return False

    def _weight_gradient(self, x: torch.Tensor, grad_out: torch.Tensor) -> None:
        torch.matmul(x.t(), grad_out, out=self.stacks[0][1])

    def _compiled_arguments(self) -> tuple[list[tuple], tuple, list[torch.Tensor]]:
        """(per stack (param, grad, exp_avg, exp_avg_sq, step size), the constants, the step
        counters) of the next compiled update."""
        optimizer = self.optimizer
        states = [optimizer.state[g["params"][0]] for g in optimizer.param_groups]
        step = int(states[0]["step"].item()) + 1
        (beta1, beta2), eps = optimizer.param_groups[0]["betas"], optimizer.param_groups[0]["eps"]
        dtype = self.stacks[0][0].dtype
        # In float64 first, as torch's fused kernel computes them.
        bias_correction2_sqrt = torch.tensor(math.sqrt(1 - beta2**step), dtype=dtype)
        stacks = []
        for (param, grad, lrs), (exp_avg, exp_avg_sq) in zip(
            self.stacks, self.moments, strict=True
        ):
            size = torch.tensor([lr / (1 - beta1**step) for lr in lrs], dtype=dtype)
            size = size.view(-1, *([1] * (param.dim() - 1)))
            stacks.append((param, grad, exp_avg, exp_avg_sq, size))
        constants = (bias_correction2_sqrt, beta1, beta2, eps)
        return stacks, constants, [s["step"] for s in states]

    def adam_step(self, first: int = 0) -> None:
        """``optimizer.step()`` without its per-call Python bookkeeping, which costs about as
        much as the update itself at batch 8 on a CPU: the same fused kernel on the same
        state (so checkpoints and the torch.optim parity test still hold). Param groups
        before ``first`` are skipped (the compiled update did them)."""
        optimizer = self.optimizer
        groups = optimizer.param_groups
        if self.capturable or not groups[0].get("fused") or not optimizer.state:
            optimizer.step()  # CUDA graphs, the foreach fallback, and the state's creation
            return
        groups = groups[first:]
        if not groups:
            return
        states = [optimizer.state[g["params"][0]] for g in groups]
        torch._foreach_add_([s["step"] for s in states], 1)
        for group, state in zip(groups, states, strict=True):
            (param,) = group["params"]
            beta1, beta2 = group["betas"]
            torch._fused_adam_(
                [param],
                [param.grad],
                [state["exp_avg"]],
                [state["exp_avg_sq"]],
                [],
                [state["step"]],
                lr=group["lr"],
                beta1=beta1,
                beta2=beta2,
                weight_decay=group["weight_decay"],
                eps=group["eps"],
                amsgrad=False,
                maximize=False,
            )

    def state_dict(self) -> dict:
        """Adam's state, copied to the CPU."""
        optimizer = self.optimizer.state_dict()
        return {
            "state": {
                i: {k: v.detach().to("cpu", copy=True) for k, v in s.items()}
                for i, s in optimizer["state"].items()
            },
            "param_groups": optimizer["param_groups"],
        }

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)  # casts moments to the device
        for group in self.optimizer.param_groups:  # a checkpoint may come from the CPU
            group["capturable"] = self.capturable
        if self.mode != "eager":
            self.bind_moments()


def _view_param(view: torch.Tensor, grad_view: torch.Tensor) -> torch.Tensor:
    """A leaf sharing storage with a block of the stacked tensor, with its gradient a view
    of the stacked gradient: Adam's in-place update lands in the stacked weights."""
    param = view.detach().requires_grad_(True)
    param.grad = grad_view
    return param
