"""IJB-B / IJB-C template-based 1:1 verification and 1:N identification.

Layout: insightface's ``IJB_release`` (meta files: see ``ijb_meta``; images in
``<root>/loose_crop/``).

Protocol (insightface's ``ijb_11.py``/``ijb_1n.py``): each loose crop is aligned with its five
landmarks by the shared ``unpg.data.align.align_face``; features of the image and its mirror
are summed; optionally multiplied by the detector score; averaged per media inside a template;
summed per template; L2-normalised; a pair scores the dot product of its two templates.
``variant: seed`` is the official code's route instead: the pre-aligned images of ``meta/img.list``
(same order as face_tid_mid), no flip, no score weighting.

Everything after the features is vectorised: aggregation is one sparse-matrix product; pair
scores are GEMM tiles (rows: templates of the side with fewer distinct ids) or blocked
row-wise dot products where the pairs are too sparse for a tile to pay off.

Legend: N images, T templates, P pairs, D feature dim, R rows of a tile, C its columns.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import cv2
import numpy as np
import torch
from scipy import sparse
from torch import nn

from ..data.align import align_face
from ..fileio import atomic_write
from .features import extract_features
from .ijb_meta import ONE_N_FILES, IJBMeta, need_file, read_ijb_meta, read_template_subjects
from .metrics import DEFAULT_FARS, l2_normalize, rank_k_accuracy, tpir_at_fpir, verification_summary

__all__ = [
    "aggregate_templates",
    "evaluate_ijb",
    "identification_1n",
    "image_features",
    "pair_scores",
    "template_rows",
    "verification_1v1",
]

SEED_IMAGE_LIST = "meta/img.list"
FPIRS = (1e-2, 1e-1)
RANKS = (1, 5, 10)


# ----------------------------------------------------------------------------- aggregation
def aggregate_templates(feats_ND: np.ndarray, templates_N: np.ndarray, medias_N: np.ndarray,
                        image_weights_N: Optional[np.ndarray] = None
                        ) -> Tuple[np.ndarray, np.ndarray]:
    """Media mean inside each template, summed per template, L2-normalised.

    ``image_weights_N`` (e.g. detector scores) multiplies each image feature first. Returns
    (sorted unique template ids [T], float32 features [T, D]). One sparse product
    ``W @ feats`` with ``W[t, i] = weight_i / |media of image i in template t|``: no copy of
    the image features and no loop over templates.
    """
    n = len(feats_ND)
    templates_N = np.asarray(templates_N, dtype=np.int64)
    medias_N = np.asarray(medias_N, dtype=np.int64)
    if templates_N.shape != (n,) or medias_N.shape != (n,):
        raise ValueError(f"need one template and one media id per image ({n}), got "
                         f"{templates_N.shape} and {medias_N.shape}")
    uniq_t, t_inv = np.unique(templates_N, return_inverse=True)
    # A media id can appear in several templates: the media key is the (template, media) pair.
    m_off = medias_N - medias_N.min() if n else medias_N
    m_span = int(m_off.max()) + 1 if n else 1
    if len(uniq_t) * m_span >= 2**62:
        raise ValueError(f"media ids span {m_span} values: too wide to key (template, media)")
    _, m_inv, m_count = np.unique(t_inv * m_span + m_off, return_inverse=True, return_counts=True)
    m_inv = m_inv.reshape(-1)
    weight_N = 1.0 / m_count[m_inv]
    if image_weights_N is not None:
        image_weights_N = np.asarray(image_weights_N, dtype=np.float64)
        if image_weights_N.shape != (n,):
            raise ValueError(f"need one weight per image ({n}), got {image_weights_N.shape}")
        weight_N = weight_N * image_weights_N
    # Weights in the features' dtype: a float64 matrix would make scipy upcast (copy) the
    # whole [N, D] feature array first (1.9 GB at IJB-C size).
    feats_ND = np.asarray(feats_ND)
    if feats_ND.dtype not in (np.float32, np.float64):
        feats_ND = feats_ND.astype(np.float32)
    w_TN = sparse.csr_matrix((weight_N.astype(feats_ND.dtype), (t_inv, np.arange(n))),
                             shape=(len(uniq_t), n))
    feats_TD = np.asarray(w_TN @ feats_ND)
    return uniq_t, l2_normalize(feats_TD).astype(np.float32)


def template_rows(uniq_templates: np.ndarray, ids: np.ndarray, what: str) -> np.ndarray:
    """Row of each template id in ``uniq_templates`` (sorted); unknown ids raise ``ValueError``."""
    ids = np.asarray(ids, dtype=np.int64)
    if len(uniq_templates) and 0 <= uniq_templates[0] and uniq_templates[-1] < 50_000_000:
        lut = np.full(int(uniq_templates[-1]) + 1, -1, dtype=np.int64)  # direct lookup table
        lut[uniq_templates] = np.arange(len(uniq_templates))
        inside = (ids >= 0) & (ids < len(lut))
        rows = np.full(len(ids), -1, dtype=np.int64)
        rows[inside] = lut[ids[inside]]
    else:
        pos = np.searchsorted(uniq_templates, ids).clip(0, max(len(uniq_templates) - 1, 0))
        rows = np.where(uniq_templates[pos] == ids, pos, -1) if len(uniq_templates) else \
            np.full(len(ids), -1, dtype=np.int64)
    if (rows < 0).any():
        missing = np.unique(ids[rows < 0])
        raise ValueError(f"{what}: {len(missing)} template id(s) have no image in face_tid_mid, "
                         f"e.g. {missing[:5].tolist()}")
    return rows


def pair_scores(feats_TD: np.ndarray, idx1_P: np.ndarray, idx2_P: np.ndarray, *,
                tile_rows: int = 512, gemm_ratio: float = 32.0, chunk: int = 16384) -> np.ndarray:
    """Dot products ``feats[idx1[p]] · feats[idx2[p]]`` for every pair p → float32 [P].

    Pairs are grouped by tiles of ``tile_rows`` templates of the side with fewer distinct
    templates (a radix sort of the tile ids). A tile whose pairs cover at least
    1/``gemm_ratio`` of its rows x columns is one GEMM, then a gather of the needed entries
    (GEMM is ~30x faster per multiply-add than gathered dot products); sparser tiles use
    row-wise dot products in chunks of ``chunk`` pairs.
    """
    feats_TD = np.ascontiguousarray(feats_TD, dtype=np.float32)
    n_t = len(feats_TD)
    i1 = np.asarray(idx1_P, dtype=np.int64)
    i2 = np.asarray(idx2_P, dtype=np.int64)
    if i1.shape != i2.shape or i1.ndim != 1:
        raise ValueError(f"pair index arrays must be 1-D and equal, got {i1.shape} and {i2.shape}")
    out_P = np.empty(len(i1), dtype=np.float32)
    if len(i1) == 0:
        return out_P
    for arr in (i1, i2):
        if arr.min() < 0 or arr.max() >= n_t:
            raise ValueError(f"pair indices must be in [0, {n_t}), got [{arr.min()}, {arr.max()}]")
    used1 = np.bincount(i1, minlength=n_t) > 0
    used2 = np.bincount(i2, minlength=n_t) > 0
    if used2.sum() < used1.sum():  # the dot product is symmetric: tile the smaller side
        i1, i2, used1 = i2, i1, used2
    row_templates = np.flatnonzero(used1)
    compact_T = np.cumsum(used1) - 1
    rows_P = compact_T[i1]
    n_tiles = -(-len(row_templates) // tile_rows)
    tile_dtype = np.int16 if n_tiles < 2**15 else np.int64
    tile_P = (rows_P // tile_rows).astype(tile_dtype)
    order_P = np.argsort(tile_P, kind="stable")  # radix sort for int16 keys: O(P)
    bounds = np.concatenate([[0], np.cumsum(np.bincount(tile_P, minlength=n_tiles))])
    del tile_P
    col_used = np.zeros(n_t, dtype=bool)
    for k in range(n_tiles):  # a loop over tiles (P / (tile pairs)), never over pairs
        sel = order_P[bounds[k]: bounds[k + 1]]
        if len(sel) == 0:
            continue
        tile_feats_RD = feats_TD[row_templates[k * tile_rows: (k + 1) * tile_rows]]
        r_local = rows_P[sel] - k * tile_rows
        cols = i2[sel]
        col_used[:] = False
        col_used[cols] = True
        n_cols = int(col_used.sum())
        if len(sel) * gemm_ratio >= len(tile_feats_RD) * n_cols:
            col_ids = np.flatnonzero(col_used)
            col_map = np.cumsum(col_used) - 1
            sim_RC = tile_feats_RD @ feats_TD[col_ids].T
            out_P[sel] = sim_RC[r_local, col_map[cols]]
        else:
            for a in range(0, len(sel), chunk):
                b = a + chunk
                out_P[sel[a:b]] = np.einsum("ij,ij->i", tile_feats_RD[r_local[a:b]],
                                            feats_TD[cols[a:b]])
    return out_P


def verification_1v1(img_feats_ND: np.ndarray, templates_N: np.ndarray, medias_N: np.ndarray,
                     t1_P: np.ndarray, t2_P: np.ndarray, labels_P: np.ndarray,
                     fars: Sequence[float] = DEFAULT_FARS,
                     image_weights_N: Optional[np.ndarray] = None, where: str = "template pairs"
                     ) -> Tuple[Dict[str, object], Tuple[np.ndarray, np.ndarray]]:
    """Image features → template features → pair scores → TAR@FAR summary and ROC."""
    uniq_t, feats_TD = aggregate_templates(img_feats_ND, templates_N, medias_N, image_weights_N)
    scores_P = pair_scores(feats_TD, template_rows(uniq_t, t1_P, where),
                           template_rows(uniq_t, t2_P, where))
    return verification_summary(scores_P, labels_P, fars)


def identification_1n(uniq_t: np.ndarray, feats_TD: np.ndarray,
                      galleries: Sequence[Tuple[str, np.ndarray, np.ndarray]],
                      probe: Tuple[np.ndarray, np.ndarray], ks: Sequence[int] = RANKS,
                      fpirs: Sequence[float] = FPIRS) -> Dict[str, Dict[str, object]]:
    """Open-set 1:N on each gallery with the mixed probe set, plus the mean over galleries.

    ``galleries``: (name, template ids, subject ids); ``probe``: (template ids, subject ids).
    """
    p_tids, p_sids = probe
    p_feats = feats_TD[template_rows(uniq_t, p_tids, "1:N probe csv")]
    out: Dict[str, Dict[str, object]] = {}
    for name, g_tids, g_sids in galleries:
        g_feats = feats_TD[template_rows(uniq_t, g_tids, f"1:N gallery {name} csv")]
        ranks = rank_k_accuracy(p_feats, g_feats, p_sids, g_sids, ks)
        tpir = tpir_at_fpir(p_feats, g_feats, p_sids, g_sids, fpirs)
        out[name] = {
            **{f"rank_{k}": v for k, v in ranks.items()},
            "tpir_at_fpir": {f"{f:g}": float(v) for f, v in zip(fpirs, tpir)},
            "num_gallery": int(len(g_tids)),
            "num_mated_probes": int(np.isin(p_sids, g_sids).sum()),
            "num_nonmated_probes": int((~np.isin(p_sids, g_sids)).sum()),
        }
    names = [g[0] for g in galleries]
    out["mean"] = {
        **{f"rank_{k}": float(np.mean([out[n][f"rank_{k}"] for n in names])) for k in ks},
        "tpir_at_fpir": {f"{f:g}": float(np.mean([out[n]["tpir_at_fpir"][f"{f:g}"] for n in names]))
                         for f in fpirs},
    }
    return out


# ----------------------------------------------------------------------------- features
def _read_rgb(path: Path) -> np.ndarray:
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise FileNotFoundError(f"IJB image missing or unreadable: {path}")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def _seed_image_paths(root: Path, n_expected: int, names: List[str]) -> List[Path]:
    """The official code's ``meta/img.list``: one pre-aligned image per line, face_tid_mid order."""
    list_path = need_file(root / SEED_IMAGE_LIST, "the official code's pre-aligned image list (one image path "
                      "per line, in face_tid_mid order)")
    paths = []
    with open(list_path, encoding="utf-8") as fh:
        for line in fh:
            parts = line.split()
            if not parts:
                continue
            p = Path(parts[0])
            # The official code keeps the last two path parts below root (folder/image).
            paths.append(p if p.is_absolute() and p.is_file() else root.joinpath(*p.parts[-2:]))
    if len(paths) != n_expected:
        raise ValueError(f"{list_path}: {len(paths)} images, but face_tid_mid lists {n_expected}; "
                         f"the official code's list must follow face_tid_mid line by line")
    mismatched = sum(p.name != n for p, n in zip(paths, names))
    if mismatched:
        warnings.warn(f"{list_path}: {mismatched} file names differ from face_tid_mid's; the "
                      f"features are matched by line order", stacklevel=2)
    return paths


