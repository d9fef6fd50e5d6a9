"""Procedural face renderer: deterministic identities and per-image nuisance, 112x112 RGB.

An identity is a parameter vector (:class:`FaceParams`: face shape, skin/hair/eye colours, eye,
brow, nose and mouth geometry, hair style, glasses, beard, moles ...). Each image of an identity
draws nuisance on top (pose shift/rotation/scale, lighting, blur, noise, an occluder, a small
expression change), scaled by the ``nuisance`` knob. Everything is deterministic for a seed: an
identity's parameters come from ``default_rng([seed, 1, split, ident])`` and image ``k`` of it
from ``default_rng([seed, 2, split, ident, k])``, so any worker can draw any image on its own.
Training identities use split 0; held-out identities use split 1 (same parameter distribution,
a disjoint seed stream). ``unpg.data.synthetic`` writes datasets of these faces.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

SIZE = 112
TRAIN_SPLIT, VAL_SPLIT = 0, 1
# Seed-stream tags. They sit second in the entropy list so streams never collide (numpy's
# SeedSequence treats [a, b] and [a, b, 0] alike; every stream has a fixed length).
_STREAM_IDENTITY, _STREAM_IMAGE, _STREAM_PAIRS = 1, 2, 3
_SHIFT = 4  # cv2 sub-pixel bits: coordinates are passed multiplied by 16
_ONE = 1 << _SHIFT
_AA = cv2.LINE_AA

_HAIR = np.array([(30, 25, 22), (70, 45, 30), (115, 75, 45), (200, 165, 100), (150, 65, 30),
                  (150, 150, 150), (225, 222, 215), (60, 80, 170), (190, 70, 140)], np.float64)
_HAIR_P = np.array([0.22, 0.2, 0.15, 0.12, 0.08, 0.09, 0.06, 0.04, 0.04])
_IRIS = np.array([(90, 55, 30), (40, 30, 25), (70, 110, 170), (80, 120, 70), (120, 130, 140),
                  (130, 100, 50)], np.float64)


@dataclass(frozen=True)
class FaceParams:
    """One identity. Lengths in pixels of the canonical 112x112 frame, colours RGB 0..255."""

    cx: float
    cy: float
    face_w: float
    face_h: float
    jaw_square: float  # superellipse exponent of the lower face (2 = ellipse)
    jaw_taper: float
    skin: tuple
    hair: tuple
    hair_style: int  # 0 bald, 1 short, 2 medium, 3 bangs, 4 long, 5 curly, 6 side part
    hair_volume: float
    hairline: float
    hair_recess: float
    hair_slope: float
    ear_w: float
    ear_h: float
    eye_y: float
    eye_dx: float
    eye_w: float
    eye_h: float
    eye_tilt: float
    iris: tuple
    brow_gap: float
    brow_len: float
    brow_thick: float
    brow_angle: float
    brow_arch: float
    brow_color: tuple
    nose_len: float
    nose_w: float
    nose_style: int
    mouth_gap: float
    mouth_w: float
    mouth_curve: float
    lip_up: float
    lip_low: float
    lip_color: tuple
    beard: int  # 0 none, 1 moustache, 2 goatee, 3 full
    glasses: int  # 0 none, 1 round, 2 rectangular, 3 sunglasses
    glasses_color: tuple
    glasses_thick: float
    moles: tuple  # ((u, v, radius), ...) in face-relative units


def _col(c) -> tuple:
    return tuple(min(255.0, max(0.0, float(v))) for v in c)


def sample_identity(rng: np.random.Generator) -> FaceParams:
    """Draw one identity's parameters (wide spread over many attributes)."""
    u = rng.uniform
    face_w, face_h = u(33, 45), u(46, 58)
    cy = 60 + u(-3, 3)
    eye_y = u(45, 55)
    tone = u(0, 1)
    skin = np.array([236, 205, 180]) * (1 - tone) + np.array([92, 58, 40]) * tone
    skin = skin + rng.normal(0, 9, 3)
    hair = _HAIR[rng.choice(len(_HAIR), p=_HAIR_P)] + rng.normal(0, 12, 3)
    style = int(rng.integers(0, 7))
    top = cy - face_h
    hairline = top + u(0.3, 0.75) * (eye_y - 16 - top)
    if style == 3:  # bangs: low, flat fringe
        hairline = eye_y - u(12, 17)
    lip = skin * 0.55 + np.array([190, 70, 80]) * 0.45 + rng.normal(0, 10, 3)
    brow = hair * u(0.45, 1.0) if rng.random() < 0.8 else np.full(3, u(25, 60))
    n_moles = int(rng.choice(4, p=[0.45, 0.3, 0.15, 0.1]))
    moles = tuple((float(u(-0.7, 0.7)), float(u(-0.5, 0.7)), float(u(1.2, 2.2)))
                  for _ in range(n_moles))
    glasses = int(rng.choice(4, p=[0.62, 0.15, 0.15, 0.08]))
    return FaceParams(
        cx=56 + u(-2, 2), cy=cy, face_w=face_w, face_h=face_h,
        jaw_square=u(2.0, 3.4), jaw_taper=u(0.0, 0.32),
        skin=_col(skin), hair=_col(hair), hair_style=style, hair_volume=u(1.5, 9),
        hairline=hairline, hair_recess=u(0, 9), hair_slope=u(-7, 7) if style == 6 else 0.0,
        ear_w=u(3.5, 6.5), ear_h=u(8, 13),
        eye_y=eye_y, eye_dx=u(14, 21), eye_w=u(5, 8.5), eye_h=u(2.2, 4.5), eye_tilt=u(-10, 10),
        iris=_col(_IRIS[rng.integers(len(_IRIS))] + rng.normal(0, 10, 3)),
        brow_gap=u(5, 11), brow_len=u(10, 18), brow_thick=u(1.2, 3.8), brow_angle=u(-15, 20),
        brow_arch=u(0, 4), brow_color=_col(brow),
        nose_len=u(12, 23), nose_w=u(3.5, 8.5), nose_style=int(rng.integers(0, 3)),
        mouth_gap=u(8, 15), mouth_w=u(8.5, 15), mouth_curve=u(-0.3, 0.5),
        lip_up=u(1.0, 3.0), lip_low=u(1.5, 4.5), lip_color=_col(lip),
        beard=int(rng.choice(4, p=[0.65, 0.12, 0.1, 0.13])), glasses=glasses,
        glasses_color=_col(rng.uniform(10, 200, 3) if rng.random() < 0.4 else np.full(3, u(15, 60))),
        glasses_thick=u(1.0, 2.5), moles=moles,
    )


