"""Class-sharded loss on gloo ranks, and the single-process reference it must match.

Used by ``test_sharded.py`` in two ways: loaded with ``runpy.run_path`` for the helpers, and run
as ``__main__`` (``runpy.run_path(path, run_name="__main__", init_globals=...)``) inside each
spawned rank. ``runpy.run_path`` is the spawn target because it is importable everywhere; a
pytest-imported test module (importlib mode) is not importable in a child process.

Each scenario computes the sharded loss one way: assembled here from the kernels' entry
(all_gather_rows -> normalise -> ``lse_and_target(process_group=...)`` -> margin psi -> UNPG
scalar U on the global batch -> ``mean(logsumexp(ell, s psi, U) - s psi)``), or through the
public paths: ``unpg.losses.margin_softmax_loss(process_group=...)`` and
``unpg.classifier.MarginClassifier`` in ``sharded`` mode. The reference is the official code's
formulation: all B x C logits with the margin on the target column, the kept negatives appended
to every row, one cross-entropy.
"""
# B: global batch, b: local batch, C: classes, N: kept negatives
import gc
import math
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from unpg.kernels import PartialFC, all_gather_rows, lse_and_target, shard_range

from unpg.classifier import MarginClassifier
from unpg.distributed import DistContext
from unpg.heads import build_head
from unpg.losses import margin_softmax_loss

SCALE, MARGIN = 64.0, 0.5
SCENARIOS = {
    "arcface_unpg": dict(head="arcface", wisk=1.5, sample_rate=1.0),
    "cosface_plain": dict(head="cosface", wisk=None, sample_rate=1.0),
    "arcface_unpg_sampled": dict(head="arcface", wisk=1.5, sample_rate=0.5),
    # The public entry points: unpg.losses.margin_softmax_loss(process_group=...) and the
    # classifier the trainer uses (fc.mode=sharded), with and without class sampling.
    "arcface_unpg_via_margin_softmax_loss": dict(head="arcface", wisk=1.5, sample_rate=1.0,
                                                 losses_api=True),
    "arcface_unpg_via_classifier": dict(head="arcface", wisk=1.5, sample_rate=1.0,
                                        classifier=True),
    "cosface_sampled_via_classifier": dict(head="cosface", wisk=1.5, sample_rate=0.5,
                                           classifier=True),
    "cosface_sampled_positives_only": dict(head="cosface", wisk=None, sample_rate=0.1),
}


def kept_negatives(emb_hat_BD, labels_B, wisk):
    """UNPG's negatives: strict upper triangle with different labels, box-and-whisker kept."""
    sim_BB = emb_hat_BD @ emb_hat_BD.t()
    neg_mask = (labels_B[:, None] != labels_B[None, :]).triu(diagonal=1)
    neg_N = sim_BB[neg_mask]
    if neg_N.numel() == 0:
        return neg_N
    srt = neg_N.detach().sort().values
    q1, q3 = srt[int(0.25 * srt.numel())], srt[int(0.75 * srt.numel())]
    iqr = q3 - q1
    return neg_N[(neg_N.detach() >= q1 - wisk * iqr) & (neg_N.detach() <= q3 + wisk * iqr)]


def psi(head, cos_B):
    if head == "cosface":
        return cos_B - MARGIN
    sin_B = torch.sqrt((1.0 - cos_B * cos_B).clamp_min(1e-12))
    return cos_B * math.cos(MARGIN) - sin_B * math.sin(MARGIN)


def reference_loss(emb_BD, weight_CD, labels_B, head, wisk):
    """Single process, full logits (seed formulation)."""
    emb_hat_BD = F.normalize(emb_BD, dim=1)
    cos_BC = emb_hat_BD @ F.normalize(weight_CD, dim=1).t()
    target_B = psi(head, cos_BC.gather(1, labels_B[:, None]).squeeze(1))
    logits_BC = cos_BC.scatter(1, labels_B[:, None], target_B[:, None])
    if wisk is not None:
        neg_N = kept_negatives(emb_hat_BD, labels_B, wisk)
        logits_BC = torch.cat([logits_BC, neg_N.expand(logits_BC.shape[0], -1)], dim=1)
    return F.cross_entropy(SCALE * logits_BC, labels_B)


def assembled_loss(emb_local_bD, labels_B, head, wisk, group, lse_and_target):
    """The decomposed loss; ``lse_and_target(emb_hat_BD) -> (ell_B, cos_t_B)``."""
    emb_hat_BD = F.normalize(all_gather_rows(emb_local_bD, group), dim=1)
    ell_B, cos_t_B = lse_and_target(emb_hat_BD)
    spsi_B = SCALE * psi(head, cos_t_B)
    terms = [ell_B, spsi_B]
    if wisk is not None:
        neg_N = kept_negatives(emb_hat_BD, labels_B, wisk)
        if neg_N.numel():
            terms.append(torch.logsumexp(SCALE * neg_N, dim=0).expand_as(ell_B))
    return (torch.logsumexp(torch.stack(terms, dim=1), dim=1) - spsi_B).mean()


