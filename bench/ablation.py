#!/usr/bin/env python
"""Does UNPG help? A paired ablation on procedural faces, on the CPU.

For each head (ArcFace, CosFace, MagFace) and variant -- ``base`` (UNPG off), ``unpg`` (wisk
1.5, the paper's MS1MV2 setting) and ``unpg_w1.0`` (wisk 1.0, its K-FACE setting) -- and each
seed, train ``configs/ablation.yaml`` (small MobileFaceNet, same data, same schedule) through the
regular trainer, then evaluate the backbone on identities never seen in training:

* ``val_acc`` / ``hard_acc``: insightface's 10-fold accuracy on the pairs of ``synth_val.bin``
  and ``synth_hard.bin`` (the same pairs, nuisance x1.5);
* ``val_tar@1e-2``, ``val_tar@1e-3``, ``hard_tar@...``: TAR at FAR over *all* pairs of the
  distinct held-out images of each bin (identities from the data's ``meta.json``): about 10^6
  impostor pairs, so FAR = 1e-3 is resolved (the bins' own pairs have a few thousand impostors).

A seed is the training seed: initial weights, sample order and flips. ``base`` and UNPG runs of
one seed start from the same weights and see the same batches, so the effect is read as the
paired difference (UNPG - base per seed), reported with its spread over seeds and pooled over
heads. Each run's result is cached in its run folder (keyed by everything that determines it);
``--fresh`` retrains. Same seeds give the same numbers (CPU, same thread count).

Usage::

    python bench/ablation.py [--quick] [--json out.json] [--work DIR] [key=value ...]

JSON names: ``ablation/<head>/<variant>/<metric>`` (mean over seeds, with ``std`` and
``per_seed``), ``ablation/<head>/<variant>_minus_base/<metric>`` (paired differences) and
``ablation/all/<variant>_minus_base/<metric>`` (pooled over heads).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from unpg.config import load_config
from unpg.data.synthetic import HARD_BIN, VAL_BIN, ensure_dataset
from unpg.distributed import teardown_distributed
from unpg.eval.bins import decode_image, read_bin_pickle
from unpg.eval.features import extract_features
from unpg.eval.metrics import kfold_accuracy, l2_normalize, tar_at_far
from unpg.fileio import atomic_write_json
from unpg.runtime import tune_cpu_allocator
from unpg.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "configs" / "ablation.yaml"
DEFAULT_WORK = REPO / "bench" / "data" / "ablation"
VERSION = 1  # bump when the evaluation changes, so cached run results are recomputed

# Head parameters for a short CPU schedule: the paper's s = 64 with m = 0.5 (or MagFace's
# 0.45..0.8) leaves the loss on its starting plateau for most of a ~100-step run (see
# configs/demo.yaml), so every head uses s = 32 and about half the margin.
HEADS = {
    "arcface": ["head.name=arcface", "head.s=32", "head.m=0.3"],
    "cosface": ["head.name=cosface", "head.s=32", "head.m=0.2"],
    "magface": ["head.name=magface", "head.s=32", "head.l_margin=0.2", "head.u_margin=0.4",
                "head.l_a=10", "head.u_a=110", "head.lambda_g=35"],
}
VARIANTS = {"base": None, "unpg": 1.5, "unpg_w1.0": 1.0}
FARS = (1e-2, 1e-3)
METRICS = ("val_acc", "hard_acc", "val_tar@1e-2", "val_tar@1e-3", "hard_tar@1e-2",
           "hard_tar@1e-3")
EVAL_FLIP = "none"  # one forward pass per image: evaluation stays a small part of each run

# Data and run-list presets. Full: 400 identities x 10 images (few images each, as face data),
# nuisance 1.5 (pose, light, blur, noise, occluders; the hard bin at 2.25) and JPEG quality 75,
# 2 epochs of batch 128 (62 steps): baselines land well below saturation.
PRESETS = {
    "full": dict(identities=400, images_per_identity=10, val_identities=60, val_pairs=6000,
                 nuisance=1.5, quality=75, data_seed=0, epochs=2,
                 heads=list(HEADS), variants=list(VARIANTS), seeds=[0, 1, 2]),
    "quick": dict(identities=100, images_per_identity=10, val_identities=30, val_pairs=2000,
                  nuisance=1.5, quality=75, data_seed=0, epochs=2,
                  heads=["arcface"], variants=["base", "unpg"], seeds=[0, 1]),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python bench/ablation.py",
        description="UNPG on/off ablation (ArcFace, CosFace, MagFace x seeds) on synthetic faces, "
                    "evaluated on held-out identities.")
    p.add_argument("--quick", action="store_true",
                   help="small smoke run: ArcFace base vs unpg, 2 seeds, tiny data (< 5 min)")
    p.add_argument("--json", type=Path, help="write {'results': [...], 'settings': ...} here")
    p.add_argument("--work", type=Path, default=DEFAULT_WORK,
                   help=f"data cache and run folders (default {DEFAULT_WORK})")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="shared training config")
    p.add_argument("--heads", help=f"comma-separated subset of {','.join(HEADS)}")
    p.add_argument("--variants", help=f"comma-separated subset of {','.join(VARIANTS)}")
    p.add_argument("--seeds", help="comma-separated training seeds (default 0,1,2; quick 0,1)")
    p.add_argument("--fresh", action="store_true", help="retrain runs whose result is cached")
    p.add_argument("--workers", type=int, default=2, help="data generation processes")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="training config overrides applied to every run")
    return p


def _pick(text: Optional[str], default: List[str], known: Sequence[str], flag: str) -> List[str]:
    if not text:
        return list(default)
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in known]
    if bad or not items:
        raise ValueError(f"{flag}: unknown {bad or 'empty list'}; choose from {', '.join(known)}")
    return items


def _seeds(text: Optional[str], default: List[int]) -> List[int]:
    if not text:
        return list(default)
    try:
        seeds = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"--seeds: expected comma-separated integers, got {text!r}") from None
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds: give distinct integers >= 0, got {text!r}")
    return seeds


# ----------------------------------------------------------------------------- held-out data
@dataclass
class HeldOut:
    """One bin reduced to its distinct images: the bin's pairs index into them."""

    name: str
    images: np.ndarray  # uint8 [U, 112, 112, 3]
    ident_U: np.ndarray  # held-out identity of each distinct image
    idx1_N: np.ndarray
    idx2_N: np.ndarray
    issame_N: np.ndarray


