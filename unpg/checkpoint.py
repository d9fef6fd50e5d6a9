"""Training checkpoint *files*: their layout, names, atomic writing and checked reading.

What goes into a checkpoint and when is decided by ``unpg.checkpointing.CheckpointManager``; this
module only knows the file. A checkpoint is one ``torch.save`` dict of plain types and tensors
(so ``torch.load(..., weights_only=True)`` reads it), one entry per training component::

    format, version, run_id, config (the resolved config as a dict)
    train_state  the trainer's counters: global_step, epoch, step_in_epoch, steps_per_epoch,
                 best_score, num_classes, world_size
    backbone     backbone state_dict (no DDP/compile prefixes)
    classifier   {"weight": the FULL class-centre matrix [C, D]}, whatever the number of shards
    optimizer    optimizer state_dict; the classifier group's per-row state is full [C, ...] too
    schedule     {"steps_done": optimizer steps done}
    scaler       GradScaler state ({} without fp16 loss scaling)
    rng          one entry per rank: python, numpy, torch, cuda

Everything per-row is saved gathered, so a checkpoint is independent of the process count and
of ``fc.mode``. Files in the run folder: ``ckpt_<global step>.pt`` and ``best.pt``; an
interrupted save leaves only a temporary ``.ckpt_<step>.pt.<random>.tmp`` (``unpg.fileio``), which
``remove_stale_temporaries`` deletes.
"""
from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import numpy as np
import torch
from torch import nn

from unpg.fileio import atomic_write

__all__ = ["BEST_NAME", "FORMAT", "VERSION", "atomic_save", "capture_rng", "checkpoint_path",
           "checkpoint_step", "is_checkpoint_temporary", "latest_checkpoint", "list_checkpoints",
           "load_backbone_weights", "load_checkpoint", "remove_stale_temporaries", "restore_rng"]

FORMAT, VERSION = "unpg-train-checkpoint", 2
BEST_NAME = "best.pt"
_NAME_RE = re.compile(r"^ckpt_(\d+)\.pt$")
# unpg.fileio.atomic_write's temporaries of our checkpoint files: .<name>.<random>.tmp
_TEMP_RE = re.compile(r"^\.(ckpt_\d+\.pt|best\.pt)\.[A-Za-z0-9_]+\.tmp$")
PathLike = Union[str, Path]


def checkpoint_path(run_dir: PathLike, global_step: int) -> Path:
    return Path(run_dir) / f"ckpt_{global_step:09d}.pt"


def checkpoint_step(path: PathLike) -> int:
    """Global step encoded in a ``ckpt_<step>.pt`` name (-1 for other names)."""
    m = _NAME_RE.match(Path(path).name)
    return int(m.group(1)) if m else -1


def list_checkpoints(run_dir: PathLike) -> List[Path]:
    """Step checkpoints of ``run_dir``, oldest first (``best.pt`` and temporaries excluded)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(checkpoint_step(p), p) for p in run_dir.iterdir()
             if _NAME_RE.match(p.name) and p.is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: PathLike) -> Optional[Path]:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def is_checkpoint_temporary(name: str) -> bool:
    """True for the temporary name of an interrupted checkpoint save."""
    return bool(_TEMP_RE.match(name))


def remove_stale_temporaries(run_dir: PathLike) -> List[Path]:
    """Delete what interrupted saves left in ``run_dir`` (only our temporary pattern)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    stale = [p for p in run_dir.iterdir() if is_checkpoint_temporary(p.name) and p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def atomic_save(obj: Dict[str, Any], path: PathLike) -> Path:
    """``torch.save`` through ``unpg.fileio.atomic_write`` (temporary beside ``path``, fsync,
    rename, fsync the folder): a crash leaves either the old file or the complete new one."""
    with atomic_write(path) as fh:
        torch.save(obj, fh)
    return Path(path)


def load_checkpoint(path: PathLike) -> Dict[str, Any]:
    """Read a checkpoint with ``weights_only=True`` (memory-mapped: a rank touches only its rows)
    and check that it is one of ours, of this version. ``ValueError`` says what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path} (train.resume takes 'auto', '' or "
                                f"the path of a ckpt_*.pt / best.pt file)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # truncated file, foreign pickle with globals, not a zip ...
        raise ValueError(f"{path}: not a readable training checkpoint "
                         f"({type(exc).__name__}: {exc})") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"{path}: not a unpg training checkpoint (no format={FORMAT!r}); to start "
                         f"from backbone weights use model.weights=FILE instead of train.resume")
    if ckpt.get("version") != VERSION:
        raise ValueError(f"{path}: checkpoint version {ckpt.get('version')} is not supported "
                         f"(this code reads version {VERSION}); its backbone still loads with "
                         f"model.weights=FILE")
    return ckpt


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


# ----------------------------------------------------------------------------- RNG
def capture_rng() -> Dict[str, Any]:
    """This process's RNG states as plain Python values (ints, bytes, tuples): they travel
    through ``all_gather_object`` and load with ``weights_only=True``."""
    np_state = np.random.get_state(legacy=False)
    np_state = {**np_state, "state": {"key": np_state["state"]["key"].astype(np.uint32).tobytes(),
                                      "pos": int(np_state["state"]["pos"])}}
    state = {"python": random.getstate(), "numpy": np_state,
             "torch": torch.get_rng_state().numpy().tobytes()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [t.numpy().tobytes() for t in torch.cuda.get_rng_state_all()]
    return state


def _byte_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def restore_rng(state: Dict[str, Any]) -> None:
    """Inverse of ``capture_rng`` (CUDA states only when the device count matches)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = dict(state["numpy"])
    np_state["state"] = {"key": np.frombuffer(np_state["state"]["key"], dtype=np.uint32).copy(),
                         "pos": int(np_state["state"]["pos"])}
    np.random.set_state(np_state)
    torch.set_rng_state(_byte_tensor(state["torch"]))
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([_byte_tensor(b) for b in cuda])
