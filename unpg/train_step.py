"""One optimizer step on this rank's batch: micro-batches, autocast, the classifier's loss,
gradient finishing, an update that skips itself on a non-finite loss, the schedule.

Gradient accumulation (``optim.accum_steps``) splits each rank's batch into micro-batches
(loss / n each, DDP ``no_sync`` until the last, one optimizer and scheduler step). It equals one
big batch for the margin-softmax part; UNPG's negatives then come from each (global)
micro-batch, as they would for a smaller batch.

Host syncs: none on CUDA. The loss, the UNPG statistics and the finiteness flag ``ok`` are
returned as 0-dim device tensors (the trainer reads them at its logging cadence); a non-finite
step is skipped on the device (``unpg.optim.guarded_step``, or the GradScaler under fp16).
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Dict, Optional

import torch
from torch import nn

from unpg.classifier import MarginClassifier
from unpg.distributed import DistContext
from unpg.grads import finalize_grads
from unpg.optim import Schedule, guarded_step

__all__ = ["TrainStep"]


class TrainStep:
    """``step(images_b3HW, labels_b)`` -> ``{loss, ok, **UNPG statistics}`` (device tensors).

    ``model`` is the (DDP-wrapped, maybe compiled) backbone; ``last_lr`` is the learning rate
    the latest update used (for the logs)."""

    def __init__(self, model: nn.Module, classifier: MarginClassifier,
                 optimizer: torch.optim.Optimizer, schedule: Schedule,
                 scaler: torch.amp.GradScaler, ctx: DistContext, *, accum_steps: int,
                 amp_dtype: Optional[torch.dtype], grad_clip: float) -> None:
        self.model, self.classifier, self.optimizer = model, classifier, optimizer
        self.schedule, self.scaler, self.ctx = schedule, scaler, ctx
        self.accum_steps, self.amp_dtype, self.grad_clip = accum_steps, amp_dtype, grad_clip
        self.last_lr = math.nan

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> Dict[str, Any]:
        n = self.accum_steps
        if images.shape[0] % n or images.shape[0] != labels.shape[0]:
            raise ValueError(f"train_step: batch of {images.shape[0]} images / "
                             f"{labels.shape[0]} labels is not splittable into "
                             f"optim.accum_steps={n} micro-batches")
        device = self.ctx.device
        loss_sum = torch.zeros((), device=device)
        stats: Dict[str, torch.Tensor] = {}
        for i, (x, y) in enumerate(zip(images.chunk(n), labels.chunk(n))):
            last = i == n - 1
            # Gradients are reduced once, on the last micro-batch (DDP no_sync before it).
            sync = contextlib.nullcontext() if last or not self.ctx.distributed \
                else self.model.no_sync()
            if last:
                self.classifier.arm_grad_sync()
            with sync:
                with torch.autocast(device.type, dtype=self.amp_dtype or torch.float32,
                                    enabled=self.amp_dtype is not None):
                    emb = self.model(x)
                # Outside autocast: the embedding keeps the backbone's dtype, the classifier's
                # fc.precision picks the kernel's tiles (bf16 under bf16 AMP) and its
                # length-B math runs in float32 against the fp32 master weight.
                loss, stats = self.classifier(emb, y)
                self.scaler.scale(loss / n).backward()
            loss_sum = loss_sum + loss.detach()
        self.classifier.finish_grad_sync()
        loss = loss_sum / n
        # Unscale (fp16), clip, and the device-side verdict ``ok`` (``unpg.grads``).
        ok = finalize_grads(self.optimizer, loss, scaler=self.scaler, clip=self.grad_clip,
                            ctx=self.ctx, classifier=self.classifier)
        self.last_lr = self.optimizer.param_groups[0]["lr"]  # the lr this update uses
        with self.classifier.step_context(self.optimizer):
            if self.scaler.is_enabled():
                self.scaler.step(self.optimizer)  # skips on inf/NaN gradients by itself
                self.scaler.update()
            else:
                guarded_step(self.optimizer, ok)
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": loss, "ok": ok, **stats}
