"""The checkpoint manager: which components a checkpoint holds, and which files belong to a run.

Components own their state: each has ``state_dict()`` / ``load_state_dict()`` (the trainer's
counters, the backbone, the classifier, the optimizer, the schedule, the loss scaler, the RNGs),
and ``CheckpointManager(folder, states={"train_state": trainer, "backbone": ..., ...})`` only
collects them into one file and hands each its part back (the file layout is in
``unpg.checkpoint``). ``state_dict()`` may be collective (the class-sharded classifier gathers its
rows), so every rank calls every component, in the order of ``states``; rank 0 writes.

A run folder belongs to one run. ``RunFolder.claim`` decides, on rank 0, before any work:

* a fresh run (``train.resume=''``) needs an empty (or new) folder; ``train.overwrite=true``
  deletes an earlier run's files first, and refuses when the folder holds anything else;
* ``train.resume=auto`` continues the run named in ``run.json``: its newest *readable*
  checkpoint (an unreadable one, e.g. truncated, is skipped with a warning); no checkpoint yet
  starts the same run again from step 0; a non-empty folder without ``run.json`` is refused;
* ``train.resume=PATH`` continues that run when PATH is one of this folder's own checkpoints,
  otherwise starts a new run (an empty folder, as a fresh one) from PATH's state.

``run.json`` holds the run's random id (stored in each of its checkpoints too) and the step
checkpoints it wrote, oldest write first; rotation (``train.keep_last``) deletes only those, so
nothing of another run is ever pruned. Temporaries of an interrupted save are removed.
"""
from __future__ import annotations

import json
import logging
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional, Protocol

import torch
import yaml

from unpg import checkpoint as ckpt_io
from unpg.config import Config, save_config
from unpg.distributed import DistContext, gather_objects
from unpg.fileio import atomic_write_json

__all__ = ["RUN_FILE", "CheckpointManager", "RNGState", "RunFolder", "ScalerState", "Stateful"]

log = logging.getLogger("unpg.train")

RUN_FILE = "run.json"
_RUN_FORMAT = "unpg-run"
# What training writes into a run folder (train.overwrite=true deletes these, nothing else).
_RUN_NAMES = ("run.json", "config.yaml", "metrics.jsonl", "tb", ckpt_io.BEST_NAME)


class Stateful(Protocol):
    def state_dict(self) -> Dict[str, Any]: ...

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None: ...


def _is_run_file(name: str) -> bool:
    if name.startswith(".") and name.endswith(".tmp"):  # an atomic write's temporary
        name = name[1:].rsplit(".", 2)[0]
    return (name in _RUN_NAMES or ckpt_io.checkpoint_step(name) >= 0
            or (name.startswith("config_resumed_") and name.endswith(".yaml")))


