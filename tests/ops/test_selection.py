import pytest
import torch

import megatron_dsv.ops.selection.naive as naive
from megatron_dsv.ops.selection import select_topk


def brute_force_sets(q_lr, k_lr, g, kv_count, kv_block):
    """Full [Gq, N] scores with float64 and plain topk; the sets of selected units."""
    b, h, s, r = q_lr.shape
    proxy = q_lr.double().view(b, h, s // g, g, r).mean(3)
    units = k_lr.double().view(b, h, -1, kv_block, r).mean(3)
    scores = proxy @ units.transpose(-1, -2)
    out = {}
    for bi in range(b):
        for hi in range(h):
            k = int(kv_count[bi, hi])
            top = scores[bi, hi].topk(k, dim=-1).indices
            for gi in range(top.shape[0]):
                out[bi, hi, gi] = set(top[gi].tolist())
    return out


@pytest.mark.parametrize("kv_block", [1, 4])
@pytest.mark.parametrize("k_spec", ["per_head", "one", "all"])
def test_matches_brute_force(kv_block, k_spec, monkeypatch):
    monkeypatch.setattr(naive, "_CHUNK_ELEMS", 64)  # force several chunks of groups
    b, h, s, r, g = 2, 3, 64, 8, 8
    units = s // kv_block
    q_lr, k_lr = torch.randn(b, h, s, r), torch.randn(b, h, s, r)
    k = {"per_head": [3, units // 2, 1], "one": 1, "all": units}[k_spec]
    idx = select_topk(q_lr, k_lr, g, k, kv_block=kv_block, backend="reference").validate()
    kv_count = idx.kv_count
    assert idx.kv_idx.shape == (b, h, s // g, int(kv_count.max()))
    want = brute_force_sets(q_lr, k_lr, g, kv_count, kv_block)
    for (bi, hi, gi), units_set in want.items():
        n = int(kv_count[bi, hi])
        got = idx.kv_idx[bi, hi, gi]
        assert set(got[:n].tolist()) == units_set
        assert bool((got[n:] == -1).all())


def test_k_per_batch_and_head():
    q_lr, k_lr = torch.randn(2, 2, 32, 4), torch.randn(2, 2, 32, 4)
    idx = select_topk(q_lr, k_lr, 8, torch.tensor([[1, 2], [3, 32]]), backend="reference").validate()
    assert idx.kv_count.tolist() == [[1, 2], [3, 32]]
    assert sorted(idx.kv_idx[1, 1, 0].tolist()) == list(range(32))


@pytest.mark.parametrize(
    "kwargs,err",
    [
        (dict(group_size=7), "not a multiple of the query group size"),
        (dict(k_per_head=65), r"k_per_head must lie in \[1, 64\]"),
        (dict(k_per_head=0), "k_per_head must lie"),
        (dict(kv_block=5), "not a multiple of kv_block"),
        (dict(k_per_head=[1, 2]), "entries for 3 heads"),
        (dict(backend="cuda"), "backend must be"),
    ],
)
def test_bad_inputs_raise(kwargs, err):
    args = dict(q_lr=torch.randn(1, 3, 64, 4), k_lr=torch.randn(1, 3, 64, 4), group_size=8, k_per_head=4)
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=err):
        select_topk(**args)


def test_bad_dtype_raises():
    with pytest.raises(TypeError, match="floating point"):
        select_topk(torch.ones(1, 1, 8, 4, dtype=torch.int64), torch.randn(1, 1, 8, 4), 8, 1)


def test_k_per_head_extremes_are_read_on_the_host():
    """select_topk takes min/max K from the host copy it validates, so a CUDA index needs no
    read-back (tests/gpu/test_gpu_no_sync.py checks the whole sparse step on the device)."""
    from megatron_dsv.ops.selection import _k_per_head

    counts, k_min, k_max = _k_per_head([3, 5, 4], 2, 3, 8, "cpu")
    assert counts.dtype == torch.int32 and counts.tolist() == [[3, 5, 4], [3, 5, 4]]
    assert (k_min, k_max) == (3, 5)
    counts, k_min, k_max = _k_per_head(torch.tensor([[1, 8], [2, 7]]), 2, 2, 8, "cpu")
    assert (k_min, k_max) == (1, 8) and counts.tolist() == [[1, 8], [2, 7]]
