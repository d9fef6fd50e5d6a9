"""Tests for unpg.data.detect: weights, priors, decoding, NMS and detection on real photos."""
import math

import cv2
import numpy as np
import pytest
import torch

from unpg.data.align import ARCFACE_TEMPLATE_112, align_face, estimate_similarity
from unpg.data.detect import (
    RetinaFace,
    RetinaFaceDetector,
    decode_boxes,
    decode_landmarks,
    load_retinaface,
    nms,
    prior_boxes,
)

WEIGHTS = "retinaface_mobilenet0.25.pth"


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    # These images are small: with several test processes sharing 2 cores, OpenMP barriers
    # of a multi-threaded forward cost up to seconds per call, one thread takes ~40 ms.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def weights_path(models_dir):
    return models_dir / WEIGHTS


@pytest.fixture(scope="module")
def detector(weights_path):
    return RetinaFaceDetector(weights_path)


@pytest.fixture(scope="module")
def t1_result(detector, fixtures_dir):
    image = cv2.imread(str(fixtures_dir / "real_faces" / "t1.jpg"))
    return image, detector.detect(image)


def _read(fixtures_dir, name):
    image = cv2.imread(str(fixtures_dir / "real_faces" / name))
    assert image is not None, name
    return image


def _check_anatomy(box, lmk):
    """Landmarks inside the box; eyes above nose above mouth; left before right."""
    x1, y1, x2, y2 = box[:4]
    assert (lmk[:, 0] >= x1).all() and (lmk[:, 0] <= x2).all()
    assert (lmk[:, 1] >= y1).all() and (lmk[:, 1] <= y2).all()
    left_eye, right_eye, nose, left_mouth, right_mouth = lmk
    assert left_eye[0] < right_eye[0] and left_mouth[0] < right_mouth[0]
    assert max(left_eye[1], right_eye[1]) < nose[1] < min(left_mouth[1], right_mouth[1])


# ------------------------------------------------------------------------- weights
def test_weights_load_strict(weights_path):
    state = torch.load(weights_path, map_location="cpu", weights_only=True)
    model = RetinaFace()
    assert set(model.state_dict()) == set(state) and len(state) == 300
    loaded = load_retinaface(weights_path)
    for name, tensor in loaded.state_dict().items():
        torch.testing.assert_close(tensor, state[name], rtol=0, atol=0)
    assert not loaded.training


def test_weights_with_module_prefix_and_wrapper(weights_path, tmp_path):
    state = torch.load(weights_path, map_location="cpu", weights_only=True)
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, wrapped)
    loaded = load_retinaface(wrapped)
    for name, tensor in loaded.state_dict().items():
        torch.testing.assert_close(tensor, state[name], rtol=0, atol=0)


def test_weights_errors(weights_path, tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match=r"nope\.pth.*--detector-weights"):
        RetinaFaceDetector(missing)
    state = torch.load(weights_path, map_location="cpu", weights_only=True)
    state.pop("LandmarkHead.2.conv1x1.bias")
    partial = tmp_path / "partial.pth"
    torch.save(state, partial)
    with pytest.raises(ValueError, match=r"(?s)partial\.pth is not a RetinaFace.*LandmarkHead\.2\.conv1x1\.bias"):
        load_retinaface(partial)
    not_dict = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), not_dict)
    with pytest.raises(ValueError, match="not a state dict"):
        load_retinaface(not_dict)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="weights_only=True"):
        load_retinaface(garbage)


