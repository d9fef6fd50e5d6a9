"""extract_features: batching/prefetch order, eval-mode handling, and CUDA vs CPU."""
import numpy as np
import pytest
import torch

from unpg.eval.features import extract_features, iter_image_batches, resolve_device
from unpg.models import build_backbone


def test_batches_keep_order_and_bounded_prefetch():
    seen = []

    def load(i):
        seen.append(i)
        return np.full((2, 2, 3), i, dtype=np.uint8)

    batches = iter_image_batches(23, load, batch_size=5, workers=3, prefetch_batches=1)
    first = next(batches)
    assert first[:, 0, 0, 0].tolist() == [0, 1, 2, 3, 4]
    assert len(seen) <= 10  # only the next batch is decoded ahead
    rest = np.concatenate([first] + list(batches))
    assert rest[:, 0, 0, 0].tolist() == list(range(23))


def test_model_mode_restored_even_on_error(tiny_model):
    tiny_model.train()

    def bad_load(i):
        raise OSError(f"cannot read image {i}")

    with pytest.raises(OSError, match="image 0"):
        extract_features(tiny_model, 3, bad_load, batch_size=2, flip="sum",
                         normalize="insightface", device="cpu", progress=False)
    assert tiny_model.training


def test_bad_options():
    with pytest.raises(ValueError, match="flip"):
        extract_features(torch.nn.Identity(), 1, lambda i: np.zeros((4, 4, 3), np.uint8),
                         batch_size=1, flip="mirror", normalize="insightface", device="cpu",
                         progress=False)
    with pytest.raises(ValueError, match="device"):
        resolve_device("tpu")


@pytest.mark.gpu
def test_cuda_autocast_features_match_cpu():
    torch.manual_seed(0)
    net = build_backbone("mobilefacenet", embedding_size=64).eval()
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 255, (12, 112, 112, 3), dtype=np.uint8)
    cpu = extract_features(net, 12, lambda i: imgs[i], batch_size=5, flip="sum",
                           normalize="imagenet", device="cpu", progress=False)
    gpu = extract_features(net.cuda(), 12, lambda i: imgs[i], batch_size=5, flip="sum",
                           normalize="imagenet", device="cuda", progress=False)
    cos = np.sum(cpu * gpu, 1) / (np.linalg.norm(cpu, axis=1) * np.linalg.norm(gpu, axis=1))
    assert cos.min() > 0.999
