"""Shared helpers of the training tests (loaded by path: importlib mode has no package here).

``TinyNet`` is a BN-free backbone registered as ``tiny_test_net`` so that a K-process run can
equal the 1-process run exactly; ``MemoryLoader`` serves in-memory tensors with the loaders'
sample-order contract (``unpg.loaders.base.epoch_plan``) and ``tiny_config`` builds a config.
"""
from __future__ import annotations

import torch
from torch import nn
from unpg.loaders.base import epoch_plan, per_rank_batch

from unpg.config import load_config
from unpg.models import register_model


class TinyNet(nn.Module):
    """conv 8x8/8 -> tanh -> 2x2 average pool -> linear: [N,3,112,112] -> [N, D], no BN."""

    def __init__(self, embedding_size: int = 16) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, kernel_size=8, stride=8)
        self.pool = nn.AvgPool2d(2)
        self.fc = nn.Linear(4 * 7 * 7, embedding_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(torch.tanh(self.conv(x))).flatten(1))


@register_model
def tiny_test_net(embedding_size: int = 16, dropout: float = 0.0,
                  channels_last: bool = False) -> TinyNet:
    return TinyNet(embedding_size)


class MemoryLoader:
    """In-memory ``(images, labels)`` with the same order contract as ``unpg.loaders``."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, cfg, rank: int,
                 world_size: int, device, train: bool = True) -> None:
        self.images, self.labels = images, labels
        self.rank, self.world_size = rank, world_size
        self.batch_size = per_rank_batch(cfg.train.batch_size, world_size)
        self.seed, self.device, self.epoch = cfg.train.seed, torch.device(device), 0
        self.num_classes = int(labels.max()) + 1
        self.batches_read = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.labels) // (self.world_size * self.batch_size)

    def __iter__(self):
        plan = epoch_plan(len(self.labels), self.seed, self.epoch, self.rank, self.world_size,
                          self.batch_size)
        for step in range(plan.steps):
            idx, flips = plan.batch(step)
            idx_t = torch.from_numpy(idx)
            x = self.images[idx_t]
            f = torch.from_numpy(flips).view(-1, 1, 1, 1)
            x = torch.where(f, x.flip(3), x)
            self.batches_read += 1
            yield x.to(self.device), self.labels[idx_t].to(self.device)


def make_data(n_classes: int = 7, per_class: int = 8, seed: int = 0):
    """Class-dependent random images: class mean pattern + noise."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(n_classes, 3, 112, 112, generator=g)
    labels = torch.arange(n_classes).repeat_interleave(per_class)
    images = means[labels] + 0.5 * torch.randn(len(labels), 3, 112, 112, generator=g)
    return images, labels


def tiny_config(tmp, *overrides: str):
    base = ["model.name=tiny_test_net", "model.embedding_size=16", "head.name=arcface",
            "head.s=16.0", "head.m=0.3", "unpg.enabled=true", "unpg.wisk=1.5",
            "optim.lr=0.05", "optim.momentum=0.9", "optim.weight_decay=5.0e-4",
            "schedule.epochs=2", "schedule.warmup_epochs=0.5", "train.batch_size=8",
            "train.amp=none", "train.device=cpu", f"train.output_dir={tmp}", "train.name=run",
            "train.log_every=1", "train.save_every=0", "eval.every=0"]
    return load_config(None, base + list(overrides))
