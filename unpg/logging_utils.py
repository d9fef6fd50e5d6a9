"""Training logs: a device-side window meter, the rank-0 progress line, ``metrics.jsonl`` and
TensorBoard events.

The meter adds each step's loss and UNPG statistics as *tensors*; nothing is read on the host
until ``WindowMeter.read()`` at the logging cadence (that ``.tolist()`` is the one host sync of a
logging window).

The negative-pair view: UNPG's statistics carry ``neg_hist``, the step's in-batch negative cosine
similarities in ``unpg.negatives.HIST_BINS`` bins over [-1, 1]. The meter sums it over the window
(a device add per step); ``read`` returns it as ``unpg/neg_hist`` (a list of counts, also the
compact form in ``metrics.jsonl``) with ``unpg/kept_fraction`` (kept / negatives over the window).
``MetricsSink`` draws the counts as the TensorBoard histogram ``train/unpg/neg_cos`` beside the
scalars ``train/unpg/{q1,q3,lower,upper,kept_fraction}``; ``python -m unpg.tools.plot_negatives``
draws them from ``metrics.jsonl``.
"""
from __future__ import annotations

import datetime
import json
import logging
import math
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist

from unpg.fileio import atomic_write_text
from unpg.negatives import hist_edges

__all__ = ["HIST_KEY", "HIST_TAG", "MetricsSink", "WindowMeter", "format_progress",
           "histogram_summary", "truncate_jsonl"]

log = logging.getLogger("unpg.train")

UNPG_KEYS = ("num_negatives", "num_kept", "q1", "q3", "lower", "upper", "min", "max")
HIST_KEY = "unpg/neg_hist"  # record key: window counts of the negatives' cosines
HIST_TAG = "unpg/neg_cos"  # TensorBoard histogram tag (under the record's kind, e.g. train/)


class WindowMeter:
    """Sums of the per-step loss, kept/negative counts and the negatives' histogram since the
    last ``read``; the other UNPG statistics are the latest step's."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._loss_sum: Optional[torch.Tensor] = None
        self._skipped: Optional[torch.Tensor] = None
        self._stats: Dict[str, torch.Tensor] = {}
        self._counts: Optional[torch.Tensor] = None  # [kept, negatives] summed over the window
        self._hist: Optional[torch.Tensor] = None  # neg_hist summed over the window
        self.steps = 0

    def add(self, loss: torch.Tensor, ok: torch.Tensor, stats: Dict[str, torch.Tensor]) -> None:
        loss = loss.detach().float()
        skipped = (~ok).to(torch.int64)
        # A skipped (non-finite) step is counted, not averaged into the loss.
        loss = torch.where(ok, loss, torch.zeros_like(loss))
        self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss
        self._skipped = skipped if self._skipped is None else self._skipped + skipped
        self._stats = {k: v.detach() for k, v in stats.items() if k != "neg_hist"}
        if "num_kept" in stats and "num_negatives" in stats:
            counts = torch.stack([stats["num_kept"], stats["num_negatives"]]).detach()
            self._counts = counts if self._counts is None else self._counts + counts
        if "neg_hist" in stats:
            hist = stats["neg_hist"].detach()
            self._hist = hist if self._hist is None else self._hist + hist
        self.steps += 1

    def average_loss_over(self, group: Any, world_size: int) -> None:
        """Replace the window's loss sum by its mean over ranks (replicated FC mode, where
        each rank's loss is its local mean). A device collective at the logging cadence."""
        if self._loss_sum is not None:
            dist.all_reduce(self._loss_sum, group=group)
            self._loss_sum = self._loss_sum / world_size

    def read(self) -> Dict[str, Any]:
        """Host values of the window and reset: ``loss`` (mean over finite steps), ``skipped``,
        ``unpg/<stat>`` of the latest step, and over the whole window ``unpg/kept_fraction``
        and ``unpg/neg_hist`` (list of int counts)."""
        if self.steps == 0:
            return {}
        keys = [k for k in UNPG_KEYS if k in self._stats]
        parts = [self._loss_sum.double().reshape(1), self._skipped.double().reshape(1)]
        parts += [self._stats[k].double().reshape(1) for k in keys]
        if self._counts is not None:
            parts.append(self._counts.double())
        if self._hist is not None:
            parts.append(self._hist.double())
        values = torch.cat(parts).tolist()  # the window's one host sync
        loss_sum, skipped = values[0], int(values[1])
        finite = self.steps - skipped
        out: Dict[str, Any] = {"loss": loss_sum / finite if finite else math.nan,
                               "skipped": skipped}
        n = 2 + len(keys)
        out.update({f"unpg/{k}": (int(v) if k in ("num_negatives", "num_kept") else v)
                    for k, v in zip(keys, values[2:n])})
        if self._counts is not None:
            kept, negatives = values[n:n + 2]
            out["unpg/kept_fraction"] = kept / negatives if negatives else math.nan
            n += 2
        if self._hist is not None:
            out[HIST_KEY] = [int(v) for v in values[n:]]
        self._reset()
        return out


