"""Class-sharded mode: gloo ranks vs one process (the kernels' sharded entry, the functional loss
and the sharded classifier), sampling, PartialFC's optimizer-state guard."""
# B: global batch, b: local batch, C: classes, D: embedding dim
import runpy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from unpg.kernels import PartialFC, lse_and_target, sample_classes, shard_range

WORKER = str(Path(__file__).with_name("_sharded_worker.py"))
LIB = runpy.run_path(WORKER, run_name="sharded_worker_lib")
C, D = 37, 16


def _data(B, seed=0):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, C, (B,), generator=gen)
    labels[1] = labels[0]  # a repeated label: its pair is not a UNPG negative
    weight = torch.randn(C, D, generator=gen, dtype=torch.float64)
    emb = torch.randn(B, D, generator=gen, dtype=torch.float64) + 2.0 * F.normalize(weight[labels])
    return emb, weight, labels


def _reference(emb, weight, labels, scenario, sampled):
    """Single-process loss and gradients, restricted to the sampled classes ``sampled``."""
    emb = emb.clone().requires_grad_()
    weight = weight.clone().requires_grad_()
    remapped = torch.searchsorted(sampled, labels)
    assert torch.equal(sampled[remapped], labels), "a positive class was not sampled"
    loss = LIB["reference_loss"](emb, weight[sampled], remapped, scenario["head"],
                                 scenario["wisk"])
    loss.backward()
    return loss.detach(), emb.grad, weight.grad


@pytest.mark.slow
@pytest.mark.parametrize("world,b", [(2, 4), (3, 3)])
def test_gloo_ranks_match_single_process(tmp_path, world, b, gloo_ranks):
    emb, weight, labels = _data(world * b, seed=world)
    ranks = gloo_ranks(WORKER, tmp_path, world, {"emb": emb, "weight": weight, "labels": labels})

    for name, scenario in LIB["SCENARIOS"].items():
        sampled = torch.cat([res[name]["sampled"] for res in ranks])
        loss, emb_grad, w_grad = _reference(emb, weight, labels, scenario, sampled)
        if scenario["sample_rate"] < 1.0:
            assert sampled.numel() < C  # really sampled
        for rank, res in enumerate(ranks):
            got = res[name]
            start, num_local = shard_range(C, rank, world)
            tag = f"{name} rank {rank}"
            torch.testing.assert_close(got["loss"], loss, rtol=1e-10, atol=1e-12,
                                       msg=lambda m, tag=tag: f"{tag} loss: {m}")
            torch.testing.assert_close(got["emb_grad"], emb_grad[rank * b:(rank + 1) * b],
                                       rtol=1e-9, atol=1e-12,
                                       msg=lambda m, tag=tag: f"{tag} dX: {m}")
            torch.testing.assert_close(got["w_grad"], w_grad[start:start + num_local],
                                       rtol=1e-9, atol=1e-12,
                                       msg=lambda m, tag=tag: f"{tag} dW: {m}")
        assert all(bool(res["unequal_rows_raised"]) for res in ranks)