def load_heldout(path: Path, pairs: list) -> HeldOut:
    """Read a synthetic bin; images are keyed by (identity, image index) from the pair plan,
    so each distinct image is embedded once (identical keys must hold identical bytes)."""
    blobs, issame = read_bin_pickle(path)
    if len(pairs) != len(issame):
        raise ValueError(f"{path}: {len(issame)} pairs but meta.json plans {len(pairs)}")
    index: Dict[tuple, int] = {}
    first_blob: List[bytes] = []
    idx = np.empty(2 * len(pairs), dtype=np.int64)
    for i, (a, ka, b, kb, same) in enumerate(pairs):
        if bool(same) != bool(issame[i]):
            raise ValueError(f"{path}: pair {i} disagrees with meta.json")
        for j, key in ((2 * i, (a, ka)), (2 * i + 1, (b, kb))):
            u = index.setdefault(key, len(index))
            if u == len(first_blob):
                first_blob.append(blobs[j])
            elif first_blob[u] != blobs[j]:
                raise ValueError(f"{path}: image {key} stored with two different contents")
            idx[j] = u
    images = np.stack([decode_image(b, 112, f"{path} image {k}")
                       for b, k in zip(first_blob, index)])
    ident = np.array([k[0] for k in index], dtype=np.int64)
    return HeldOut(path.stem, images, ident, idx[0::2], idx[1::2], np.asarray(issame, bool))


def evaluate(backbone, sets: Dict[str, HeldOut], normalize: str) -> Dict[str, float]:
    """The six metrics of one trained backbone (prefix ``val`` / ``hard``)."""
    out: Dict[str, float] = {}
    for prefix, hs in sets.items():
        images = hs.images
        emb_UD = extract_features(backbone, len(images), images.__getitem__,
                                  batch_size=256, flip=EVAL_FLIP, normalize=normalize,
                                  device="cpu", workers=1, progress=False)
        acc, _ = kfold_accuracy(emb_UD[hs.idx1_N], emb_UD[hs.idx2_N], hs.issame_N)
        e_UD = l2_normalize(emb_UD)
        iu, ju = np.triu_indices(len(e_UD), k=1)
        scores = (e_UD @ e_UD.T)[iu, ju]  # U x U cosines (U ~ 2k: tens of MB), upper triangle
        tars = tar_at_far(scores, hs.ident_U[iu] == hs.ident_U[ju], FARS)
        out[f"{prefix}_acc"] = float(acc)
        out.update({f"{prefix}_tar@{far:.0e}".replace("e-0", "e-"): float(t)
                    for far, t in zip(FARS, tars)})
    return out


