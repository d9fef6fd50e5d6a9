"""After backward, before the optimizer: fp16 unscaling, the global gradient norm, clipping
and the device-side verdict whether this step's update is applied.

Everything stays on the device (no host sync). With several ranks the verdict and the norm
are the same on every rank: the loss flag is all-reduced (MIN) when the loss is per-rank, the
backbone gradients are already DDP-reduced, and the classifier adds its own contribution
(``MarginClassifier.grad_sq_norm``: summed over the shards when it is class-sharded). Parameter
groups are found by name (``unpg.optim``), never by position.
"""
from __future__ import annotations

import math
from typing import List, Protocol

import torch

from unpg.distributed import DistContext, all_reduce_min

__all__ = ["finalize_grads", "global_grad_norm", "grads_of"]


class GradOwner(Protocol):
    """What gradient finishing needs of the classifier (``unpg.classifier.MarginClassifier``)."""

    loss_is_global: bool

    def grad_sq_norm(self) -> torch.Tensor: ...


def grads_of(optimizer: torch.optim.Optimizer) -> List[torch.Tensor]:
    return [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]


def _sq_norm(params: List[torch.Tensor], device: torch.device) -> torch.Tensor:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), device=device)
    return torch.stack([n.float() ** 2 for n in torch._foreach_norm(grads)]).sum()


def global_grad_norm(optimizer: torch.optim.Optimizer, classifier: GradOwner,
                     device: torch.device) -> torch.Tensor:
    """L2 norm over every gradient of the run: the groups other than ``"classifier"`` (already
    identical on every rank) plus the classifier's own contribution (collective if sharded)."""
    others = [p for g in optimizer.param_groups if g.get("name") != "classifier"
              for p in g["params"]]
    return (_sq_norm(others, device) + classifier.grad_sq_norm().to(device)).sqrt()


def finalize_grads(optimizer: torch.optim.Optimizer, loss: torch.Tensor, *,
                   scaler: torch.amp.GradScaler, clip: float, ctx: DistContext,
                   classifier: GradOwner) -> torch.Tensor:
    """Returns ``ok`` (0-dim bool): the loss is finite on every rank and, without fp16, the
    gradient norm is finite when clipping. Under fp16 the GradScaler additionally skips steps
    whose gradients overflowed (its usual job)."""
    ok = torch.isfinite(loss)
    if ctx.distributed and not classifier.loss_is_global:  # each rank's own local mean
        ok = all_reduce_min(ok.to(torch.float32), ctx.loss_group) > 0
    if scaler.is_enabled():
        if ctx.distributed:
            # Every rank's GradScaler must reach the same overflow verdict (sharded FC gradients
            # differ per rank): finite gradients become NaN when any rank overflowed.
            finite = torch.isfinite(global_grad_norm(optimizer, classifier, ctx.device))
            grads_ok = all_reduce_min(finite.to(torch.float32), ctx.loss_group) > 0
            poison = torch.where(grads_ok & ok, 1.0, math.nan).to(torch.float32)
            torch._foreach_mul_(grads_of(optimizer), poison)
        scaler.unscale_(optimizer)
    if clip > 0:
        norm = global_grad_norm(optimizer, classifier, ctx.device)
        if not scaler.is_enabled():
            ok = ok & torch.isfinite(norm)
        coef = torch.clamp(clip / (norm + 1e-6), max=1.0)
        torch._foreach_mul_(grads_of(optimizer), coef)
    return ok
