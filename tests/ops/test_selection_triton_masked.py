"""Triton selection under causal and chunk-causal masks vs the reference ``select_topk(..., mask=)``.

The reference's index is the contract (forced units first, then the best allowed units, then a
fill of allowed non-finite and disallowed units by position; see ``selection/naive.py``, itself
checked against a brute force in tests/ops/test_causal.py): the Triton index must equal it
element for element on tie-free random inputs, on each of the three drivers.
"""

import re

import pytest
import torch

from tests.ops.triton_env import CPU_OK, DEVICE, INTERPRET  # noqa: F401  (sets TRITON_INTERPRET first)

triton = pytest.importorskip("triton")

from megatron_dsv.ops.mask import CausalMask  # noqa: E402
from megatron_dsv.ops.options import KernelOptions  # noqa: E402
from megatron_dsv.ops.selection import group_proxies, pool_keys, select_topk  # noqa: E402
from megatron_dsv.ops.selection import triton as sel_triton  # noqa: E402
from tests.ops.test_selection_triton import _captured  # noqa: E402  (one definition of the captured score)

# The three selection drivers (see selection/triton.py): one program per group tile with the
# scores in registers or streamed, and the split path (forced by a unit limit of 0).
PATHS = {
    "resident": KernelOptions(),
    "stream": KernelOptions(select_fused_kind="stream"),
    "split": KernelOptions(select_fused_max_units=0),
}
CAUSAL = CausalMask("causal")
# A group with no ranked unit (every allowed unit forced, or none finite) brackets with inf - inf
# and is then marked done; numpy under the interpreter warns on that NaN, a GPU does not.
pytestmark = pytest.mark.filterwarnings(
    "ignore:invalid value encountered:RuntimeWarning", "ignore:All-NaN slice encountered:RuntimeWarning"
)


def chunk(t):
    return CausalMask("chunk_causal", t)


def _k_per_head(mask, s, g, kvb, ks):
    """``"need"``: the mask's smallest K (some groups rank nothing, K' = 0); ``"all"``: every
    unit; an int: that many units, at least ``need``."""
    units, need = s // kvb, mask.max_forced(s, g, kvb)
    return [need if k == "need" else units if k == "all" else max(need, k) for k in ks]


def _check(q_lr, k_lr, g, ks, kvb, mask, path, q_offset=0):
    ref = select_topk(q_lr, k_lr, g, ks, kv_block=kvb, mask=mask, q_offset=q_offset, backend="reference")
    got = select_topk(q_lr, k_lr, g, ks, kv_block=kvb, mask=mask, q_offset=q_offset, backend="triton",
                      options=PATHS[path])
    got.validate(check_values=True)
    assert got.mask == mask and got.q_offset == q_offset
    assert torch.equal(got.kv_count.cpu(), ref.kv_count.cpu())
    assert got.kv_idx.shape == ref.kv_idx.shape
    assert torch.equal(got.kv_idx.cpu(), ref.kv_idx.cpu())
    return got


def _fills(index):
    """Listed units past their group's allowed prefix (a group with fewer allowed units than K)."""
    idx = index.kv_idx.long().cpu()
    last = (torch.arange(index.num_groups) + 1) * index.group_size - 1 + index.q_offset
    return int(((idx >= 0) & (idx * index.kv_block > index.mask.limit(last).view(1, 1, -1, 1))).sum())