def image_features(model: nn.Module, meta: IJBMeta, *, variant: str, image_size: int,
                   batch_size: int, flip: str, normalize: str,
                   device: Union[str, torch.device], workers: Optional[int] = None,
                   progress: bool = True) -> np.ndarray:
    """Per-image features in face_tid_mid order (insightface: aligned loose crops)."""
    if variant == "insightface":
        crop_dir = meta.root / "loose_crop"
        if not crop_dir.is_dir():
            raise FileNotFoundError(f"IJB image folder not found: {crop_dir} (expected the "
                                    f"loose crops named in {meta.benchmark}_face_tid_mid.txt)")
        names, lmk = meta.image_names, meta.landmarks

        def load(i: int) -> np.ndarray:
            return align_face(_read_rgb(crop_dir / names[i]), lmk[i], template="arcface",
                              image_size=image_size)
    elif variant == "seed":
        paths = _seed_image_paths(meta.root, len(meta.image_names), meta.image_names)

        def load(i: int) -> np.ndarray:
            img = _read_rgb(paths[i])
            if img.shape[:2] != (image_size, image_size):
                img = cv2.resize(img, (image_size, image_size), interpolation=cv2.INTER_CUBIC)
            return img
    else:
        raise ValueError(f"variant must be 'insightface' or 'seed', got {variant!r}")
    return extract_features(model, len(meta.image_names), load, batch_size=batch_size, flip=flip,
                            normalize=normalize, device=device, workers=workers,
                            desc=f"{meta.benchmark} features", progress=progress)