def _eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    return str(datetime.timedelta(seconds=int(max(0.0, seconds))))


def format_progress(step: int, total_steps: int, epoch: int, epochs: int, record: Dict[str, Any],
                    ) -> str:
    """One progress line: step, epoch, loss, lr, throughput, ETA, UNPG filter statistics."""
    parts = [f"step {step}/{total_steps}", f"epoch {epoch + 1}/{epochs}",
             f"loss {record.get('loss', math.nan):.4f}", f"lr {record.get('lr', math.nan):.5g}",
             f"{record.get('images_per_sec', 0.0):.1f} img/s",
             f"eta {_eta(record.get('eta_sec', math.nan))}"]
    if record.get("skipped"):
        parts.append(f"skipped {record['skipped']}")
    if "unpg/num_kept" in record:
        parts.append(
            f"| unpg kept {record['unpg/num_kept']}/{record['unpg/num_negatives']} "
            f"q1 {record['unpg/q1']:.3f} q3 {record['unpg/q3']:.3f} "
            f"bounds [{record['unpg/lower']:.3f}, {record['unpg/upper']:.3f}]")
    return "  ".join(parts)


def truncate_jsonl(path: Path, max_step: int) -> None:
    """Drop records with ``step > max_step`` (a resumed run re-logs those steps); atomic."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            step = json.loads(line).get("step", 0)
        except ValueError:
            continue  # a line cut by a crash
        if isinstance(step, int) and step <= max_step:
            kept.append(line)
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def histogram_summary(counts: List[int]) -> Optional[Dict[str, Any]]:
    """Arguments of ``SummaryWriter.add_histogram_raw`` for ``neg_hist`` counts (None when
    empty). TensorBoard buckets are given by their right edges; min, max, sum and sum of squares
    are those of the bins' occupied range and centres (the raw values are not kept)."""
    total = sum(counts)
    if total <= 0:
        return None
    edges = hist_edges(len(counts))
    centres = [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:])]
    occupied = [i for i, c in enumerate(counts) if c]
    return dict(min=edges[occupied[0]], max=edges[occupied[-1] + 1], num=total,
                sum=sum(c * x for c, x in zip(counts, centres)),
                sum_squares=sum(c * x * x for c, x in zip(counts, centres)),
                bucket_limits=edges[1:], bucket_counts=list(counts))


class MetricsSink:
    """Rank 0's ``metrics.jsonl`` (one JSON object per line, flushed) and TensorBoard scalars
    (plus the negatives' histogram when the record has ``unpg/neg_hist``)."""

    def __init__(self, run_dir: Path, *, resume_step: int = 0, tensorboard: bool = True) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / "metrics.jsonl"
        truncate_jsonl(self.path, resume_step)
        self._fh = open(self.path, "a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:  # tensorboard is a declared dependency; say what is wrong
                log.warning("TensorBoard events disabled (%s); metrics.jsonl is still written", exc)
            else:
                self._tb = SummaryWriter(str(run_dir / "tb"), purge_step=resume_step or None)

    def write(self, step: int, record: Dict[str, Any], kind: str = "train") -> None:
        row = {"step": step, "kind": kind, **record}
        self._fh.write(json.dumps(row, allow_nan=True) + "\n")
        self._fh.flush()
        if self._tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and \
                        math.isfinite(value):
                    self._tb.add_scalar(f"{kind}/{key}", value, step)
            hist = histogram_summary(record[HIST_KEY]) if HIST_KEY in record else None
            if hist is not None:
                self._tb.add_histogram_raw(f"{kind}/{HIST_TAG}", global_step=step, **hist)
            self._tb.flush()

    def close(self) -> None:
        self._fh.close()
        if self._tb is not None:
            self._tb.close()
