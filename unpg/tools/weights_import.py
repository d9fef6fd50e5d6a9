"""Read pretrained face-recognition weights as verified state dicts of our backbones.

Used by ``python -m unpg.tools.weights import|export`` (the CLI, in ``unpg.tools.weights``) and
by ``unpg.evaluate`` (backbone inference for plain state dicts).

Sources (``--format``, ``auto`` tries them in this order):
  state_dict  insightface arcface_torch ``backbone.pth`` (a plain state dict), or a dict holding
              one under ``state_dict_backbone`` (arcface_torch's ``checkpoint_gpu_*.pt``),
              ``state_dict`` or ``backbone``; a DDP ``module.`` prefix is dropped. Read with
              ``torch.load(weights_only=True)``.
  seed        the UNPG paper code's ``last.pt``/``best.pt`` (github jung-jun-uk/UNPG), which pickle
              whole modules: ``{'backbone': models.iresnet.IResNet, 'headandloss':
              models.build.HeadAndLoss, 'epoch', 'best_acc', 'optimizer', 'scheduler'}``. Read
              through a restricted unpickler (below); never with plain pickle.

The backbone name is inferred when ``--model`` is not given: the embedding size comes from
``fc.weight`` (or the last 2-D weight); an IResNet is named by its blocks per stage counted from
the keys (``layer3.0`` .. ``layer3.29``: iresnet100), another backbone by matching the keys and
shapes of each registered one. The state dict must load with ``strict=True``; the output is a plain float32
state dict that ``torch.load(weights_only=True)`` reads, written atomically. The official code's class
centres (the head's weight, C x D) go to a separate file ``{'head', 'weight', <head params>}``.

Restricted unpickler: ``find_class`` admits only torch's tensor/storage rebuild helpers, dtypes,
``torch.Size``/``torch.device``, ``collections.OrderedDict``, ``set``, ``_codecs.encode`` and numpy
scalar/array reconstruction (what ``weights_only`` admits too), a fixed list of ``torch.nn`` layer
classes, and the official code's own classes (``models.iresnet.IResNet``/``IBasicBlock``,
``models.head.ArcFace``/``CosFace``/``UNPG``, ``models.magface.MagFace``/``MagLinear``/``MagLoss``,
``models.build.HeadAndLoss``), which become stand-in ``nn.Module`` s that only hold the pickled
state (none of the official code runs). Any other global, e.g. ``os.system`` or ``builtins.eval``, raises
``UnsafeCheckpointError`` naming the global and the file, before anything is called.
"""
from __future__ import annotations

import codecs
import collections
import os
import pickle
import re
import types
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np
import torch
from torch import nn

from unpg.fileio import atomic_write
from unpg.models import build_backbone, list_models
from unpg.models.iresnet import IRESNET_ARGS

__all__ = ["FORMATS", "ImportedWeights", "SeedModule", "UnsafeCheckpointError", "import_weights",
           "infer_backbone", "load_restricted", "save_atomic", "torch_load"]

FORMATS = ("auto", "state_dict", "seed")


def torch_load(path: os.PathLike | str, **kwargs: Any) -> Any:
    """``torch.load(path, map_location='cpu', **kwargs)``; a truncated or non-torch file raises a
    ``ValueError`` naming it (torch raises RuntimeError/EOFError with miniz internals)."""
    try:
        return torch.load(path, map_location="cpu", **kwargs)
    except (RuntimeError, EOFError, zipfile.BadZipFile) as e:
        if isinstance(e, RuntimeError) and "zip archive" not in str(e) and "storage" not in str(e):
            raise
        size = Path(path).stat().st_size if Path(path).exists() else 0
        first = str(e).split(". ")[0] or type(e).__name__
        raise ValueError(f"{os.fspath(path)}: not a complete torch file ({size} bytes; {first}): "
                         f"truncated by an interrupted copy or save? Copy it again") from None