def _pts(xs, ys) -> np.ndarray:
    """Float coordinates -> int32 sub-pixel polygon for cv2 drawing with shift=_SHIFT."""
    return np.round(np.stack([xs, ys], -1) * _ONE).astype(np.int32)


_CIRCLE_T = np.linspace(0, 2 * np.pi, 24, endpoint=False)


def _ellipse(img, c, axes, angle, color, thickness=-1, start=0, end=360) -> None:
    """Sub-pixel ellipse (or arc from ``start`` to ``end`` degrees), filled when thickness < 0.

    cv2.ellipse approximates ellipses under 3 px by a diamond and under 10 px by a 12-gon;
    pupils, moles and eyes are that small, so draw our own 24-gon instead.
    """
    closed = end - start >= 360
    t = _CIRCLE_T if closed else np.radians(np.linspace(start, end, 13))
    x, y = axes[0] * np.cos(t), axes[1] * np.sin(t)
    if angle:
        ca, sa = math.cos(math.radians(angle)), math.sin(math.radians(angle))
        x, y = x * ca - y * sa, x * sa + y * ca
    pts = _pts(c[0] + x, c[1] + y)
    if thickness < 0:
        cv2.fillPoly(img, [pts], color, _AA, _SHIFT)
    else:
        cv2.polylines(img, [pts], closed, color, thickness, _AA, _SHIFT)


