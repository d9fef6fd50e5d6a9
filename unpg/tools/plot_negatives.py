"""Draw UNPG's negative-pair view of a training run as a PNG.

    python -m unpg.tools.plot_negatives RUN_DIR [--out FILE.png] [--snapshots 4]

Reads ``RUN_DIR/metrics.jsonl`` (no TensorBoard needed): every training record with
``unpg/neg_hist`` -- the in-batch negative cosine similarities of a logging window, counted in
equal bins over [-1, 1] -- and the box-and-whisker statistics of the window's last step (Q1, Q3
and the kept interval ``[Q1 - wisk IQR, Q3 + wisk IQR]``). Two panels:

* left: a heat map of the distribution over training steps (each column is one window,
  normalised to a density), with Q1/Q3 dashed and the kept interval's bounds solid;
* right: the distribution at a few steps (first, last and evenly spaced between) with each
  step's kept interval marked.

The y range is cropped to the occupied bins. ``--out`` defaults to ``RUN_DIR/negatives.png``
(written atomically). matplotlib is an optional dependency (``pip install matplotlib``). Exit
status 2 with an ``error:`` line when it is missing or the run has no such records (UNPG off,
or a run logged before the histogram existed).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np
import yaml

from unpg.fileio import atomic_write
from unpg.logging_utils import HIST_KEY
from unpg.negatives import hist_edges

__all__ = ["main", "plot_negatives", "read_negative_records"]

_SCALARS = ("q1", "q3", "lower", "upper", "kept_fraction")


def read_negative_records(run_dir: Path) -> Dict[str, np.ndarray]:
    """``{step [T], hist [T, bins], q1, q3, lower, upper, kept_fraction [T]}`` from
    ``metrics.jsonl``, sorted by step (a re-logged step keeps its last record). Raises
    ValueError naming the file when it is missing or holds no histogram records."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"{path}: not found; RUN_DIR must be a training run folder "
                         f"(train.output_dir/train.name)")
    by_step: Dict[int, dict] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line cut by a crash
        if isinstance(row, dict) and row.get("kind", "train") == "train" and \
                isinstance(row.get(HIST_KEY), list) and isinstance(row.get("step"), int):
            by_step[row["step"]] = row
    if not by_step:
        raise ValueError(f"{path}: no '{HIST_KEY}' records; the negative-pair histogram is "
                         f"logged only by runs with unpg.enabled=true")
    steps = sorted(by_step)
    bins = {len(by_step[s][HIST_KEY]) for s in steps}
    if len(bins) != 1:
        raise ValueError(f"{path}: '{HIST_KEY}' records have different bin counts {sorted(bins)}")
    out = {"step": np.array(steps, dtype=np.int64),
           "hist": np.array([by_step[s][HIST_KEY] for s in steps], dtype=np.float64)}
    for key in _SCALARS:
        out[key] = np.array([_float(by_step[s].get(f"unpg/{key}")) for s in steps])
    return out


def _float(value) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) \
        else math.nan


def _run_title(run_dir: Path) -> str:
    """Run name, head and whisker from the run's saved config (when readable)."""
    title = run_dir.resolve().name
    try:
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
        head, unpg = cfg["head"], cfg["unpg"]
        return f"{title}: {head['name']}, UNPG wisk {float(unpg['wisk'])}"
    except (OSError, ValueError, yaml.YAMLError, KeyError, TypeError):
        return title


def plot_negatives(rec: Dict[str, np.ndarray], out: Path, title: str = "",
                   snapshots: int = 4) -> Path:
    """Draw ``read_negative_records``' output to the PNG ``out`` (atomically); returns it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hist_TB = rec["hist"]
    steps = rec["step"]
    bins = hist_TB.shape[1]
    edges = np.array(hist_edges(bins))
    width = edges[1] - edges[0]
    density_TB = hist_TB / np.maximum(hist_TB.sum(1, keepdims=True), 1) / width
    occupied = np.flatnonzero(hist_TB.sum(0))
    lo = edges[max(occupied[0] - 1, 0)]
    hi = edges[min(occupied[-1] + 2, bins)]

    fig, (ax_map, ax_snap) = plt.subplots(1, 2, figsize=(11, 4.2),
                                          gridspec_kw={"width_ratios": [1.6, 1]})
    # Column t spans from the previous logged step to step t: the window it summarises.
    x_edges = np.concatenate([[0], steps]).astype(np.float64)
    mesh = ax_map.pcolormesh(x_edges, edges, density_TB.T, cmap="magma", shading="flat")
    fig.colorbar(mesh, ax=ax_map, label="density of negatives")
    for key, style, label in (("upper", "-", "kept interval"), ("lower", "-", None),
                              ("q3", "--", "Q1 / Q3"), ("q1", "--", None)):
        y = np.concatenate([rec[key][:1], rec[key]])  # the first window starts at step 0
        ax_map.step(x_edges, y, where="pre", color="cyan" if style == "-" else "white",
                    linestyle=style, linewidth=1.2, label=label)
    ax_map.set_ylim(lo, hi)
    ax_map.set_xlim(0, steps[-1])
    ax_map.set_xlabel("training step")
    ax_map.set_ylabel("cosine similarity of in-batch negative pairs")
    ax_map.legend(loc="upper right", fontsize=8, framealpha=0.6)

    picks = np.unique(np.linspace(0, len(steps) - 1, max(1, min(snapshots, len(steps))))
                      .round().astype(int))
    centres = (edges[:-1] + edges[1:]) / 2
    colours = plt.cm.viridis(np.linspace(0, 0.9, len(picks)))
    for colour, t in zip(colours, picks):
        kept = rec["kept_fraction"][t]
        label = f"step {steps[t]}" + ("" if math.isnan(kept) else f" (kept {kept:.1%})")
        ax_snap.plot(centres, density_TB[t], color=colour, label=label)
        for key in ("lower", "upper"):
            if math.isfinite(rec[key][t]):
                ax_snap.axvline(rec[key][t], color=colour, linestyle=":", linewidth=1)
    ax_snap.set_xlim(lo, hi)
    ax_snap.set_xlabel("cosine similarity (dotted: kept interval)")
    ax_snap.set_ylabel("density")
    ax_snap.legend(fontsize=8)
    fig.suptitle(title or "UNPG in-batch negatives")
    fig.tight_layout()
    out = Path(out)
    try:
        with atomic_write(out, "wb") as fh:
            fig.savefig(fh, format="png", dpi=110)
    finally:
        plt.close(fig)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m unpg.tools.plot_negatives",
                                description="Plot the distribution of UNPG's in-batch negative "
                                            "similarities and the kept interval over training.")
    p.add_argument("run_dir", type=Path, help="training run folder (holds metrics.jsonl)")
    p.add_argument("--out", type=Path, help="PNG to write (default RUN_DIR/negatives.png)")
    p.add_argument("--snapshots", type=int, default=4,
                   help="steps drawn in the right panel (default 4)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.snapshots < 1:
        print("error: --snapshots must be >= 1", file=sys.stderr)
        return 2
    try:
        import matplotlib  # noqa: F401  (optional dependency: checked before reading the run)
    except ImportError:
        print("error: plot_negatives needs matplotlib: pip install matplotlib (or the project's "
              "'plot' extra)", file=sys.stderr)
        return 2
    try:
        rec = read_negative_records(args.run_dir)
        out = plot_negatives(rec, args.out or args.run_dir / "negatives.png",
                             _run_title(args.run_dir), args.snapshots)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}: {len(rec['step'])} logging steps up to step {rec['step'][-1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