# ----------------------------------------------------------------------------- benchmark
def evaluate_ijb(model: nn.Module, cfg, *, device: Union[str, torch.device],
                 weights_hash: Optional[str] = None, workers: Optional[int] = None,
                 progress: bool = True) -> Tuple[Dict[str, object], Dict[str, Tuple]]:
    """Run IJB-B/C for an ``EvalDataConfig`` → (results dict, ROC curves by name).

    With ``weights_hash`` the image features are cached as ``.npy`` under
    ``<output_dir>/features/`` keyed by benchmark, variant, flip, normalisation and the hash.
    """
    bench, variant = cfg.benchmark, cfg.variant
    flip = cfg.flip
    if variant == "seed" and flip != "none":
        print(f"{bench}: variant 'seed' extracts unflipped features (flip={flip!r} ignored)")
        flip = "none"
    meta = read_ijb_meta(cfg.root, bench, with_landmarks=(variant == "insightface"))
    cache: Optional[Path] = None
    if weights_hash:
        cache = Path(cfg.output_dir) / "features" / \
            f"{bench}_{variant}_{flip}_{cfg.normalize}_{weights_hash}.npy"
    feats_ND: Optional[np.ndarray] = None
    if cache is not None and cache.is_file():
        feats_ND = np.load(cache)
        if feats_ND.ndim != 2 or len(feats_ND) != len(meta.image_names):
            print(f"{bench}: ignoring stale feature cache {cache} (shape {feats_ND.shape})")
            feats_ND = None
        else:
            print(f"{bench}: features from cache {cache}")
    if feats_ND is None:
        feats_ND = image_features(model, meta, variant=variant, image_size=cfg.image_size,
                                  batch_size=cfg.batch_size, flip=flip, normalize=cfg.normalize,
                                  device=device, workers=workers, progress=progress)
        if cache is not None:
            with atomic_write(cache) as fh:  # a killed run leaves no truncated cache
                np.save(fh, feats_ND)
    # insightface's use_detector_score: each image feature times its detector score.
    weights_N = meta.det_scores if cfg.score_weighting else None
    uniq_t, feats_TD = aggregate_templates(feats_ND, meta.templates, meta.medias, weights_N)
    del feats_ND
    pair_file = f"{bench}_template_pair_label.txt"
    scores_P = pair_scores(feats_TD, template_rows(uniq_t, meta.pair_t1, pair_file),
                           template_rows(uniq_t, meta.pair_t2, pair_file))
    summary, roc = verification_summary(scores_P, meta.pair_labels, cfg.fars)
    results: Dict[str, object] = {
        "benchmark": bench, "variant": variant, "flip": flip, "normalize": cfg.normalize,
        "score_weighting": bool(cfg.score_weighting), "num_images": len(meta.image_names),
        "num_templates": int(len(uniq_t)), "verification_1v1": summary,
    }
    (g1_name, g1_file), (g2_name, g2_file), probe_file = ONE_N_FILES[bench]
    files = [meta.root / "meta" / f for f in (g1_file, g2_file, probe_file)]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        results["identification_1n"] = {"skipped": f"missing {', '.join(missing)}"}
    else:
        galleries = [(g1_name, *read_template_subjects(files[0])),
                     (g2_name, *read_template_subjects(files[1]))]
        results["identification_1n"] = identification_1n(
            uniq_t, feats_TD, galleries, read_template_subjects(files[2]))
    return results, {f"{bench} ({variant})": roc}
