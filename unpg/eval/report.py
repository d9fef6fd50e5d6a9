"""Output of an evaluation: text tables, an atomically written JSON file and ROC plots.

matplotlib is optional: ``plot_roc`` imports it when called and, when it is missing, prints one
warning line (``pip install matplotlib``) and skips the plot.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any, Dict, Mapping, Sequence, Tuple, Union

import numpy as np

# atomic_write_bytes stays importable from here (it is part of this module's API).
from ..fileio import atomic_write, atomic_write_bytes, atomic_write_json

__all__ = ["atomic_write_bytes", "format_table", "plot_roc", "to_jsonable", "write_json"]

_warned_matplotlib = False


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]], title: str = "") -> str:
    """A plain-text table with a rule under the header; floats are printed as given (strings)."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]

    def line(r):
        return "| " + " | ".join(c.rjust(w) for c, w in zip(r, widths)) + " |"

    rule = "+" + "+".join("-" * (w + 2) for w in widths) + "+"
    out = [rule, line(cells[0]), rule] + [line(r) for r in cells[1:]] + [rule]
    if title:
        out.insert(0, title)
    return "\n".join(out)


def to_jsonable(obj: Any) -> Any:
    """Numpy scalars/arrays → Python numbers/lists; NaN/inf → None (JSON has neither)."""
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(path: Union[str, Path], obj: Any) -> Path:
    """Write ``obj`` as indented JSON, atomically (a reader never sees a half-written file)."""
    return atomic_write_json(path, to_jsonable(obj), indent=2, sort_keys=False, allow_nan=False)


def plot_roc(curves: Dict[str, Tuple[np.ndarray, np.ndarray]], path: Union[str, Path], *,
             title: str, fars: Sequence[float] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)) -> bool:
    """Save ROC curves (log-FPR axis, as insightface's IJB plots) as a PNG; False if skipped."""
    global _warned_matplotlib
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        if not _warned_matplotlib:
            print(f"warning: matplotlib is not installed, skipping ROC plots such as {path} "
                  f"(pip install matplotlib)", file=sys.stderr)
            _warned_matplotlib = True
        return False
    path = Path(path)
    fig, ax = plt.subplots(figsize=(6, 5))
    try:
        for name, (fpr, tpr) in curves.items():
            ax.plot(fpr, tpr, lw=1, label=name)
        ax.set_xscale("log")
        ax.set_xlim(min(fars), 1.0)
        ax.set_ylim(0.0, 1.0)
        ax.set_xticks(list(fars))
        ax.grid(linestyle="--", linewidth=0.5)
        ax.set_xlabel("False Positive Rate")
        ax.set_ylabel("True Positive Rate")
        ax.set_title(title)
        ax.legend(loc="lower right")
        fig.tight_layout()
        with atomic_write(path) as fh:  # a file object: the format cannot come from its name
            fig.savefig(fh, format="png", dpi=120)
    finally:
        plt.close(fig)
    return True
