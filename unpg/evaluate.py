"""Evaluate a backbone on one benchmark: verification .bin files, IJB-B/C or K-FACE.

    python -m unpg.evaluate --weights backbone.pth --data configs/data/ijbc.yaml \\
        [--model iresnet100] [--embedding-size 512] [--device auto|cpu|cuda] [key=value ...]

The weights are a plain backbone state dict or a checkpoint dict with a ``backbone`` entry,
read with ``torch.load(weights_only=True)``. The architecture comes from ``--model`` /
``--embedding-size`` when given, else from a training checkpoint's stored config
(``model.name``, ``model.embedding_size``), else it is inferred from the state dict's keys and
shapes (as ``python -m unpg.tools.weights`` does). ``key=value`` overrides the data config
(``root=/data/IJB_release/IJBC variant=seed score_weighting=false``), before or after the flags.
The output folder is checked writable before anything is evaluated. Prints a table per
benchmark and writes every number to ``<output_dir>/<benchmark>_<weights>_<hash>.json`` (and ROC
curves as PNG when matplotlib is installed). A TAR at a FAR finer than 1 / (number of impostor
pairs) cannot be measured on that data: such entries are listed under ``far_below_resolution``
in the JSON and a caveat is printed.
"""
from __future__ import annotations

import argparse
import hashlib
import pickle
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import yaml

from unpg.config import load_eval_data_config
from unpg.eval.bins import evaluate_verification_set, load_bin
from unpg.eval.features import resolve_device
from unpg.eval.ijb import evaluate_ijb
from unpg.eval.kface import evaluate_kface
from unpg.eval.report import format_table, plot_roc, write_json
from unpg.fileio import check_writable_dir
from unpg.models import build_backbone
from unpg.tools.weights_import import infer_backbone, torch_load

__all__ = ["far_caveats", "format_results", "load_backbone", "load_state_dict", "load_weights",
           "main", "resolve_architecture", "run_benchmark", "sha256_16"]


def sha256_16(path: Path) -> str:
    """First 16 hex digits of the file's sha256: the feature-cache key of a weights file."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def load_state_dict(path: Path) -> Dict[str, torch.Tensor]:
    """A backbone state dict from ``path`` (plain, or under a checkpoint's ``backbone`` key)."""
    return load_weights(path)[0]


def load_weights(path: Path) -> Tuple[Dict[str, torch.Tensor], Optional[dict]]:
    """(backbone state dict, the training checkpoint's ``model`` config section or None)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path} (expected a backbone state dict "
                                f"saved with torch.save, or a checkpoint dict with a 'backbone' "
                                f"entry)")
    try:
        obj = torch_load(path, weights_only=True)  # a truncated file: ValueError naming it
    except pickle.UnpicklingError as exc:
        raise ValueError(
            f"{path}: refused by torch.load(weights_only=True): it pickles Python objects, not "
            f"only tensors (the official code saves the whole nn.Module as ckpt['backbone']). Re-save it "
            f"from trusted code as torch.save(module.state_dict(), ...). Detail: {exc}") from exc
    model_cfg = None
    if isinstance(obj, dict) and "backbone" in obj:
        config = obj.get("config")
        if isinstance(config, dict) and isinstance(config.get("model"), dict):
            model_cfg = config["model"]  # written by the trainer: the run's architecture
        obj = obj["backbone"]
    if not isinstance(obj, dict) or not obj or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise ValueError(f"{path}: expected a state dict (parameter name → tensor) or a dict with "
                         f"a 'backbone' state dict, got {type(obj).__name__}"
                         + (f" with keys {list(obj)[:5]}" if isinstance(obj, dict) else ""))
    if all(k.startswith("module.") for k in obj):  # saved from a DDP/DataParallel wrapper
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj, model_cfg


def resolve_architecture(state: Dict[str, torch.Tensor], model_cfg: Optional[dict],
                         model: Optional[str], embedding_size: Optional[int],
                         source: str) -> Tuple[str, int, str]:
    """(model name, embedding size, where they came from): the flags win, then the training
    checkpoint's config, then inference from the state dict."""
    origin = "--model/--embedding-size"
    if model is None or embedding_size is None:
        if model_cfg is not None and "name" in model_cfg and "embedding_size" in model_cfg:
            found, dim, origin = str(model_cfg["name"]), int(model_cfg["embedding_size"]), \
                "the checkpoint's config"
        else:
            try:
                found, dim = infer_backbone(state, source)
            except ValueError as e:
                raise ValueError(f"{e}; pass --model and --embedding-size") from None
            origin = "inferred from the weights"
        model = found if model is None else model
        embedding_size = dim if embedding_size is None else embedding_size
    return model, embedding_size, origin


def load_backbone(weights: Path, model: Optional[str] = None, embedding_size: Optional[int] = None,
                  model_kwargs: Optional[dict] = None,
                  loaded: Optional[Tuple[Dict[str, torch.Tensor], Optional[dict]]] = None
                  ) -> torch.nn.Module:
    """Build the backbone (``model``/``embedding_size``, or from the checkpoint, see
    ``resolve_architecture``) and load ``weights`` into it strictly, with a readable error.
    ``loaded``: ``load_weights(weights)`` already read (not read again)."""
    state, model_cfg = load_weights(weights) if loaded is None else loaded
    model, embedding_size, _ = resolve_architecture(state, model_cfg, model, embedding_size,
                                                    str(weights))
    net = build_backbone(model, embedding_size=embedding_size, **(model_kwargs or {}))
    own = net.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
              for k, v in state.items() if k in own and own[k].shape != v.shape]
    if missing or unexpected or shapes:
        raise ValueError(
            f"{weights}: does not match --model {model} --embedding-size {embedding_size}: "
            f"{len(missing)} missing key(s) {missing[:4]}, {len(unexpected)} unexpected key(s) "
            f"{unexpected[:4]}, {len(shapes)} shape mismatch(es) {shapes[:2]}; pass the "
            f"architecture the weights were trained with")
    net.load_state_dict(state, strict=True)
    return net


