"""RetinaFace face detector (MobileNet-0.25 backbone) with 5-point landmarks, in plain torch.

Mirrors biubug6/Pytorch_Retinaface (cfg_mnet) so that its released weights, the ones the
official code uses for K-FACE alignment, load with strict=True. No torchvision: the backbone's
intermediate layers are returned directly and NMS is written here.
"""
# P: prior boxes (anchors), N: detections, A: anchors per feature-map cell, H/W: image size
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "CFG_MNET",
    "RetinaFace",
    "RetinaFaceDetector",
    "decode_boxes",
    "decode_landmarks",
    "load_retinaface",
    "nms",
    "prior_boxes",
]

CFG_MNET = {
    "min_sizes": ((16, 32), (64, 128), (256, 512)),
    "steps": (8, 16, 32),
    "variance": (0.1, 0.2),
    "in_channel": 32,
    "out_channel": 64,
}
BGR_MEAN = (104.0, 117.0, 123.0)  # subtracted from raw BGR values; no scaling (as trained)


# ---------------------------------------------------------------------------- network
def _conv_bn(inp: int, oup: int, stride: int = 1, leaky: float = 0.0) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, oup, 3, stride, 1, bias=False),
        nn.BatchNorm2d(oup),
        nn.LeakyReLU(negative_slope=leaky, inplace=True),
    )


def _conv_bn_no_relu(inp: int, oup: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inp, oup, 3, 1, 1, bias=False), nn.BatchNorm2d(oup))


def _conv_bn1x1(inp: int, oup: int, leaky: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, oup, 1, 1, 0, bias=False),
        nn.BatchNorm2d(oup),
        nn.LeakyReLU(negative_slope=leaky, inplace=True),
    )


def _conv_dw(inp: int, oup: int, stride: int, leaky: float = 0.1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, inp, 3, stride, 1, groups=inp, bias=False),
        nn.BatchNorm2d(inp),
        nn.LeakyReLU(negative_slope=leaky, inplace=True),
        nn.Conv2d(inp, oup, 1, 1, 0, bias=False),
        nn.BatchNorm2d(oup),
        nn.LeakyReLU(negative_slope=leaky, inplace=True),
    )


class MobileNetV1Body(nn.Module):
    """MobileNet-0.25 stages 1-3 (strides 8, 16, 32); the classifier of the original is unused."""

    def __init__(self) -> None:
        super().__init__()
        self.stage1 = nn.Sequential(
            _conv_bn(3, 8, 2, leaky=0.1),
            _conv_dw(8, 16, 1),
            _conv_dw(16, 32, 2),
            _conv_dw(32, 32, 1),
            _conv_dw(32, 64, 2),
            _conv_dw(64, 64, 1),
        )
        self.stage2 = nn.Sequential(_conv_dw(64, 128, 2), *[_conv_dw(128, 128, 1) for _ in range(5)])
        self.stage3 = nn.Sequential(_conv_dw(128, 256, 2), _conv_dw(256, 256, 1))

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        c1 = self.stage1(x)
        c2 = self.stage2(c1)
        c3 = self.stage3(c2)
        return [c1, c2, c3]


class FPN(nn.Module):
    def __init__(self, in_channels: Sequence[int], out_channels: int) -> None:
        super().__init__()
        leaky = 0.1 if out_channels <= 64 else 0.0
        self.output1 = _conv_bn1x1(in_channels[0], out_channels, leaky)
        self.output2 = _conv_bn1x1(in_channels[1], out_channels, leaky)
        self.output3 = _conv_bn1x1(in_channels[2], out_channels, leaky)
        self.merge1 = _conv_bn(out_channels, out_channels, leaky=leaky)
        self.merge2 = _conv_bn(out_channels, out_channels, leaky=leaky)

    def forward(self, feats: List[torch.Tensor]) -> List[torch.Tensor]:
        out1 = self.output1(feats[0])
        out2 = self.output2(feats[1])
        out3 = self.output3(feats[2])
        out2 = self.merge2(out2 + F.interpolate(out3, size=out2.shape[2:], mode="nearest"))
        out1 = self.merge1(out1 + F.interpolate(out2, size=out1.shape[2:], mode="nearest"))
        return [out1, out2, out3]


