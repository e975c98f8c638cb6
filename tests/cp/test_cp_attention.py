"""Context-parallel attention equals single-process attention on the gathered sequence.

Head-only (uneven head lists), sequence-only (ring for dense; selective exchange with uneven key
sets for sparse) and hybrid 2x2, on 2 and 4 gloo ranks: every rank checks its slice of the
output and of dq/dk/dv against the reference computed on the whole sequence, in fp64.
"""

from __future__ import annotations

import pytest
import torch

from megatron_dsv.cp.groups import build_cp_groups, slot_and_chunk, split_ranks
from megatron_dsv.cp.head_parallel import kv_send_heads
from megatron_dsv.cp.plan import LayerPlan, balance_heads
from megatron_dsv.ops.mask import CausalMask
from tests.cp.distributed import run_ranks

B, H, HKV, D, G, KVB, R = 2, 4, 2, 16, 8, 4, 4
SCALE = 0.25
TOL = 1e-9


def _inputs(s_total, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(s_total, B, H, D, generator=gen, dtype=torch.float64)
    k = torch.randn(s_total, B, HKV, D, generator=gen, dtype=torch.float64)
    v = torch.randn(s_total, B, HKV, D, generator=gen, dtype=torch.float64)
    do = torch.randn(s_total, B, H, D, generator=gen, dtype=torch.float64)
    wq = torch.randn(H, D, R, generator=gen, dtype=torch.float64)
    wk = torch.randn(H, D, R, generator=gen, dtype=torch.float64)
    return q, k, v, do, wq, wk


def _project(q, k, wq, wk, heads):
    """Low-rank q/k for query heads ``heads``; q ``[b, h, s, D]``, k ``[b, hkv, s, D]`` (local rep)."""
    idx = list(heads)
    rep = len(idx) // k.shape[1]
    q_lr = torch.einsum("bhsd,hdr->bhsr", q, wq[idx])
    k_lr = torch.einsum("bhsd,hdr->bhsr", k.repeat_interleave(rep, 1), wk[idx])
    return q_lr, k_lr


K_UNITS = [3, 6, 2, 9]  # heterogeneous per-head K (in key blocks)


def _reference(q, k, v, do, wq, wk, sparse, mask=None):
    from megatron_dsv.ops.selection import select_topk
    from megatron_dsv.ops.sparse_attention import sparse_attention
    from megatron_dsv.cp.seq_parallel import full_index

    qb, kb, vb = (t.permute(1, 2, 0, 3).clone().requires_grad_(True) for t in (q, k, v))
    s = qb.shape[2]
    if sparse:
        q_lr, k_lr = _project(qb.detach(), kb.detach(), wq, wk, range(H))
        index = select_topk(q_lr, k_lr, G, K_UNITS, kv_block=KVB, backend="reference", mask=mask)
    else:
        index = full_index(B, H, s, s, G, KVB, q.device, mask)
    out, _ = sparse_attention(qb, kb, vb, index, SCALE, backend="reference")
    out.backward(do.permute(1, 2, 0, 3))
    return out.permute(2, 0, 1, 3), qb.grad.permute(2, 0, 1, 3), kb.grad.permute(2, 0, 1, 3), vb.grad.permute(2, 0, 1, 3)


def _check_plan(rank, world, plan, sparse, s_local, mask=None):
    from megatron_dsv.cp.context import CPAttention
    from megatron_dsv.ops.selection import select_topk

    groups = build_cp_groups(torch.distributed.group.WORLD)
    q, k, v, do, wq, wk = _inputs(s_local * world)
    ref = _reference(q, k, v, do, wq, wk, sparse, mask)
    sl = slice(rank * s_local, (rank + 1) * s_local)
    ql, kl, vl = (t[sl].clone().requires_grad_(True) for t in (q, k, v))
    cp = CPAttention(plan, groups, H, HKV)
    qh, kh, vh = cp.to_heads(ql, kl, vl)
    if sparse:
        q_lr, k_lr = _project(qh.detach(), kh.detach(), wq, wk, cp.heads)
        k_lr = cp.gather_keys(k_lr)
        index = select_topk(
            q_lr, k_lr, G, [K_UNITS[h] for h in cp.heads], kv_block=KVB, backend="reference", mask=mask,
            q_offset=cp.query_offset(qh.shape[2], mask),
        )
        out = cp.sparse(qh, kh, vh, index, SCALE, "reference")
        if cp.exchange is not None:
            assert cp.exchange.fetched_bytes <= cp.exchange.allgather_bytes, cp.exchange
            if mask is not None and mask.kind == "causal" and cp.chunk == 0:
                # every other chunk is later: its units are fillers, never fetched
                assert cp.exchange.fetched_bytes == 0, cp.exchange
    else:
        out = cp.dense(qh, kh, vh, SCALE, G, KVB, "reference", mask=mask)
    out = cp.from_heads(out)
    out.backward(do[sl])
    name = f"plan {plan.key()} {'sparse' if sparse else 'dense'} {mask} rank {rank}"
    for what, got, want in (("out", out, ref[0][sl]), ("dq", ql.grad, ref[1][sl]), ("dk", kl.grad, ref[2][sl]), ("dv", vl.grad, ref[3][sl])):
        err = (got.detach() - want).abs().max().item()
        assert err < TOL, f"{name}: {what} differs by {err}"


def _plans(world):
    work = [0.3, 0.05, 0.1, 0.6]  # heterogeneous densities -> uneven head lists
    plans = [LayerPlan(1, world, ((0, 1, 2, 3),))]
    plans.append(LayerPlan(world, 1, balance_heads(work, world)))
    if world == 4:
        plans.append(LayerPlan(2, 2, balance_heads(work, 2)))
        plans.append(LayerPlan(2, 2, balance_heads(work, 2, unit=H // HKV)))
    return plans


def _all_plans(rank, world, s_local):
    for plan in _plans(world):
        for sparse in (False, True):
            _check_plan(rank, world, plan, sparse, s_local)


@pytest.mark.parametrize("world", [2, 4])
def test_cp_attention_matches_single_process(world):
    run_ranks(_all_plans, world, 32 if world == 2 else 16)


MASKS = [CausalMask("causal"), CausalMask("chunk_causal", 16), CausalMask("chunk_causal", 32)]


def _masked_cases(world):
    """(plan, mask). World 2: every mask on the sequence-only split and the head-only split once
    (the mask passes through unchanged). World 4 (four processes on CI's two cores: the slow
    part) only what world 2 cannot reach: a chunk spanning shards on the sequence split, and the
    2x2 hybrids (causal; chunk 32 with GQA-whole units)."""
    seq, head = _plans(world)[:2]
    if world == 4:
        return [(seq, MASKS[2]), (_plans(4)[2], MASKS[0]), (_plans(4)[3], MASKS[2])]
    return [(seq, m) for m in MASKS] + [(head, MASKS[1])]


def _masked_plans(rank, world, s_local):
    for plan, mask in _masked_cases(world):
        for sparse in (False, True):
            _check_plan(rank, world, plan, sparse, s_local, mask)


@pytest.mark.parametrize("world", [2, 4])
def test_masked_cp_attention_matches_single_process(world):
    """Causal and chunk-causal masks over the gathered sequence: head-only (the mask passes
    through), sequence-only (ring with skipped, full and masked steps; selective exchange with
    the compacted mask) and 2x2 hybrid. World 2 has 32-token shards (chunk 16: a shard holds
    chunks); world 4 has 16-token shards (chunk 32: a chunk spans shards)."""
    run_ranks(_masked_plans, world, 32 if world == 2 else 16)


def test_masked_k_floor_holds_for_the_test_k():
    for mask in MASKS:
        assert min(K_UNITS) >= mask.max_forced(64, G, KVB)


def _bytes(rank, world, s_local, k_units, out_path):
    """Selective exchange at ~94% sparsity: count what it moves against an all-gather."""
    import json

    from megatron_dsv.cp.seq_parallel import gather_sequence, selective_sparse_attention
    from megatron_dsv.ops.selection import select_topk

    q, k, v, _, wq, wk = _inputs(s_local * world, seed=1)
    sl = slice(rank * s_local, (rank + 1) * s_local)
    qb, kb, vb = (t[sl].permute(1, 2, 0, 3).contiguous() for t in (q, k, v))
    q_lr, k_lr = _project(qb, kb, wq, wk, range(H))
    group = torch.distributed.group.WORLD
    index = select_topk(q_lr, gather_sequence(k_lr, group), G, k_units, kv_block=KVB, backend="reference")
    _, _, stats = selective_sparse_attention(qb, kb, vb, index, SCALE, group, "reference")
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump({"fetched": stats.fetched_bytes, "allgather": stats.allgather_bytes,
                       "union": stats.union_density}, f)


def test_selective_exchange_moves_fewer_bytes_than_allgather(tmp_path):
    import json

    out = tmp_path / "bytes.json"
    s_local, world = 128, 2
    n_units = s_local * world // KVB  # 64 key blocks; K = 4 blocks = 93.75% sparsity
    run_ranks(_bytes, world, s_local, 4, str(out))
    got = json.loads(out.read_text())
    kv_bytes = B * HKV * (s_local // KVB) * KVB * 2 * D * 8  # remote K and V of one peer, fp64
    assert got["allgather"] == (world - 1) * kv_bytes
    assert 0 < got["fetched"] < got["allgather"], got
    # every fetched block is one some query group selected: at most 4 blocks x 16 groups per kv head
    assert all(4 / n_units <= u <= min(1.0, 2 * 4 * (s_local // G) / n_units) for u in got["union"]), got


def test_uneven_head_lists_are_really_uneven():
    slots = balance_heads([0.3, 0.05, 0.1, 0.6], 2)
    assert sorted(len(s) for s in slots) == [1, 3]
    assert kv_send_heads(slots, 2) == tuple(tuple(h // 2 for h in s) for s in slots)
    assert kv_send_heads(((0, 1), (2, 3)), 2) == ((0,), (1,))


def test_rank_arithmetic():
    heads, seqs = split_ranks([10, 11, 12, 13, 14, 15], 3)
    assert heads == [[10, 11, 12], [13, 14, 15]] and seqs == [[10, 13], [11, 14], [12, 15]]
    assert [slot_and_chunk(r, 3) for r in range(6)] == [(0, 0), (1, 0), (2, 0), (0, 1), (1, 1), (2, 1)]
    with pytest.raises(ValueError, match="does not divide"):
        split_ranks(range(6), 4)


def _hierarchical(rank, world, s_local):
    """Megatron's --hierarchical-context-parallel-sizes 2 2 groups are reused for the 2x2 split
    (level 0 = adjacent ranks = head groups, level 1 = stride 2 = sequence groups)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel(context_parallel_size=world, hierarchical_context_parallel_sizes=[2, 2])
    hcp = ps.get_hierarchical_context_parallel_groups()
    groups = build_cp_groups(ps.get_context_parallel_group(), hcp)
    head_g, seq_g = groups.get(2)
    assert head_g is hcp[0] and seq_g is hcp[1]
    assert dist.get_process_group_ranks(head_g) == [rank - rank % 2, rank - rank % 2 + 1]
    assert dist.get_process_group_ranks(seq_g) == [rank % 2, rank % 2 + 2]
    work = [0.3, 0.05, 0.1, 0.6]
    for sparse in (False, True):
        _check_plan(rank, world, LayerPlan(2, 2, balance_heads(work, 2)), sparse, s_local)


def test_reuses_megatron_hierarchical_cp_groups():
    pytest.importorskip("einops")  # Megatron's hierarchical groups need it
    run_ranks(_hierarchical, 4, 16)
