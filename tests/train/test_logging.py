"""Logs (progress line, metrics.jsonl, TensorBoard), SIGINT, AMP resolution and torch.compile."""
import json
import math
import os
import signal

import pytest
import torch

from unpg.logging_utils import WindowMeter, format_progress
from unpg.negatives import HIST_BINS
from unpg.trainer import Trainer, resolve_amp


def test_window_meter_averages_finite_steps_and_counts_skips():
    meter = WindowMeter()
    stats = {"num_negatives": torch.tensor(10), "num_kept": torch.tensor(9),
             "q1": torch.tensor(-0.1), "q3": torch.tensor(0.2)}
    meter.add(torch.tensor(2.0), torch.tensor(True), stats)
    meter.add(torch.tensor(float("nan")), torch.tensor(False), stats)
    meter.add(torch.tensor(4.0), torch.tensor(True), dict(stats, num_kept=torch.tensor(7)))
    rec = meter.read()
    assert rec["loss"] == 3.0 and rec["skipped"] == 1
    assert rec["unpg/num_kept"] == 7 and rec["unpg/num_negatives"] == 10  # latest step
    assert rec["unpg/q1"] == pytest.approx(-0.1) and meter.steps == 0 and meter.read() == {}
    assert rec["unpg/kept_fraction"] == pytest.approx((9 + 9 + 7) / 30)  # over the window


def test_window_meter_sums_histogram_and_reads_once():
    meter = WindowMeter()
    hist = torch.arange(HIST_BINS)
    for k in range(3):
        meter.add(torch.tensor(1.0), torch.tensor(True),
                  {"num_negatives": torch.tensor(10), "num_kept": torch.tensor(k),
                   "neg_hist": hist * (k + 1)})
    rec = meter.read()
    assert rec["unpg/neg_hist"] == (hist * 6).tolist()
    assert rec["unpg/kept_fraction"] == pytest.approx(3 / 30)
    assert "neg_hist" not in rec and all(isinstance(v, int) for v in rec["unpg/neg_hist"])


def test_progress_line_has_every_field():
    rec = {"loss": 12.3456, "lr": 0.05, "images_per_sec": 1234.5, "eta_sec": 3725.0,
           "unpg/num_kept": 120, "unpg/num_negatives": 130, "unpg/q1": -0.1, "unpg/q3": 0.2,
           "unpg/lower": -0.55, "unpg/upper": 0.65, "skipped": 2}
    line = format_progress(40, 1000, 1, 20, rec)
    for part in ("step 40/1000", "epoch 2/20", "loss 12.3456", "lr 0.05", "1234.5 img/s",
                 "eta 1:02:05", "skipped 2", "unpg kept 120/130", "q1 -0.100", "q3 0.200",
                 "bounds [-0.550, 0.650]"):
        assert part in line, (part, line)


def _trainer(helpers, tmp_path, *overrides, hook=None):
    images, labels = helpers["make_data"](n_classes=5, per_class=8)

    def factory(cfg, rank, world, device, train=True):
        loader = helpers["MemoryLoader"](images, labels, cfg, rank, world, device)
        if hook is None:
            return loader
        return HookedLoader(loader, hook)

    return Trainer(helpers["tiny_config"](tmp_path, *overrides), loader_factory=factory).setup()


class HookedLoader:
    def __init__(self, inner, hook):
        self.inner, self.hook, self.num_classes = inner, hook, inner.num_classes

    def set_epoch(self, e):
        self.inner.set_epoch(e)

    def __len__(self):
        return len(self.inner)

    def __iter__(self):
        for i, batch in enumerate(self.inner):
            self.hook(i)
            yield batch


def test_metrics_jsonl_and_tensorboard_events(helpers, tmp_path):
    t = _trainer(helpers, tmp_path, "train.log_every=2", "train.max_steps=4")
    t.train()
    run = tmp_path / "run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4]
    for r in rows:
        assert {"loss", "lr", "images_per_sec", "eta_sec", "epoch", "unpg/num_kept", "unpg/q1",
                "unpg/q3", "unpg/lower", "unpg/upper"} <= set(r)
        assert math.isfinite(r["loss"]) and 0 < r["unpg/num_kept"] <= r["unpg/num_negatives"]
        # Window sums (2 steps): the histogram holds every negative of both steps.
        assert len(r["unpg/neg_hist"]) == HIST_BINS and sum(r["unpg/neg_hist"]) >= \
            r["unpg/num_negatives"] and 0 < r["unpg/kept_fraction"] <= 1
    events = [f for f in os.listdir(run / "tb") if f.startswith("events.out.tfevents")]
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    losses = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    assert losses == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in rows]
    assert (run / "config.yaml").exists()


def test_sigint_saves_then_raises_keyboard_interrupt(helpers, tmp_path):
    def interrupt(i):
        if i == 2:  # while the third batch is produced: the step finishes, then we stop
            os.kill(os.getpid(), signal.SIGINT)

    t = _trainer(helpers, tmp_path, hook=interrupt)
    previous = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt, match="SIGINT"):
        t.train()
    assert signal.getsignal(signal.SIGINT) is previous  # handler restored
    assert t.global_step == 3
    assert (tmp_path / "run" / "ckpt_000000003.pt").exists()


def test_amp_resolution():
    from unpg.config import load_config

    assert load_config(None).train.amp == "auto"  # the default: bf16 on CUDA, none on CPU
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert resolve_amp("auto", cpu) is None and resolve_amp("auto", cuda) is torch.bfloat16
    assert resolve_amp("bf16", cpu) is torch.bfloat16 and resolve_amp("none", cuda) is None
    assert resolve_amp("fp16", cuda) is torch.float16
    with pytest.raises(ValueError, match="fp16 needs CUDA"):
        resolve_amp("fp16", cpu)


@pytest.mark.slow
def test_compiled_training_matches_eager(helpers, tmp_path):
    """train.compile=true (inductor on CPU) trains the same numbers as eager mode."""
    losses = {}
    for flag in ("false", "true"):
        t = _trainer(helpers, tmp_path / flag, f"train.compile={flag}", "train.max_steps=2",
                     "unpg.enabled=true")
        out = []
        for images, labels in t.epoch_batches():
            out.append(float(t.train_step(images, labels)["loss"]))
            if len(out) == 2:
                break
        losses[flag] = out
    assert losses["true"] == pytest.approx(losses["false"], rel=1e-4)
