"""Five-point face alignment: reference templates, a similarity fit and the warp to a square crop.

One implementation for every aligner in the project (K-FACE preparation, IJB evaluation).
Landmark order everywhere: left eye, right eye, nose tip, left mouth corner, right mouth
corner, with left/right as seen in the image. Points are (x, y) in pixels.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import cv2
import numpy as np

__all__ = [
    "ARCFACE_TEMPLATE_112",
    "REFERENCE_FACIAL_POINTS_96x112",
    "SEED_TEMPLATE_SETTINGS",
    "TEMPLATES",
    "align_face",
    "estimate_similarity",
    "get_reference_facial_points",
    "template_points",
]

# insightface's `arcface_dst`: the 5-point layout of every 112x112 ArcFace training crop.
ARCFACE_TEMPLATE_112 = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float64,
)

# The 96x112 (w, h) reference of the mtcnn-pytorch / face.evoLVe lineage (SphereFace crops).
REFERENCE_FACIAL_POINTS_96x112 = np.array(
    [
        [30.29459953, 51.69630051],
        [65.53179932, 51.50139999],
        [48.02519989, 71.73660278],
        [33.54930115, 92.3655014],
        [62.72990036, 92.20410156],
    ],
    dtype=np.float64,
)
DEFAULT_CROP_SIZE = (96, 112)  # (w, h) of REFERENCE_FACIAL_POINTS_96x112

# What the official code's align_kfaces.py passes for its 112x112 crops. With a square default and a
# 112x112 output the reference function returns early, so the inner padding is never applied:
# the official code's template is the 96x112 reference shifted by 8 px in x, i.e. arcface_dst.
SEED_TEMPLATE_SETTINGS = {"inner_padding_factor": 0.25, "outer_padding": (0, 0), "default_square": True}

TEMPLATES = ("arcface", "seed")


def get_reference_facial_points(
    output_size: Optional[Tuple[int, int]] = None,
    inner_padding_factor: float = 0.0,
    outer_padding: Tuple[int, int] = (0, 0),
    default_square: bool = False,
) -> np.ndarray:
    """Reference 5 points for a crop of `output_size` = (w, h), as face.evoLVe computes them.

    Steps: start from the 96x112 reference; if `default_square`, widen the crop to 112x112
    (points move right by 8 px). If `output_size` equals that crop, return it as is. Otherwise
    pad each side by `inner_padding_factor` x crop size, scale the padded crop to
    `output_size - 2 * outer_padding`, then shift by `outer_padding`.
    Returns a float64 [5, 2] array of (x, y).
    """
    pts_52 = REFERENCE_FACIAL_POINTS_96x112.copy()
    crop_size = np.array(DEFAULT_CROP_SIZE, dtype=np.int64)
    outer = np.asarray(outer_padding, dtype=np.int64)
    if outer.shape != (2,):
        raise ValueError(f"outer_padding must be (w_pad, h_pad), got {outer_padding!r}")

    if default_square:
        size_diff = crop_size.max() - crop_size
        pts_52 += size_diff / 2.0
        crop_size = crop_size + size_diff

    if output_size is not None:
        output = np.asarray(output_size, dtype=np.int64)
        if output.shape != (2,) or (output <= 0).any():
            raise ValueError(f"output_size must be (w, h) with positive ints, got {output_size!r}")
        if (output == crop_size).all():
            return pts_52

    if inner_padding_factor == 0 and (outer == 0).all():
        if output_size is None:
            return pts_52
        raise ValueError(
            f"no padding requested, so output_size must be None or {tuple(crop_size.tolist())}; "
            f"got {tuple(output_size)}"
        )
    if not 0.0 <= inner_padding_factor <= 1.0:
        raise ValueError(f"inner_padding_factor must be in [0, 1], got {inner_padding_factor}")

    if output_size is None:
        # face.evoLVe means this (its expression calls .astype on a Python float and fails).
        output = (crop_size * (1 + inner_padding_factor * 2)).astype(np.int64) + outer
    if not (outer < output).all():
        raise ValueError(f"outer_padding {tuple(outer.tolist())} must be smaller than output_size "
                         f"{tuple(output.tolist())}")

    if inner_padding_factor > 0:
        size_diff = crop_size * inner_padding_factor * 2
        pts_52 += size_diff / 2.0
        crop_size = crop_size + np.round(size_diff).astype(np.int64)

    inner_size = output - outer * 2
    if inner_size[0] * crop_size[1] != inner_size[1] * crop_size[0]:
        raise ValueError(
            f"output_size - 2 * outer_padding = {tuple(inner_size.tolist())} must have the aspect "
            f"ratio of the padded reference crop {tuple(crop_size.tolist())}"
        )
    scale = inner_size[0] / crop_size[0]
    return pts_52 * scale + outer


def template_points(template: str = "arcface", image_size: int = 112) -> np.ndarray:
    """The [5, 2] float64 destination points of `template` for an `image_size` square crop."""
    if template not in TEMPLATES:
        raise ValueError(f"template must be one of {TEMPLATES}, got {template!r}")
    if not isinstance(image_size, (int, np.integer)) or image_size <= 0:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    if template == "seed":
        return get_reference_facial_points((image_size, image_size), **SEED_TEMPLATE_SETTINGS)
    # insightface's rule: multiples of 112 scale the template; other sizes are read as the
    # 128-px variant (the template scaled by size/128 and shifted right by 8 px of that scale).
    if image_size % 112 == 0:
        return ARCFACE_TEMPLATE_112 * (image_size / 112.0)
    ratio = image_size / 128.0
    return ARCFACE_TEMPLATE_112 * ratio + np.array([8.0 * ratio, 0.0])


def _as_points(name: str, pts: object) -> np.ndarray:
    arr = np.asarray(pts, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 2 or arr.shape[0] < 2:
        raise ValueError(f"{name} must be an [N, 2] array of (x, y) with N >= 2, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or inf: {arr.tolist()}")
    return arr


def estimate_similarity(src_pts: Sequence, dst_pts: Sequence) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation) mapping src onto dst.

    Umeyama (1991): the rotation comes from the SVD of the cross-covariance, with the sign of
    the last singular direction flipped when the best orthogonal map would be a reflection, so
    the result is always a proper rotation. Returns the float64 [2, 3] matrix M with
    dst ≈ M[:, :2] @ src + M[:, 2].
    """
    src_N2 = _as_points("src_pts", src_pts)
    dst_N2 = _as_points("dst_pts", dst_pts)
    if src_N2.shape != dst_N2.shape:
        raise ValueError(f"src_pts {src_N2.shape} and dst_pts {dst_N2.shape} must have the same shape")

    src_mean = src_N2.mean(axis=0)
    dst_mean = dst_N2.mean(axis=0)
    src_c = src_N2 - src_mean
    dst_c = dst_N2 - dst_mean
    src_var = (src_c**2).sum() / len(src_N2)
    if src_var <= 1e-12:
        raise ValueError("src_pts are all the same point: a similarity transform is undefined")

    cov_22 = dst_c.T @ src_c / len(src_N2)
    u_22, sing_2, vt_22 = np.linalg.svd(cov_22)
    # sign(det cov) = sign(det U * det V^T) whenever cov has full rank; testing the factors
    # instead of det(cov) also covers collinear points (det(cov) = 0 up to round-off), where
    # the sign of the null direction is free and must be chosen to give a rotation.
    d_2 = np.ones(2)
    if np.linalg.det(u_22) * np.linalg.det(vt_22) < 0:
        d_2[-1] = -1.0
    rot_22 = u_22 @ np.diag(d_2) @ vt_22
    scale = float(sing_2 @ d_2) / src_var

    m_23 = np.empty((2, 3), dtype=np.float64)
    m_23[:, :2] = scale * rot_22
    m_23[:, 2] = dst_mean - scale * rot_22 @ src_mean
    return m_23


def align_face(
    image: np.ndarray,
    landmarks: Sequence,
    *,
    template: str = "arcface",
    image_size: int = 112,
) -> np.ndarray:
    """Warp `image` (uint8 HxWx3) so that its 5 `landmarks` land on `template`.

    Returns a uint8 [image_size, image_size, 3] crop (bilinear, black outside the source).
    """
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 \
            or image.shape[2] != 3:
        desc = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"image must be a uint8 HxWx3 array, got {desc}")
    lmk_52 = np.asarray(landmarks, dtype=np.float64)
    if lmk_52.shape != (5, 2):
        raise ValueError(
            f"landmarks must have shape (5, 2) (left eye, right eye, nose, left and right mouth "
            f"corners as (x, y)), got {lmk_52.shape}"
        )
    dst_52 = template_points(template, image_size)
    m_23 = estimate_similarity(lmk_52, dst_52)
    return cv2.warpAffine(
        image,
        m_23,
        (image_size, image_size),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=0,
    )