def run_benchmark(model: torch.nn.Module, cfg, *, device, weights_hash: Optional[str] = None,
                  workers: Optional[int] = None, progress: bool = True
                  ) -> Tuple[Dict[str, object], Dict[str, Tuple[np.ndarray, np.ndarray]]]:
    """Dispatch on ``cfg.benchmark`` → (results, ROC curves by name)."""
    if cfg.benchmark == "bins":
        root = Path(cfg.root)
        paths = [root / f"{name}.bin" for name in cfg.names]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"verification file(s) not found: {', '.join(missing)} "
                                    f"(expected <root>/<name>.bin for names {cfg.names})")
        results, curves = {}, {}
        for p in paths:
            vs = load_bin(p, image_size=cfg.image_size, workers=workers, use_cache=False)
            results[vs.name], curves[vs.name] = evaluate_verification_set(
                model, vs, batch_size=cfg.batch_size, flip=cfg.flip, normalize=cfg.normalize,
                device=device, fars=cfg.fars, progress=progress)
        return {"benchmark": "bins", "flip": cfg.flip, "normalize": cfg.normalize,
                "sets": results}, curves
    if cfg.benchmark in ("ijbb", "ijbc"):
        return evaluate_ijb(model, cfg, device=device, weights_hash=weights_hash,
                            workers=workers, progress=progress)
    if cfg.benchmark == "kface":
        return evaluate_kface(model, cfg, device=device, workers=workers, progress=progress)
    raise ValueError(f"benchmark must be bins, ijbb, ijbc or kface, got {cfg.benchmark!r}")


def _pct(x: float, digits: int = 2) -> str:
    return f"{100.0 * x:.{digits}f}"


def format_results(results: Dict[str, object], fars: Sequence[float]) -> List[str]:
    """The printed tables of one benchmark's results."""
    far_cols = [f"TAR@{f:g}" for f in fars]
    bench = results["benchmark"]
    if bench == "bins":
        rows = [[name, f"{_pct(r['accuracy'])} ± {_pct(r['accuracy_std'])}",
                 _pct(r["best_threshold_accuracy"])] + [_pct(v) for v in r["tar_at_far"].values()]
                + [_pct(r["auc"])] for name, r in results["sets"].items()]
        return [format_table(["set", "10-fold acc (%)", "best-thr acc (%)"] + far_cols
                             + ["AUC (%)"], rows,
                             title=f"verification .bin (flip={results['flip']}), values in %")]
    if bench == "kface":
        # Four decimals, as the official code prints its K-FACE TAR table.
        rows = [[name] + [_pct(v, 4) for v in r["tar_at_far"].values()]
                + [_pct(r["auc"]), _pct(r["best_threshold_accuracy"])]
                for name, r in results["pair_files"].items()]
        return [format_table(["pairs"] + far_cols + ["AUC (%)", "best-thr acc (%)"], rows,
                             title="K-FACE TAR (%) at FAR")]
    v = results["verification_1v1"]
    tables = [format_table(
        ["method"] + far_cols + ["AUC (%)"],
        [[f"{bench}-{results['variant']}"] + [_pct(x) for x in v["tar_at_far"].values()]
         + [_pct(v["auc"])]],
        title=f"{bench.upper()} 1:1 TAR (%) at FAR ({v['num_pairs']} pairs, "
              f"{results['num_templates']} templates)")]
    one_n = results["identification_1n"]
    if "skipped" in one_n:
        tables.append(f"{bench.upper()} 1:N skipped: {one_n['skipped']}")
    else:
        names = list(one_n)
        fpir_keys = list(one_n[names[0]]["tpir_at_fpir"])
        rank_keys = [k for k in one_n[names[0]] if k.startswith("rank_")]
        rows = [[n] + [_pct(one_n[n][k]) for k in rank_keys]
                + [_pct(one_n[n]["tpir_at_fpir"][f]) for f in fpir_keys] for n in names]
        tables.append(format_table(
            ["gallery"] + [k.replace("_", "-") for k in rank_keys]
            + [f"TPIR@FPIR={f}" for f in fpir_keys], rows,
            title=f"{bench.upper()} 1:N open-set identification (%)"))
    return tables