def test_bad_arguments(weights_path, detector):
    with pytest.raises(ValueError, match="conf_threshold"):
        RetinaFaceDetector(weights_path, conf_threshold=1.5)
    with pytest.raises(ValueError, match="device"):
        RetinaFaceDetector(weights_path, device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            RetinaFaceDetector(weights_path, device="cuda")
    with pytest.raises(ValueError, match="uint8 HxWx3"):
        detector.detect(np.zeros((64, 64, 3), np.float32))
    with pytest.raises(ValueError, match="uint8 HxWx3"):
        detector.detect(np.zeros((64, 64), np.uint8))


# ------------------------------------------------------------------ priors / decoding
def test_prior_boxes_hand_computed():
    pri = prior_boxes(16, 24).numpy()
    # step 8: 2x3 cells, step 16: 1x2 cells, step 32: 1x1 cell; two sizes per cell.
    assert pri.shape == (2 * 3 * 2 + 1 * 2 * 2 + 1 * 1 * 2, 4)
    expected_head = [
        [4, 4, 16, 16], [4, 4, 32, 32],      # row 0, col 0
        [12, 4, 16, 16], [12, 4, 32, 32],    # row 0, col 1
        [20, 4, 16, 16], [20, 4, 32, 32],    # row 0, col 2
        [4, 12, 16, 16],                     # row 1, col 0
    ]
    np.testing.assert_array_equal(pri[:7], expected_head)
    np.testing.assert_array_equal(pri[12:16], [[8, 8, 64, 64], [8, 8, 128, 128],
                                               [24, 8, 64, 64], [24, 8, 128, 128]])
    np.testing.assert_array_equal(pri[16:], [[16, 16, 256, 256], [16, 16, 512, 512]])
    # The count matches what the network emits for that input size.
    with torch.inference_mode():
        loc, conf, landm = RetinaFace().eval()(torch.zeros(1, 3, 37, 50))
    assert loc.shape[1] == conf.shape[1] == landm.shape[1] == prior_boxes(37, 50).shape[0]


def test_decode_hand_computed():
    priors = torch.tensor([[100.0, 50.0, 32.0, 32.0]])
    loc = torch.tensor([[0.5, -0.25, math.log(2.0) / 0.2, 0.0]])
    # centre (100 + 0.5*0.1*32, 50 - 0.25*0.1*32) = (101.6, 49.2); size (64, 32).
    torch.testing.assert_close(decode_boxes(loc, priors),
                               torch.tensor([[69.6, 33.2, 133.6, 65.2]]))
    pre = torch.tensor([[0.0, 0.0, 1.0, -1.0, 2.5, 0.5, -3.0, 1.0, 0.25, 4.0]])
    expected = torch.tensor([[[100.0, 50.0], [103.2, 46.8], [108.0, 51.6],
                              [90.4, 53.2], [100.8, 62.8]]])
    torch.testing.assert_close(decode_landmarks(pre, priors), expected)


def _iou(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def _nms_reference(boxes, scores, thr):
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    keep = []
    for i in order:
        if all(_iou(boxes[i], boxes[k]) <= thr for k in keep):
            keep.append(i)
    return keep


@pytest.mark.parametrize("seed,thr", [(0, 0.4), (1, 0.3), (2, 0.5), (3, 0.7)])
def test_nms_matches_bruteforce(seed, thr):
    rng = np.random.default_rng(seed)
    centres = rng.uniform(0, 200, size=(6, 2))  # clusters so that many boxes overlap
    xy = centres[rng.integers(0, 6, 120)] + rng.normal(0, 8, (120, 2))
    wh = rng.uniform(10, 60, (120, 2))
    boxes = np.concatenate([xy - wh / 2, xy + wh / 2], axis=1)
    scores = rng.permutation(120) / 120.0  # distinct scores: a unique answer
    keep = nms(torch.tensor(boxes), torch.tensor(scores), thr).tolist()
    assert keep == _nms_reference(boxes.tolist(), scores.tolist(), thr)
    assert 6 <= len(keep) < 120
    assert nms(torch.zeros(0, 4), torch.zeros(0), thr).numel() == 0


# ---------------------------------------------------------------- real photographs
def test_group_photo_six_faces(t1_result):
    image, (boxes, landmarks) = t1_result
    assert image.shape == (886, 1280, 3)
    assert boxes.dtype == np.float32 and landmarks.dtype == np.float32
    assert boxes.shape == (6, 5) and landmarks.shape == (6, 5, 2)
    assert (np.diff(boxes[:, 4]) <= 0).all() and (boxes[:, 4] > 0.5).all()
    for box, lmk in zip(boxes, landmarks):
        _check_anatomy(box, lmk)
        assert 60 < box[2] - box[0] < 200  # faces of this photo are ~90-110 px wide
    ious = [_iou(boxes[i], boxes[j]) for i in range(6) for j in range(i + 1, 6)]
    assert max(ious) == 0.0  # six distinct people


def test_max_size_maps_back(weights_path, t1_result):
    _, (boxes, landmarks) = t1_result
    small = RetinaFaceDetector(weights_path, max_size=640)
    boxes_s, landmarks_s = small.detect(t1_result[0])
    assert len(boxes_s) == 6
    for box, lmk in zip(boxes_s, landmarks_s):  # same faces, in full-resolution pixels
        j = int(np.argmax([_iou(box, b) for b in boxes]))
        assert _iou(box, boxes[j]) > 0.75
        assert np.abs(lmk - landmarks[j]).max() < 8


def test_single_face_landmark_order(detector, weights_path, fixtures_dir):
    image = _read(fixtures_dir, "Rob_Lowe_0001.jpg")
    boxes, landmarks = detector.detect(image)
    assert boxes.shape == (1, 5) and boxes[0, 4] > 0.9
    _check_anatomy(boxes[0], landmarks[0])
    # biubug6's pre-NMS threshold (0.02) also lets weak candidates through; the default
    # threshold is what removes them, and the best face is the same either way.
    boxes_lo, landmarks_lo = RetinaFaceDetector(weights_path, conf_threshold=0.02).detect(image)
    assert len(boxes_lo) > 1 and (boxes_lo[1:, 4] < 0.5).all()
    np.testing.assert_array_equal(boxes_lo[0], boxes[0])
    np.testing.assert_array_equal(landmarks_lo[0], landmarks[0])


@pytest.mark.parametrize("name", ["Rob_Lowe_0001.jpg", "Rob_Lowe_0002.jpg"])
def test_aligned_faces_land_on_template(detector, fixtures_dir, name):
    image = _read(fixtures_dir, name)
    _, landmarks = detector.detect(image)
    m = estimate_similarity(landmarks[0], ARCFACE_TEMPLATE_112)
    mapped = landmarks[0] @ m[:, :2].T + m[:, 2]
    err = np.linalg.norm(mapped - ARCFACE_TEMPLATE_112, axis=1)
    assert err[:2].max() < 4 and err.max() < 6, err
    crop = align_face(image, landmarks[0])
    assert crop.shape == (112, 112, 3) and crop.dtype == np.uint8
    # Detecting again in the aligned crop (with some context) finds the template layout.
    pad = 40
    boxes2, landmarks2 = detector.detect(cv2.copyMakeBorder(crop, pad, pad, pad, pad,
                                                            cv2.BORDER_CONSTANT, value=0))
    assert len(boxes2) == 1
    err2 = np.linalg.norm(landmarks2[0] - pad - ARCFACE_TEMPLATE_112, axis=1)
    assert err2[:2].max() < 4 and err2.max() < 6, err2


def test_insightface_aligned_crop_matches_template(detector, fixtures_dir):
    # Tom_Hanks_54745.png was aligned by insightface to arcface_dst: the detector's
    # landmarks, in our order, must fall on that template.
    pad = 40
    crop = _read(fixtures_dir, "Tom_Hanks_54745.png")
    boxes, landmarks = detector.detect(cv2.copyMakeBorder(crop, pad, pad, pad, pad,
                                                          cv2.BORDER_CONSTANT, value=0))
    assert len(boxes) == 1
    err = np.linalg.norm(landmarks[0] - pad - ARCFACE_TEMPLATE_112, axis=1)
    assert err[:2].max() < 5 and err.max() < 9, err


@pytest.mark.gpu
def test_cuda_matches_cpu(weights_path, t1_result):
    image, (boxes, landmarks) = t1_result
    boxes_g, landmarks_g = RetinaFaceDetector(weights_path, device="cuda").detect(image)
    assert boxes_g.shape == boxes.shape
    for box, lmk in zip(boxes_g, landmarks_g):  # scores are all ~1: match faces by overlap
        j = int(np.argmax([_iou(box, b) for b in boxes]))
        np.testing.assert_allclose(box[:4], boxes[j, :4], atol=0.5)
        np.testing.assert_allclose(box[4], boxes[j, 4], atol=1e-3)
        np.testing.assert_allclose(lmk, landmarks[j], atol=0.5)