def _face_contour(p: FaceParams, grow: float = 0.0, dy: float = 0.0, n: int = 48):
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    c, s = np.cos(t), np.sin(t)
    low = s > 0  # lower half (y grows downwards): squarer jaw, tapered towards the chin
    e = np.where(low, 2.0 / p.jaw_square, 1.0)
    x = np.sign(c) * np.abs(c) ** e * (1 - p.jaw_taper * np.where(low, s, 0) ** 2)
    y = np.sign(s) * np.abs(s) ** e
    return p.cx + (p.face_w + grow) * x, p.cy + dy + (p.face_h + grow) * y


def _draw_head(img: np.ndarray, p: FaceParams) -> tuple:
    """Neck, hair mass, ears, the skin below the hairline, moles; returns the face contour."""
    skin, hair = p.skin, p.hair
    dark_skin = _col(np.array(skin) * 0.8)
    fx, fy = _face_contour(p)
    hair_bottom = {1: p.eye_y + 2, 2: p.eye_y + 14, 3: p.eye_y + 4, 4: p.cy + p.face_h + 12,
                   5: p.eye_y + 10, 6: p.eye_y + 6}.get(p.hair_style)
    nw = p.face_w * 0.45
    cv2.rectangle(img, (int((p.cx - nw) * _ONE), int((p.cy + p.face_h * 0.4) * _ONE)),
                  (int((p.cx + nw) * _ONE), SIZE * _ONE), dark_skin, -1, _AA, _SHIFT)
    fy_skin = fy
    if hair_bottom is not None:
        # The hair mass is a grown head contour cut flat at the style's length; the skin drawn
        # next covers it below the hairline curve.
        hx, hy = _face_contour(p, grow=p.hair_volume, dy=-p.hair_volume * 0.5, n=40)
        if p.hair_style == 4:
            hx = np.where(hy > p.cy, p.cx + (hx - p.cx) * 1.08, hx)
        cv2.fillPoly(img, [_pts(hx, np.minimum(hy, hair_bottom))], hair, _AA, _SHIFT)
        if p.hair_style == 5:  # curly: bumps along the top of the hair outline
            for k in range(0, 40, 3):
                if hy[k] < p.eye_y - 4:
                    _ellipse(img, (hx[k], hy[k]), (p.hair_volume * 0.7 + 2,) * 2, 0, hair)
        uu = np.clip((fx - p.cx) / p.face_w, -1, 1)
        fy_skin = np.maximum(fy, p.hairline + p.hair_recess * uu ** 2 + p.hair_slope * uu)
    if p.hair_style != 4:  # long hair hides the ears
        for side in (-1, 1):
            _ellipse(img, (p.cx + side * p.face_w * 0.97, p.eye_y + 5), (p.ear_w, p.ear_h), 0,
                     dark_skin)
    cv2.fillPoly(img, [_pts(fx, fy_skin)], skin, _AA, _SHIFT)
    if p.hair_style == 4:  # long hair: curtains over the sides of the face
        for side in (-1, 1):
            x0 = p.cx + side * p.face_w
            xs = np.array([x0 + side * 3, x0 - side * p.face_w * 0.22,
                           x0 - side * p.face_w * 0.12, x0 + side * 3])
            ys = np.array([p.hairline, p.hairline + 4, p.cy + p.face_h + 12, p.cy + p.face_h + 12])
            cv2.fillPoly(img, [_pts(xs, ys)], hair, _AA, _SHIFT)
    for m_u, m_v, r in p.moles:
        _ellipse(img, (p.cx + m_u * p.face_w, p.cy + m_v * p.face_h), (r, r), 0,
                 _col(np.array(skin) * 0.35))
    return fx, fy


