"""Evaluate a backbone on one benchmark: verification .bin files, IJB-B/C or K-FACE.

    python -m unpg.evaluate --weights backbone.pth --data configs/data/ijbc.yaml \\
        [--model iresnet100] [--embedding-size 512] [--device auto|cpu|cuda] [key=value ...]

The weights are a plain backbone state dict or a checkpoint dict with a ``backbone`` entry,
read with ``torch.load(weights_only=True)``. ``key=value`` overrides the data config
(``root=/data/IJB_release/IJBC variant=seed score_weighting=false``). Prints a table per
benchmark and writes every number to ``<output_dir>/<benchmark>_<weights>_<hash>.json`` (and ROC
curves as PNG when matplotlib is installed).
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

__all__ = ["format_results", "load_backbone", "load_state_dict", "main", "run_benchmark",
           "sha256_16"]


def sha256_16(path: Path) -> str:
    """First 16 hex digits of the file's sha256: the feature-cache key of a weights file."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def load_state_dict(path: Path) -> Dict[str, torch.Tensor]:
    """A backbone state dict from ``path`` (plain, or under a checkpoint's ``backbone`` key)."""
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path} (expected a backbone state dict "
                                f"saved with torch.save, or a checkpoint dict with a 'backbone' "
                                f"entry)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ValueError(
            f"{path}: refused by torch.load(weights_only=True): it pickles Python objects, not "
            f"only tensors (the official code saves the whole nn.Module as ckpt['backbone']). Re-save it "
            f"from trusted code as torch.save(module.state_dict(), ...). Detail: {exc}") from exc
    if isinstance(obj, dict) and "backbone" in obj:
        obj = obj["backbone"]
    if not isinstance(obj, dict) or not obj or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise ValueError(f"{path}: expected a state dict (parameter name → tensor) or a dict with "
                         f"a 'backbone' state dict, got {type(obj).__name__}"
                         + (f" with keys {list(obj)[:5]}" if isinstance(obj, dict) else ""))
    if all(k.startswith("module.") for k in obj):  # saved from a DDP/DataParallel wrapper
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def load_backbone(weights: Path, model: str, embedding_size: int,
                  model_kwargs: Optional[dict] = None) -> torch.nn.Module:
    """Build ``model`` and load ``weights`` into it strictly, with a readable mismatch error."""
    from unpg.models import build_backbone

    state = load_state_dict(weights)
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
        from unpg.eval.bins import evaluate_verification_set, load_bin

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
        from unpg.eval.ijb import evaluate_ijb

        return evaluate_ijb(model, cfg, device=device, weights_hash=weights_hash,
                            workers=workers, progress=progress)
    if cfg.benchmark == "kface":
        from unpg.eval.kface import evaluate_kface

        return evaluate_kface(model, cfg, device=device, workers=workers, progress=progress)
    raise ValueError(f"benchmark must be bins, ijbb, ijbc or kface, got {cfg.benchmark!r}")


def _pct(x: float, digits: int = 2) -> str:
    return f"{100.0 * x:.{digits}f}"


def format_results(results: Dict[str, object], fars: Sequence[float]) -> List[str]:
    """The printed tables of one benchmark's results."""
    from unpg.eval.report import format_table

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
    ap.add_argument("--weights", required=True, type=Path, help="backbone weights (.pth/.pt)")
    ap.add_argument("--data", required=True, type=Path, help="configs/data/{bins,ijbb,ijbc,kface}.yaml")
    ap.add_argument("--model", default="iresnet100", help="registered backbone name (default iresnet100)")
    ap.add_argument("--embedding-size", type=int, default=512, help="embedding dim (default 512)")
    ap.add_argument("--model-kwargs", default=None,
                    help="extra backbone options as a YAML mapping, e.g. '{scale: 1}'")
    ap.add_argument("--device", default="auto", help="auto (default), cpu or cuda[:N]")
    ap.add_argument("--workers", type=int, default=None, help="image decoding threads")
    ap.add_argument("--no-progress", action="store_true", help="hide progress bars")
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="data-config overrides")
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from unpg.config import load_eval_data_config
    from unpg.eval.features import resolve_device
    from unpg.eval.report import plot_roc, write_json

    if not args.data.is_file():
        raise FileNotFoundError(f"data config not found: {args.data} (expected a YAML such as "
                                f"configs/data/bins.yaml)")
    if args.embedding_size < 1:
        raise ValueError(f"--embedding-size must be positive, got {args.embedding_size}")
    cfg = load_eval_data_config(args.data, args.overrides)
    device = resolve_device(args.device)
    net = load_backbone(args.weights, args.model, args.embedding_size,
                        _parse_model_kwargs(args.model_kwargs)).to(device)
    weights_hash = sha256_16(args.weights)
    t0 = time.perf_counter()
    results, curves = run_benchmark(net, cfg, device=device, weights_hash=weights_hash,
                                    workers=args.workers, progress=not args.no_progress)
    results = {**results, "weights": str(args.weights), "weights_sha256_16": weights_hash,
               "model": args.model, "embedding_size": args.embedding_size,
               "data_config": cfg.to_dict(), "device": str(device),
               "seconds": time.perf_counter() - t0}
    for table in format_results(results, cfg.fars):
        print(table)
    out_dir = Path(cfg.output_dir)
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
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
