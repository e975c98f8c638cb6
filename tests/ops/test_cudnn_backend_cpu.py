"""CPU checks of the cuDNN block-sparse backend: lazy import, the support rule, the index mapping,
and the autograd wiring (layouts, LSE gradient) against a stand-in package that implements the
package's documented contract with our reference. The kernels themselves are tested on the GPU
(tests/gpu/test_cudnn_backend.py)."""

import math
import subprocess
import sys
import types

import pytest
import torch

import megatron_dsv.ops.sparse_attention.cudnn as cb
from megatron_dsv.ops.selection import select_topk
from megatron_dsv.ops.sparse_attention.naive import masked_dense_attention, sparse_attention_backward_reference, sparse_attention_reference
from megatron_dsv.ops.sparse_index import SparseIndex


def block_index(b, h, s, k_per_head, g=64, kvb=64):
    return select_topk(torch.randn(b, h, s, 8), torch.randn(b, h, s, 8), g, k_per_head, kv_block=kvb, backend="reference")


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_module_imports_without_the_package():
    code = (
        "import sys; import megatron_dsv.ops.sparse_attention.cudnn as m; "
        "assert 'cudnn' not in sys.modules, 'imported eagerly'; print(m.BLOCK)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "64"


def test_not_supported_on_cpu_says_why():
    q = torch.randn(1, 2, 128, 128, dtype=torch.bfloat16)
    ok, reason = cb.cudnn_supported(q, q, block_index(1, 2, 128, 1))
    assert not ok and "CUDA" in reason


def test_entry_point_raises_the_reason_before_work():
    q = torch.randn(1, 2, 128, 128, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="CUDA GPUs only.*backend='triton'"):
        cb.sparse_attention_cudnn(q, q, q, block_index(1, 2, 128, 1))


class FakeCuda:
    """Just enough of a CUDA tensor for ``cudnn_supported``: device, dtype and shape."""

    def __init__(self, shape, dtype=torch.bfloat16):
        self.shape, self.dtype = shape, dtype
        self.is_cuda, self.device = True, torch.device("cuda", 0)


@pytest.mark.parametrize(
    "cap, dtype, d, hkv, g, kvb, importable, expect",
    [
        ((8, 0), torch.bfloat16, 128, 4, 64, 64, True, "SM80"),
        ((10, 0), torch.bfloat16, 128, 4, 64, 64, True, "SM100"),
        ((9, 0), torch.float16, 128, 4, 64, 64, True, "bf16 only"),
        ((9, 0), torch.bfloat16, 64, 4, 64, 64, True, "head dim is 64"),
        ((9, 0), torch.bfloat16, 128, 2, 64, 64, True, "MHA only"),
        ((9, 0), torch.bfloat16, 128, 4, 32, 64, True, "query groups of 32"),
        ((9, 0), torch.bfloat16, 128, 4, 64, 16, True, "key blocks of 16"),
        ((9, 0), torch.bfloat16, 128, 4, 64, 64, False, "pip install"),
        ((9, 0), torch.bfloat16, 128, 4, 64, 64, True, None),
    ],
)
def test_support_rule(monkeypatch, cap, dtype, d, hkv, g, kvb, importable, expect):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cap)
    install_fake_package(monkeypatch, calls=[])
    if not importable:
        # None in sys.modules makes the import raise ImportError, also where the real package
        # was imported before (its submodules are cached under their full names)
        for name in [n for n in sys.modules if n == "cudnn" or n.startswith("cudnn.")]:
            monkeypatch.setitem(sys.modules, name, None)
    index = block_index(1, 4, 256, 2, g=g, kvb=kvb)
    ok, reason = cb.cudnn_supported(FakeCuda((1, 4, 256, d), dtype), FakeCuda((1, hkv, 256, d), dtype), index)
    if expect is None:
        assert ok and "block-sparse" in reason and "fake-1.32" in reason
    else:
        assert not ok and expect in reason


