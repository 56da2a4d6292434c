"""Stepping each parameter inside the backward pass, so the model's gradients never exist at once."""
from __future__ import annotations

import torch

from .optim import BF16AdamW


class StepInBackward:
    """The optimizer step inside the backward pass (torchtune's "optimizer in backward"): each parameter
    is updated as soon as its gradient is complete, and the gradient is freed right away, so the whole
    model's gradients never exist at once. In bf16 that saves 2 bytes per parameter (12.6 GiB at 7B). It
    needs one backward pass per optimizer step (no gradient accumulation) and cannot clip to a global
    gradient norm, which is known only after the last gradient; the norm is still measured, for the log.
    A parameter's weights change only after autograd has used them for the last time: its gradient is
    complete only once every use of it has been differentiated."""

    def __init__(self, optimizer: BF16AdamW):
        self.optimizer = optimizer
        self._squared_norm: torch.Tensor | None = None
        self._handles = [p.register_post_accumulate_grad_hook(self._step)
                         for group in optimizer.param_groups for p in group["params"]]

    def _step(self, p: torch.Tensor) -> None:
        squared = torch.linalg.vector_norm(p.grad, dtype=torch.float32).square()
        self._squared_norm = squared if self._squared_norm is None else self._squared_norm + squared
        self.optimizer.step_parameter(p)
        p.grad = None
        # What optimizer.step() sets for LR schedulers (torch's own flag): without it every scheduler step
        # warns that it came before the optimizer's and that the schedule's first value is skipped, which
        # is not so here.
        self.optimizer._opt_called = True

    def grad_norm(self) -> torch.Tensor:
        """The norm of all the gradients of the backward pass just run; starts the next count."""
        if self._squared_norm is None:
            raise RuntimeError("no gradient reached the optimizer in this backward pass")
        norm, self._squared_norm = self._squared_norm.sqrt(), None
        return norm

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
