"""What a training checkpoint holds, taken from a ``Trainer`` and put back into one.

``checkpoint_state(trainer)`` is collective (every rank calls it): the class-centre shards and
their optimizer state are gathered into full ``[C, ...]`` tensors and every rank's RNG state is
collected; rank 0 gets the dict (layout in ``unpg.checkpoint``), the others None.
``restore_state(trainer, ckpt, where)`` cuts this rank's rows back out, so a checkpoint resumes
on any number of processes and in either ``fc.mode``. ``load_backbone_weights`` reads
``model.weights`` (initial weights, not a resume).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from torch import nn

from unpg import checkpoint as ckpt_io
from unpg.distributed import gather_objects

__all__ = ["checkpoint_state", "ckpt_step", "load_backbone_weights", "restore_state"]

log = logging.getLogger("unpg.train")


def ckpt_step(path: Path) -> int:
    """Global step encoded in a ``ckpt_<step>.pt`` name (-1 for other names)."""
    name = Path(path).name
    if name.startswith("ckpt_") and name.endswith(".pt"):
        try:
            return int(name[5:-3])
        except ValueError:
            return -1
    return -1


def load_backbone_weights(backbone: nn.Module, path: str) -> None:
    """``model.weights``: a state dict, one of our checkpoints, or ``{'state_dict': ...}``;
    ``module.`` / ``_orig_mod.`` prefixes (DDP, torch.compile) are stripped."""
    if not os.path.isfile(path):
        raise ValueError(f"model.weights={path}: file not found; give a backbone state dict or "
                         f"a training checkpoint, or set model.weights= (empty) to start fresh")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"model.weights={path}: cannot read it with torch.load(weights_only="
                         f"True) ({type(exc).__name__}: {exc})") from exc
    if isinstance(obj, dict) and "backbone" in obj:
        obj = obj["backbone"]
    elif isinstance(obj, dict) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ValueError(f"model.weights={path}: expected a state dict, got {type(obj).__name__}")
    state = {}
    for key, value in obj.items():
        for prefix in ("module.", "_orig_mod."):
            key = key[len(prefix):] if key.startswith(prefix) else key
        state[key] = value
    try:
        backbone.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"model.weights={path} does not fit model.name's architecture: {exc}"
                         ) from exc


def checkpoint_state(t: Any) -> Optional[Dict[str, Any]]:
    """The checkpoint dict of trainer ``t`` on rank 0 (None elsewhere); collective."""
    # Both collective when the classifier is sharded (full [C, ...] rows on rank 0).
    fc_weight = t.classifier.state_dict().get("weight")
    optim_state = t.optimizer_state.state_dict()
    rng = gather_objects(ckpt_io.capture_rng(), t.ctx)
    if not t.ctx.is_main:
        return None
    return {
        "format": ckpt_io.FORMAT, "version": ckpt_io.VERSION,
        "global_step": t.global_step, "epoch": t.epoch, "step_in_epoch": t.step_in_epoch,
        "steps_per_epoch": t.steps_per_epoch, "best_score": t.best_score,
        "num_classes": t.num_classes, "world_size": t.ctx.world_size, "config": t.cfg.to_dict(),
        "backbone": {k: v.detach().cpu() for k, v in t.backbone.state_dict().items()},
        "fc_weight": fc_weight,
        "optimizer": optim_state,
        "scheduler": t.scheduler.state_dict(),
        "scaler": t.scaler.state_dict() if t.scaler.is_enabled() else None,
        "rng": rng,
    }


def restore_state(t: Any, ck: Dict[str, Any], where: str) -> None:
    """Load checkpoint ``ck`` (from ``where``) into trainer ``t`` after its ``build_optim``."""
    saved_optim = ck["config"]["optim"]["name"]
    if saved_optim != t.cfg.optim.name:
        raise ValueError(f"{where}: saved with optim.name={saved_optim}, this run has "
                         f"optim.name={t.cfg.optim.name}; resume with the same optimizer")
    try:
        t.backbone.load_state_dict(ck["backbone"], strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{where}: backbone does not match model.name: {exc}") from exc
    t.classifier.load_state_dict({"weight": ck["fc_weight"]}, where=where)
    try:  # this rank's rows of the classifier group's state; fused flags of this machine
        t.optimizer_state.load_state_dict(ck["optimizer"])
    except (KeyError, ValueError) as exc:
        raise ValueError(f"{where}: optimizer state does not fit this model: {exc}") from exc
    # The schedule's shape comes from this config, its position from the checkpoint.
    t.scheduler.load_state_dict(ck["scheduler"])
    if t.scaler.is_enabled() and ck.get("scaler"):
        t.scaler.load_state_dict(ck["scaler"])

    rng = ck["rng"]
    if t.ctx.rank < len(rng):  # more ranks than saved: the extra ones keep their fresh seeds
        ckpt_io.restore_rng(rng[t.ctx.rank])
    t.global_step = int(ck["global_step"])
    t.epoch, t.step_in_epoch = int(ck["epoch"]), int(ck["step_in_epoch"])
    t.best_score = float(ck["best_score"])
    if int(ck["steps_per_epoch"]) != t.steps_per_epoch and t.ctx.is_main:
        log.warning("%s: saved with %d steps/epoch, now %d (global batch or data changed); the "
                    "epoch position is kept", where, ck["steps_per_epoch"], t.steps_per_epoch)
