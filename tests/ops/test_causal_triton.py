"""Triton sparse attention under causal and chunk-causal masks vs masked dense attention (fp64):
out, LSE, dq, dk, dv. CPU: the Triton interpreter, fp32, tiny shapes."""

import dataclasses

import pytest
import torch

from tests.ops.triton_env import CPU_OK, DEVICE, INTERPRET  # noqa: F401  (sets TRITON_INTERPRET first)

triton = pytest.importorskip("triton")

from megatron_dsv.ops.mask import CausalMask  # noqa: E402
from megatron_dsv.ops.options import KernelOptions  # noqa: E402
from megatron_dsv.ops.selection import select_topk  # noqa: E402
from megatron_dsv.ops.sparse_attention import (  # noqa: E402
    attention_backend,
    sparse_attention,
    sparse_attention_bwd,
    sparse_attention_fwd,
)
from megatron_dsv.ops.sparse_attention.cudnn import cudnn_supported  # noqa: E402
from megatron_dsv.ops.sparse_attention.naive import masked_dense_attention  # noqa: E402
from megatron_dsv.ops.sparse_index import PAD, SparseIndex  # noqa: E402

CAUSAL = CausalMask("causal")
# fp32 end to end: the kernels differ from the fp64 reference by summation order and fp32
# rounding (~3e-7 measured); on a GPU fp32 dots run as tf32 (~1e-3).
TOL = 2e-5 if INTERPRET else 5e-3


def chunk(t):
    return CausalMask("chunk_causal", t)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _index(b, h, s, g, kvb, ks, mask, seed=0):
    """Masked selection; ``ks`` per head, ``"need"`` = the mask's minimum K, ``"all"`` = every unit."""
    units = s // kvb
    need = mask.max_forced(s, g, kvb)
    k_per_head = [need if k == "need" else units if k == "all" else max(need, k) for k in ks]
    gen = torch.Generator().manual_seed(seed)
    q_lr, k_lr = (torch.randn(b, h, s, 8, generator=gen) for _ in range(2))
    return select_topk(q_lr, k_lr, g, k_per_head, kv_block=kvb, mask=mask, backend="reference").to(DEVICE)


def _filler_units(index):
    """Listed units that no query of their group may read (a group with fewer allowed units than K)."""
    idx = index.kv_idx.long().cpu()
    last = (torch.arange(index.num_groups) + 1) * index.group_size - 1
    return ((idx >= 0) & (idx * index.kv_block > index.mask.limit(last).view(1, 1, -1, 1))).sum().item()


def _grads(q, k, v, fn, do, dlse):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out, lse = fn(q, k, v)
    dq, dk, dv = torch.autograd.grad((out.double() * do).sum() + (lse.double() * dlse).sum(), (q, k, v))
    return [out, lse, dq, dk, dv]


def _reference(q, k, v, keep, do, dlse):
    scale = q.shape[-1] ** -0.5
    return _grads(q.double(), k.double(), v.double(), lambda q_, k_, v_: masked_dense_attention(q_, k_, v_, keep, scale), do, dlse)


TILES16 = {kind: {"BLOCK_M": 16} for kind in ("fwd", "dq", "dkdv")}
# A masked index with 1 < kv_block < the forward's or dq's key tile is refused (masked_tile_problem):
# kv_block 16 runs with 16-key tiles in both.
KEY_TILES16 = {"fwd": {"BLOCK_N": 16}, "dq": {"BLOCK_N": 16}}