# ----------------------------------------------------------------------------------------------
# Restricted unpickling of the official code's whole-module checkpoints


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint references a Python global outside the allow-list."""


class SeedModule(nn.Module):
    """Stand-in for one of the official code's module classes: holds the pickled state (parameters,
    buffers, sub-modules, plain attributes) so ``state_dict()`` works; runs none of its code."""

    seed_class = ""  # e.g. "models.iresnet.IResNet"


_SEED_CLASSES = {
    "models.iresnet": ("IResNet", "IBasicBlock"),
    "models.head": ("ArcFace", "CosFace", "UNPG"),
    "models.magface": ("MagFace", "MagLinear", "MagLoss"),
    "models.build": ("HeadAndLoss",),
}
# Pickles made with the repo root (not recognition/) on sys.path carry a "recognition." prefix.
_SEED_PREFIXES = ("", "recognition.")
_STAND_INS: Dict[Tuple[str, str], type] = {}
for _mod, _names in _SEED_CLASSES.items():
    for _name in _names:
        _cls = type(_name, (SeedModule,), {"seed_class": f"{_mod}.{_name}", "__module__": __name__,
                                            "__qualname__": f"SeedModule[{_mod}.{_name}]"})
        for _prefix in _SEED_PREFIXES:
            _STAND_INS[(_prefix + _mod, _name)] = _cls

_NN_CLASSES = frozenset({
    "AdaptiveAvgPool2d", "BatchNorm1d", "BatchNorm2d", "Conv2d", "CrossEntropyLoss", "Dropout",
    "Flatten", "Identity", "Linear", "ModuleDict", "ModuleList", "PReLU", "ReLU", "Sequential",
})


def _numpy_core():
    return getattr(np, "_core", None) or np.core  # numpy >= 2 renamed numpy.core to numpy._core


_ALLOWED: Dict[Tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("__builtin__", "set"): set,  # protocol-2 pickles name Python 2's module
    ("builtins", "frozenset"): frozenset,
    ("__builtin__", "frozenset"): frozenset,
    ("_codecs", "encode"): codecs.encode,  # protocol 2 stores bytes as encode(str, 'latin1')
    ("torch._utils", "_rebuild_tensor"): torch._utils._rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): torch._utils._rebuild_parameter_with_state,
    ("torch._tensor", "_rebuild_from_type_v2"): torch._tensor._rebuild_from_type_v2,
    ("torch", "Size"): torch.Size,
    ("torch", "device"): torch.device,
    ("torch.nn.parallel.data_parallel", "DataParallel"): nn.DataParallel,  # the official code's head wrapper
    ("numpy", "dtype"): np.dtype,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy.core.multiarray", "scalar"): _numpy_core().multiarray.scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_core().multiarray.scalar,
    ("numpy.core.multiarray", "_reconstruct"): _numpy_core().multiarray._reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _numpy_core().multiarray._reconstruct,
}


def _resolve_global(module: str, name: str, source: str) -> Any:
    if (module, name) in _ALLOWED:
        return _ALLOWED[(module, name)]
    if (module, name) in _STAND_INS:
        return _STAND_INS[(module, name)]
    if module.startswith("torch.nn.modules.") and name in _NN_CLASSES:
        return getattr(nn, name)
    if module == "torch":
        obj = getattr(torch, name, None)
        if isinstance(obj, torch.dtype):
            return obj
        if name.endswith("Storage") and isinstance(obj, type):  # e.g. torch.FloatStorage
            return obj
    raise UnsafeCheckpointError(
        f"{source}: refusing to unpickle global '{module}.{name}': not on the allow-list of "
        "weight imports (torch tensors/storages, torch.nn layers, the official UNPG code's model classes). "
        "The file may be malicious, or written by an unsupported trainer; if you trust it, load "
        "it with its own code and re-save `model.state_dict()`.")


def _restricted_pickle_module(source: str) -> types.ModuleType:
    """A ``pickle``-like module for ``torch.load(pickle_module=...)`` whose unpickler resolves
    globals only through the allow-list (torch subclasses it and keeps our ``find_class``)."""

    class RestrictedUnpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            return _resolve_global(module, name, source)

    mod = types.ModuleType("unpg_restricted_pickle")
    mod.Unpickler = RestrictedUnpickler
    mod.load = lambda file, **kwargs: RestrictedUnpickler(file, **kwargs).load()
    return mod


def load_restricted(path: os.PathLike | str) -> Any:
    """``torch.load`` of a whole-module checkpoint through the restricted unpickler (CPU)."""
    path = os.fspath(path)
    return torch_load(path, weights_only=False, pickle_module=_restricted_pickle_module(path))


# ----------------------------------------------------------------------------------------------
# State dicts, name inference, head extraction


@dataclass
class ImportedWeights:
    """A verified backbone state dict and what was learnt about it."""

    state_dict: "collections.OrderedDict[str, torch.Tensor]"
    model: str
    embedding_size: int
    source_format: str  # 'state_dict' or 'seed'
    head: Optional[Dict[str, Any]] = None  # {'head', 'weight' [C, D], params...} (seed only)
    meta: Dict[str, Any] = field(default_factory=dict)  # e.g. the official code's epoch, best_acc

    def build(self) -> nn.Module:
        """The backbone with these weights, in eval mode."""
        model = build_backbone(self.model, embedding_size=self.embedding_size)
        model.load_state_dict(self.state_dict, strict=True)
        return model.eval()


def _is_state_dict(obj: Any) -> bool:
    return (isinstance(obj, Mapping) and len(obj) > 0
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()))


def _clean_state_dict(sd: Mapping[str, torch.Tensor]) -> "collections.OrderedDict[str, torch.Tensor]":
    keys = list(sd)
    strip = "module." if all(k.startswith("module.") for k in keys) else ""
    out = collections.OrderedDict()
    for k, v in sd.items():
        v = v.detach()
        # The official code trained under AMP and called .float() before use; store float32 like it.
        out[k[len(strip):]] = (v.float() if v.is_floating_point() else v).contiguous().clone()
    return out


def _embedding_size(sd: Mapping[str, torch.Tensor], source: str) -> int:
    if "fc.weight" in sd and sd["fc.weight"].dim() == 2:
        return int(sd["fc.weight"].shape[0])
    two_d = [k for k, v in sd.items() if k.endswith("weight") and v.dim() == 2]
    if not two_d:
        raise ValueError(f"{source}: no 2-D weight (fc.weight) to take the embedding size from; "
                         "is this a backbone state dict?")
    return int(sd[two_d[-1]].shape[0])


def _stage_blocks(sd: Mapping[str, Any]) -> Dict[int, int]:
    blocks: Dict[int, int] = {}
    for k in sd:
        m = re.match(r"layer(\d+)\.(\d+)\.", k)
        if m:
            stage, i = int(m.group(1)), int(m.group(2))
            blocks[stage] = max(blocks.get(stage, 0), i + 1)
    return dict(sorted(blocks.items()))


def _signature(sd: Mapping[str, torch.Tensor]) -> Dict[str, Tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in sd.items()}


# insightface's IResNet depths: blocks per stage (layer1..layer4) -> registered name.
_IRESNET_BLOCKS = {tuple(args["layers"]): name for name, args in IRESNET_ARGS.items()}


def infer_backbone(sd: Mapping[str, torch.Tensor], source: str = "state dict") -> Tuple[str, int]:
    """(registered backbone name, embedding size) for a backbone state dict.

    The embedding size is ``fc.weight``'s rows (else the last 2-D weight's). An IResNet (keys
    ``layer1..4.N.``) is named by its blocks per stage, counted from the keys (iresnet100 has
    ``layer3.0`` .. ``layer3.29``); any other state dict must match the keys and shapes of a
    registered backbone built on the meta device (no memory, no init). ``import_weights`` then
    verifies a strict load. Raises ``ValueError`` describing what was found."""
    dim = _embedding_size(sd, source)
    blocks = _stage_blocks(sd)
    if list(blocks) == [1, 2, 3, 4] and "fc.weight" in sd:
        layers = tuple(blocks.values())
        if layers in _IRESNET_BLOCKS:
            return _IRESNET_BLOCKS[layers], dim
        raise ValueError(f"{source}: an IResNet with blocks per stage {layers}, which no registered "
                         f"backbone has ({', '.join(f'{n} {b}' for b, n in _IRESNET_BLOCKS.items())})")
    want = _signature(sd)
    best = None
    for name in list_models():
        with torch.device("meta"):
            try:
                cand = build_backbone(name, embedding_size=dim)
            except ValueError:
                continue
        got = _signature(cand.state_dict())
        if got == want:
            return name, dim
        diff = len(set(got.items()) ^ set(want.items()))
        if best is None or diff < best[1]:
            best = (name, diff)
    hint = f"; closest is {best[0]} ({best[1]} keys/shapes differ)" if best else ""
    raise ValueError(f"{source}: no registered backbone matches this state dict ({len(sd)} tensors, "
                     f"embedding size {dim}){hint}. Known: {', '.join(list_models())}; "
                     "pass --model to see the exact key mismatch")


def _verify(sd: Mapping[str, torch.Tensor], name: str, dim: int, source: str) -> None:
    model = build_backbone(name, embedding_size=dim)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{source}: the weights do not load into {name} (embedding size {dim}) "
                         f"with strict=True: {e}") from None


def _unwrap(m: Any) -> Any:
    while isinstance(m, nn.DataParallel):
        m = m.module
    return m


def _number(obj: Any, key: str) -> Optional[float]:
    v = obj.__dict__.get(key) if obj is not None else None
    return float(v) if isinstance(v, (int, float, np.number)) and not isinstance(v, bool) else None


def _seed_head(head_and_loss: Any) -> Optional[Dict[str, Any]]:
    """{'head', 'weight' [C, D] float32, params...} from the official code's HeadAndLoss, or None."""
    hl = _unwrap(head_and_loss)
    if not isinstance(hl, nn.Module):
        return None
    head = _unwrap(hl._modules.get("head"))
    cls = getattr(type(head), "seed_class", "")
    if cls.endswith((".ArcFace", ".CosFace")):
        weight, kind, params = head._parameters.get("weight"), cls.rsplit(".", 1)[1].lower(), ("s", "m")
    elif cls.endswith(".MagFace"):
        fc = head._modules.get("fc")
        weight = None if fc is None else fc._parameters.get("weight")
        weight = None if weight is None else weight.t()  # MagLinear stores [D, C]
        kind, params = "magface", ("s", "l_margin", "u_margin", "l_a", "u_a", "lambda_g")
    else:
        return None
    if weight is None:
        return None
    out: Dict[str, Any] = {"head": kind, "weight": weight.detach().float().contiguous().clone()}
    for p in params:
        v = _number(head, p)
        if v is not None:
            out[p] = v
    wisk = _number(hl, "wisk")  # set only when the official code trained with UNPG
    if wisk is not None:
        out["unpg_wisk"] = wisk
    return out