class SSH(nn.Module):
    """Single-stage headless context module: 3x3, 5x5 and 7x7 receptive fields, concatenated."""

    def __init__(self, in_channel: int, out_channel: int) -> None:
        super().__init__()
        assert out_channel % 4 == 0
        leaky = 0.1 if out_channel <= 64 else 0.0
        self.conv3X3 = _conv_bn_no_relu(in_channel, out_channel // 2)
        self.conv5X5_1 = _conv_bn(in_channel, out_channel // 4, leaky=leaky)
        self.conv5X5_2 = _conv_bn_no_relu(out_channel // 4, out_channel // 4)
        self.conv7X7_2 = _conv_bn(out_channel // 4, out_channel // 4, leaky=leaky)
        self.conv7x7_3 = _conv_bn_no_relu(out_channel // 4, out_channel // 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c3 = self.conv3X3(x)
        c5_1 = self.conv5X5_1(x)
        c5 = self.conv5X5_2(c5_1)
        c7 = self.conv7x7_3(self.conv7X7_2(c5_1))
        return F.relu(torch.cat([c3, c5, c7], dim=1))


class _Head(nn.Module):
    """1x1 conv giving `per_anchor` values per anchor, flattened to [B, fh*fw*A, per_anchor]."""

    def __init__(self, in_channels: int, num_anchors: int, per_anchor: int) -> None:
        super().__init__()
        self.per_anchor = per_anchor
        self.conv1x1 = nn.Conv2d(in_channels, num_anchors * per_anchor, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1x1(x).permute(0, 2, 3, 1)
        return out.reshape(out.shape[0], -1, self.per_anchor)


class RetinaFace(nn.Module):
    """Returns (box offsets [B, P, 4], class probabilities [B, P, 2], landmark offsets [B, P, 10])."""

    def __init__(self, cfg: Optional[dict] = None) -> None:
        super().__init__()
        cfg = CFG_MNET if cfg is None else cfg
        in_ch, out_ch = cfg["in_channel"], cfg["out_channel"]
        num_anchors = len(cfg["min_sizes"][0])
        self.body = MobileNetV1Body()
        self.fpn = FPN([in_ch * 2, in_ch * 4, in_ch * 8], out_ch)
        self.ssh1 = SSH(out_ch, out_ch)
        self.ssh2 = SSH(out_ch, out_ch)
        self.ssh3 = SSH(out_ch, out_ch)
        self.ClassHead = nn.ModuleList([_Head(out_ch, num_anchors, 2) for _ in range(3)])
        self.BboxHead = nn.ModuleList([_Head(out_ch, num_anchors, 4) for _ in range(3)])
        self.LandmarkHead = nn.ModuleList([_Head(out_ch, num_anchors, 10) for _ in range(3)])

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        fpn = self.fpn(self.body(x))
        feats = [self.ssh1(fpn[0]), self.ssh2(fpn[1]), self.ssh3(fpn[2])]
        loc = torch.cat([head(f) for head, f in zip(self.BboxHead, feats)], dim=1)
        logits = torch.cat([head(f) for head, f in zip(self.ClassHead, feats)], dim=1)
        landm = torch.cat([head(f) for head, f in zip(self.LandmarkHead, feats)], dim=1)
        return loc, F.softmax(logits, dim=-1), landm


# ---------------------------------------------------------------------- priors, decoding, NMS
def prior_boxes(
    height: int,
    width: int,
    min_sizes: Sequence[Sequence[int]] = CFG_MNET["min_sizes"],
    steps: Sequence[int] = CFG_MNET["steps"],
    device: Union[str, torch.device, None] = None,
) -> torch.Tensor:
    """Anchors [P, 4] as (cx, cy, w, h) in input pixels, in the heads' output order.

    Level k has a ceil(H/step) x ceil(W/step) grid; cells run row-major and each cell holds
    one square anchor per min size, centred at ((j + 0.5) * step, (i + 0.5) * step).
    (biubug6 keeps these divided by the image size and multiplies back after decoding.)
    """
    levels = []
    for sizes, step in zip(min_sizes, steps):
        fh, fw = -(-height // step), -(-width // step)
        cy = (torch.arange(fh, dtype=torch.float32, device=device) + 0.5) * step
        cx = (torch.arange(fw, dtype=torch.float32, device=device) + 0.5) * step
        size = torch.tensor(sizes, dtype=torch.float32, device=device)
        shape = (fh, fw, len(sizes))
        level_4 = torch.stack(
            [
                cx.view(1, fw, 1).expand(shape),
                cy.view(fh, 1, 1).expand(shape),
                size.view(1, 1, -1).expand(shape),
                size.view(1, 1, -1).expand(shape),
            ],
            dim=-1,
        )
        levels.append(level_4.reshape(-1, 4))
    return torch.cat(levels, dim=0)


def decode_boxes(loc_P4: torch.Tensor, priors_P4: torch.Tensor,
                 variances: Sequence[float] = CFG_MNET["variance"]) -> torch.Tensor:
    """Offsets -> (x1, y1, x2, y2): centre = prior + loc·v0·size, size = prior·exp(loc·v1)."""
    centre = priors_P4[:, :2] + loc_P4[:, :2] * variances[0] * priors_P4[:, 2:]
    size = priors_P4[:, 2:] * torch.exp(loc_P4[:, 2:] * variances[1])
    return torch.cat([centre - size / 2, centre + size / 2], dim=1)


def decode_landmarks(pre_P10: torch.Tensor, priors_P4: torch.Tensor,
                     variances: Sequence[float] = CFG_MNET["variance"]) -> torch.Tensor:
    """Offsets [P, 10] -> points [P, 5, 2]: point = prior centre + pre·v0·prior size."""
    pre_P52 = pre_P10.reshape(-1, 5, 2)
    return priors_P4[:, None, :2] + pre_P52 * variances[0] * priors_P4[:, None, 2:]


def nms(boxes_N4: torch.Tensor, scores_N: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy NMS: indices of kept boxes, by descending score (ties keep input order).

    A box is dropped when its IoU with an already kept, higher-scored box exceeds
    `iou_threshold`. IoU uses continuous coordinates (area = (x2 - x1) * (y2 - y1)).
    """
    if boxes_N4.ndim != 2 or boxes_N4.shape[1] != 4 or scores_N.shape != boxes_N4.shape[:1]:
        raise ValueError(f"nms needs boxes [N, 4] and scores [N], got {tuple(boxes_N4.shape)} "
                         f"and {tuple(scores_N.shape)}")
    order_N = torch.argsort(scores_N, descending=True, stable=True)
    boxes = boxes_N4[order_N]
    areas_N = (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)
    keep: List[torch.Tensor] = []
    remaining = torch.arange(len(boxes), device=boxes.device)
    while remaining.numel() > 0:
        best, rest = remaining[0], remaining[1:]
        keep.append(best)
        lt = torch.maximum(boxes[rest, :2], boxes[best, :2])
        rb = torch.minimum(boxes[rest, 2:], boxes[best, 2:])
        inter = (rb - lt).clamp(min=0).prod(dim=1)
        iou = inter / (areas_N[rest] + areas_N[best] - inter).clamp(min=1e-12)
        # Boolean indexing has a data-dependent size: one host sync per kept box (on CUDA).
        remaining = rest[iou <= iou_threshold]
    if not keep:
        return order_N[:0]
    return order_N[torch.stack(keep)]


# --------------------------------------------------------------------------- loading
def _resolve_device(device: Union[str, torch.device]) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available; use --device cpu")
    return dev


def load_retinaface(weights_path: Union[str, os.PathLike], device: Union[str, torch.device] = "cpu") -> RetinaFace:
    """Build RetinaFace-MobileNet-0.25 and load a biubug6-layout state dict strictly."""
    path = Path(weights_path)
    if not path.is_file():
        raise FileNotFoundError(
            f"RetinaFace weights not found at {path}: pass the MobileNet-0.25 state dict "
            f"(retinaface_mobilenet0.25.pth) with --detector-weights"
        )
    try:
        # The file was saved from CUDA tensors: map to CPU so that it loads anywhere.
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types (UnpicklingError, RuntimeError, EOFError)
        raise ValueError(f"could not read {path} as a torch state dict with weights_only=True: {err}") from err
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict (name -> tensor)")
    prefix = "module."  # left by nn.DataParallel in some released checkpoints
    state = {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in obj.items()}
    model = RetinaFace()
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(
            f"{path} is not a RetinaFace MobileNet-0.25 state dict in the biubug6/Pytorch_Retinaface "
            f"layout (body.stage1..3, fpn, ssh1..3, ClassHead/BboxHead/LandmarkHead): {err}"
        ) from err
    return model.to(_resolve_device(device)).eval()


# -------------------------------------------------------------------------- detector
class RetinaFaceDetector:
    """Faces in a BGR uint8 image: boxes [N, 5] (x1, y1, x2, y2, score) and landmarks [N, 5, 2].

    Landmarks: left eye, right eye, nose, left and right mouth corners (as seen), in pixels of
    the input image; rows sorted by score, descending. Post-processing follows biubug6 and the
    seed: keep scores > conf_threshold, the top_k best, greedy NMS at nms_threshold, then at
    most keep_top_k. `max_size` shrinks images whose longer side exceeds it before the network
    and maps the results back.
    """

    def __init__(
        self,
        weights_path: Union[str, os.PathLike],
        device: Union[str, torch.device] = "cpu",
        conf_threshold: float = 0.5,
        nms_threshold: float = 0.4,
        *,
        top_k: int = 5000,
        keep_top_k: int = 750,
        max_size: Optional[int] = None,
    ) -> None:
        for name, value in (("conf_threshold", conf_threshold), ("nms_threshold", nms_threshold)):
            if not 0.0 <= float(value) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        for name, value in (("top_k", top_k), ("keep_top_k", keep_top_k)):
            if int(value) < 1:
                raise ValueError(f"{name} must be a positive int, got {value}")
        if max_size is not None and int(max_size) < 32:
            raise ValueError(f"max_size must be None or an int >= 32, got {max_size}")
        self.device = _resolve_device(device)
        self.model = load_retinaface(weights_path, self.device)
        self.conf_threshold = float(conf_threshold)
        self.nms_threshold = float(nms_threshold)
        self.top_k = int(top_k)
        self.keep_top_k = int(keep_top_k)
        self.max_size = None if max_size is None else int(max_size)
        self._mean = torch.tensor(BGR_MEAN, device=self.device).view(3, 1, 1)
        self._priors: dict = {}

    def _priors_for(self, height: int, width: int) -> torch.Tensor:
        key = (height, width)
        if key not in self._priors:
            if len(self._priors) >= 16:  # datasets use a few sizes; bound memory otherwise
                self._priors.clear()
            self._priors[key] = prior_boxes(height, width, device=self.device)
        return self._priors[key]

    def detect(self, image: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 \
                or image.shape[2] != 3:
            desc = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
            raise ValueError(f"detect() needs a BGR uint8 HxWx3 image (as cv2.imread gives), got {desc}")
        height, width = image.shape[:2]
        scale_x = scale_y = 1.0
        if self.max_size is not None and max(height, width) > self.max_size:
            ratio = self.max_size / max(height, width)
            new_w, new_h = max(1, round(width * ratio)), max(1, round(height * ratio))
            image = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
            scale_x, scale_y = new_w / width, new_h / height

        img = torch.from_numpy(np.ascontiguousarray(image)).to(self.device)
        x = (img.permute(2, 0, 1).float() - self._mean).unsqueeze(0)
        with torch.inference_mode():
            loc, conf, landm = self.model(x)
            priors_P4 = self._priors_for(image.shape[0], image.shape[1])
            assert priors_P4.shape[0] == loc.shape[1], "prior count must match the head outputs"
            scores_P = conf[0, :, 1]
            idx = torch.nonzero(scores_P > self.conf_threshold).squeeze(1)
            idx = idx[torch.argsort(scores_P[idx], descending=True, stable=True)[: self.top_k]]
            scores_N = scores_P[idx]
            boxes_N4 = decode_boxes(loc[0, idx], priors_P4[idx])
            landm_N52 = decode_landmarks(landm[0, idx], priors_P4[idx])
            keep = nms(boxes_N4, scores_N, self.nms_threshold)[: self.keep_top_k]
            boxes_N4, scores_N, landm_N52 = boxes_N4[keep], scores_N[keep], landm_N52[keep]

        unscale = torch.tensor([scale_x, scale_y], device=self.device)
        boxes_N4 = boxes_N4 / unscale.repeat(2)
        landm_N52 = landm_N52 / unscale
        dets_N5 = torch.cat([boxes_N4, scores_N[:, None]], dim=1)
        return (dets_N5.float().cpu().numpy().astype(np.float32, copy=False),
                landm_N52.float().cpu().numpy().astype(np.float32, copy=False))