def _draw_eyes(img: np.ndarray, p: FaceParams, eye_open: float, brow_raise: float) -> None:
    lid = _col(np.array(p.skin) * 0.35)
    bt = np.linspace(-0.5, 0.5, 7)
    a = math.radians(p.brow_angle)
    for side in (-1, 1):
        ex = p.cx + side * p.eye_dx
        ang, eh = side * p.eye_tilt, p.eye_h * eye_open
        if p.glasses != 3:  # sunglasses hide the eyes
            _ellipse(img, (ex, p.eye_y), (p.eye_w, eh), ang, (238, 236, 230))
            ir = min(p.eye_h * 0.95, p.eye_w * 0.55)
            _ellipse(img, (ex, p.eye_y), (ir, min(ir, eh)), 0, p.iris)
            _ellipse(img, (ex, p.eye_y), (ir * 0.45, min(ir * 0.45, eh)), 0, (20, 18, 18))
            _ellipse(img, (ex, p.eye_y), (p.eye_w, eh), ang, lid, 1, 180, 360)
        bx = ex + side * bt * p.brow_len * math.cos(a)
        by = (p.eye_y - p.brow_gap - brow_raise + bt * p.brow_len * math.sin(a)
              - p.brow_arch * (1 - 4 * bt ** 2))
        cv2.polylines(img, [_pts(bx, by)], False, p.brow_color, max(1, round(p.brow_thick)),
                      _AA, _SHIFT)


def _draw_nose_mouth(img: np.ndarray, p: FaceParams, fx, fy, curve: float,
                     mouth_open: float) -> None:
    """Nose, beard and lips; ``curve`` > 0 raises the mouth corners (smile)."""
    skin = np.array(p.skin)
    tip_y = p.eye_y + p.nose_len
    mouth_y = min(tip_y + p.mouth_gap, p.cy + p.face_h * 0.82)
    if p.beard == 3:  # full beard: the face below the nose tip; the mouth is drawn over it
        sel = fy > tip_y - 2
        cv2.fillPoly(img, [_pts(fx[sel], fy[sel])], p.hair, _AA, _SHIFT)
    elif p.beard == 2:  # goatee
        _ellipse(img, (p.cx, mouth_y + p.lip_low + 5), (p.mouth_w * 0.6, 5), 0, p.hair)
    if p.nose_style in (0, 1):  # side line(s) of the nose
        for side in ((-1, 1) if p.nose_style == 0 else (1,)):
            xs = np.array([p.cx + side * 2.5, p.cx + side * p.nose_w * 0.7])
            cv2.polylines(img, [_pts(xs, np.array([p.eye_y + 5, tip_y - 1]))], False,
                          _col(skin * 0.62), 1, _AA, _SHIFT)
    else:  # a shaded tip
        _ellipse(img, (p.cx, tip_y - 2), (p.nose_w * 0.6, 3), 0, _col(skin * 0.8))
    for side in (-1, 1):
        _ellipse(img, (p.cx + side * p.nose_w * 0.5, tip_y), (p.nose_w * 0.28 + 0.6, 1.4), 0,
                 _col(skin * 0.4))
    mu = np.linspace(-1, 1, 13)
    mid = mouth_y - curve * p.mouth_w * 0.4 * mu ** 2
    mx = p.cx + mu * p.mouth_w
    ring_x = np.concatenate([mx, mx[::-1]])
    bow = 1 - mu ** 2
    up = mid - mouth_open / 2 - p.lip_up * np.sqrt(bow) * (1 - 0.35 * np.exp(-(mu * 6) ** 2))
    lo = mid + mouth_open / 2 + p.lip_low * bow ** 0.7
    if p.beard in (1, 3):  # moustache
        mo = mid - p.lip_up - 2
        cv2.fillPoly(img, [_pts(ring_x, np.concatenate([mo - 3.5 * bow, mo[::-1] + 0.5]))],
                     p.hair, _AA, _SHIFT)
    cv2.fillPoly(img, [_pts(ring_x, np.concatenate([up, lo[::-1]]))], p.lip_color, _AA, _SHIFT)
    gap = _col(np.array(p.lip_color) * 0.35)
    if mouth_open > 0.6:
        inner = np.concatenate([mid - mouth_open / 2, mid[::-1] + mouth_open / 2])
        cv2.fillPoly(img, [_pts(ring_x, inner)], gap, _AA, _SHIFT)
    else:
        cv2.polylines(img, [_pts(mx, mid)], False, gap, 1, _AA, _SHIFT)


