"""Tests for unpg.data.align: similarity fit, templates and the warp."""
import cv2
import numpy as np
import pytest

from unpg.data.align import (
    ARCFACE_TEMPLATE_112,
    REFERENCE_FACIAL_POINTS_96x112,
    align_face,
    estimate_similarity,
    get_reference_facial_points,
    template_points,
)


def _similarity(scale, theta, tx, ty):
    c, s = np.cos(theta), np.sin(theta)
    return np.array([[scale * c, -scale * s, tx], [scale * s, scale * c, ty]])


def _apply(m_23, pts):
    return pts @ m_23[:, :2].T + m_23[:, 2]


def _lstsq_similarity(src, dst):
    """Independent fit: x' = a x - b y + tx, y' = b x + a y + ty is linear in (a, b, tx, ty)."""
    rows, rhs = [], []
    for (x, y), (u, v) in zip(src, dst):
        rows += [[x, -y, 1, 0], [y, x, 0, 1]]
        rhs += [u, v]
    a, b, tx, ty = np.linalg.lstsq(np.array(rows), np.array(rhs), rcond=None)[0]
    return np.array([[a, -b, tx], [b, a, ty]])


@pytest.mark.parametrize("seed", range(5))
def test_similarity_recovers_known_transform(seed):
    rng = np.random.default_rng(seed)
    src = rng.uniform(-50, 150, size=(5, 2))
    true = _similarity(rng.uniform(0.2, 3.0), rng.uniform(-np.pi, np.pi), *rng.uniform(-100, 100, 2))
    m = estimate_similarity(src, _apply(true, src))
    assert m.dtype == np.float64 and m.shape == (2, 3)
    np.testing.assert_allclose(m, true, rtol=0, atol=1e-10)


def test_similarity_maps_landmarks_onto_template():
    rng = np.random.default_rng(7)
    true = _similarity(2.3, 0.4, 300.0, -20.0)
    landmarks = _apply(true, ARCFACE_TEMPLATE_112)  # a face 2.3x larger, rotated, shifted
    m = estimate_similarity(landmarks, ARCFACE_TEMPLATE_112)
    np.testing.assert_allclose(_apply(m, landmarks), ARCFACE_TEMPLATE_112, atol=1e-10)
    # With noise it is the least-squares optimum, same as the independent linear solve.
    noisy = landmarks + rng.normal(0, 2.0, landmarks.shape)
    np.testing.assert_allclose(estimate_similarity(noisy, ARCFACE_TEMPLATE_112),
                               _lstsq_similarity(noisy, ARCFACE_TEMPLATE_112), atol=1e-9)


def test_similarity_reflection_gives_best_rotation_not_mirror():
    mirrored = ARCFACE_TEMPLATE_112 * np.array([-1.0, 1.0]) + np.array([112.0, 0.0])
    m = estimate_similarity(mirrored, ARCFACE_TEMPLATE_112)
    assert np.linalg.det(m[:, :2]) > 0  # a proper rotation times a positive scale
    np.testing.assert_allclose(m, _lstsq_similarity(mirrored, ARCFACE_TEMPLATE_112), atol=1e-9)
    # Points whose best orthogonal fit is a pure reflection: the fit must still be a rotation.
    src = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.5, 0.2]])
    dst = src[:, ::-1].copy()
    m = estimate_similarity(src, dst)
    assert np.linalg.det(m[:, :2]) > 0
    np.testing.assert_allclose(m, _lstsq_similarity(src, dst), atol=1e-9)


def test_similarity_collinear_points_are_a_rotation():
    src = np.array([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0], [3.0, 3.0], [4.0, 4.0]])
    true = _similarity(1.5, 0.3, 5.0, 7.0)
    m = estimate_similarity(src, _apply(true, src))
    np.testing.assert_allclose(m, true, atol=1e-9)


def test_similarity_bad_input():
    with pytest.raises(ValueError, match="same shape"):
        estimate_similarity(np.zeros((5, 2)) + np.arange(5)[:, None], np.zeros((4, 2)))
    with pytest.raises(ValueError, match="same point"):
        estimate_similarity(np.ones((5, 2)), ARCFACE_TEMPLATE_112)
    with pytest.raises(ValueError, match=r"\[N, 2\]"):
        estimate_similarity(np.zeros((5, 3)), np.zeros((5, 3)))


def test_reference_points_square_is_reference_plus_8():
    # default_square widens 96x112 to 112x112 by 8 px on each side; output 112x112 returns it.
    expected = REFERENCE_FACIAL_POINTS_96x112 + np.array([8.0, 0.0])
    got = get_reference_facial_points((112, 112), 0.0, (0, 0), True)
    np.testing.assert_allclose(got, expected, atol=1e-12)
    # The official code's own settings (inner padding 0.25) take the same early return...
    np.testing.assert_allclose(template_points("seed", 112), expected, atol=1e-12)
    # ...and that is insightface's arcface_dst up to its 4 printed decimals.
    np.testing.assert_allclose(expected, ARCFACE_TEMPLATE_112, atol=1e-4)


