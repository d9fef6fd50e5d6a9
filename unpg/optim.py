"""Optimizers (SGD, AdamW) with the class centres in their own group, the per-iteration
learning-rate schedule (linear warm-up, then cosine or polynomial decay) and a step that skips
itself on the device when the loss is not finite.

Schedule, stepped once per *optimizer* step (``t`` = optimizer steps done, ``W`` warm-up steps,
``T`` total steps, ``r = min_lr / lr``)::

    t <  W:  factor = (t + 1) / W                                   (linear warm-up)
    t >= W:  p = (t - W) / max(1, T - W), clamped to [0, 1]
             cosine: factor = r + (1 - r) * (1 + cos(pi * p)) / 2
             poly:   factor = r + (1 - r) * (1 - p) ** power

The first step already trains (factor ``1/W``, not 0 as in insightface's ``PolyScheduler``).

Checkpoint components (``state_dict()`` / ``load_state_dict()``, plain types and tensors only, so
``torch.load(weights_only=True)`` reads them):

* ``Schedule``: the shape (``WarmupDecay``) comes from this run's config, only the position
  (optimizer steps done) from the checkpoint, so a resumed run may change epochs or warm-up.
* ``OptimizerState``: the optimizer's state with the classifier group's per-row tensors
  (momentum, Adam moments) as FULL ``[C, ...]`` rows, gathered from / cut back to this rank's
  rows by the classifier (``gather_rows`` / ``local_rows``): a checkpoint reshards like the
  class centres themselves.

Parameter groups are named (``"backbone"``, ``"classifier"``) and looked up by name only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Protocol

import torch
from torch import nn

__all__ = ["GROUP_NAMES", "OptimizerState", "Schedule", "WarmupDecay", "build_optimizer",
           "group_params", "guarded_step", "param_groups", "schedule_steps"]

GROUP_NAMES = ("backbone", "classifier")


def param_groups(backbone: nn.Module, classifier: nn.Module) -> List[dict]:
    """Backbone and class-centre parameters as two named groups (same weight decay, as
    insightface's arcface_torch; separate so that their state can be treated apart)."""
    return [
        {"params": [p for p in backbone.parameters() if p.requires_grad], "name": "backbone"},
        {"params": [p for p in classifier.parameters() if p.requires_grad],
         "name": "classifier"},
    ]


def _group(groups: List[dict], name: str) -> dict:
    for group in groups:
        if group.get("name") == name:
            return group
    raise KeyError(f"no parameter group named {name!r} (groups: "
                   f"{[g.get('name') for g in groups]})")


def group_params(optimizer: torch.optim.Optimizer, name: str) -> List[torch.Tensor]:
    """The parameters of the group called ``name``."""
    return list(_group(optimizer.param_groups, name)["params"])


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


def schedule_steps(schedule, lr: float, steps_per_epoch: int) -> WarmupDecay:
    """The shape of the ``schedule`` config section for base learning rate ``lr`` (``optim.lr``)
    and ``steps_per_epoch`` optimizer steps per epoch."""
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
    total = schedule.epochs * steps_per_epoch
    warmup = min(total - 1, int(round(schedule.warmup_epochs * steps_per_epoch)))
    return WarmupDecay(total_steps=total, warmup_steps=max(0, warmup), name=schedule.name,
                       min_factor=schedule.min_lr / lr, power=schedule.poly_power)


class Schedule:
    """Sets every group's learning rate to ``base_lr * shape(t)`` at optimizer step ``t``.

    ``step()`` once per optimizer step. ``state_dict()`` holds the position only; the shape
    stays the one built from this run's config (see the module docstring)."""

    def __init__(self, optimizer: torch.optim.Optimizer, shape: WarmupDecay,
                 base_lr: float) -> None:
        self.optimizer, self.shape, self.base_lr = optimizer, shape, float(base_lr)
        self.steps_done = 0
        self._apply()

    @property
    def total_steps(self) -> int:
        return self.shape.total_steps

    @property
    def last_epoch(self) -> int:
        """Optimizer steps done (the name torch's LR schedulers use)."""
        return self.steps_done

    def lr_at(self, t: int) -> float:
        return self.base_lr * self.shape(t)

    def get_last_lr(self) -> List[float]:
        """The learning rate of every group for the next optimizer step."""
        return [group["lr"] for group in self.optimizer.param_groups]

    def step(self) -> None:
        self.steps_done += 1
        self._apply()

    def _apply(self) -> None:
        lr = self.lr_at(self.steps_done)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def state_dict(self) -> Dict[str, Any]:
        return {"steps_done": self.steps_done}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        steps = state_dict.get("steps_done")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"schedule state: 'steps_done' must be an int >= 0, got {steps!r}")
        self.steps_done = steps
        self._apply()


