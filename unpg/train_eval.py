"""Verification during training: insightface's 10-fold accuracy on ``eval.bins`` (or
``data.val_bins``) every ``eval.every`` steps, computed by rank 0 on the unwrapped backbone (no
DDP collective) and shared with the other ranks as one number, the mean accuracy, which decides
``best.pt``.

``TrainingEvaluator(eval_cfg, bins, normalize, ctx)`` checks at construction that the files
exist (the rule lives with its owner); ``run(backbone, step, sink)`` is collective.
"""
from __future__ import annotations

import logging
import math
import os
from typing import Any, Dict, List, Optional

import numpy as np
from torch import nn

from unpg.distributed import DistContext, broadcast_float
from unpg.eval.bins import evaluate_bins
from unpg.logging_utils import MetricsSink

__all__ = ["TrainingEvaluator"]

log = logging.getLogger("unpg.train")


class TrainingEvaluator:
    """Verification on ``bins`` every ``eval_cfg.every`` steps (0 or no bins: never)."""

    def __init__(self, eval_cfg: Any, bins: List[str], normalize: str, ctx: DistContext) -> None:
        self.cfg, self.bins, self.normalize, self.ctx = eval_cfg, list(bins), normalize, ctx
        if self.cfg.every > 0:
            missing = [b for b in self.bins if not os.path.isfile(b)]
            if missing:
                raise ValueError(f"verification file(s) not found: {', '.join(missing)} (from "
                                 f"eval.bins / data.val_bins); fix the paths, or set eval.every=0")

    @property
    def enabled(self) -> bool:
        return self.cfg.every > 0 and bool(self.bins)

    def due(self, step: int) -> bool:
        return self.enabled and step % self.cfg.every == 0

    def run(self, backbone: nn.Module, step: int, sink: Optional[MetricsSink]) -> Dict[str, Any]:
        """``{step, score, results}`` on every rank (``results`` on rank 0 only); the score is
        the mean accuracy over the files. Collective: every rank calls it."""
        results: Dict[str, Any] = {}
        score = math.nan
        if self.ctx.is_main:
            # evaluate_bins switches to eval mode and restores train mode.
            results = evaluate_bins(backbone, self.bins, batch_size=self.cfg.batch_size,
                                    flip=self.cfg.flip, normalize=self.normalize,
                                    device=self.ctx.device,
                                    n_folds=self.cfg.n_folds)
            accs = {name: float(r["accuracy"]) for name, r in results.items()}
            score = float(np.mean(list(accs.values()))) if accs else math.nan
            record = {f"{name}/accuracy": acc for name, acc in accs.items()}
            record.update({f"{name}/accuracy_std": float(r["accuracy_std"])
                           for name, r in results.items()})
            log.info("step %d verification: %s", step,
                     "  ".join(f"{n} {a:.4f}" for n, a in accs.items()))
            if sink is not None:
                sink.write(step, record, kind="eval")
        return {"step": step, "score": broadcast_float(score, self.ctx), "results": results}