def _flat(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _summary(names: List[str], limit: int = 4) -> str:
    more = f", ... ({len(names)} entries)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


class RunFolder:
    """``train.output_dir/train.name`` as owned by one run (see the module docstring)."""

    def __init__(self, run_dir: Path, ctx: DistContext) -> None:
        self.run_dir, self.ctx = Path(run_dir), ctx
        self.run_id = ""
        self.checkpoints: List[str] = []  # this run's step checkpoints, oldest write first
        self._loaded: Optional[tuple] = None  # (path, dict) read by claim on rank 0
        self._doomed: List[str] = []  # an earlier run's files, deleted by begin (overwrite)
        self._new = False  # begin writes a new run.json

    # ------------------------------------------------------------------ claiming (collective)
    def claim(self, resume: str, overwrite: bool) -> Optional[Path]:
        """Check and prepare the folder; return the checkpoint to resume from (or None). Every
        rank calls it and gets the same answer, or the same ``ValueError``."""
        outcome = {"error": "", "path": "", "run_id": ""}
        if self.ctx.is_main:
            try:
                path = self._claim(resume, overwrite)
                outcome.update(path=str(path) if path else "", run_id=self.run_id)
            except (ValueError, FileNotFoundError) as exc:
                outcome["error"] = str(exc)
        outcome = gather_objects(outcome, self.ctx)[0]
        if outcome["error"]:
            raise ValueError(outcome["error"])
        self.run_id = outcome["run_id"]
        return Path(outcome["path"]) if outcome["path"] else None

    def _claim(self, resume: str, overwrite: bool) -> Optional[Path]:
        """Checks and decisions only; ``begin`` changes the folder once training starts."""
        self._check_writable()
        manifest = self._read_manifest()
        entries = sorted(p.name for p in self.run_dir.iterdir())
        if resume == "auto":
            if manifest is None:
                if entries:
                    raise ValueError(
                        f"train.resume=auto: {self.run_dir} is not empty ({_summary(entries)}) "
                        f"but has no {RUN_FILE}, so it is not a run folder of this trainer; "
                        f"choose another train.name / train.output_dir")
                log.info("train.resume=auto: no checkpoint in %s, starting fresh", self.run_dir)
                return self._new_run()
            self._adopt(manifest)
            return self._newest_readable()
        if resume:
            path = Path(resume)
            ck = ckpt_io.load_checkpoint(path)  # unreadable: ValueError, exit 2
            if manifest is not None and ck.get("run_id") == manifest["run_id"] and \
                    path.resolve().parent == self.run_dir.resolve():
                self._adopt(manifest)  # one of this run's own checkpoints
            else:  # a new run starting from another run's state
                self._require_empty(entries, overwrite)
                self._new_run()
            self._loaded = (path, ck)
            return path
        self._require_empty(entries, overwrite)
        return self._new_run()

    def _check_writable(self) -> None:
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=self.run_dir):
                pass
        except OSError as exc:
            raise ValueError(f"train.output_dir: cannot write the run folder {self.run_dir} "
                             f"({exc.strerror or exc}); set train.output_dir to a writable "
                             f"folder") from None

    def _read_manifest(self) -> Optional[Dict[str, Any]]:
        path = self.run_dir / RUN_FILE
        if not path.is_file():
            return None
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
            valid = (isinstance(manifest, dict) and manifest.get("format") == _RUN_FORMAT
                     and isinstance(manifest.get("run_id"), str)
                     and isinstance(manifest.get("checkpoints"), list)
                     and all(isinstance(n, str) for n in manifest["checkpoints"]))
        except (OSError, ValueError) as exc:
            valid, manifest = False, str(exc)
        if not valid:
            raise ValueError(f"{path}: not a readable run file of this trainer; move the folder "
                             f"away or choose another train.name")
        return manifest

    def _require_empty(self, entries: List[str], overwrite: bool) -> None:
        if not entries:
            return
        if not overwrite:
            raise ValueError(
                f"run folder {self.run_dir} is not empty ({_summary(entries)}): it holds an "
                f"earlier run. Continue that run with --resume (train.resume=auto), choose "
                f"another train.name, or set train.overwrite=true to delete it")
        foreign = [name for name in entries if not _is_run_file(name)]
        if foreign:
            raise ValueError(
                f"train.overwrite=true: {self.run_dir} also holds files training does not write "
                f"({_summary(foreign)}); nothing was deleted. Move them away or choose another "
                f"train.name")
        self._doomed = entries

    def _new_run(self) -> None:
        self.run_id, self.checkpoints, self._new = uuid.uuid4().hex, [], True

    def begin(self) -> None:
        """Rank 0, when training starts: delete an earlier run's files (``train.overwrite``),
        the temporaries of interrupted saves, and write ``run.json`` for a new run."""
        for name in self._doomed:
            path = self.run_dir / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        if self._doomed:
            log.warning("train.overwrite=true: deleted the earlier run in %s (%d entries)",
                        self.run_dir, len(self._doomed))
        self._doomed = []
        for stale in ckpt_io.remove_stale_temporaries(self.run_dir):
            log.warning("removed %s, left by an interrupted checkpoint save", stale)
        if self._new:
            self._write_manifest()
            self._new = False
            log.info("run %s in %s", self.run_id, self.run_dir)

    def _adopt(self, manifest: Dict[str, Any]) -> None:
        self.run_id, self.checkpoints = manifest["run_id"], list(manifest["checkpoints"])

    def _newest_readable(self) -> Optional[Path]:
        skipped, missing = [], []
        for name in reversed(self.checkpoints):
            path = self.run_dir / name
            if not path.is_file():
                missing.append(name)
                continue
            try:
                ck = ckpt_io.load_checkpoint(path)
            except ValueError as exc:
                log.warning("train.resume=auto: skipping %s: %s", path, exc)
                skipped.append(name)
                continue
            if skipped:
                log.warning("train.resume=auto: resuming from %s, the newest readable checkpoint "
                            "(skipped %s)", path, ", ".join(skipped))
            self._loaded = (path, ck)
            return path
        if skipped or missing:  # starting over would silently throw the run away
            raise ValueError(f"train.resume=auto: no checkpoint of the run in {self.run_dir} is "
                             f"readable (unreadable: {', '.join(skipped) or 'none'}; missing: "
                             f"{', '.join(missing) or 'none'}); resume from a copy with "
                             f"train.resume=PATH, or start over with train.overwrite=true")
        log.info("train.resume=auto: run %s has no checkpoint yet, starting it from step 0",
                 self.run_id)
        return None

    # ------------------------------------------------------------------ rank 0's bookkeeping
    def _write_manifest(self) -> None:
        atomic_write_json(self.run_dir / RUN_FILE, {"format": _RUN_FORMAT, "run_id": self.run_id,
                                                    "checkpoints": self.checkpoints}, indent=1)

    def record(self, path: Path, keep_last: int) -> List[Path]:
        """Add a step checkpoint just written; delete this run's oldest writes beyond
        ``keep_last`` (the manifest is updated first: a crash leaves an unlisted file, never a
        listed missing one). Returns the deleted paths."""
        names = [n for n in self.checkpoints if n != path.name] + [path.name]
        doomed, self.checkpoints = names[:-keep_last], names[-keep_last:]
        self._write_manifest()
        for name in doomed:
            (self.run_dir / name).unlink(missing_ok=True)
        return [self.run_dir / n for n in doomed]

    def write_config(self, cfg: Config, step: int) -> None:
        """``config.yaml`` is the config the run started with and is never replaced; a resumed
        piece whose config differs (other than ``train.resume``/``overwrite``) is kept beside it
        as ``config_resumed_<step>.yaml`` and the changed keys are logged."""
        first = self.run_dir / "config.yaml"
        if not first.is_file():
            save_config(cfg, first)
            return
        try:
            before = _flat(yaml.safe_load(first.read_text(encoding="utf-8")) or {})
        except (OSError, yaml.YAMLError):
            before = {}
        now = _flat(yaml.safe_load(yaml.safe_dump(cfg.to_dict())))  # as the file holds it
        changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k)
                         and k not in ("train.resume", "train.overwrite"))
        if changed:
            path = save_config(cfg, self.run_dir / f"config_resumed_{step:09d}.yaml")
            log.warning("config changed since the run started (%s): wrote %s",
                        ", ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed),
                        path)

    def take_loaded(self, path: Path) -> Optional[Dict[str, Any]]:
        """The checkpoint ``claim`` already read (rank 0), so it is not read twice."""
        loaded, self._loaded = self._loaded, None
        return loaded[1] if loaded is not None and loaded[0] == path else None