@CPU_OK
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize(
    "mask,s,g,kvb,ks",
    [
        (CAUSAL, 128, 16, 1, ["need", 40, "all"]),  # token units: 16 forced per group
        (chunk(32), 128, 16, 1, ["need", 50, 90]),
        (CAUSAL, 256, 32, 16, ["need", 5, "all"]),  # blocks inside a group
        (chunk(24), 256, 16, 16, ["need", 6, 11]),  # chunks cut the key blocks: partial units
        (chunk(40), 256, 32, 16, ["need", 7, "all"]),  # a group straddles a chunk boundary
        (CAUSAL, 512, 64, 64, ["need", 3, "all"]),  # one unit per group
        (chunk(128), 512, 32, 64, ["need", 4, 6]),  # several groups per unit
    ],
)
def test_masked_selection_matches_reference(mask, s, g, kvb, ks, path):
    """Per-head K: the smallest (forced units only for some groups), K below a late group's
    allowed units (ranking), above an early group's (fill) and K = all; batch 2."""
    gen = torch.Generator().manual_seed(s + g + kvb)
    q_lr, k_lr = (torch.randn(2, 3, s, 16, generator=gen).to(DEVICE) for _ in range(2))
    got = _check(q_lr, k_lr, g, _k_per_head(mask, s, g, kvb, ks), kvb, mask, path)
    assert _fills(got) > 0  # the fill rule ran


@CPU_OK
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("mask", [CAUSAL, chunk(64)], ids=["causal", "chunk64"])
@pytest.mark.parametrize("q_offset", [0, 64, 192])
def test_masked_selection_of_a_shard(mask, q_offset, path):
    """Queries of one sequence shard (context parallelism) against the gathered keys."""
    s, s_q, g, kvb = 256, 64, 16, 4
    gen = torch.Generator().manual_seed(q_offset)
    q_lr = torch.randn(1, 2, s_q, 16, generator=gen).to(DEVICE)
    k_lr = torch.randn(1, 2, s, 16, generator=gen).to(DEVICE)
    _check(q_lr, k_lr, g, _k_per_head(mask, s, g, kvb, ["need", 20]), kvb, mask, path, q_offset)


@CPU_OK
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("mask", [CAUSAL, chunk(48)], ids=["causal", "chunk48"])
def test_masked_selection_with_non_finite_scores(mask, path):
    """The non-finite contract under a mask: NaN/Inf scores rank below every finite allowed
    one, a forced unit is kept whatever its score, and a group with too few finite allowed
    units fills with the allowed non-finite ones, then disallowed ones, by position."""
    s, g, kvb = 128, 16, 4
    gen = torch.Generator().manual_seed(3)
    q_lr, k_lr = (torch.randn(2, 2, s, 16, generator=gen) for _ in range(2))
    k_lr[0, 0, 5] = float("nan")  # an allowed unit of most groups: ranked last
    k_lr[0, 0, 66] = float("inf")  # unit 16: an own unit (forced) of group 4, a full one of group 5
    q_lr[0, 1, 40] = float("nan")  # group 2 of (0, 1): no finite score, fills by position
    k_lr[1, 0, :96] = float("nan")  # (1, 0): most groups have too few finite allowed units
    ks = _k_per_head(mask, s, g, kvb, [12, 20])
    got = _check(q_lr.to(DEVICE), k_lr.to(DEVICE), g, ks, kvb, mask, path)
    idx = got.kv_idx.cpu()
    assert (idx[0, 0, 4] == 16).any() and not (idx[0, 0, 5] == 16).any()  # kept where forced only
    assert not (idx[0, 0, 4:] == 1).any()  # the NaN unit 1 loses to the finite allowed units


@CPU_OK
@pytest.mark.parametrize("path", list(PATHS))
def test_unmasked_selection_unchanged(path):
    """The unmasked kernels (MASK=0) still equal the unmasked reference, NaN rows included, and
    their index carries no mask."""
    gen = torch.Generator().manual_seed(7)
    q_lr, k_lr = (torch.randn(2, 2, 128, 16, generator=gen) for _ in range(2))
    k_lr[0, 1, 9] = float("nan")
    q_lr[1, 0, 33] = float("nan")
    q_lr, k_lr = q_lr.to(DEVICE), k_lr.to(DEVICE)
    for kvb, ks in ((1, [9, 128]), (8, [3, 16])):
        ref = select_topk(q_lr, k_lr, 16, ks, kv_block=kvb, backend="reference")
        got = select_topk(q_lr, k_lr, 16, ks, kv_block=kvb, backend="triton", options=PATHS[path]).validate()
        assert got.mask is None and got.q_offset == 0
        assert torch.equal(got.kv_idx.cpu(), ref.kv_idx.cpu())


