"""Evaluation speed: IJB-C-sized 1:1 verification from features, and 10-fold accuracy.

``ijbc/seconds``: from precomputed image features at IJB-C's size (469,375 images x 512-d,
23,124 templates, 15,658,489 template pairs, synthetic random values) to the TAR@FAR table:
detector-score weighting, media/template aggregation, pair scores, ROC and TAR@FAR. The pairs
follow IJB-C's gallery x probe structure (first side: 3,531 gallery templates, second side:
the 19,593 others; 19,557 genuine pairs); ``--pairs uniform`` draws both sides from all
templates instead. ``kfold6000/seconds``: insightface's 10-fold accuracy on 6,000 pairs.
Each is the median of ``--repeats`` runs; the data are generated once, outside the timing.

    python bench/eval_speed.py [--repeats 3] [--json FILE]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

N_IMAGES = 469_375
N_TEMPLATES = 23_124
N_PAIRS = 15_658_489
N_GALLERY = 3_531
N_GENUINE = 19_557
DIM = 512


def synthetic_ijbc(rng: np.random.Generator, structure: str):
    """Random features and IJB-C-sized template/media/pair assignments."""
    feats_ND = rng.standard_normal((N_IMAGES, DIM), dtype=np.float32)
    # Every template gets at least one image; the rest are spread at random.
    templates_N = np.concatenate([np.arange(N_TEMPLATES),
                                  rng.integers(0, N_TEMPLATES, N_IMAGES - N_TEMPLATES)])
    rng.shuffle(templates_N)
    templates_N = templates_N * 7 + 1  # sparse ids, as IJB's
    medias_N = rng.integers(0, 60_000, N_IMAGES)  # ~8 media per template: many multi-frame
    det_scores_N = rng.uniform(0.5, 1.0, N_IMAGES).astype(np.float32)
    ids = np.arange(N_TEMPLATES) * 7 + 1
    if structure == "ijbc":
        t1 = ids[rng.integers(0, N_GALLERY, N_PAIRS)]
        t2 = ids[rng.integers(N_GALLERY, N_TEMPLATES, N_PAIRS)]
    else:
        t1 = ids[rng.integers(0, N_TEMPLATES, N_PAIRS)]
        t2 = ids[rng.integers(0, N_TEMPLATES, N_PAIRS)]
    labels = np.zeros(N_PAIRS, dtype=bool)
    labels[rng.choice(N_PAIRS, N_GENUINE, replace=False)] = True
    return feats_ND, templates_N, medias_N, det_scores_N, t1, t2, labels


def time_ijbc(repeats: int, structure: str) -> tuple[float, str]:
    from unpg.eval.ijb import verification_1v1
    from unpg.eval.metrics import DEFAULT_FARS
    from unpg.eval.report import format_table

    data = synthetic_ijbc(np.random.default_rng(0), structure)
    feats, templates, medias, det, t1, t2, labels = data
    times, table = [], ""
    for _ in range(repeats):
        t0 = time.perf_counter()
        summary, _ = verification_1v1(feats, templates, medias, t1, t2, labels,
                                      DEFAULT_FARS, image_weights_N=det)
        row = [f"{100 * v:.2f}" for v in summary["tar_at_far"].values()]
        table = format_table(["FAR"] + list(summary["tar_at_far"]), [["TAR (%)"] + row])
        times.append(time.perf_counter() - t0)
    return statistics.median(times), table


def time_kfold(repeats: int) -> float:
    from unpg.eval.metrics import kfold_accuracy

    rng = np.random.default_rng(1)
    same = rng.random(6000) < 0.5
    e1 = rng.standard_normal((6000, DIM)).astype(np.float32)
    e2 = np.where(same[:, None], e1 + rng.standard_normal((6000, DIM)).astype(np.float32),
                  rng.standard_normal((6000, DIM)).astype(np.float32))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        kfold_accuracy(e1, e2, same)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per case (median reported)")
    ap.add_argument("--pairs", choices=("ijbc", "uniform"), default="ijbc",
                    help="pair structure: IJB-C's gallery x probe (default) or uniform random")
    ap.add_argument("--skip-ijbc", action="store_true", help="only time the 10-fold accuracy")
    ap.add_argument("--json", type=Path, help="write {'results': [{name, value, unit}]} here")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error(f"--repeats must be >= 1, got {args.repeats}")

    results = []
    if not args.skip_ijbc:
        ijbc_s, table = time_ijbc(args.repeats, args.pairs)
        print(f"IJB-C-sized 1:1 ({args.pairs} pairs), TAR of random features:\n{table}")
        results.append({"name": "ijbc/seconds", "value": ijbc_s, "unit": "s"})
    results.append({"name": "kfold6000/seconds", "value": time_kfold(max(args.repeats, 3)),
                    "unit": "s"})

    from unpg.eval.report import format_table
    from unpg.fileio import atomic_write_json

    print(format_table(["name", "value", "unit"],
                       [[r["name"], f"{r['value']:.4f}", r["unit"]] for r in results],
                       title=f"eval_speed (median of >= {args.repeats} runs, {os.cpu_count()} CPUs)"))
    if args.json:
        atomic_write_json(args.json, {"results": results}, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