CASES = [
    # b, h, hkv, s, d, g, kv_block, mask, K per head, kernel options
    pytest.param(2, 2, 1, 64, 32, 16, 1, CAUSAL, ["need", 48], {}, id="token-causal-gqa-K>allowed"),
    pytest.param(1, 3, 3, 96, 32, 16, 1, chunk(24), ["need", 40, "all"], {}, id="token-chunk24-Kall"),
    pytest.param(1, 4, 2, 128, 32, 32, 16, CAUSAL, ["need", 3, 5, "all"], {"tune": KEY_TILES16}, id="block16-causal-keymajor-gqa"),
    pytest.param(2, 2, 2, 128, 32, 16, 16, chunk(40), ["need", 6], {"tune": KEY_TILES16}, id="block16-chunk40-cuts-units"),
    pytest.param(1, 2, 1, 128, 32, 32, 16, CAUSAL, ["need", 6], {"tune": {**TILES16, **{k: {"BLOCK_M": 16, "BLOCK_N": 16} for k in ("fwd", "dq")}}}, id="block16-query-tiles<group"),
    pytest.param(1, 2, 2, 128, 32, 32, 16, chunk(48), ["need", 5], {"force_atomic_dkdv": True, "tune": KEY_TILES16}, id="block16-atomic-dkdv"),
    pytest.param(1, 2, 2, 128, 32, 32, 16, CAUSAL, ["need", 5], {"fused_dq_atomic": True, "tune": KEY_TILES16}, id="block16-fused-dq"),
    pytest.param(1, 2, 1, 128, 32, 32, 32, CAUSAL, ["need", 3], {}, id="block32-contig-causal"),
    pytest.param(1, 2, 2, 128, 48, 32, 32, chunk(64), ["need", "all"], {}, id="block32-chunk64-d48"),
    pytest.param(1, 2, 2, 256, 32, 64, 64, CAUSAL, ["need", 3], {}, id="block64-g64-causal"),
    # KernelOptions.tma: descriptor loads of K/V (forward, dq) and Q/dO (dk/dv) on the masked loops
    pytest.param(1, 2, 1, 128, 32, 32, 32, CAUSAL, ["need", 3], {"tma": True}, id="block32-contig-causal-tma"),
    pytest.param(1, 2, 2, 128, 32, 32, 32, chunk(64), ["need", "all"], {"tma": True}, id="block32-chunk64-tma"),
    pytest.param(1, 2, 2, 256, 32, 64, 64, CAUSAL, ["need", 3], {"tma": True}, id="block64-g64-causal-tma"),
    # KernelOptions.dkdv_transposed: off by default for the 32-row query tiles above (G=32), on for
    # 16- and 32-key tiles with 64-row query tiles (the last case); the other orientation of each
    pytest.param(1, 4, 2, 128, 32, 32, 16, CAUSAL, ["need", 3, 5, "all"], {"tune": KEY_TILES16, "dkdv_transposed": False}, id="block16-causal-untransposed"),
    pytest.param(1, 2, 2, 256, 32, 64, 64, chunk(96), ["need", 3], {"dkdv_transposed": True}, id="block64-chunk96-transposed"),
    pytest.param(1, 4, 2, 256, 32, 64, 32, CAUSAL, ["need", 3, 6, "all"], {}, id="block32-g64-causal-transposed-default"),
]


def _triton_matches_reference(q, k, v, index, options, do, dlse):
    """Out, LSE and dq/dk/dv of the masked Triton kernels against the fp64 reference on the
    index's dense mask; returns the reference."""
    got = _grads(q, k, v, lambda q_, k_, v_: sparse_attention(q_, k_, v_, index, backend="triton", options=options), do, dlse)
    ref = _reference(q, k, v, index.to_dense_mask(), do, dlse)
    for name, a, r in zip(["out", "lse", "dq", "dk", "dv"], got, ref):
        assert torch.isfinite(a).all(), f"{name} has unwritten (NaN) or non-finite elements"
        assert _rel(a, r) < TOL, f"{name}: rel err {_rel(a, r):.2e} >= {TOL}"
    return ref