def _backbone_from_seed(obj: Any, source: str) -> Tuple[Any, Optional[Dict[str, Any]], Dict[str, Any]]:
    """(backbone module or state dict, head dict, meta) from a restricted-loaded official-code object."""
    if isinstance(obj, nn.Module):
        return _unwrap(obj), None, {}
    if not isinstance(obj, Mapping):
        raise ValueError(f"{source}: expected a checkpoint dict with a 'backbone' entry, "
                         f"got {type(obj).__name__}")
    for key in ("backbone", "model", "state_dict_backbone", "state_dict"):
        if key in obj:
            meta = {k: obj[k] for k in ("epoch", "best_acc") if isinstance(obj.get(k), (int, float))}
            return _unwrap(obj[key]), _seed_head(obj.get("headandloss")), meta
    raise ValueError(f"{source}: checkpoint has no backbone; keys: {sorted(map(str, obj))}")


def _state_dict_from(obj: Any, source: str) -> Mapping[str, torch.Tensor]:
    if _is_state_dict(obj):
        return obj
    if isinstance(obj, nn.Module):
        return obj.state_dict()
    if isinstance(obj, Mapping):
        for key in ("state_dict_backbone", "state_dict", "backbone"):
            if _is_state_dict(obj.get(key)):
                return obj[key]
        raise ValueError(f"{source}: neither a state dict nor a checkpoint holding one under "
                         f"'state_dict_backbone'/'state_dict'/'backbone'; keys: {sorted(map(str, obj))[:20]}")
    raise ValueError(f"{source}: expected a state dict, got {type(obj).__name__}")


