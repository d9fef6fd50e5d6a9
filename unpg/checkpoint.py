"""Training checkpoints: atomic files in the run folder, rotation, loading and FC resharding.

A checkpoint is one ``torch.save`` file of plain types and tensors (so ``torch.load(...,
weights_only=True)`` reads it)::

    format, version, global_step, epoch, step_in_epoch, best_score, config (dict)
    backbone    backbone state_dict (no DDP/compile prefixes)
    fc_weight   the FULL class-centre matrix [C, D], whatever the number of shards
    optimizer   optimizer state_dict; the FC parameter's state tensors are full [C, ...] too
    fc_param_index   index of the FC weight in the optimizer's flat parameter order
    scheduler, scaler (or None), rng (one entry per rank: python, numpy, torch, cuda)

Saving the FC gathered makes a checkpoint independent of the GPU count and of ``fc.mode``:
``slice_fc_state`` cuts a rank's rows back out on load (``unpg.kernels.shard_range`` layout).
Files are ``ckpt_<global step>.pt`` (the newest ``train.keep_last`` are kept) and ``best.pt``.
"""
from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import numpy as np
import torch

from unpg.fileio import atomic_write

__all__ = ["FORMAT", "VERSION", "atomic_save", "capture_rng", "checkpoint_path",
           "latest_checkpoint", "list_checkpoints", "load_checkpoint", "prune_checkpoints",
           "restore_rng", "slice_fc_state"]

FORMAT, VERSION = "unpg-train-checkpoint", 1
BEST_NAME = "best.pt"
_NAME_RE = re.compile(r"^ckpt_(\d+)\.pt$")
PathLike = Union[str, Path]


def checkpoint_path(run_dir: PathLike, global_step: int) -> Path:
    return Path(run_dir) / f"ckpt_{global_step:09d}.pt"


def list_checkpoints(run_dir: PathLike) -> List[Path]:
    """Step checkpoints of ``run_dir``, oldest first (``best.pt`` and temporaries excluded)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir()
             if (m := _NAME_RE.match(p.name)) and p.is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: PathLike) -> Optional[Path]:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def atomic_save(obj: Dict[str, Any], path: PathLike) -> Path:
    """``torch.save`` through ``unpg.fileio.atomic_write`` (temporary beside ``path``, fsync,
    rename, fsync the folder): a crash leaves either the old file or the complete new one."""
    with atomic_write(path) as fh:
        torch.save(obj, fh)
    return Path(path)


def prune_checkpoints(run_dir: PathLike, keep_last: int) -> List[Path]:
    """Delete all but the newest ``keep_last`` step checkpoints; return the deleted paths."""
    ckpts = list_checkpoints(run_dir)
    doomed = ckpts[:-keep_last] if keep_last > 0 else ckpts
    for p in doomed:
        p.unlink(missing_ok=True)
    return doomed


def load_checkpoint(path: PathLike) -> Dict[str, Any]:
    """Read a checkpoint with ``weights_only=True`` (memory-mapped: a rank touches only its rows)
    and check that it is one of ours."""
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
                         f"(this code reads version {VERSION})")
    return ckpt


# ----------------------------------------------------------------------------- FC resharding
def slice_fc_state(optim_state: Dict[str, Any], fc_index: int, start: int, num_local: int,
                   num_classes: int) -> Dict[str, Any]:
    """A copy of ``optim_state`` whose FC-parameter tensors with ``num_classes`` rows keep only
    rows ``[start, start + num_local)``; every other entry is shared, not copied."""
    state = dict(optim_state["state"])
    fc_state = state.get(fc_index)
    if fc_state is not None:
        state[fc_index] = {
            k: (v[start:start + num_local].clone()
                if torch.is_tensor(v) and v.dim() >= 1 and v.shape[0] == num_classes else v)
            for k, v in fc_state.items()}
    return {**optim_state, "state": state}


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
