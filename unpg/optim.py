"""Optimizers (SGD, AdamW) with the class centres in their own group, the per-iteration
learning-rate schedule (linear warm-up, then cosine or polynomial decay) and a step that skips
itself on the device when the loss is not finite.

Schedule, stepped once per *optimizer* step (``t`` = optimizer steps done, ``W`` warm-up steps,
``T`` total steps, ``r = min_lr / lr``)::

    t <  W:  factor = (t + 1) / W                                   (linear warm-up)
    t >= W:  p = (t - W) / max(1, T - W), clamped to [0, 1]
             cosine: factor = r + (1 - r) * (1 + cos(pi * p)) / 2
             poly:   factor = r + (1 - r) * (1 - p) ** power

The first step already trains (factor ``1/W``, not 0 as in insightface's ``PolyScheduler``). The
schedule is a ``LambdaLR`` whose lambda is a ``WarmupDecay`` object holding plain numbers, so the
scheduler's ``state_dict`` round-trips through ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["WarmupDecay", "build_optimizer", "build_scheduler", "guarded_step", "param_groups",
           "schedule_steps"]


def param_groups(backbone: nn.Module, classifier: nn.Module) -> List[dict]:
    """Backbone and class-centre parameters as two named groups (same weight decay, as
    insightface's arcface_torch; separate so that their state can be treated apart)."""
    return [
        {"params": [p for p in backbone.parameters() if p.requires_grad], "name": "backbone"},
        {"params": [p for p in classifier.parameters() if p.requires_grad], "name": "fc"},
    ]


def build_optimizer(cfg_optim, groups: List[dict], device: torch.device) -> torch.optim.Optimizer:
    """SGD (momentum, weight decay) or AdamW from ``cfg.optim``; fused kernels on CUDA."""
    fused = device.type == "cuda"
    if cfg_optim.name == "sgd":
        opt = torch.optim.SGD(groups, lr=cfg_optim.lr, momentum=cfg_optim.momentum,
                              weight_decay=cfg_optim.weight_decay, fused=fused or None)
    elif cfg_optim.name == "adamw":
        opt = torch.optim.AdamW(groups, lr=cfg_optim.lr, betas=tuple(cfg_optim.betas),
                                eps=cfg_optim.eps, weight_decay=cfg_optim.weight_decay,
                                fused=fused or None)
    else:  # the config's Literal type rules this out
        raise ValueError(f"optim.name: unknown optimizer {cfg_optim.name!r}; use sgd or adamw")
    return opt


@dataclass
class WarmupDecay:
    """LR factor at optimizer step ``t`` (see the module docstring). Plain numbers only."""

    total_steps: int
    warmup_steps: int
    name: str = "cosine"
    min_factor: float = 0.0
    power: float = 2.0

    def __post_init__(self) -> None:
        if self.total_steps < 1 or not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(f"schedule: need total_steps >= 1 and 0 <= warmup_steps <= "
                             f"total_steps, got {self.total_steps} and {self.warmup_steps}")
        if self.name not in ("cosine", "poly"):
            raise ValueError(f"schedule.name: {self.name!r} is not 'cosine' or 'poly'")

    def __call__(self, t: int) -> float:
        if t < self.warmup_steps:
            return (t + 1) / self.warmup_steps
        p = min(1.0, max(0.0, (t - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)))
        decay = 0.5 * (1.0 + math.cos(math.pi * p)) if self.name == "cosine" else (1.0 - p) ** self.power
        return self.min_factor + (1.0 - self.min_factor) * decay


def schedule_steps(cfg, steps_per_epoch: int) -> WarmupDecay:
    """The schedule of ``cfg.schedule`` for ``steps_per_epoch`` optimizer steps per epoch."""
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
    total = cfg.schedule.epochs * steps_per_epoch
    warmup = min(total - 1, int(round(cfg.schedule.warmup_epochs * steps_per_epoch)))
    return WarmupDecay(total_steps=total, warmup_steps=max(0, warmup), name=cfg.schedule.name,
                       min_factor=cfg.schedule.min_lr / cfg.optim.lr, power=cfg.schedule.poly_power)


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: WarmupDecay) -> LambdaLR:
    """A ``LambdaLR`` applying ``schedule`` to every group (call ``.step()`` per optimizer step)."""
    return LambdaLR(optimizer, lr_lambda=[schedule for _ in optimizer.param_groups])


def _is_fused(optimizer: torch.optim.Optimizer) -> bool:
    return all(bool(g.get("fused")) for g in optimizer.param_groups)


def _init_momentum(optimizer: torch.optim.Optimizer) -> None:
    """Create zero SGD momentum buffers before the first fused step. The fused kernel otherwise
    allocates them with ``empty_like`` and fills them in-kernel, which leaves garbage when that
    first step is skipped by ``found_inf``. ``0 * momentum + g == g``: the same numbers."""
    if not isinstance(optimizer, torch.optim.SGD):
        return
    for group in optimizer.param_groups:
        if group["momentum"] == 0:
            continue
        for p in group["params"]:
            state = optimizer.state[p]
            if state.get("momentum_buffer") is None:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def guarded_step(optimizer: torch.optim.Optimizer, ok: torch.Tensor) -> None:
    """``optimizer.step()`` if ``ok`` (0-dim bool tensor), else leave parameters and state alone.

    Fused optimizers (CUDA) take the decision on the device through their ``found_inf``
    argument, the mechanism ``torch.amp.GradScaler`` uses: no host sync. Others read ``ok`` on
    the host; they only run on CPU here, where reading a tensor costs no device sync.
    """
    if _is_fused(optimizer):
        _init_momentum(optimizer)
        optimizer.grad_scale = None
        optimizer.found_inf = (~ok).to(torch.float32)
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf, optimizer.grad_scale
    elif bool(ok):  # host read: synchronous device (CPU) or a non-fused optimizer chosen on purpose
        optimizer.step()