def import_weights(path: os.PathLike | str, *, model: Optional[str] = None,
                   fmt: str = "auto") -> ImportedWeights:
    """Read insightface/arcface_torch or official-code weights from ``path`` (see the module docstring),
    infer the backbone unless ``model`` is given, and verify a strict load."""
    source = os.fspath(path)
    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if not Path(source).is_file():
        raise FileNotFoundError(f"weights file {source} does not exist")
    head, meta, used = None, {}, fmt
    obj = None
    if fmt in ("auto", "state_dict"):
        try:
            obj, used = torch_load(source, weights_only=True), "state_dict"
        except pickle.UnpicklingError:
            if fmt == "state_dict":
                raise ValueError(f"{source}: not a plain state dict (torch.load(weights_only=True) "
                                 "refuses it); for the official UNPG code's checkpoints use --format seed") from None
    if obj is None:  # the official code's whole-module pickle (or a refused global, raised from here)
        obj, used = load_restricted(source), "seed"
        if not _is_state_dict(obj):
            obj, head, meta = _backbone_from_seed(obj, source)
    sd = _clean_state_dict(_state_dict_from(obj, source))
    if model is None:
        name, dim = infer_backbone(sd, source)
    else:
        name, dim = model, _embedding_size(sd, source)
    _verify(sd, name, dim, source)
    return ImportedWeights(sd, name, dim, used, head, meta)


def save_atomic(obj: Any, path: os.PathLike | str) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename it into place."""
    with atomic_write(path) as fh:
        torch.save(obj, fh)
