"""The shared order contract (epoch_plan) and the on-device flip + normalisation."""
import numpy as np
import pytest
import torch
from unpg.loaders.base import (
    epoch_permutation,
    epoch_plan,
    per_rank_batch,
    quasi_random_permutation,
    to_device_normalized,
)

from unpg.config import NORMALIZE_MEAN_STD


@pytest.mark.parametrize("n,world,batch", [(100, 2, 8), (96, 3, 4), (37, 1, 5), (1000, 4, 16)])
def test_plan_shares_are_disjoint_equal_and_drop_last(n, world, batch):
    plans = [epoch_plan(n, 5, 2, r, world, batch) for r in range(world)]
    steps = n // (world * batch)
    for p in plans:
        assert p.steps == steps and p.indices.size == steps * batch == p.flips.size
    union = np.concatenate([p.indices for p in plans])
    assert np.unique(union).size == union.size  # disjoint, no repeats
    perm = epoch_permutation(n, 5, 2)
    # rank r takes perm[r::world]: the union is exactly the first world*steps*batch of the perm
    assert np.array_equal(np.sort(union), np.sort(perm[: world * steps * batch]))
    for r, p in enumerate(plans):
        assert np.array_equal(p.indices, perm[r::world][: steps * batch])


def test_plan_reproducible_and_new_each_epoch():
    a = epoch_plan(500, 11, 3, 1, 2, 10)
    b = epoch_plan(500, 11, 3, 1, 2, 10)
    assert np.array_equal(a.indices, b.indices) and np.array_equal(a.flips, b.flips)
    c = epoch_plan(500, 11, 4, 1, 2, 10)
    assert not np.array_equal(a.indices, c.indices)
    d = epoch_plan(500, 12, 3, 1, 2, 10)
    assert not np.array_equal(a.indices, d.indices)
    assert 0.35 < a.flips.mean() < 0.65  # p = 0.5
    assert not epoch_plan(500, 11, 3, 1, 2, 10, train=False).flips.any()


def test_quasi_random_is_a_page_local_permutation():
    page_of = np.repeat(np.arange(40), 25)  # 40 pages of 25 samples
    perm = quasi_random_permutation(page_of, 1, 0, window_pages=4)
    assert np.array_equal(np.sort(perm), np.arange(1000))
    # every window of 100 consecutive positions covers exactly 4 whole pages
    for w in range(10):
        pages = np.unique(page_of[perm[w * 100:(w + 1) * 100]])
        assert pages.size == 4
    assert not np.array_equal(perm, quasi_random_permutation(page_of, 1, 1, window_pages=4))
    plans = [epoch_plan(1000, 1, 0, r, 2, 10, order="quasi_random", page_of=page_of,
                        window_pages=4) for r in range(2)]
    union = np.concatenate([p.indices for p in plans])
    assert np.unique(union).size == 1000


def test_plan_and_batch_errors():
    with pytest.raises(ValueError, match="multiple of world_size=3"):
        per_rank_batch(16, 3)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        epoch_plan(10, 0, 0, 0, 2, 8)
    with pytest.raises(ValueError, match="loader.order"):
        epoch_plan(100, 0, 0, 0, 1, 8, order="sorted")
    with pytest.raises(ValueError, match="rank"):
        epoch_plan(100, 0, 0, 2, 2, 8)


@pytest.mark.parametrize("normalize", ["insightface", "imagenet"])
def test_normalisation_and_flip_against_direct_computation(normalize):
    g = torch.Generator().manual_seed(0)
    batch = torch.randint(0, 256, (6, 112, 112, 3), dtype=torch.uint8, generator=g)
    flips = torch.tensor([True, False, True, False, False, True])
    mean, std = NORMALIZE_MEAN_STD[normalize]
    out = to_device_normalized(batch, flips, mean, std, "cpu", layout="NHWC")
    assert out.dtype == torch.float32 and out.shape == (6, 3, 112, 112) and out.is_contiguous()
    x = batch.double().numpy()
    for i in range(6):
        img = x[i, :, ::-1] if flips[i] else x[i]  # mirror along the width
        want = (img - np.array(mean)) / np.array(std)
        np.testing.assert_allclose(out[i].permute(1, 2, 0).numpy(), want, atol=1e-5)
    plain = to_device_normalized(batch, None, mean, std, "cpu", layout="NHWC")
    assert torch.equal(plain[1], out[1]) and torch.equal(plain[0].flip(2), out[0])
    nchw_in = batch.permute(0, 3, 1, 2).contiguous()
    before = nchw_in.clone()
    nchw = to_device_normalized(nchw_in, flips, mean, std, "cpu", layout="NCHW")
    assert torch.equal(nchw, out) and torch.equal(nchw_in, before)  # input left untouched
    # The CPU's per-channel scalar multiply-add gives the bits of the [1, 3, 1, 1] float32
    # broadcast that the GPU path runs.
    mirrored = torch.where(flips.view(-1, 1, 1, 1), nchw_in.flip(3), nchw_in).float()
    scale = torch.tensor([1 / s for s in std], dtype=torch.float64).float().view(1, 3, 1, 1)
    shift = torch.tensor([-m / s for m, s in zip(mean, std)], dtype=torch.float64).float()
    assert torch.equal(nchw, mirrored.mul_(scale).add_(shift.view(1, 3, 1, 1)))


@pytest.mark.gpu
def test_normalisation_cuda_matches_cpu():
    batch = torch.randint(0, 256, (4, 112, 112, 3), dtype=torch.uint8)
    flips = torch.tensor([True, False, False, True])
    mean, std = NORMALIZE_MEAN_STD["imagenet"]
    cpu = to_device_normalized(batch, flips, mean, std, "cpu", layout="NHWC")
    gpu = to_device_normalized(batch.pin_memory(), flips, mean, std, "cuda", layout="NHWC")
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=1e-6)