@CPU_OK
@pytest.mark.parametrize("b,h,hkv,s,d,g,kvb,mask,ks,opts", CASES)
def test_masked_kernels_match_masked_dense(b, h, hkv, s, d, g, kvb, mask, ks, opts, poisoned):
    # drawn on the CPU, so the GPU run sees the inputs the interpreter run sees
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(b, h, s, d, generator=gen).to(DEVICE)
    k, v = (torch.randn(b, hkv, s, d, generator=gen).to(DEVICE) for _ in range(2))
    do = torch.randn(b, h, s, d, generator=gen, dtype=torch.float64).to(DEVICE)
    dlse = torch.randn(b, h, s, generator=gen, dtype=torch.float64).to(DEVICE)
    index = _index(b, h, s, g, kvb, ks, mask)
    assert bool((index.kv_idx == PAD).any())  # heads differ in K: padding entries exist
    ref = _triton_matches_reference(q, k, v, index, dataclasses.replace(poisoned, **opts), do, dlse)
    # the mask matters here: the same units without it are far outside the tolerance (on the
    # H200's draws the smallest change was 0.105, 21x the tolerance)
    unmasked = dataclasses.replace(index, mask=None)
    loose = _reference(q, k, v, unmasked.to_dense_mask(), do, dlse)
    for name, a, r in zip(["out", "lse", "dq", "dk", "dv"], loose, ref):
        assert _rel(a, r) > 10 * TOL, f"{name}: dropping the mask changes it by only {_rel(a, r):.2e}"


@CPU_OK
def test_cases_cover_filler_units():
    """Groups with fewer allowed units than K list disallowed units, which the kernels must skip."""
    assert _filler_units(_index(2, 2, 64, 16, 1, ["need", 48], CAUSAL)) > 0
    assert _filler_units(_index(1, 4, 128, 32, 16, ["need", 3, 5, "all"], CAUSAL)) > 0


@CPU_OK
@pytest.mark.parametrize("mask,kvb", [(CAUSAL, 1), (chunk(48), 16)])
def test_forward_backward_blocks_on_masked_index(mask, kvb, poisoned):
    """Context parallelism's building blocks (forward only, backward given out/lse) on Triton."""
    poisoned = dataclasses.replace(poisoned, tune=KEY_TILES16)
    torch.manual_seed(1)
    b, h, s, d, g = 1, 2, 96, 32, 16
    q, k, v, do = (torch.randn(b, h, s, d, device=DEVICE) for _ in range(4))
    index = _index(b, h, s, g, kvb, ["need", 5], mask, seed=1)
    scale = d**-0.5
    out, lse = sparse_attention_fwd(q, k, v, index, scale, backend="triton", options=poisoned)
    ref_out, ref_lse = sparse_attention_fwd(q, k, v, index, scale, backend="reference")
    assert _rel(out, ref_out) < TOL and _rel(lse, ref_lse) < TOL
    got = sparse_attention_bwd(q, k, v, ref_out, ref_lse, do, index, scale, backend="triton", options=poisoned)
    want = sparse_attention_bwd(q, k, v, ref_out, ref_lse, do, index, scale, backend="reference")
    for name, a, r in zip(["dq", "dk", "dv"], got, want):
        assert torch.isfinite(a).all() and _rel(a, r) < TOL, name


@CPU_OK
def test_masked_index_without_a_readable_key_is_refused():
    """A group whose lowest unit starts past its first query's limit would give that query an
    empty softmax: the value check refuses it before any kernel runs."""
    s, g, kvb = 64, 16, 16
    q = torch.randn(1, 1, s, 16, device=DEVICE)
    good = torch.tensor([[[[0], [1], [2], [3]]]], dtype=torch.int32, device=DEVICE)
    count = torch.ones(1, 1, dtype=torch.int32, device=DEVICE)
    index = SparseIndex(good, count, g, kvb, s, s, CAUSAL)
    n16 = KernelOptions(tune=KEY_TILES16)
    sparse_attention(q, q, q, index, backend="triton", options=n16)  # every group lists its own unit: fine
    bad = good.clone()
    bad[0, 0, 2, 0] = 3  # group 2 (queries 32..47) lists only keys 48..63
    index = SparseIndex(bad, count, g, kvb, s, s, CAUSAL)
    with pytest.raises(ValueError, match=r"group 2\) lists no key its first query \(token 32\)"):
        sparse_attention(q, q, q, index, backend="triton", options=n16)
    with pytest.raises(ValueError, match="units holding each group's own queries"):
        index.validate()
    # chunk-causal: a query may read its whole chunk, so a later unit of the chunk is enough
    SparseIndex(bad, count, g, kvb, s, s, chunk(32)).validate()
    past = good.clone()
    past[0, 0, 0, 0] = 2  # group 0 (chunk 0..31) lists only keys 32..47
    with pytest.raises(ValueError, match="past that query's last allowed key 31"):
        SparseIndex(past, count, g, kvb, s, s, chunk(32)).validate()


