"""The FFCV-style loader on a CPU device: decode workers normalise (numpy, or one compiled pass
with numba) into a float32 shared ring and batches are handed out as zero-copy leases of its
slots. A slot must never be rewritten while any tensor still views it, and the ring must never
run dry, whatever the consumer keeps."""
import gc

import numpy as np
import pytest
import torch
from unpg.loaders import build_loader
from unpg.loaders.base import affine_f32, to_device_normalized
from unpg.loaders.fused_normalize import fused_normalizer, hwc_to_planar_normalized
from unpg.loaders.packed import LEASES, PackedBatchFiller
from unpg.loaders.packed_format import PackedFile
from unpg.loaders.workers import SharedRing

from unpg.config import NORMALIZE_MEAN_STD
from unpg.tools.pack import pack_rec


def _loader(prepared, cfg_factory, **kw):
    cfg = cfg_factory("ffcv", rec=prepared["rec"], ffcv=prepared["ffcv"], **kw)
    return build_loader(cfg, 0, 1, "cpu", train=True)


@pytest.fixture(scope="module")
def raw_pack(tiny_rec, tmp_path_factory):
    out = tmp_path_factory.mktemp("raw") / "tiny_raw.unpgpack"
    pack_rec(tiny_rec, out, raw=True, progress=False)
    return out


FILLERS = ["numpy", pytest.param("compiled", marks=pytest.mark.skipif(
    fused_normalizer() is None, reason="numba not installed"))]


@pytest.mark.parametrize("path", FILLERS)
@pytest.mark.parametrize("decoder", ["simplejpeg", "cv2"])
@pytest.mark.parametrize("normalize", ["insightface", "imagenet"])
@pytest.mark.parametrize("pack", ["jpeg", "raw"])
def test_filler_normalises_to_the_bits_of_the_device_path(prepared, raw_pack, pack, normalize,
                                                          decoder, path):
    """The workers' float rows (numpy or compiled) equal the uint8 rows normalised by
    ``to_device_normalized``, the GPU's path, bit for bit."""
    mean, std = NORMALIZE_MEAN_STD[normalize]
    file = PackedFile(prepared["ffcv"] if pack == "jpeg" else raw_pack)
    try:
        rng = np.random.default_rng(0)
        idx = rng.permutation(file.num_samples)[:11]  # not a multiple of the 8-image chunks
        flips = rng.random(11) < 0.5
        u8 = np.empty((11, 3, 112, 112), np.uint8)
        f32 = np.empty((11, 3, 112, 112), np.float32)
        lab_u8, lab_f32 = np.empty(11, np.int64), np.empty(11, np.int64)
        PackedBatchFiller(file, decoder, "error")(idx, flips, u8, lab_u8)
        filler = PackedBatchFiller(file, decoder, "error", affine_f32(mean, std),
                                   fused=path == "compiled")
        assert (filler.fused is not None) == (path == "compiled")
        filler(idx, flips, f32, lab_f32)
        labels = np.asarray(file.meta["label"])[idx]
    finally:
        file.close()
    want = to_device_normalized(torch.from_numpy(u8), None, mean, std, "cpu")
    assert torch.equal(torch.from_numpy(f32), want)
    assert np.array_equal(lab_u8, lab_f32) and np.array_equal(lab_f32, labels)


def test_compiled_kernel_is_the_python_loop_and_the_formula():
    """The kernel's plain-Python source, run as Python, against numpy's float32 formula; then
    the numba build of it against the same numbers (odd sizes, both normalisations)."""
    rng = np.random.default_rng(1)
    hwc = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    for normalize in ("insightface", "imagenet"):
        scale, shift = affine_f32(*NORMALIZE_MEAN_STD[normalize])
        want = hwc.transpose(2, 0, 1).astype(np.float32) * scale[:, None, None]
        want = want + shift[:, None, None]
        out = np.full((3, 5, 7), np.nan, np.float32)
        hwc_to_planar_normalized(hwc.reshape(-1), out.reshape(-1), 35, scale, shift)
        assert np.array_equal(out, want)
        compiled = fused_normalizer()
        if compiled is not None:
            out[:] = np.nan
            compiled(hwc, out, scale, shift)
            assert np.array_equal(out, want)
            wide = np.zeros((3, 5, 14), np.float32)
            with pytest.raises(ValueError, match="C-contiguous"):  # would write into a copy
                compiled(hwc, wide[:, :, ::2], scale, shift)


def test_ring_lease_comes_back_when_the_last_view_is_gone():
    ring = SharedRing(2, 4, (8, 8), np.float32)
    a, b = ring.acquire(), ring.acquire()
    assert ring.acquire() is None  # both in use
    images = ring.lease(a)
    ring.np_images[a] = 1.5
    assert images.dtype == torch.float32 and bool((images == 1.5).all())  # shares the slot
    view = images[1:3]
    del images
    gc.collect()
    assert ring.leased == 1 and ring.acquire() is None  # a view still holds it
    del view
    assert ring.leased == 0 and ring.acquire() == a  # back without a collection
    ring.release(b)
    assert ring.acquire() == b


@pytest.mark.parametrize("workers", [0, 2])
def test_kept_batches_are_never_overwritten(prepared, cfg_factory, workers):
    """A consumer keeping every batch of two epochs (more than the ring has slots) gets the
    same values as one that copies each batch at once, and the ring keeps moving."""
    kw = dict(workers=workers, batches_ahead=1, batch=8)
    copied = []
    loader = _loader(prepared, cfg_factory, **kw)
    for epoch in (3, 4):
        loader.set_epoch(epoch)
        copied += [(x.clone(), y.clone()) for x, y in loader]
    loader.close()
    kept_loader = _loader(prepared, cfg_factory, **kw)
    slots = kept_loader._ring.shape[0]
    kept = []
    for epoch in (3, 4):
        kept_loader.set_epoch(epoch)
        kept += list(kept_loader)
    assert len(kept) == len(copied) == 2 * len(kept_loader) > slots
    for (x, y), (cx, cy) in zip(kept, copied):
        assert torch.equal(x, cx) and torch.equal(y, cy)
    assert kept_loader._ring.leased == LEASES  # the first LEASES are views, the rest copies
    del kept, x
    gc.collect()
    assert kept_loader._ring.leased == 0
    kept_loader.close()


def test_a_training_loop_gets_views_not_copies(prepared, cfg_factory):
    loader = _loader(prepared, cfg_factory, workers=2, batches_ahead=1, batch=8)
    ring_ptrs = {loader._ring.images[k].data_ptr() for k in range(loader._ring.shape[0])}
    loader.set_epoch(0)
    for _ in loader:  # a stray reference to the last batch survives into the next epoch
        pass
    loader.set_epoch(1)
    ptrs = [x.data_ptr() for x, _ in loader]
    assert set(ptrs) <= ring_ptrs  # every batch a lease, none copied
    loader.close()
