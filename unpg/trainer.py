"""``Trainer``: one training run, from the resolved config to the last checkpoint.

Read top to bottom: ``setup`` = ``setup_distributed`` -> ``check_config`` -> the run folder
(``unpg.checkpointing.RunFolder.claim``: ours? resume from where?) -> ``build_data`` ->
``build_model`` -> ``build_optim`` -> ``maybe_resume``; ``train`` loops over epochs and batches
calling ``train_step``, logging every ``train.log_every`` steps, evaluating every ``eval.every``
and checkpointing every ``train.save_every`` steps and at each epoch end. The components own
their state (``state_dict``/``load_state_dict``: this trainer's counters, backbone, classifier,
optimizer, schedule, scaler, RNGs); ``unpg.checkpointing.CheckpointManager`` collects them.

One step (micro-batches, AMP, the update) is ``unpg.train_step``; verification during training
``unpg.train_eval``. Host syncs: none per step on CUDA. Loss, UNPG statistics and the
finiteness flag stay on the device (``WindowMeter``) and are read at the logging cadence, before
a checkpoint and at the end. The per-step stop check (SIGTERM/SIGINT) is a host-side all-reduce
of a CPU flag when distributed.

Calling ``train_step`` on in-memory batches (benchmarks)::

    trainer = Trainer(cfg, num_classes=C).setup(data=False, steps_per_epoch=1000)
    out = trainer.train_step(images_b3HW, labels_b)  # this rank's float batch on trainer.device
    out["loss"], out["ok"]                               # 0-dim device tensors (no sync)
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import numpy as np
import torch
import torch.distributed as dist

from unpg.checkpoint import checkpoint_step, load_backbone_weights
from unpg.checkpointing import CheckpointManager, RNGState, RunFolder, ScalerState
from unpg.classifier import MarginClassifier
from unpg.config import Config
from unpg.distributed import (
    DistContext,
    setup_distributed,
)
from unpg.faults import NonFiniteGuard, NonFiniteLossError
from unpg.loaders import CorruptSampleError, build_loader
from unpg.logging_utils import MetricsSink, WindowMeter, format_progress
from unpg.models import build_backbone
from unpg.models.registry import resolve_name
from unpg.optim import (
    OptimizerState,
    Schedule,
    build_optimizer,
    param_groups,
    schedule_steps,
)
from unpg.signals import StopSignals
from unpg.train_eval import TrainingEvaluator
from unpg.train_step import TrainStep

__all__ = ["NonFiniteLossError", "Trainer"]

log = logging.getLogger("unpg.train")

LoaderFactory = Callable[..., Any]  # (cfg, rank, world_size, device, train=True) -> loader


def resolve_amp(amp: str, device: torch.device) -> Optional[torch.dtype]:
    """``train.amp`` -> autocast dtype (None = float32). ``auto``: bf16 on CUDA, none on CPU."""
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" else "none"
    if amp == "fp16" and device.type != "cuda":
        raise ValueError("train.amp=fp16 needs CUDA (GradScaler loss scaling); on CPU use "
                         "train.amp=bf16 or none")
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[amp]


class Trainer:
    """One training run; see the module docstring for the order of the steps."""

    def __init__(self, cfg: Config, *, loader_factory: Optional[LoaderFactory] = None,
                 num_classes: Optional[int] = None) -> None:
        self.cfg = cfg
        self.loader_factory = loader_factory
        self.num_classes = num_classes
        self.run_dir = Path(cfg.train.output_dir) / cfg.train.name
        self.accum_steps = cfg.optim.accum_steps
        # Position: optimizer steps done, the epoch being read and batches of it consumed.
        self.global_step = 0
        self.epoch = 0
        self.step_in_epoch = 0
        self.best_score = -math.inf
        self.last_checkpoint: Optional[Path] = None
        self.resume_from: Optional[Path] = None  # chosen by RunFolder.claim in setup
        self.loader: Any = None
        self.sink: Optional[MetricsSink] = None
        self.signals = StopSignals()
        self.last_eval: Dict[str, Any] = {}
        self.guard: Optional[NonFiniteGuard] = None
        self._step_lr = math.nan  # learning rate of the latest update (for the logs)

    # ========================================================================= setup
    def setup(self, data: bool = True, steps_per_epoch: Optional[int] = None) -> "Trainer":
        """Everything before the first step. ``data=False`` (benchmarks) skips the loader and
        resuming; then give ``num_classes`` to the constructor and ``steps_per_epoch`` here."""
        self.setup_distributed()
        self.check_config()
        self.folder = RunFolder(self.run_dir, self.ctx)
        if data:
            # Before any work: the run folder is writable and ours; which checkpoint to resume.
            self.resume_from = self.folder.claim(self.cfg.train.resume, self.cfg.train.overwrite)
            self.build_data()
        else:
            if self.num_classes is None or steps_per_epoch is None:
                raise ValueError("Trainer.setup(data=False) needs Trainer(num_classes=...) and "
                                 "setup(steps_per_epoch=...)")
            self.steps_per_epoch = int(steps_per_epoch)
        self.build_model()
        self.build_optim()
        if data:
            self.maybe_resume()
        return self

    def setup_distributed(self) -> None:
        self.ctx: DistContext = setup_distributed(self.cfg.train.device)
        self.device = self.ctx.device
        self.amp_dtype = resolve_amp(self.cfg.train.amp, self.device)

    def check_config(self) -> None:
        """Problems a config can have that only show with the world size, data and files."""
        cfg, world = self.cfg, self.ctx.world_size
        per_step = world * self.accum_steps
        if cfg.train.batch_size % per_step:
            raise ValueError(
                f"train.batch_size={cfg.train.batch_size} (global) must be divisible by "
                f"world_size x optim.accum_steps = {world} x {self.accum_steps}; set "
                f"train.batch_size to a multiple of {per_step}")
        # Verification during training checks its own files (before any work).
        self.evaluator = TrainingEvaluator(cfg.eval, cfg.verification_bins, cfg.data.normalize,
                                           self.ctx)
        if cfg.model.weights and not os.path.isfile(cfg.model.weights):
            raise ValueError(f"model.weights={cfg.model.weights}: file not found")
        resolve_name(cfg.model.name)  # unknown backbone: ValueError listing the known ones

    def build_data(self) -> None:
        cfg = self.cfg
        # The loader checks what it reads (the data key of loader.name, data.num_classes, at
        # least one global batch) and says how to fix it.
        factory = self.loader_factory or build_loader
        self.loader = factory(cfg, self.ctx.rank, self.ctx.world_size, self.device, train=True)
        if self.num_classes is not None and self.num_classes != self.loader.num_classes:
            raise ValueError(f"num_classes={self.num_classes} given but the training data has "
                             f"{self.loader.num_classes} classes")
        self.num_classes = int(self.loader.num_classes)
        self.steps_per_epoch = len(self.loader)

    def build_model(self) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg.train.seed)  # the same initial backbone on every rank
        backbone = build_backbone(cfg.model.name, embedding_size=cfg.model.embedding_size,
                                  dropout=cfg.model.dropout, channels_last=cfg.model.channels_last)
        if cfg.model.weights:
            load_backbone_weights(backbone, cfg.model.weights)
        self.backbone = backbone.to(self.device)
        if cfg.model.channels_last:
            self.backbone.to(memory_format=torch.channels_last)
        self.classifier = MarginClassifier.from_config(
            cfg.fc, cfg.head, cfg.unpg, embedding_size=cfg.model.embedding_size,
            num_classes=self.num_classes, ctx=self.ctx, seed=cfg.train.seed,
            amp_dtype=self.amp_dtype, device=self.device)
        self.model = self.classifier.wrap_backbone(self.backbone)
        if cfg.train.compile:
            self.model = torch.compile(self.model)
        # Each rank draws its own random numbers from here on (dropout, class sampling).
        seed = cfg.train.seed + 1000 * self.ctx.rank
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)

    def build_optim(self) -> None:
        cfg = self.cfg
        groups = param_groups(self.backbone, self.classifier)
        self.optimizer = build_optimizer(cfg.optim, groups, self.device)
        # Checkpoint component: the classifier group's per-row state saved as full [C, ...].
        self.optimizer_state = OptimizerState(self.optimizer, self.classifier)
        shape = schedule_steps(cfg.schedule, cfg.optim.lr, self.steps_per_epoch)
        self.total_steps = shape.total_steps
        self.scheduler = Schedule(self.optimizer, shape, cfg.optim.lr)
        self.scaler = torch.amp.GradScaler(self.device.type,
                                           enabled=self.amp_dtype == torch.float16)
        self.step = TrainStep(self.model, self.classifier, self.optimizer, self.scheduler,
                              self.scaler, self.ctx, accum_steps=self.accum_steps,
                              amp_dtype=self.amp_dtype, grad_clip=cfg.optim.grad_clip)
        # Every component owns its state; the manager only collects it (order = save order).
        self.checkpoints = CheckpointManager(self.folder, {
            "train_state": self, "backbone": self.backbone, "classifier": self.classifier,
            "optimizer": self.optimizer_state, "schedule": self.scheduler,
            "scaler": ScalerState(self.scaler), "rng": RNGState(self.ctx),
        }, keep_last=cfg.train.keep_last, config=cfg.to_dict())

    def maybe_resume(self) -> None:
        """Load the checkpoint ``RunFolder.claim`` chose for ``train.resume`` (if any)."""
        if self.resume_from is not None:
            self.checkpoints.load(self.resume_from)
            self.last_checkpoint = self.resume_from
            log.info("resumed from %s at step %d (epoch %d, batch %d)", self.resume_from,
                     self.global_step, self.epoch + 1, self.step_in_epoch)

    # ========================================================================= training
    def train(self) -> Dict[str, Any]:
        """Run to the end of the schedule (or ``train.max_steps`` / a stop signal). Returns
        ``{reason, global_step, checkpoint, eval}``; raises ``KeyboardInterrupt`` after saving
        on SIGINT and ``NonFiniteLossError`` when the loss stays non-finite."""
        cfg = self.cfg
        if self.ctx.is_main:
            self.folder.begin()
            self.folder.write_config(cfg, self.global_step)
            self.sink = MetricsSink(self.run_dir, resume_step=self.global_step)
            log.info("training %s: %d classes, %d steps/epoch x %d epochs, global batch %d on %d "
                     "process(es), device %s, amp %s, fc %s", cfg.model.name, self.num_classes,
                     self.steps_per_epoch, cfg.schedule.epochs, cfg.train.batch_size,
                     self.ctx.world_size, self.device, self.amp_dtype or "none", cfg.fc.mode)
        self._meter = WindowMeter()
        self.guard = NonFiniteGuard(cfg.train.max_nonfinite, self.device)
        self._window_start, self._window_steps = time.perf_counter(), 0
        reason = "done"
        stop_at = min(self.total_steps, cfg.train.max_steps or self.total_steps)
        with self.signals:
            try:
                reason = self._run_epochs(stop_at)
            except CorruptSampleError:
                self._save_before_data_error()
                raise
            finally:
                if self.sink is not None:
                    self.sink.close()
                    self.sink = None
        if self.ctx.distributed:
            # Every rank leaves together: a rank that tears its process group down while a peer
            # is still inside the last checkpoint's collectives can abort in gloo's teardown.
            dist.barrier()
        if reason == "SIGINT":
            raise KeyboardInterrupt(f"stopped by SIGINT after saving {self.last_checkpoint}")
        return {"reason": reason, "global_step": self.global_step,
                "checkpoint": str(self.last_checkpoint) if self.last_checkpoint else None,
                "eval": self.last_eval}

    def close(self) -> None:
        """Stop the loader's worker processes now. They ignore SIGTERM (a signal to the process
        group is for this process), so the interpreter's exit could not terminate them."""
        loader, self.loader = self.loader, None
        if hasattr(loader, "close"):
            loader.close()

    def _save_before_data_error(self) -> None:
        """Keep the steps done before a corrupt sample stopped the run (one process only: the
        other ranks of a distributed run would wait in the save's collectives for this one)."""
        if not self.ctx.distributed and self.global_step and not self._saved_now():
            log.warning("saved %s before stopping on corrupt data; fix the data or set loader."
                        "on_corrupt=skip, then resume (--resume)", self.save_checkpoint())

    def _run_epochs(self, stop_at: int) -> str:
        cfg = self.cfg
        if self.step_in_epoch >= self.steps_per_epoch:  # saved at the very end of an epoch
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
        self.backbone.train()
        self.classifier.train()
        stop = ""
        while not stop and self.global_step < stop_at and self.epoch < cfg.schedule.epochs:
            stop = self._run_epoch(stop_at)
        stop = stop or "done"
        self._finish(stop)
        return stop

    def _run_epoch(self, stop_at: int) -> str:
        """The rest of the current epoch; returns a stop reason or '' at the epoch's end."""
        with contextlib.closing(self.epoch_batches()) as batches:
            for images, labels in batches:
                out = self.train_step(images, labels)
                self.global_step += 1
                self.step_in_epoch += 1
                self._after_step(out)
                if self.step_in_epoch >= self.steps_per_epoch:
                    break
                stop = self._stop_reason(stop_at)
                if stop:
                    return stop
            else:
                raise RuntimeError(f"the loader yielded {self.step_in_epoch} batches in epoch "
                                   f"{self.epoch}, fewer than its len() = {self.steps_per_epoch}")
        self.epoch, self.step_in_epoch = self.epoch + 1, 0
        self.save_checkpoint()  # epoch end
        return self._stop_reason(stop_at)

    def epoch_batches(self):
        """The rest of this epoch: the loader's reproducible order at position (``epoch``,
        ``step_in_epoch``), set through its public API (``set_epoch``, and ``set_start_step``
        where the loader has it; otherwise the consumed batches are read and dropped)."""
        self.loader.set_epoch(self.epoch)
        skip = self.step_in_epoch
        if skip and hasattr(self.loader, "set_start_step"):
            self.loader.set_start_step(skip)  # seeks without decoding the skipped batches
            skip = 0
        it = iter(self.loader)
        try:
            for i, batch in enumerate(it):
                if i >= skip:
                    yield batch
        finally:
            if hasattr(it, "close"):
                it.close()  # stop prefetching when we leave early

    def _stop_reason(self, stop_at: int) -> str:
        # Per-step check; across ranks one host-side all-reduce of a CPU flag (no device sync).
        if self.signals.agreed(self.ctx):
            return self.signals.name or "SIGTERM"
        if self.global_step >= stop_at:
            return "done" if stop_at == self.total_steps else "max_steps"
        return ""

    def _finish(self, reason: str) -> None:
        """Last log, evaluation and checkpoint of the run (or of this piece of it)."""
        if self._meter.steps:
            self._log_progress()
        if reason == "done" and self.evaluator.enabled and \
                self.last_eval.get("step") != self.global_step:
            self.evaluate()
        if not self._saved_now():
            self.save_checkpoint()
        if reason not in ("done", "max_steps") and self.ctx.is_main:
            log.warning("%s received: saved %s at step %d; resume with train.resume=auto",
                        reason, self.last_checkpoint, self.global_step)

    def _after_step(self, out: Dict[str, torch.Tensor]) -> None:
        cfg, step = self.cfg, self.global_step
        self._meter.add(out["loss"], out["ok"], {k: v for k, v in out.items()
                                                 if k not in ("loss", "ok")})
        self.guard.track(out["ok"], step)
        self._window_steps += 1
        if step % cfg.train.log_every == 0:
            self._log_progress()
        if self.evaluator.due(step):
            self.evaluate()
        if cfg.train.save_every > 0 and step % cfg.train.save_every == 0 and \
                self.step_in_epoch < self.steps_per_epoch:  # the epoch end saves anyway
            self.save_checkpoint()

    # ========================================================================= one step
    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> Dict[str, torch.Tensor]:
        """One optimizer step on this rank's batch (``unpg.train_step``): 0-dim device tensors
        ``loss``, ``ok`` (finite: the update was applied) and the UNPG statistics."""
        out = self.step(images, labels)
        self._step_lr = self.step.last_lr
        return out

    # ========================================================================= logging / eval
    def _log_progress(self) -> None:
        meter = self._meter
        if not self.classifier.loss_is_global and meter.steps:  # per-rank means: average them
            meter.average_loss_over(self.ctx.loss_group, self.ctx.world_size)
        record = meter.read()  # host sync: once per logging window
        now = time.perf_counter()
        elapsed = max(now - self._window_start, 1e-9)
        steps = self._window_steps
        self._window_start, self._window_steps = now, 0
        self.guard.check(self.global_step, self.last_checkpoint, record.get("skipped", 0),
                         steps, warn=self.ctx.is_main)
        stop_at = min(self.total_steps, self.cfg.train.max_steps or self.total_steps)
        record.update(lr=self._step_lr, epoch=self.epoch,
                      images_per_sec=steps * self.cfg.train.batch_size / elapsed,
                      eta_sec=(stop_at - self.global_step) * elapsed / max(steps, 1))
        if self.ctx.is_main:
            epoch = min(self.epoch, self.cfg.schedule.epochs - 1)  # after the last epoch end
            log.info(format_progress(self.global_step, stop_at, epoch, self.cfg.schedule.epochs,
                                     record))
            if self.sink is not None:
                self.sink.write(self.global_step, record)

    def evaluate(self) -> Dict[str, Any]:
        """Verification (``unpg.train_eval``); keeps ``best.pt`` when the mean accuracy
        improves. Collective: call on every rank."""
        self.last_eval = self.evaluator.run(self.backbone, self.global_step, self.sink)
        score = self.last_eval["score"]
        if math.isfinite(score) and score > self.best_score:
            self.best_score = score
            self.save_checkpoint(best=True)
        return self.last_eval

    # ========================================================================= checkpoints
    def state_dict(self) -> Dict[str, Any]:
        """The trainer's own counters (checkpoint component ``train_state``): the position in
        the schedule and in the data (epoch, batches of it consumed), the best score."""
        return {"global_step": self.global_step, "epoch": self.epoch,
                "step_in_epoch": self.step_in_epoch, "steps_per_epoch": self.steps_per_epoch,
                "best_score": self.best_score, "num_classes": self.num_classes,
                "world_size": self.ctx.world_size}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.global_step = int(state["global_step"])
        self.epoch, self.step_in_epoch = int(state["epoch"]), int(state["step_in_epoch"])
        self.best_score = float(state["best_score"])
        if int(state["steps_per_epoch"]) != self.steps_per_epoch and self.ctx.is_main:
            log.warning("saved with %d steps/epoch, now %d (global batch or data changed); the "
                        "epoch position is kept", state["steps_per_epoch"], self.steps_per_epoch)

    def _saved_now(self) -> bool:
        return self.last_checkpoint is not None and \
            checkpoint_step(self.last_checkpoint) == self.global_step

    def save_checkpoint(self, best: bool = False) -> Path:
        """Write ``ckpt_<step>.pt`` (rotating this run's to ``train.keep_last``) or ``best.pt``.
        Every rank must call it; rank 0 writes. Refuses when the fault limit was crossed."""
        if self.guard is not None and self.guard.over_limit():
            self.guard.check(self.global_step, self.last_checkpoint)
        path = self.checkpoints.save(self.global_step, best=best)
        if not best:
            self.last_checkpoint = path
        return path