# ----------------------------------------------------------------------------- one run
def run_one(config: Path, overrides: List[str], run_dir: Path, sets: Dict[str, HeldOut],
            key: str, fresh: bool) -> Dict[str, object]:
    """Train (or reuse the cached result of) one run and evaluate it."""
    cfg = load_config(str(config), overrides)
    fingerprint = hashlib.sha256(json.dumps(
        [VERSION, key, EVAL_FLIP, cfg.to_dict()], sort_keys=True).encode()).hexdigest()
    cache = run_dir / "ablation_result.json"
    if not fresh and cache.is_file():
        cached = json.loads(cache.read_text(encoding="utf-8"))
        if cached.get("fingerprint") == fingerprint:
            return dict(cached, cached=True)
    if run_dir.exists():
        shutil.rmtree(run_dir)
    t0 = time.perf_counter()
    try:
        trainer = Trainer(cfg).setup()
        reason = trainer.train()["reason"]
    finally:
        teardown_distributed()
    if reason not in ("done", "max_steps"):  # a signal: the trainer saved and returned early
        raise SystemExit(f"error: {run_dir.name} stopped by {reason} at step "
                         f"{trainer.global_step}; rerun the same command to continue the table")
    t_train = time.perf_counter() - t0
    metrics = evaluate(trainer.backbone, sets, cfg.data.normalize)
    result = {"fingerprint": fingerprint, "metrics": metrics, "steps": trainer.global_step,
              "train_seconds": t_train, "seconds": time.perf_counter() - t0,
              "load_average": os.getloadavg()[0]}
    atomic_write_json(cache, result, indent=1)
    return dict(result, cached=False)


def last_train_record(run_dir: Path) -> Dict[str, float]:
    """The run's final training loss and UNPG kept fraction (its last logged window)."""
    last: Dict[str, float] = {}
    path = run_dir / "metrics.jsonl"
    for line in path.read_text(encoding="utf-8").splitlines() if path.is_file() else []:
        row = json.loads(line)
        if row.get("kind") == "train":
            last = {k: row[k] for k in ("loss", "unpg/kept_fraction") if k in row}
    return last


# ----------------------------------------------------------------------------- statistics
def summarize(values: Sequence[float]) -> Dict[str, object]:
    """Mean, sample std (None for one value), min, max, n and the values themselves."""
    v = np.asarray(values, dtype=np.float64)
    std = float(v.std(ddof=1)) if len(v) > 1 else None
    return {"value": float(v.mean()), "std": std, "min": float(v.min()), "max": float(v.max()),
            "n": int(len(v)), "per_seed": [float(x) for x in v]}


def aggregate(runs: Dict[tuple, Dict[str, float]], heads: List[str], variants: List[str],
              seeds: List[int]) -> List[Dict[str, object]]:
    """``runs[(head, variant, seed)] = metrics`` -> the named results (cells, paired diffs)."""
    results = []
    pooled: Dict[tuple, List[float]] = {}
    for head in heads:
        for variant in variants:
            for m in METRICS:
                vals = [runs[(head, variant, s)][m] for s in seeds]
                results.append({"name": f"ablation/{head}/{variant}/{m}", "unit": "fraction",
                                **summarize(vals)})
        if "base" not in variants:
            continue
        for variant in (v for v in variants if v != "base"):
            for m in METRICS:
                diffs = [runs[(head, variant, s)][m] - runs[(head, "base", s)][m] for s in seeds]
                pooled.setdefault((variant, m), []).extend(diffs)
                results.append({"name": f"ablation/{head}/{variant}_minus_base/{m}",
                                "unit": "fraction", "wins": sum(d > 0 for d in diffs),
                                **summarize(diffs)})
    for (variant, m), diffs in pooled.items():
        results.append({"name": f"ablation/all/{variant}_minus_base/{m}", "unit": "fraction",
                        "wins": sum(d > 0 for d in diffs), **summarize(diffs)})
    return results


def _cell(r: Dict[str, object], signed: bool = False, pct: float = 100.0) -> str:
    mean = f"{r['value'] * pct:+.2f}" if signed else f"{r['value'] * pct:.2f}"
    std = "-" if r["std"] is None else f"{r['std'] * pct:.2f}"
    wins = f" ({r['wins']}/{r['n']})" if "wins" in r else ""
    return f"{mean} ± {std}{wins}"


def format_tables(results: List[Dict[str, object]], heads: List[str], variants: List[str]) -> str:
    """One table per head (and the pooled differences), values in percent."""
    by_name = {r["name"]: r for r in results}
    lines = []
    groups = [(h, [(v, f"ablation/{h}/{v}") for v in variants]
               + [(f"{v} − base", f"ablation/{h}/{v}_minus_base") for v in variants
                  if v != "base" and "base" in variants]) for h in heads]
    if "base" in variants and len(variants) > 1 and len(heads) > 1:
        groups.append(("all heads (paired, pooled)",
                       [(f"{v} − base", f"ablation/all/{v}_minus_base") for v in variants
                        if v != "base"]))
    for title, rows in groups:
        table = [[title, *METRICS]]
        for label, prefix in rows:
            table.append([label] + [_cell(by_name[f"{prefix}/{m}"], signed="minus" in prefix)
                                    for m in METRICS])
        widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in table]
        lines.append("")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main