def test_one_process_assembled_loss_equals_reference():
    """Without a group the same decomposition equals the official-formulation reference."""
    emb, weight, labels = _data(10, seed=5)
    for sc in LIB["SCENARIOS"].values():
        if sc["sample_rate"] < 1.0 or sc.get("classifier") or sc.get("losses_api"):
            continue
        e = emb.clone().requires_grad_()
        w = weight.clone().requires_grad_()
        loss = LIB["assembled_loss"](
            e, labels, sc["head"], sc["wisk"], None,
            lambda h, w=w: lse_and_target(h, w, labels, 64.0, backend="chunked", chunk_size=6))
        loss.backward()
        ref_loss, ref_de, ref_dw = _reference(emb, weight, labels, sc, torch.arange(C))
        torch.testing.assert_close(loss.detach(), ref_loss, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(e.grad, ref_de, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(w.grad, ref_dw, rtol=1e-9, atol=1e-12)


def test_shard_range_partitions_classes():
    for num_classes, world in [(37, 3), (10, 4), (3, 5), (85742, 8)]:
        ranges = [shard_range(num_classes, r, world) for r in range(world)]
        assert sum(n for _, n in ranges) == num_classes
        assert all(ranges[r][0] + ranges[r][1] == ranges[r + 1][0] for r in range(world - 1))
        assert max(n for _, n in ranges) - min(n for _, n in ranges) <= 1
    with pytest.raises(ValueError, match="rank"):
        shard_range(10, 3, 3)


def test_sample_classes_keeps_positives_and_is_deterministic():
    labels = torch.tensor([3, 40, 41, 3, 59, 7])  # shard [20, 60): positives 40, 41, 59
    runs = [sample_classes(labels, 20, 40, 0.25, torch.Generator().manual_seed(s)) for s in (1, 1, 2)]
    (idx, local), (idx2, _), (idx3, _) = runs
    assert idx.numel() == 10 and torch.equal(idx, idx.sort().values)
    assert {20, 21, 39} <= set(idx.tolist())
    assert torch.equal(idx, idx2) and not torch.equal(idx, idx3)
    in_shard = (labels >= 20) & (labels < 60)
    assert torch.equal(local[~in_shard], torch.full_like(local[~in_shard], -1))
    assert torch.equal(idx[local[in_shard]] + 20, labels[in_shard])
    # More positives than int(rate * C): keep exactly the positives.
    idx_few, _ = sample_classes(labels, 20, 40, 0.05, torch.Generator().manual_seed(1))
    assert idx_few.tolist() == [20, 21, 39]
    with pytest.raises(ValueError, match="sample_rate"):
        sample_classes(labels, 0, 10, 1.5)


def test_partial_fc_step_moves_only_sampled_rows():
    """Two forwards per step (micro-batches): the union of their samples moves; every other
    row keeps its weight and momentum (plain SGD numbers on the moved rows)."""
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(30, 8) * 0.01)
    pfc = PartialFC(0, 30, sample_rate=0.3)
    opt = torch.optim.SGD([weight], lr=0.1, momentum=0.9, weight_decay=5e-4)
    gen = torch.Generator().manual_seed(3)
    emb_hat = F.normalize(torch.randn(6, 8), dim=1)
    label_sets = [torch.tensor([1, 2, 2, 5, 9, 28]), torch.tensor([3, 3, 4, 9, 11, 12])]
    for step in range(3):
        opt.zero_grad()
        drawn = []
        for labels in label_sets:
            index_S, local_labels = pfc.sample(labels, gen)
            drawn.append(index_S)
            assert index_S.numel() == 9 and set(labels.tolist()) <= set(index_S.tolist())
            ell, cos_t = lse_and_target(emb_hat, weight[index_S], local_labels, 64.0,
                                        backend="chunked")
            (ell - 64.0 * cos_t).mean().backward()
        mask = torch.zeros(30, dtype=torch.bool)
        mask[torch.cat(drawn)] = True
        assert 9 < mask.sum() < 30
        assert torch.equal(weight.grad[~mask], torch.zeros_like(weight.grad[~mask]))
        w_before = weight.detach().clone()
        buf = opt.state.get(weight, {}).get("momentum_buffer")
        buf_before = buf.clone() if buf is not None else torch.zeros_like(w_before)
        with pfc.keep_unsampled_rows(weight, opt):
            opt.step()
        assert torch.equal(pfc.rows_mask(pfc.last_step_index, weight.device), mask)
        buf_after = opt.state[weight]["momentum_buffer"]
        assert torch.equal(weight[~mask], w_before[~mask]), step
        assert torch.equal(buf_after[~mask], buf_before[~mask]), step
        # Sampled rows took a plain SGD momentum step.
        d_p = weight.grad + 5e-4 * w_before
        expect_buf = d_p if step == 0 else 0.9 * buf_before + d_p
        torch.testing.assert_close(buf_after[mask], expect_buf[mask])
        torch.testing.assert_close(weight.detach()[mask], (w_before - 0.1 * expect_buf)[mask])
    with pytest.raises(ValueError, match="num_local"):
        PartialFC(0, 0, 0.5)