def test_reference_points_padding_formula():
    ref = REFERENCE_FACIAL_POINTS_96x112
    # Inner padding 0.25 on a 112 square: +28 px each side -> 168, then scaled to 224.
    got = get_reference_facial_points((224, 224), 0.25, (0, 0), True)
    np.testing.assert_allclose(got, (ref + [8.0, 0.0] + 28.0) * (224 / 168), atol=1e-9)
    # Outer padding only: the 112 square is kept at scale 1 and shifted by the padding.
    got = get_reference_facial_points((120, 120), 0.0, (4, 4), True)
    np.testing.assert_allclose(got, ref + [8.0, 0.0] + 4.0, atol=1e-9)
    # Not square: 96x112 with inner padding 0.5 -> 192x224, scaled to 96x112 (factor 0.5).
    got = get_reference_facial_points((96, 112), 0.5, (0, 0), False)
    np.testing.assert_allclose(got, ref, atol=1e-12)  # (96, 112) == crop: early return
    got = get_reference_facial_points((192, 224), 0.5, (0, 0), False)
    np.testing.assert_allclose(got, ref + [48.0, 56.0], atol=1e-9)
    # Output size deduced from the paddings.
    got = get_reference_facial_points(None, 0.5, (0, 0), False)
    np.testing.assert_allclose(got, ref + [48.0, 56.0], atol=1e-9)


def test_reference_points_errors():
    with pytest.raises(ValueError, match="aspect ratio"):
        get_reference_facial_points((112, 150), 0.25, (0, 0), True)
    with pytest.raises(ValueError, match="no padding"):
        get_reference_facial_points((200, 200), 0.0, (0, 0), True)
    with pytest.raises(ValueError, match="inner_padding_factor"):
        get_reference_facial_points((200, 200), 1.5, (0, 0), True)


def test_template_points_sizes_and_errors():
    np.testing.assert_allclose(template_points("arcface", 224), ARCFACE_TEMPLATE_112 * 2)
    np.testing.assert_allclose(template_points("arcface", 128), ARCFACE_TEMPLATE_112 + [8.0, 0.0])
    with pytest.raises(ValueError, match="arcface.*seed"):
        template_points("mtcnn")
    with pytest.raises(ValueError, match="image_size"):
        template_points("arcface", 0)


def _textured_image(h, w, seed=0):
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(h // 8, w // 8, 3), dtype=np.uint8)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)


@pytest.mark.parametrize("template", ["arcface", "seed"])
def test_align_face_shape_dtype_and_identity(template):
    image = _textured_image(112, 112)
    out = align_face(image, template_points(template, 112), template=template)
    assert out.shape == (112, 112, 3) and out.dtype == np.uint8
    m = estimate_similarity(template_points(template, 112), template_points(template, 112))
    np.testing.assert_allclose(m, np.eye(2, 3), atol=1e-12)
    # The identity warp reproduces the pixels (cv2's fixed-point bilinear: at most 1 off).
    assert np.abs(out.astype(int) - image.astype(int)).max() <= 1
    larger = align_face(_textured_image(300, 400), template_points(template, 224) + 30,
                        template=template, image_size=224)
    assert larger.shape == (224, 224, 3)


def test_align_face_undoes_a_known_warp():
    crop = _textured_image(112, 112, seed=3)
    true = _similarity(1.8, np.deg2rad(20), 90.0, 40.0)  # crop coords -> photo coords
    photo = cv2.warpAffine(crop, true, (320, 320), flags=cv2.INTER_LINEAR)
    out = align_face(photo, _apply(true, ARCFACE_TEMPLATE_112))
    # The interior comes back up to two bilinear resamplings.
    diff = np.abs(out[8:104, 8:104].astype(int) - crop[8:104, 8:104].astype(int))
    assert diff.mean() < 4, diff.mean()


def test_align_face_black_border_and_validation():
    image = np.full((50, 50, 3), 200, np.uint8)
    out = align_face(image, ARCFACE_TEMPLATE_112 * 0.3 - 5)  # crop corner maps to (-5, -5)
    assert out[0, 0].tolist() == [0, 0, 0] and out[56, 56].tolist() == [200, 200, 200]
    with pytest.raises(ValueError, match=r"\(5, 2\)"):
        align_face(image, np.zeros((4, 2)))
    with pytest.raises(ValueError, match="uint8 HxWx3"):
        align_face(image.astype(np.float32), ARCFACE_TEMPLATE_112)
    with pytest.raises(ValueError, match="uint8 HxWx3"):
        align_face(image[:, :, 0], ARCFACE_TEMPLATE_112)
    with pytest.raises(ValueError, match="template must be one of"):
        align_face(image, ARCFACE_TEMPLATE_112, template="dlib")
