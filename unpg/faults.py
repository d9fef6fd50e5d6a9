"""Non-finite losses: skipped updates are counted on the device and checked at the logging
cadence, so watching for them costs no host sync per step.

``NonFiniteGuard.track(ok, step)`` after every step keeps, as device tensors, the current run
of consecutive non-finite steps and the first step at which that run exceeded
``train.max_nonfinite``; ``check`` (a host read, called when logging and before a checkpoint)
raises ``NonFiniteLossError`` naming that step and the last good checkpoint.
"""
from __future__ import annotations

import logging
from typing import Optional, Union

import torch

__all__ = ["NonFiniteGuard", "NonFiniteLossError"]

log = logging.getLogger("unpg.train")


class NonFiniteLossError(RuntimeError):
    """More than ``train.max_nonfinite`` consecutive steps had a non-finite loss."""


class NonFiniteGuard:
    """Device-side counters of non-finite steps (see the module docstring)."""

    def __init__(self, max_nonfinite: int, device: torch.device) -> None:
        self.max_nonfinite = max_nonfinite
        zero = torch.zeros((), dtype=torch.int64, device=device)
        self.run = zero.clone()  # consecutive non-finite steps up to now
        self.total = zero.clone()
        self.over_step = zero - 1  # first step at which the run exceeded the limit, else -1

    def track(self, ok: torch.Tensor, step: int) -> None:
        self.run = torch.where(ok, 0, self.run + 1)
        self.total = self.total + (~ok).to(torch.int64)
        over = (self.run > self.max_nonfinite) & (self.over_step < 0)
        self.over_step = torch.where(over, step, self.over_step)

    def over_limit(self) -> bool:
        return bool(self.over_step >= 0)  # host read: only before a checkpoint

    def check(self, step: int, last_checkpoint: Optional[Union[str, object]],
              skipped_in_window: int = 0, window_steps: int = 0, warn: bool = True) -> None:
        """Raise once the limit was crossed; warn about updates skipped in the last window."""
        over_step, run = (int(v) for v in torch.stack([self.over_step, self.run]).tolist())
        if over_step >= 0:
            last = last_checkpoint or "none saved yet"
            raise NonFiniteLossError(
                f"the loss was not finite in more than train.max_nonfinite={self.max_nonfinite} "
                f"consecutive steps, at step {over_step}; last good checkpoint: {last}. Lower "
                f"optim.lr, set optim.grad_clip, or use train.amp=bf16/none, then resume with "
                f"train.resume=auto")
        if skipped_in_window and warn:
            log.warning("step %d: skipped %d update(s) with a non-finite loss in the last %d "
                        "step(s) (%d in a row now)", step, skipped_in_window, window_steps, run)