class RowLayout(Protocol):
    """What ``OptimizerState`` needs of the classifier (``unpg.classifier.MarginClassifier``)."""

    num_classes: int
    ctx: Any  # unpg.distributed.DistContext: rank 0 receives the gathered state

    def gather_rows(self, local_CX: torch.Tensor) -> Optional[torch.Tensor]: ...

    def local_rows(self, full_CX: torch.Tensor) -> torch.Tensor: ...


class OptimizerState:
    """Checkpoint component of ``optimizer``: its ``state_dict`` with the classifier group's
    per-row state as full ``[C, ...]`` tensors (see the module docstring).

    ``state_dict()`` is collective when the classifier is sharded (every rank calls it); rank 0
    gets the dict (tensors on the CPU), the other ranks ``{}``. ``load_state_dict`` cuts this
    rank's rows back out and keeps this machine's ``fused``/``foreach`` flags."""

    def __init__(self, optimizer: torch.optim.Optimizer, classifier: RowLayout,
                 group: str = "classifier") -> None:
        self.optimizer, self.classifier, self.group = optimizer, classifier, group

    def _row_indices(self, state: Dict[str, Any]) -> List[int]:
        """Flat indices (torch's ``state_dict`` numbering) of the classifier group's params."""
        return list(_group(state["param_groups"], self.group)["params"])

    def state_dict(self) -> Dict[str, Any]:
        state = self.optimizer.state_dict()
        per_param = dict(state["state"])
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        for idx in self._row_indices(state):
            shape = params[idx].shape
            entry = per_param.get(idx, {})
            # Sorted keys: every rank gathers the same tensors in the same order.
            per_param[idx] = {key: (self.classifier.gather_rows(entry[key])
                                    if torch.is_tensor(entry[key]) and entry[key].shape == shape
                                    else entry[key]) for key in sorted(entry)}
        if not self.classifier.ctx.is_main:
            return {}
        return {**state, "state": {idx: {k: (v.detach().cpu() if torch.is_tensor(v) else v)
                                         for k, v in entry.items()}
                                   for idx, entry in per_param.items()}}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        names = [g.get("name") for g in state_dict["param_groups"]]
        ours = [g.get("name") for g in self.optimizer.param_groups]
        if names != ours:
            raise ValueError(f"optimizer state has parameter groups {names}, this run has {ours}")
        per_param = dict(state_dict["state"])
        num_classes = self.classifier.num_classes
        for idx in self._row_indices(state_dict):
            if idx in per_param:
                per_param[idx] = {
                    k: (self.classifier.local_rows(v).clone()
                        if torch.is_tensor(v) and v.dim() >= 1 and v.shape[0] == num_classes
                        else v) for k, v in per_param[idx].items()}
        flags = [{k: g[k] for k in ("fused", "foreach") if k in g}
                 for g in self.optimizer.param_groups]
        self.optimizer.load_state_dict({**state_dict, "state": per_param})
        for group, keep in zip(self.optimizer.param_groups, flags):
            group.update(keep)  # fused kernels follow this machine, not the one that saved


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
