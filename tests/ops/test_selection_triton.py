"""Triton top-K selection vs the reference ``select_topk`` (exact on tie-free random inputs).

The kernel fills its output with -1 before writing, so an unwritten slot below K fails
``SparseIndex.validate`` (padding allowed only past ``kv_count``).
"""


import pytest
import torch

from tests.ops.triton_env import CPU_OK, DEVICE  # noqa: F401  (sets TRITON_INTERPRET first)

triton = pytest.importorskip("triton")

from megatron_dsv.ops.options import KernelOptions  # noqa: E402
from megatron_dsv.ops.selection import pool_keys, group_proxies, select_topk  # noqa: E402
from megatron_dsv.ops.selection import triton as sel_triton  # noqa: E402

# The three selection drivers (see selection/triton.py): one program per group tile with the
# scores in registers or streamed, and the split path (forced by a unit limit of 0).
PATHS = {
    "fused": KernelOptions(),
    "stream": KernelOptions(select_fused_kind="stream"),
    "split": KernelOptions(select_fused_max_units=0),
}


@CPU_OK
@pytest.mark.parametrize(
    "b,h,s,g,kvb,kh",
    [
        (1, 2, 128, 16, 1, [5, 128]),  # K = all
        (2, 3, 256, 32, 4, [1, 64, 17]),  # K = 1, K = all units, batch 2
        (1, 2, 96, 16, 1, [7, 33]),  # units not a multiple of the tile
        (1, 1, 512, 16, 16, [3]),
        (1, 2, 1024, 64, 1, [100, 513]),  # more units than one search tile
    ],
)
@pytest.mark.parametrize("path", ["fused", "stream", "split"])
def test_selection_matches_reference(b, h, s, g, kvb, kh, path):
    torch.manual_seed(0)
    q = torch.randn(b, h, s, 16, device=DEVICE)
    k = torch.randn(b, h, s, 16, device=DEVICE)
    got = select_topk(q, k, g, kh, kv_block=kvb, backend="triton", options=PATHS[path]).validate()
    ref = select_topk(q, k, g, kh, kv_block=kvb, backend="reference")
    assert got.kv_idx.shape == ref.kv_idx.shape
    assert torch.equal(got.kv_count, ref.kv_count)
    assert torch.equal(got.kv_idx, ref.kv_idx)


@CPU_OK
@pytest.mark.parametrize("path", ["fused", "stream", "split"])
def test_selection_ties_pick_exactly_k(path):
    """All scores equal: any K units are right; count, order and padding must still hold."""
    q = torch.randn(1, 2, 64, 16, device=DEVICE)
    k = torch.ones(1, 2, 64, 16, device=DEVICE)
    got = select_topk(q, k, 16, [10, 3], backend="triton", options=PATHS[path]).validate()
    assert (got.kv_idx[0, 0] >= 0).all() and (got.kv_idx[0, 1, :, 3:] == -1).all()


@CPU_OK
@pytest.mark.parametrize("p", [1, 4, 48, 64])
def test_pool_matches_naive(p):
    """The pooling kernel (group proxies, key-unit means) equals the fp32 PyTorch means."""
    torch.manual_seed(1)
    x = torch.randn(2, 3, 4 * 48 * 16, 16, device=DEVICE)
    got = sel_triton._pool(x, p)
    ref = pool_keys(x, p)
    assert got.dtype == torch.float32 and got.shape == ref.shape
    assert torch.allclose(got, ref, rtol=1e-6, atol=1e-7)
    assert torch.allclose(sel_triton._pool(x, 16), group_proxies(x, 16), rtol=1e-6, atol=1e-7)


def _captured(index, proxy, units):
    idx = index.kv_idx.long()
    s = torch.einsum("bhgr,bhnr->bhgn", proxy, units)
    return torch.where(idx >= 0, s.gather(-1, idx.clamp(min=0)), torch.zeros_like(idx, dtype=s.dtype)).sum()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kvb", [1, 64])
def test_selection_gpu_large(kvb):
    torch.manual_seed(4)
    b, h, s, g = 1, 4, 16384, 32
    q = torch.randn(b, h, s, 16, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(b, h, s, 16, device="cuda", dtype=torch.bfloat16)
    n = s // kvb
    kh = [n // 10, n // 20, 1, n]
    got = select_topk(q, k, g, kh, kv_block=kvb, backend="triton").validate()
    ref = select_topk(q, k, g, kh, kv_block=kvb, backend="reference")
    same = (got.kv_idx == ref.kv_idx).float().mean().item()
    # fp32 scores in another summation order: only near-ties at the K-th score may differ.
    assert same > 0.999
    proxy, units = group_proxies(q, g), pool_keys(k, kvb)
    a, r = _captured(got, proxy, units), _captured(ref, proxy, units)
    assert abs(a - r) <= 1e-5 * abs(r) + 1e-3


@CPU_OK
@pytest.mark.parametrize("max_scores,want", [(16 * 256, "resident"), (16 * 128, "stream"), (16 * 2048, "resident")])
def test_resident_score_limit_picks_the_kernel(max_scores, want, monkeypatch):
    """KernelOptions.select_resident_max_scores: N=256 units (next pow2 256) stay in registers up to
    16 x 256 scores and stream below that; either way the index equals the reference."""
    ran = []
    for name in ("_resident_select_kernel", "_fused_select_kernel"):
        kernel = getattr(sel_triton, name)

        class Spy:
            def __init__(self, name, kernel):
                self.name, self.kernel = name, kernel

            def __getitem__(self, grid):
                ran.append(self.name)
                return self.kernel[grid]

        monkeypatch.setattr(sel_triton, name, Spy(name, kernel))
    torch.manual_seed(4)
    q = torch.randn(1, 2, 1024, 16, device=DEVICE)
    k = torch.randn(1, 2, 1024, 16, device=DEVICE)
    opts = KernelOptions(select_resident_max_scores=max_scores)
    got = select_topk(q, k, 64, [30, 200], kv_block=4, backend="triton", options=opts).validate()
    ref = select_topk(q, k, 64, [30, 200], kv_block=4, backend="reference")
    assert ran == ["_resident_select_kernel" if want == "resident" else "_fused_select_kernel"]
    assert torch.equal(got.kv_idx, ref.kv_idx)
    with pytest.raises(ValueError, match="select_resident_max_scores must be an int >= 0"):
        KernelOptions(select_resident_max_scores=-1)
    # 16 x 4096 scores needed 263168 bytes of shared memory on an H200 (limit 232448): refused at
    # construction, before any selection runs
    with pytest.raises(ValueError, match=r"above 32768 \(16 x 2048\).*263168 bytes"):
        KernelOptions(select_resident_max_scores=16 * 4096)