def test_block_metadata_is_the_index_under_the_prefix_contract():
    b, h, s = 2, 3, 512
    index = block_index(b, h, s, [1, 3, 8])  # 8 = all blocks; heads 0 and 1 have padding
    q2k, nums = cb.block_metadata(index)
    assert q2k.dtype == nums.dtype == torch.int32 and q2k.is_contiguous() and nums.is_contiguous()
    assert q2k.shape == (b, h, s // 64, 8) and nums.shape == (b, h, s // 64)
    # the package reads the first nums[b, h, m] entries of row m, nothing else
    mask = torch.zeros(b, h, s // 64, s // 64, dtype=torch.bool)
    for bi in range(b):
        for hi in range(h):
            for m in range(s // 64):
                mask[bi, hi, m, q2k[bi, hi, m, : nums[bi, hi, m]].long()] = True
    dense = mask.repeat_interleave(64, dim=2).repeat_interleave(64, dim=3)
    assert torch.equal(dense, index.to_dense_mask())


def test_block_metadata_rejects_other_block_sizes():
    with pytest.raises(ValueError, match="64 tokens.*backend='triton'"):
        cb.block_metadata(block_index(1, 1, 256, 2, g=32, kvb=64))


def _index_from_metadata(q2k, nums, s_q, s_kv):
    """The SparseIndex the package's contract describes (prefix of each row; rows of a head equal)."""
    count = nums[:, :, 0].contiguous()
    assert torch.equal(nums, count.unsqueeze(-1).expand_as(nums))
    pos = torch.arange(q2k.shape[-1]).view(1, 1, 1, -1)
    idx = torch.where(pos < nums.unsqueeze(-1), q2k, torch.full_like(q2k, -1))
    return SparseIndex(idx, count, 64, 64, s_q, s_kv)


def install_fake_package(monkeypatch, calls):
    """A stand-in ``cudnn`` package with the block-sparse API's documented contract: ``layout``
    bhsd/bshd for inputs and outputs, natural-log fp32 LSE, only the row prefixes read."""

    def to_bhsd(t, layout):
        return t if layout == "bhsd" else t.transpose(1, 2)

    def fwd(q, k, v, q2k, block_sparse_num=None, block_sizes=None, q2k_block_nums=None, *,
            sparse_block_size=None, softmax_scale=None, layout="bhsd", **_):
        assert sparse_block_size == 64 and block_sizes is None and q2k_block_nums is not None
        q, k, v = (to_bhsd(t, layout) for t in (q, k, v))
        calls.append(("fwd", layout, q.shape[0]))
        index = _index_from_metadata(q2k, q2k_block_nums, q.shape[2], k.shape[2])
        out, lse = sparse_attention_reference(q, k, v, index, softmax_scale)
        out = out.contiguous() if layout == "bhsd" else out.transpose(1, 2).contiguous()
        return {"o_tensor": out, "lse_tensor": lse}

    def bwd(do, q, k, v, o, lse, q2k, block_sparse_num=None, block_sizes=None, q2k_block_nums=None, *,
            softmax_scale=None, sparse_block_size=None, layout="bhsd", **_):
        assert sparse_block_size == 64 and layout == "bhsd" and q2k_block_nums is not None
        calls.append(("bwd", layout, q.shape[0]))
        index = _index_from_metadata(q2k, q2k_block_nums, q.shape[2], k.shape[2])
        dq, dk, dv = sparse_attention_backward_reference(q, k, v, o, lse, do, index, softmax_scale)
        return {"dq_tensor": dq.to(q.dtype), "dk_tensor": dk.to(k.dtype), "dv_tensor": dv.to(v.dtype)}

    pkg = types.ModuleType("cudnn")
    pkg.__version__ = "fake-1.32"
    bsa = types.ModuleType("cudnn.block_sparse_attention")
    api = types.ModuleType("cudnn.block_sparse_attention.api")
    api.block_sparse_attention_forward, api.block_sparse_attention_backward = fwd, bwd
    for name, mod in [("cudnn", pkg), ("cudnn.block_sparse_attention", bsa), ("cudnn.block_sparse_attention.api", api),
                      ("cudnn.block_sparse_attention._interface", types.ModuleType("_interface"))]:
        monkeypatch.setitem(sys.modules, name, mod)


@pytest.mark.parametrize("b, out_sbhd", [(1, False), (1, True), (2, True)])
def test_autograd_wiring_with_lse_gradient(monkeypatch, b, out_sbhd):
    calls = []
    install_fake_package(monkeypatch, calls)
    h, s, d = 2, 256, 16
    index = block_index(b, h, s, [1, 4])
    # q, k, v as the layer passes them: [B, H, S, D] views of [S, B, H, D] memory
    q, k, v = (torch.randn(s, b, h, d, dtype=torch.float64).permute(1, 2, 0, 3).requires_grad_(True) for _ in range(3))
    scale = 0.3
    out, lse = cb._CudnnSparseAttention.apply(q, k, v, index, scale, out_sbhd)
    ref, ref_lse = masked_dense_attention(q, k, v, index.to_dense_mask(), scale)
    assert rel_err(out, ref) < 1e-12 and rel_err(lse, ref_lse) < 1e-12
    if out_sbhd:
        assert out.permute(2, 0, 1, 3).is_contiguous()
    # B == 1 gets [S, 1, H, D] straight from the kernel's bshd layout; B > 1 a copy of bhsd
    assert calls[0] == ("fwd", "bshd" if out_sbhd and b == 1 else "bhsd", b)
    do, dl = torch.randn_like(ref), torch.randn_like(ref_lse)
    grads = torch.autograd.grad((out * do).sum() + (lse * dl).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * do).sum() + (ref_lse * dl).sum(), (q, k, v))
    for got, want in zip(grads, ref_grads):
        assert rel_err(got, want) < 1e-10
    # the LSE gradient costs one more forward and backward
    assert [c[0] for c in calls] == ["fwd", "bwd", "fwd", "bwd"]


def test_autograd_without_lse_gradient_runs_one_backward(monkeypatch):
    calls = []
    install_fake_package(monkeypatch, calls)
    q, k, v = (torch.randn(1, 2, 128, 16, dtype=torch.float64, requires_grad=True) for _ in range(3))
    index = block_index(1, 2, 128, 1)
    out, _ = cb._CudnnSparseAttention.apply(q, k, v, index, 1 / math.sqrt(16), False)
    ref, _ = masked_dense_attention(q, k, v, index.to_dense_mask(), 1 / math.sqrt(16))
    grads = torch.autograd.grad(out.sum(), (q, k, v))  # do is an expanded (stride 0) tensor
    ref_grads = torch.autograd.grad(ref.sum(), (q, k, v))
    for got, want in zip(grads, ref_grads):
        assert rel_err(got, want) < 1e-10
    assert [c[0] for c in calls] == ["fwd", "bwd"]


def test_the_attention_backend_is_decided_in_one_place_and_says_why():
    from megatron_dsv.ops.selection import select_topk
    from megatron_dsv.ops.sparse_attention import attention_backend, sparse_attention

    q = torch.randn(1, 2, 128, 16)
    index = select_topk(torch.randn(1, 2, 128, 4), torch.randn(1, 2, 128, 4), 64, [1, 2], kv_block=64,
                        backend="reference")
    auto = attention_backend("auto", q, q, index)
    assert auto.name == "reference" and "cpu tensors run the PyTorch reference" in auto.reason
    with pytest.raises(ValueError, match="backend='cudnn' cannot run this case: tensors are on cpu.*'triton'"):
        attention_backend("cudnn", q, q, index)
    with pytest.raises(ValueError, match="backend='cudnn' cannot run this case"):
        sparse_attention(q, q, q, index, backend="cudnn")