def _draw_glasses(img: np.ndarray, p: FaceParams) -> None:
    th, r, color = max(1, round(p.glasses_thick)), p.eye_w + 3.5, p.glasses_color
    for side in (-1, 1):
        ex = p.cx + side * p.eye_dx
        if p.glasses == 2:
            cv2.rectangle(img, (int((ex - r) * _ONE), int((p.eye_y - r * 0.7) * _ONE)),
                          (int((ex + r) * _ONE), int((p.eye_y + r * 0.7) * _ONE)),
                          color, th, _AA, _SHIFT)
        elif p.glasses == 3:
            _ellipse(img, (ex, p.eye_y), (r, r * 0.8), 0, (25, 25, 30))
        else:
            _ellipse(img, (ex, p.eye_y), (r, r * 0.8), 0, color, th)
        xs = np.array([ex + side * r, p.cx + side * p.face_w])  # temple arm
        cv2.polylines(img, [_pts(xs, np.array([p.eye_y, p.eye_y - 1]))], False, color, th,
                      _AA, _SHIFT)
    xs = np.array([p.cx - p.eye_dx + r, p.cx, p.cx + p.eye_dx - r])  # bridge
    cv2.polylines(img, [_pts(xs, np.array([p.eye_y - 1, p.eye_y - 2.5, p.eye_y - 1]))], False,
                  color, th, _AA, _SHIFT)


def _draw_identity(img: np.ndarray, p: FaceParams, curve: float, mouth_open: float,
                   eye_open: float, brow_raise: float) -> None:
    """Draw the face in the canonical frame, back to front (expression already perturbed)."""
    fx, fy = _draw_head(img, p)
    _draw_eyes(img, p, eye_open, brow_raise)
    _draw_nose_mouth(img, p, fx, fy, curve, mouth_open)
    if p.glasses:
        _draw_glasses(img, p)


_NOISE_PAD = 48
_NOISE: list = []


def _noise_bank() -> np.ndarray:
    """A fixed field of unit Gaussian noise; images take seeded crops of it.

    Drawing 112*112*3 fresh normals costs ~0.7 ms, more than all the drawing together.
    """
    if not _NOISE:
        rng = np.random.default_rng(0x5EED)
        _NOISE.append(rng.standard_normal((SIZE + _NOISE_PAD, SIZE + _NOISE_PAD, 3),
                                          dtype=np.float32))
    return _NOISE[0]


_GRID_X, _GRID_Y = np.meshgrid(np.linspace(-0.5, 0.5, SIZE, dtype=np.float32),
                               np.linspace(-0.5, 0.5, SIZE, dtype=np.float32))