def far_caveats(results: object, where: str = "") -> List[str]:
    """One line per verification result whose TAR is reported at FARs finer than 1 / number
    of impostor pairs (marked ``far_below_resolution`` by ``verification_summary``)."""
    lines: List[str] = []
    if isinstance(results, dict):
        if results.get("far_below_resolution"):
            fars = ", ".join(results["far_below_resolution"])
            lines.append(f"caveat: {where or 'results'}: TAR at FAR {fars} is below this data's "
                         f"resolution (1/{results.get('num_impostor', '?')} impostor pairs); it is "
                         f"the TAR with no impostor accepted, not a measurement at that FAR")
        for k, v in results.items():
            lines += far_caveats(v, f"{where}/{k}" if where else str(k))
    return lines


def _parse_model_kwargs(text: Optional[str]) -> dict:
    if not text:
        return {}
    try:
        val = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"--model-kwargs must be a YAML mapping, e.g. '{{blocks: [1, 1, 1, 1]}}'; "
                         f"got {text!r} ({exc})") from exc
    if not isinstance(val, dict):
        raise ValueError(f"--model-kwargs must be a YAML mapping, e.g. '{{scale: 1}}'; got {text!r}")
    return val


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m unpg.evaluate", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", required=True, type=Path,
                    help="backbone weights (.pth/.pt) or a training checkpoint")
    ap.add_argument("--data", required=True, type=Path, help="configs/data/{bins,ijbb,ijbc,kface}.yaml")
    ap.add_argument("--model", default=None,
                    help="registered backbone name (default: the checkpoint's, else inferred)")
    ap.add_argument("--embedding-size", type=int, default=None,
                    help="embedding dim (default: the checkpoint's, else inferred)")
    ap.add_argument("--model-kwargs", default=None,
                    help="extra backbone options as a YAML mapping, e.g. '{scale: 1}'")
    ap.add_argument("--device", default="auto", help="auto (default), cpu or cuda[:N]")
    ap.add_argument("--workers", type=int, default=None, help="image decoding threads")
    ap.add_argument("--no-progress", action="store_true", help="hide progress bars")
    ap.add_argument("overrides", nargs="*", metavar="key=value",
                    help="data-config overrides, anywhere on the command line")
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_intermixed_args(argv)  # key=value before or after the flags
    if not args.data.is_file():
        raise FileNotFoundError(f"data config not found: {args.data} (expected a YAML such as "
                                f"configs/data/bins.yaml)")
    if args.embedding_size is not None and args.embedding_size < 1:
        raise ValueError(f"--embedding-size must be positive, got {args.embedding_size}")
    cfg = load_eval_data_config(args.data, args.overrides)
    # Before the evaluation, which can take hours: an unwritable folder must not lose results.
    out_dir = check_writable_dir(cfg.output_dir, option="output_dir")
    device = resolve_device(args.device)
    state, model_cfg = load_weights(args.weights)
    model, dim, origin = resolve_architecture(state, model_cfg, args.model, args.embedding_size,
                                              str(args.weights))
    if origin != "--model/--embedding-size":
        print(f"model: {model}, embedding size {dim} ({origin})")
    net = load_backbone(args.weights, model, dim, _parse_model_kwargs(args.model_kwargs),
                        loaded=(state, model_cfg)).to(device)
    weights_hash = sha256_16(args.weights)
    t0 = time.perf_counter()
    results, curves = run_benchmark(net, cfg, device=device, weights_hash=weights_hash,
                                    workers=args.workers, progress=not args.no_progress)
    results = {**results, "weights": str(args.weights), "weights_sha256_16": weights_hash,
               "model": model, "embedding_size": dim,
               "data_config": cfg.to_dict(), "device": str(device),
               "seconds": time.perf_counter() - t0}
    for table in format_results(results, cfg.fars):
        print(table)
    for line in far_caveats(results):
        print(line)
    stem = f"{cfg.benchmark}_{args.weights.stem}_{weights_hash}"
    json_path = write_json(out_dir / f"{stem}.json", results)
    print(f"results: {json_path}")
    if plot_roc(curves, out_dir / f"{stem}_roc.png", title=f"ROC on {cfg.benchmark}",
                fars=cfg.fars):
        print(f"ROC plot: {out_dir / f'{stem}_roc.png'}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (OSError, ValueError) as exc:  # FileNotFoundError is an OSError
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
