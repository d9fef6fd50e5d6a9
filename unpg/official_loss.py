"""Transcription of the official code's loss (github jung-jun-uk/UNPG): test oracle and benchmark baseline.

Written on purpose without ``unpg.heads`` / ``unpg.negatives`` so that it checks them
independently. It follows the official code's formulation step by step:

- ``models/head.py``: cosine logits ``F.linear(normalize(x), normalize(W))`` for all B×C; ArcFace
  ``acos`` of the whole matrix, ``+ m`` on the target column, ``cos`` (no th/mm fallback, no easy
  margin); CosFace ``cosine − one_hot·m``.
- ``models/magface.py``: ``x_norm = ‖x‖.clamp(l_a, u_a)``, ``cos`` clamped to [-1, 1],
  ``cos·cos m − sqrt(1 − cos²)·sin m``, easy margin ``where(cos > 0, cos_m, cos)`` on the target
  column only, and ``lambda_g·mean(x_norm/u_a² + 1/x_norm)`` added to the loss.
- combined (insightface's general form; not in the official code): ``cos(m1·acos z + m2) − m3``.
- ``models/build.py``: ``convert_label_to_similarity`` (strict upper triangle of X̂X̂ᵀ where labels
  differ, boolean-mask selected), ``box_and_whisker_algorithm`` (sort, ``int(0.25·l)``,
  ``int(0.75·l)``, closed interval), and ``UNPG.forward``: the kept negatives are concatenated
  onto every row and one ``cross_entropy(s·[logits, negatives], labels)`` is taken. The official code
  crashes on an empty negative set; here an empty set adds nothing (as DESIGN.md states).

Host syncs (boolean-mask indexing) are fine here: this is the slow, literal baseline.
# B: batch, C: classes, D: embedding dim, N: kept negatives
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F

__all__ = ["seed_box_and_whisker", "official_margin_softmax_loss", "seed_negative_similarities"]

_SEED_PARAMS = {
    "arcface": ("s", "m"),
    "cosface": ("s", "m"),
    "magface": ("s", "l_margin", "u_margin", "l_a", "u_a", "lambda_g"),
    "combined": ("s", "m1", "m2", "m3"),
}


def seed_negative_similarities(normed_BD: torch.Tensor, labels_B: torch.Tensor) -> torch.Tensor:
    """The official code's ``convert_label_to_similarity`` (negative half): upper-triangle, labels differ."""
    similarity = normed_BD @ normed_BD.transpose(1, 0)
    label_matrix = labels_B.unsqueeze(1) == labels_B.unsqueeze(0)
    negative_matrix = label_matrix.logical_not().triu(diagonal=1)
    return similarity.view(-1)[negative_matrix.view(-1)]


def seed_box_and_whisker(similarities: torch.Tensor, wisk: float) -> torch.Tensor:
    """The official code's ``box_and_whisker_algorithm``; empty in, empty out (the official code would crash)."""
    count = similarities.size(0)
    if count == 0:
        return similarities
    sorted_x = torch.sort(input=similarities, descending=False)[0]
    lower_quartile = sorted_x[int(0.25 * count)]
    upper_quartile = sorted_x[int(0.75 * count)]
    iqr = upper_quartile - lower_quartile
    minimum = lower_quartile - wisk * iqr
    maximum = upper_quartile + wisk * iqr
    mask = torch.logical_and(sorted_x <= maximum, sorted_x >= minimum)
    return sorted_x[mask]


def official_margin_softmax_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    weight: torch.Tensor,
    head: str,
    *,
    unpg_wisk: Optional[float] = None,
    **head_params: Any,
) -> torch.Tensor:
    """Official formulation of the margin-softmax (+UNPG) loss; same contract as
    ``unpg.losses.margin_softmax_loss`` (``embeddings [B, D]``, ``labels [B]``, ``weight [C, D]``,
    unnormalised). ``arcface_grad`` is accepted only as ``'exact'``: the official code has no other."""
    if head not in _SEED_PARAMS:
        raise ValueError(f"unknown head {head!r}; choose one of {sorted(_SEED_PARAMS)}")
    if head == "arcface" and head_params.pop("arcface_grad", "exact") != "exact":
        raise ValueError("the official code's ArcFace has only the exact gradient (arcface_grad='exact')")
    expected = set(_SEED_PARAMS[head])
    if set(head_params) != expected:
        raise ValueError(
            f"head {head!r} takes exactly {sorted(expected)}, got {sorted(head_params)}"
        )
    p = {key: float(value) for key, value in head_params.items()}
    dtype = torch.promote_types(embeddings.dtype, weight.dtype)
    if dtype not in (torch.float32, torch.float64):
        dtype = torch.float32
    x, w, labels = embeddings.to(dtype), weight.to(dtype), labels.long()

    normed_x = F.normalize(x)
    cosine = F.linear(normed_x, F.normalize(w))
    one_hot = torch.zeros_like(cosine)
    one_hot.scatter_(1, labels.view(-1, 1), 1.0)
    regular_g = 0.0

    if head == "arcface":
        output = torch.cos(torch.acos(cosine) + one_hot * p["m"])
    elif head == "cosface":
        output = cosine - one_hot * p["m"]
    elif head == "magface":
        x_norm = torch.norm(x, dim=1, keepdim=True).clamp(p["l_a"], p["u_a"])
        slope = (p["u_margin"] - p["l_margin"]) / (p["u_a"] - p["l_a"])
        ada_margin = slope * (x_norm - p["l_a"]) + p["l_margin"]
        cos_m, sin_m = torch.cos(ada_margin), torch.sin(ada_margin)
        cos_theta = cosine.clamp(-1, 1)
        sin_theta = torch.sqrt(1.0 - torch.pow(cos_theta, 2))
        cos_theta_m = cos_theta * cos_m - sin_theta * sin_m
        cos_theta_m = torch.where(cos_theta > 0, cos_theta_m, cos_theta)  # easy margin
        output = one_hot * cos_theta_m + (1.0 - one_hot) * cos_theta
        regular_g = p["lambda_g"] * torch.mean(1 / (p["u_a"] ** 2) * x_norm + 1 / x_norm)
    else:  # combined
        target = torch.cos(p["m1"] * torch.acos(cosine) + p["m2"]) - p["m3"]
        output = torch.where(one_hot.bool(), target, cosine)

    if unpg_wisk is not None:
        if not (isinstance(unpg_wisk, (int, float)) and math.isfinite(unpg_wisk) and unpg_wisk >= 0):
            raise ValueError(f"unpg_wisk must be a finite number >= 0, got {unpg_wisk!r}")
        sn_prime = seed_box_and_whisker(seed_negative_similarities(normed_x, labels), unpg_wisk)
        aux_sn_BN = torch.ones(output.size(0), 1, dtype=dtype, device=output.device) * sn_prime
        output = torch.cat([output, aux_sn_BN], dim=1)
    return F.cross_entropy(p["s"] * output, labels) + regular_g