@CPU_OK
@pytest.mark.parametrize("mask", [CAUSAL, chunk(48)], ids=["causal", "chunk48"])
def test_masked_blocks_below_the_forward_tile_are_refused(mask, monkeypatch, caplog):
    """1 < kv_block < the forward's BLOCK_N under a mask gave a wrong forward on an H200 (kv_block
    16, BLOCK_N 64, bf16): every Triton entry point refuses it before a kernel runs, ``"triton"``
    is an error and ``"auto"`` picks the reference with a logged warning, never silently."""
    import logging

    import megatron_dsv.ops.sparse_attention as sa
    from megatron_dsv.ops._utils import BackendChoice
    from megatron_dsv.ops.sparse_attention.triton import masked_tile_problem

    b, h, s, d, g = 1, 2, 96, 32, 16
    q = torch.randn(b, h, s, d, device=DEVICE)
    for kvb, tune, refused in [(4, {}, True), (16, {}, True), (16, KEY_TILES16, False), (32, {}, False), (1, {}, False)]:
        index = _index(b, h, s, g, kvb, ["need", "all"], mask)
        opts = KernelOptions(tune=tune)
        assert (masked_tile_problem(index, d, q.dtype, opts) is not None) == refused, (kvb, tune)
        calls = [
            lambda: sparse_attention(q, q, q, index, backend="triton", options=opts),
            lambda: sparse_attention_fwd(q, q, q, index, d**-0.5, backend="triton", options=opts),
            lambda: sparse_attention_bwd(q, q, q, q, q[..., 0], q, index, d**-0.5, backend="triton", options=opts),
        ]
        if refused:
            for call in calls:
                with pytest.raises(ValueError, match=rf"kv_block {kvb} < its forward key tile 32 .*multiple of 32"):
                    call()
    # 16-key forward tiles alone are not enough: dq's 32-key tile gave a wrong dq on the H200
    index = _index(b, h, s, g, 16, ["need", "all"], mask)
    fwd_only = KernelOptions(tune={"fwd": {"BLOCK_N": 16}})
    assert "kv_block 16 < its dq key tile 32" in masked_tile_problem(index, d, q.dtype, fwd_only)
    # GPU tiles: bf16 at D=64 uses 64-key forward tiles, so kv_block 16 is refused there; key units
    # of 32 get 32-key tiles (one unit each), which the mask does not cut
    for kvb, refused in [(16, True), (32, False), (64, False), (1, False)]:
        index = _index(1, 2, 128, 32, kvb, ["need", "need"], mask)
        assert (masked_tile_problem(index, 64, torch.bfloat16, KernelOptions()) is not None) == refused, kvb
    index = _index(b, h, s, g, 16, ["need", "need"], mask)
    assert masked_tile_problem(dataclasses.replace(index, mask=None), d, q.dtype, KernelOptions()) is None
    # the backend decision (CUDA's auto choice faked on CPU tensors)
    monkeypatch.setattr(sa, "choose_backend", lambda backend, device, what: BackendChoice("triton", "auto: CUDA"))
    monkeypatch.setattr(sa, "log_once", lambda level, msg: logging.getLogger("test").log(level, msg))
    with caplog.at_level(logging.WARNING, logger="test"):
        choice = attention_backend("auto", q, q, index)
    assert choice.name == "reference" and "kv_block 16 < its forward key tile 32" in choice.reason
    assert any("reference kernels" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match="kv_block 16 < its forward key tile 32"):
        attention_backend("triton", q, q, index)