class RNGState:
    """Every rank's RNG states (python, numpy, torch, cuda): gathered on save (collective), each
    rank takes its own on load; ranks beyond the saved count keep their fresh seeds."""

    def __init__(self, ctx: DistContext) -> None:
        self.ctx = ctx

    def state_dict(self) -> Dict[str, Any]:
        return {"ranks": gather_objects(ckpt_io.capture_rng(), self.ctx)}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        ranks = state_dict["ranks"]
        if self.ctx.rank < len(ranks):
            ckpt_io.restore_rng(ranks[self.ctx.rank])


class ScalerState:
    """``torch.amp.GradScaler``'s state; empty (and ignored on load) without fp16 scaling."""

    def __init__(self, scaler: torch.amp.GradScaler) -> None:
        self.scaler = scaler

    def state_dict(self) -> Dict[str, Any]:
        return self.scaler.state_dict() if self.scaler.is_enabled() else {}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        if state_dict and self.scaler.is_enabled():
            self.scaler.load_state_dict(state_dict)


def _cpu(obj: Any) -> Any:
    if torch.is_tensor(obj):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu(v) for v in obj)
    return obj


class CheckpointManager:
    """Saves ``states`` into the run folder and restores them (see the module docstring)."""

    def __init__(self, folder: RunFolder, states: Dict[str, Stateful], *, keep_last: int,
                 config: Dict[str, Any]) -> None:
        self.folder, self.states, self.keep_last, self.config = folder, states, keep_last, config
        self.ctx = folder.ctx

    def save(self, step: int, best: bool = False) -> Path:
        """Write ``ckpt_<step>.pt`` (then rotate this run's) or ``best.pt``. Collective."""
        parts = {name: obj.state_dict() for name, obj in self.states.items()}  # same order
        run_dir = self.folder.run_dir
        path = run_dir / ckpt_io.BEST_NAME if best else ckpt_io.checkpoint_path(run_dir, step)
        if self.ctx.is_main:
            ckpt_io.atomic_save({"format": ckpt_io.FORMAT, "version": ckpt_io.VERSION,
                                 "run_id": self.folder.run_id, "config": self.config,
                                 **_cpu(parts)}, path)
            if not best:
                self.folder.record(path, self.keep_last)
            log.info("saved %s", path)
        return path

    def load(self, path: Path) -> None:
        """Hand each component its part of checkpoint ``path`` (every rank reads the file)."""
        ck = self.folder.take_loaded(path) if self.ctx.is_main else None
        ck = ck if ck is not None else ckpt_io.load_checkpoint(path)
        for name, obj in self.states.items():
            if name not in ck:
                raise ValueError(f"{path}: the checkpoint has no '{name}' state")
            try:
                obj.load_state_dict(ck[name])
            except ValueError as exc:
                raise ValueError(f"{path}: {name}: {exc}") from exc
            except (RuntimeError, KeyError, TypeError) as exc:  # e.g. nn.Module's strict load
                detail = " ".join(f"{type(exc).__name__}: {exc}".split())  # one line
                raise ValueError(f"{path}: the saved {name} does not fit this run ({detail[:300]}"
                                 f"); resume with the model, optimizer and data it was saved "
                                 f"with (the checkpoint's 'config' holds them)") from exc
