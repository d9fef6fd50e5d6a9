"""``make demo``: the whole pipeline on a CPU in a few minutes.

1. ``unpg.data.synthetic.ensure_dataset`` writes (or reuses) procedural faces in ``data.rec``:
   training identities, plus ``synth_val.bin`` pairs of *other* identities (held out).
2. ``unpg.trainer.Trainer`` trains ``configs/demo.yaml`` (small MobileFaceNet, ArcFace + UNPG)
   through the regular training path (torch loader, checkpoints, metrics.jsonl, TensorBoard).
3. The final model is verified on the held-out pairs with insightface's 10-fold protocol
   (threshold chosen on 9 folds, accuracy on the 10th) and a table is printed; the last line is
   ``demo: held-out verification accuracy 0.xxxx``.

The dataset sizes are options here (they are not training config); ``key=value`` arguments
override the demo config. The run folder ``train.output_dir/train.name`` is recreated (the demo
sets ``train.overwrite=true``; only files training writes are deleted); the data folder is
reused when its parameters match.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence

from unpg.config import load_config
from unpg.data.synthetic import VAL_BIN, ensure_dataset
from unpg.distributed import teardown_distributed
from unpg.runtime import tune_cpu_allocator
from unpg.trainer import Trainer

__all__ = ["main"]

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "configs" / "demo.yaml"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m unpg.demo",
        description="Generate synthetic faces, train ArcFace + UNPG on the CPU, verify on "
                    "held-out identities.")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="training config")
    p.add_argument("--identities", type=int, default=200, help="training identities")
    p.add_argument("--images-per-identity", type=int, default=20)
    p.add_argument("--val-identities", type=int, default=100, help="held-out identities")
    p.add_argument("--val-pairs", type=int, default=600, help="verification pairs (even)")
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2, help="data generation processes")
    p.add_argument("--min-accuracy", type=float, default=0.90,
                   help="exit with status 1 below this held-out accuracy")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    return p


def _table(rows: List[List[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stdout)
    tune_cpu_allocator()

    t0 = time.perf_counter()
    cfg = load_config(args.config, list(args.overrides))
    data_dir = Path(cfg.data.rec)
    meta = ensure_dataset(str(data_dir), args.identities, args.images_per_identity,
                          val_identities=args.val_identities, val_pairs=args.val_pairs,
                          seed=args.data_seed, workers=args.workers)
    t_data = time.perf_counter() - t0
    val_bin = str(data_dir / VAL_BIN)
    # Verify on the held-out pairs once, at the end of training.
    cfg.eval.bins, cfg.eval.every = [val_bin], 10**9
    cfg.train.overwrite = True  # a fresh demo run each time
    cfg.validate()
    run_dir = Path(cfg.train.output_dir) / cfg.train.name
    if run_dir.resolve() == data_dir.resolve() or data_dir.resolve() in run_dir.resolve().parents:
        raise ValueError(f"train.output_dir/train.name={run_dir} must not contain data.rec")

    t1 = time.perf_counter()
    trainer = Trainer(cfg)
    try:
        result = trainer.setup().train()
    finally:
        trainer.close()  # the loader's worker processes
        teardown_distributed()
    t_train = time.perf_counter() - t1
    res = result["eval"]["results"][Path(val_bin).stem]
    acc, std = float(res["accuracy"]), float(res["accuracy_std"])
    seen = trainer.global_step * cfg.train.batch_size

    print()
    print(f"data   {meta['num_images']} training images of {meta['num_classes']} identities; "
          f"{res['num_pairs']} held-out pairs of {args.val_identities} other identities "
          f"({t_data:.0f} s)")
    print(f"train  {cfg.model.name} ({cfg.model.embedding_size}-d), {cfg.head.name} s={cfg.head.s:g} "
          f"m={cfg.head.m:g}, UNPG wisk={cfg.unpg.wisk if cfg.unpg.enabled else 'off'}, "
          f"{trainer.global_step} steps x {cfg.train.batch_size} ({seen / t_train:.0f} img/s "
          f"incl. evaluation, {t_train:.0f} s)")
    tar = res.get("tar_at_far", {})
    rows = [["set", "pairs", "10-fold accuracy", "AUC", "EER", "TAR@FAR=1e-2"],
            [Path(val_bin).name, str(res["num_pairs"]), f"{acc:.4f} +- {std:.4f}",
             f"{res['auc']:.4f}", f"{res['eer']:.4f}", f"{tar.get('0.01', float('nan')):.4f}"]]
    print(_table(rows))
    print(f"total  {time.perf_counter() - t0:.0f} s; run folder {run_dir}")
    print(f"demo: held-out verification accuracy {acc:.4f}")
    return 0 if acc >= args.min_accuracy else 1


if __name__ == "__main__":
    sys.exit(main())