def test_backend_choice_for_masked_indexes():
    """Triton and the reference take a mask; cuDNN's block-sparse API has none, so it is refused
    by name and ``auto`` never picks it for a masked index."""
    q = torch.randn(1, 2, 128, 128)
    index = select_topk(torch.randn(1, 2, 128, 4), torch.randn(1, 2, 128, 4), 64, 2, kv_block=64, mask=CAUSAL)
    ok, why = cudnn_supported(q, q, index)
    assert not ok and "no token-wise mask" in why
    with pytest.raises(ValueError, match="backend='cudnn' cannot run this case: the index carries a causal mask"):
        sparse_attention(q, q, q, index, backend="cudnn")
    assert attention_backend("auto", q, q, index).name == "reference"  # CPU tensors
    if INTERPRET:
        assert attention_backend("triton", q, q, index).name == "triton"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mask", [CAUSAL, chunk(320)], ids=["causal", "chunk320"])
@pytest.mark.parametrize("kvb,g,d", [(1, 32, 128), (64, 64, 128), (64, 32, 64), (32, 64, 128)])
@pytest.mark.parametrize("variant", [{"tma": False}, {"tma": True}], ids=["ptr", "tma"])
def test_masked_bf16_gpu(mask, kvb, g, d, variant, poisoned):
    """bf16 at S=2048: error vs an fp32 reference at most 2x that of a bf16 PyTorch run (+1e-4)."""
    from tests.ops.test_sparse_attention_triton import _lowp_reference

    torch.manual_seed(3)
    b, h, hkv, s = 2, 4, 2, 2048
    dt = torch.bfloat16
    q = torch.randn(b, h, s, d, device="cuda", dtype=dt)
    k, v = (torch.randn(b, hkv, s, d, device="cuda", dtype=dt) for _ in range(2))
    units = s // kvb
    index = _index(b, h, s, g, kvb, ["need", units // 10, units // 5, "all"], mask)
    do = torch.randn(b, h, s, d, device="cuda")
    zero = torch.zeros(b, h, s, device="cuda")
    opts = dataclasses.replace(poisoned, **variant)
    got = _grads(q, k, v, lambda q_, k_, v_: sparse_attention(q_, k_, v_, index, backend="triton", options=opts), do, zero)
    ref = _grads(q.float(), k.float(), v.float(), lambda q_, k_, v_: sparse_attention(q_, k_, v_, index, backend="reference"), do, zero)
    low = _lowp_reference(q, k, v, index, do)
    for name, a, r, lw in zip(["out", "dq", "dk", "dv"], [got[0]] + got[2:], [ref[0]] + ref[2:], low):
        assert torch.isfinite(a).all(), name
        err = (a.float() - r.float()).abs().max().item()
        err_low = (lw.float() - r.float()).abs().max().item()
        assert err <= 2 * err_low + 1e-4, f"{name}: {err:.3e} > 2 * {err_low:.3e}"


OFFSET_CASES = [
    # b, h, hkv, s_q, s_kv, q_offset, d, g, kv_block, mask, K per head, kernel options
    pytest.param(1, 2, 1, 32, 96, 48, 32, 16, 1, CAUSAL, [40, 70], {}, id="token-causal-gqa"),
    pytest.param(1, 2, 2, 32, 128, 64, 32, 16, 16, chunk(32), [3, 6], {"tune": KEY_TILES16}, id="block16-chunk32"),
    pytest.param(1, 4, 2, 64, 192, 64, 32, 32, 32, CAUSAL, [3, 4, 5, 6], {}, id="block32-causal-keymajor-keys-after"),
    pytest.param(1, 2, 2, 64, 128, 32, 32, 32, 32, chunk(64), [3, 4], {}, id="block32-chunk64-offset-inside-chunk"),
    pytest.param(1, 4, 2, 64, 192, 64, 32, 32, 32, CAUSAL, [3, 4, 5, 6], {"tma": True}, id="block32-causal-keys-after-tma"),
]


@CPU_OK
@pytest.mark.parametrize("b,h,hkv,s_q,s_kv,q_off,d,g,kvb,mask,ks,opts", OFFSET_CASES)
def test_query_offset_matches_masked_dense(b, h, hkv, s_q, s_kv, q_off, d, g, kvb, mask, ks, opts, poisoned):
    """``SparseIndex.q_offset``: queries are key tokens ``[q_offset, q_offset + S_q)`` (a CP shard
    against longer keys); the kernels apply the mask at those positions, forward and backward."""
    torch.manual_seed(2)
    q = torch.randn(b, h, s_q, d, device=DEVICE)
    k, v = (torch.randn(b, hkv, s_kv, d, device=DEVICE) for _ in range(2))
    do = torch.randn(b, h, s_q, d, device=DEVICE, dtype=torch.float64)
    dlse = torch.randn(b, h, s_q, device=DEVICE, dtype=torch.float64)
    gen = torch.Generator().manual_seed(3)
    q_lr, k_lr = torch.randn(b, h, s_q, 8, generator=gen), torch.randn(b, h, s_kv, 8, generator=gen)
    index = select_topk(q_lr, k_lr, g, ks, kv_block=kvb, mask=mask, backend="reference", q_offset=q_off).to(DEVICE)
    assert index.q_offset == q_off
    # the offset index's pairs are rows [q_off, q_off + s_q) of the same units under the full mask
    pos = torch.arange(s_q).view(-1, 1) + q_off
    want = mask.allowed(pos, torch.arange(s_kv).view(1, -1))
    assert torch.equal(index.to_dense_mask()[0, 0].cpu() & ~want, torch.zeros_like(want))
    ref = _triton_matches_reference(q, k, v, index, dataclasses.replace(poisoned, **opts), do, dlse)
    # the offset matters: the same index read at offset 0 is far outside the tolerance (or has
    # empty softmax rows: NaN)
    at_zero = dataclasses.replace(index, q_offset=0)
    loose = _reference(q, k, v, at_zero.to_dense_mask(), do, dlse)
    assert not _rel(loose[0], ref[0]) <= 100 * TOL


def test_query_offset_is_validated():
    idx = torch.zeros(1, 1, 2, 1, dtype=torch.int32)
    cnt = torch.ones(1, 1, dtype=torch.int32)
    with pytest.raises(ValueError, match="q_offset=40, S_q=32, S_kv=64"):
        SparseIndex(idx, cnt, 16, 16, 32, 64, CAUSAL, 40)
    with pytest.raises(ValueError, match="an index without a mask needs q_offset=0"):
        SparseIndex(idx, cnt, 16, 16, 32, 64, None, 16)
    gen = torch.randn(1, 1, 64, 4)
    with pytest.raises(ValueError, match="q_offset=8 must be a multiple of the query group size 16"):
        select_topk(gen[:, :, :32], gen, 16, 2, kv_block=16, mask=CAUSAL, backend="reference", q_offset=8)
    late = torch.tensor([[[[0], [3]]]], dtype=torch.int32)  # group 1 lists keys 48..63 only
    SparseIndex(late, cnt, 16, 16, 32, 64, CAUSAL, 32).validate()  # its queries are tokens 48..63: fine
    with pytest.raises(ValueError, match=r"group 1\) lists no key its first query \(token 32\)"):
        SparseIndex(late, cnt, 16, 16, 32, 64, CAUSAL, 16).validate()