def _classifier_results(rank, world, group, emb_local, labels_local, weight_CD, sc):
    """Loss and gradients through ``MarginClassifier(mode='sharded')`` on this rank."""
    C, D = weight_CD.shape
    ctx = DistContext(rank, world, 0, torch.device("cpu"), group)
    clf = MarginClassifier(C, D, build_head(sc["head"], s=SCALE, m=MARGIN), unpg_wisk=sc["wisk"],
                           mode="sharded", sample_rate=sc["sample_rate"], backend="chunked",
                           chunk_size=5, ctx=ctx).double()
    with torch.no_grad():  # the test's centres instead of the seeded initial ones
        clf.weight.copy_(clf.local_rows(weight_CD))
    torch.manual_seed(1000 + rank)  # class sampling draws from the global generator
    loss, _ = clf(emb_local, labels_local)
    loss.backward()
    opt = torch.optim.SGD(clf.parameters(), lr=0.0)
    with clf.step_context(opt):  # consumes the recorded sample: the rows this step may move
        opt.step()
    sampled = clf.rows_moved_by_last_step().nonzero().flatten() + clf.start
    return dict(loss=loss.detach(), emb_grad=emb_local.grad, w_grad=clf.weight.grad,
                sampled=sampled)


def rank_results(rank, world, group, emb_BD, weight_CD, labels_B):
    """Loss and gradients of every scenario on this rank."""
    B, D = emb_BD.shape
    C = weight_CD.shape[0]
    b = B // world
    start, num_local = shard_range(C, rank, world)
    labels_local = labels_B[rank * b:(rank + 1) * b]
    results = {}
    for name, sc in SCENARIOS.items():
        emb_local = emb_BD[rank * b:(rank + 1) * b].clone().requires_grad_()
        sampled = torch.arange(start, start + num_local)
        weight = weight_CD[start:start + num_local].clone().requires_grad_()
        if sc.get("classifier"):
            results[name] = _classifier_results(rank, world, group, emb_local, labels_local,
                                                weight_CD, sc)
            continue
        if sc.get("losses_api"):
            loss = margin_softmax_loss(
                emb_local, labels_local, weight, sc["head"], unpg_wisk=sc["wisk"],
                backend="chunked", chunk_size=5, process_group=group, s=SCALE, m=MARGIN)
        else:
            pfc = PartialFC(start, num_local, sc["sample_rate"]) if sc["sample_rate"] < 1 else None
            gen = torch.Generator().manual_seed(1000 + rank)
            seen = []

            def fn(emb_hat, weight=weight, pfc=pfc, gen=gen, seen=seen):
                if pfc is None:
                    return lse_and_target(emb_hat, weight, labels_B, SCALE, backend="chunked",
                                          chunk_size=5, class_start=start, process_group=group)
                index_S, local_labels_B = pfc.sample(labels_B, gen)
                seen.append(index_S)
                return lse_and_target(emb_hat, weight[index_S], local_labels_B, SCALE,
                                      backend="chunked", chunk_size=5, class_start=0,
                                      process_group=group)

            loss = assembled_loss(emb_local, labels_B, sc["head"], sc["wisk"], group, fn)
            if seen:
                sampled = seen[0] + start
        loss.backward()
        results[name] = dict(loss=loss.detach(), emb_grad=emb_local.grad, w_grad=weight.grad,
                             sampled=sampled)
    return results


def run_worker(rank, world, init_file, in_path, out_path):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        data = torch.load(in_path, weights_only=True)
        group = dist.group.WORLD
        results = rank_results(rank, world, group, data["emb"], data["weight"], data["labels"])
        try:
            all_gather_rows(torch.zeros(rank + 1, 3), group)
            results["unequal_rows_raised"] = torch.tensor(False)
        except ValueError:
            results["unequal_rows_raised"] = torch.tensor(True)
        tmp = f"{out_path}.tmp"
        torch.save(results, tmp)
        os.replace(tmp, out_path)
        # Objects holding the group (autograd graphs, the classifier's gradient averager) go
        # first, and no rank tears gloo down while a peer is still in a collective: either
        # aborts a rank at exit now and then ("terminate called without an active exception").
        del results
        gc.collect()
        dist.barrier(group)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    run_worker(RANK, WORLD, INIT_FILE, IN_PATH, OUT_PATH)  # noqa: F821 (init_globals)