def _ttir(kernel, ptrs, constexprs):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {a: "constexpr" if a in constexprs else ptrs.get(a, "i32") for a in kernel.arg_names}
    compiled = triton.compile(ASTSource(kernel, sig, constexprs), target=GPUTarget("cuda", 90, 32))
    return compiled.asm["ttir"]


KERNELS = {
    "resident": (sel_triton._resident_select_kernel, dict(T=3, BLOCK_G=16, N_POW2=256, BLOCK_R=16)),
    "stream": (sel_triton._fused_select_kernel,
               dict(N_STATIC=0, INTERPRET=False, T=4, PRECISION="ieee", BLOCK_G=64, BLOCK_N=32, BLOCK_R=16)),
    "minmax": (sel_triton._minmax_kernel, dict(PRECISION="tf32x3", CHUNK=1024, BLOCK_G=32, BLOCK_N=64, BLOCK_R=16)),
    "count": (sel_triton._count_kernel, dict(T=4, PRECISION="tf32x3", CHUNK=1024, BLOCK_G=32, BLOCK_N=64, BLOCK_R=16)),
    "write": (sel_triton._write_kernel, dict(PRECISION="tf32x3", CHUNK=1024, BLOCK_G=32, BLOCK_N=64, BLOCK_R=16)),
}
PTRS = dict(proxy="*fp32", units="*fp32", kv_count="*i32", kv_idx="*i32", part_min="*fp32", part_max="*fp32",
            part_fin="*i32", part_frc="*i32", thr="*fp32", part_cnt="*i32", lo="*fp32", hi="*fp32", need="*i32",
            need_inf="*i32", sel_off="*i32", mid_off="*i32", inf_off="*i32")
MASK_ARGS = ("GROUP", "KV_BLOCK", "Q_OFFSET", "CHUNK_T", "part_frc")


@pytest.mark.skipif(INTERPRET, reason="compiles the kernels (no GPU needed): run without TRITON_INTERPRET=1")
@pytest.mark.parametrize("name", list(KERNELS))
def test_unmasked_kernels_compile_without_the_mask(name):
    """MASK=0 compiles the mask out: no operation of its TTIR reads a mask argument (they
    appear only in the signature, ``%GROUP: i32``); MASK=1 reads them all (so the check can
    fail). Compiled for sm_90 on any host."""
    kernel, constexprs = KERNELS[name]
    plain = _ttir(kernel, PTRS, dict(constexprs, MASK=False))
    masked = _ttir(kernel, PTRS, dict(constexprs, MASK=True))
    args = [a for a in MASK_ARGS if a in kernel.arg_names]
    assert len(args) >= 4
    for arg in args:
        use = re.compile(rf"%{arg}\b(?!:)")
        assert not use.search(plain), arg
        assert use.search(masked), arg


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kvb", [1, 64])
@pytest.mark.parametrize("mask", [CAUSAL, chunk(4096)], ids=["causal", "chunk4096"])
def test_masked_selection_gpu_large(mask, kvb):
    torch.manual_seed(4)
    b, h, s, g = 1, 4, 16384, 64
    q = torch.randn(b, h, s, 16, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(b, h, s, 16, device="cuda", dtype=torch.bfloat16)
    n, need = s // kvb, mask.max_forced(s, g, kvb)
    kh = [max(need, n // 10), max(need, n // 20), need, n]
    got = select_topk(q, k, g, kh, kv_block=kvb, mask=mask, backend="triton").validate(check_values=True)
    ref = select_topk(q, k, g, kh, kv_block=kvb, mask=mask, backend="reference")
    same = (got.kv_idx == ref.kv_idx).float().mean().item()
    # fp32 scores in another summation order: only near-ties at the K-th score may differ.
    assert same > 0.999
    proxy, units = group_proxies(q, g), pool_keys(k, kvb)
    a, r = _captured(got, proxy, units), _captured(ref, proxy, units)
    assert abs(a - r) <= 1e-5 * abs(r) + 1e-3