def render_face(params: FaceParams, rng: np.random.Generator, nuisance: float = 1.0) -> np.ndarray:
    """Render one image of an identity: uint8 [112, 112, 3], RGB.

    ``rng`` supplies the nuisance. Every draw happens whatever the branch and the strength, so
    one rng gives the same underlying draws at any ``nuisance`` (0 gives the clean face).
    """
    n = float(nuisance)
    g = rng.standard_normal(12)
    un = rng.random(12)
    bg = np.array([128.0, 128.0, 128.0]) * (1 - min(n, 1)) + rng.uniform(25, 230, 3) * min(n, 1)
    img = np.empty((SIZE, SIZE, 3), np.uint8)
    img[:] = np.round(bg).astype(np.uint8)
    _draw_identity(img, params, curve=params.mouth_curve + 0.12 * n * g[0],
                   mouth_open=3.0 * un[0] * n if un[1] < 0.3 * n else 0.0,
                   eye_open=math.exp(0.1 * n * float(np.clip(g[1], -2, 2))),
                   brow_raise=1.0 * n * g[2])
    # Pose: rotation, scale and shift about the face centre.
    angle = 6.0 * n * float(np.clip(g[3], -2.5, 2.5))
    scale = math.exp(0.05 * n * float(np.clip(g[4], -2.5, 2.5)))
    m = cv2.getRotationMatrix2D((params.cx, params.cy), angle, scale)
    m[:, 2] += 3.0 * n * np.clip(g[5:7], -2.5, 2.5)
    if n > 0:
        img = cv2.warpAffine(img, m, (SIZE, SIZE), flags=cv2.INTER_LINEAR,
                             borderMode=cv2.BORDER_REPLICATE)
    # Occluder: a rectangle or a long bar of a random colour, somewhere on the image.
    if un[2] < 0.25 * n:
        cxo, cyo = 10 + 92 * un[3], 10 + 92 * un[4]
        w, h = (18 + 30 * un[5], 8 + 22 * un[6]) if un[7] < 0.5 else (70 + 40 * un[5], 4 + 6 * un[6])
        rect = ((float(cxo), float(cyo)), (float(w), float(h)), float(180 * un[8]))
        box = cv2.boxPoints(rect)
        color = tuple(float(v) for v in rng.uniform(0, 255, 3))
        cv2.fillPoly(img, [np.round(box * _ONE).astype(np.int32)], color, _AA, _SHIFT)
    else:
        rng.uniform(0, 255, 3)  # keep the stream aligned across branches
    if un[9] < 0.4 * n:
        img = cv2.GaussianBlur(img, (0, 0), 0.3 + 0.9 * un[10])
    # Lighting: contrast about mid-grey, brightness, colour cast and a linear gradient.
    contrast = math.exp(0.12 * n * float(np.clip(g[7], -2.5, 2.5)))
    cast = 15.0 * n * g[8] + 7.0 * n * rng.standard_normal(3)
    ga = 35.0 * n * un[11]
    theta = 2 * math.pi * rng.random()
    grad = (ga * math.cos(theta)) * _GRID_X + (ga * math.sin(theta)) * _GRID_Y
    noise_sigma = 6.0 * n * rng.random()
    ox, oy = rng.integers(0, _NOISE_PAD + 1, 2)
    if n == 0:
        return img
    # One float32 offset map, then a single saturating pass: out = contrast * img + offset.
    offset = _noise_bank()[oy:oy + SIZE, ox:ox + SIZE] * np.float32(noise_sigma)
    offset += grad[:, :, None]
    offset += (128.0 * (1.0 - contrast) + cast).astype(np.float32)
    return cv2.addWeighted(img, contrast, offset, 1.0, 0.0, dtype=cv2.CV_8U)


def identity_rng(seed: int, split: int, ident: int) -> np.random.Generator:
    """The stream :func:`sample_identity` draws identity ``ident`` of ``split`` from."""
    return np.random.default_rng([seed, _STREAM_IDENTITY, split, ident])


def image_rng(seed: int, split: int, ident: int, k: int) -> np.random.Generator:
    """The nuisance stream of image ``k`` of that identity (independent of every other image)."""
    return np.random.default_rng([seed, _STREAM_IMAGE, split, ident, k])


def render_image(seed: int, split: int, ident: int, k: int, nuisance: float = 1.0) -> np.ndarray:
    """Image ``k`` of identity ``ident`` of ``split`` (0 train, 1 held-out), RGB uint8."""
    params = sample_identity(identity_rng(seed, split, ident))
    return render_face(params, image_rng(seed, split, ident, k), nuisance)


def encode_jpeg(rgb: np.ndarray, quality: int) -> bytes:
    """JPEG bytes of an RGB image (cv2 encodes BGR, so the channels are flipped first)."""
    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(rgb[:, :, ::-1]),
                           [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    assert ok, "cv2.imencode failed on a uint8 HxWx3 array"
    return buf.tobytes()