def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    preset = PRESETS["quick" if args.quick else "full"]
    try:
        heads = _pick(args.heads, preset["heads"], list(HEADS), "--heads")
        variants = _pick(args.variants, preset["variants"], list(VARIANTS), "--variants")
        seeds = _seeds(args.seeds, preset["seeds"])
        if not args.config.is_file():
            raise ValueError(f"--config {args.config}: file not found")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stdout)
    # Keep freed blocks mapped (as the demo does): without it the glibc heap maps and unmaps
    # the large activation buffers at every step and a run took about twice as long.
    tune_cpu_allocator()
    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    data_kw = {k: preset[k] for k in ("identities", "images_per_identity", "val_identities",
                                      "val_pairs", "nuisance", "quality")}
    key = "_".join(f"{k}{v}" for k, v in sorted(data_kw.items())) + f"_seed{preset['data_seed']}"
    data_dir = args.work / "data" / key
    meta = ensure_dataset(str(data_dir), data_kw.pop("identities"),
                          data_kw.pop("images_per_identity"), seed=preset["data_seed"],
                          workers=args.workers, progress=False, **data_kw)
    sets = {"val": load_heldout(data_dir / VAL_BIN, meta["pairs"]),
            "hard": load_heldout(data_dir / HARD_BIN, meta["pairs"])}
    n_img = len(sets["val"].images)
    n_gen = int(sum((np.bincount(sets["val"].ident_U) * (np.bincount(sets["val"].ident_U) - 1))
                    // 2))
    print(f"data   {meta['num_images']} training images of {meta['num_classes']} identities; "
          f"held out: {len(meta['pairs'])} pairs per bin for 10-fold accuracy, TAR@FAR over all "
          f"pairs of {n_img} images ({n_gen} genuine, {n_img * (n_img - 1) // 2 - n_gen} "
          f"impostor) [{time.perf_counter() - t0:.0f} s]", flush=True)

    runs: Dict[tuple, Dict[str, float]] = {}
    per_run = []
    # Seed-major order: an interrupted table still has every cell for its first seeds, and a
    # rerun reuses the cached runs.
    todo = [(h, v, s) for s in seeds for h in heads for v in variants]
    for i, (head, variant, seed) in enumerate(todo, 1):
        wisk = VARIANTS[variant]
        overrides = [f"data.rec={data_dir}", *HEADS[head], f"schedule.epochs={preset['epochs']}",
                     f"unpg.enabled={'true' if wisk is not None else 'false'}",
                     f"unpg.wisk={wisk if wisk is not None else 1.5}", f"train.seed={seed}",
                     f"train.output_dir={args.work / 'runs' / key}",
                     f"train.name={head}_{variant}_seed{seed}", *args.overrides]
        run_dir = args.work / "runs" / key / f"{head}_{variant}_seed{seed}"
        res = run_one(args.config, overrides, run_dir, sets, key, args.fresh)
        runs[(head, variant, seed)] = res["metrics"]
        final = last_train_record(run_dir)
        per_run.append({"head": head, "variant": variant, "seed": seed, **res,
                        "final_train": final})
        m = res["metrics"]
        kept = final.get("unpg/kept_fraction")
        print(f"[{i}/{len(todo)}] {head:8s} {variant:10s} seed {seed}: "
              + "  ".join(f"{k} {m[k] * 100:.2f}" for k in METRICS)
              + f"  | loss {final.get('loss', float('nan')):.2f}"
              + ("" if kept is None else f" kept {kept:.1%}")
              + (" (cached)" if res["cached"] else
                 f"  [{res['steps']} steps, {res['seconds']:.0f} s, load {res['load_average']:.1f}]"),
              flush=True)

    results = aggregate(runs, heads, variants, seeds)
    wall = time.perf_counter() - t0
    print()
    print("Held-out verification, percent: mean ± sample std over seeds; paired rows are UNPG − "
          "base per seed (in parentheses: seeds where UNPG is higher)")
    print(format_tables(results, heads, variants))
    print(f"total {wall:.0f} s; load average {load0:.1f} at start, {os.getloadavg()[0]:.1f} at end")
    if args.json:
        settings = dict(preset, heads=heads, variants=variants, seeds=seeds, data_dir=str(data_dir),
                        config=str(args.config), overrides=list(args.overrides),
                        head_overrides=HEADS, variant_wisk=VARIANTS, eval_flip=EVAL_FLIP,
                        heldout_images=n_img, heldout_genuine_pairs=n_gen)
        atomic_write_json(args.json, {"results": results, "runs": per_run, "settings": settings,
                                      "wall_seconds": wall, "load_average": [load0,
                                                                             os.getloadavg()[0]]},
                          indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
