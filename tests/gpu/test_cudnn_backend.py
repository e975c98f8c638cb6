"""GPU (bf16) tests of the cuDNN block-sparse backend against the fp32 reference and our Triton
kernel; run on the lent device: pytest -m gpu tests/gpu/test_cudnn_backend.py. Skipped, with the
reason, where ``cudnn_supported`` rules the GPU or the package out."""

import pytest
import torch

from megatron_dsv.ops.selection import select_topk
from megatron_dsv.ops.sparse_attention import masked_dense_attention, sparse_attention
from megatron_dsv.ops.sparse_attention.cudnn import cudnn_supported, sparse_attention_cudnn

pytestmark = pytest.mark.gpu

D = 128


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def block_index(b, h, s, k_per_head):
    return select_topk(torch.randn(b, h, s, 16, device="cuda"), torch.randn(b, h, s, 16, device="cuda"), 64, k_per_head, kv_block=64)


@pytest.fixture(autouse=True)
def _need_cudnn():
    q = torch.empty(1, 1, 64, D, device="cuda", dtype=torch.bfloat16)
    ok, reason = cudnn_supported(q, q, block_index(1, 1, 64, 1))
    if not ok:
        pytest.skip(reason)


def poison_allocator(*shapes):
    """Leave NaN in the caching allocator's free blocks of these sizes, so outputs the package
    allocates next start as NaN and an unwritten element fails ``isfinite``."""
    bufs = [torch.full(s, float("nan"), device="cuda", dtype=dt) for s, dt in shapes]
    del bufs


def layer_layout(*ts):
    """[B, H, S, D] views of [S, B, H, D] memory, as DSVCoreAttention passes q, k, v."""
    return tuple(t.detach().permute(2, 0, 1, 3).contiguous().permute(1, 2, 0, 3).requires_grad_(t.requires_grad) for t in ts)


def check_against_reference(q, k, v, index, out, lse, grads, do, dlse=None):
    q32, k32, v32 = (t.detach().float().requires_grad_(True) for t in (q, k, v))
    ref, ref_lse = masked_dense_attention(q32, k32, v32, index.to_dense_mask(), D**-0.5)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    # bf16 kernel vs fp32 reference: at most twice the error of the reference rounded to bf16
    assert rel_err(out, ref) <= 2 * rel_err(ref.to(torch.bfloat16), ref) + 1e-3
    assert rel_err(lse, ref_lse) < 1e-3
    loss = (ref * do.float()).sum() + ((ref_lse * dlse).sum() if dlse is not None else 0)
    for got, want in zip(grads, torch.autograd.grad(loss, (q32, k32, v32))):
        assert torch.isfinite(got).all()
        assert rel_err(got, want) <= 2 * rel_err(want.to(torch.bfloat16), want) + 1e-2


@pytest.mark.parametrize("b, s, k_per_head", [
    (2, 2048, [1, 5, 17, 32]),  # K = 1, padding in heads 0-2, K = all blocks in head 3
    (1, 4096, [64, 64, 64, 64]),  # K = all blocks for every head (no padding)
])
def test_matches_fp32_reference_and_triton(b, s, k_per_head):
    h = 4
    q, k, v = (torch.randn(b, h, s, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    index = block_index(b, h, s, k_per_head)
    do = torch.randn(b, h, s, D, device="cuda", dtype=torch.bfloat16)
    poison_allocator(((b, h, s, D), torch.bfloat16), ((b, h, s), torch.float32))
    out, lse = sparse_attention_cudnn(q, k, v, index)
    assert out.shape == (b, h, s, D) and out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    poison_allocator(((b, h, s, D), torch.bfloat16))
    grads = torch.autograd.grad(out, (q, k, v), do)
    check_against_reference(q, k, v, index, out, lse, grads, do)
    t_out, t_lse = sparse_attention(q, k, v, index, backend="triton")
    t_grads = torch.autograd.grad(t_out, (q, k, v), do)
    # two bf16 kernels: each within ~4e-3 of fp32 here, so within 1e-2 of each other
    assert rel_err(out, t_out) < 1e-2 and rel_err(lse, t_lse) < 1e-3
    for got, want in zip(grads, t_grads):
        assert rel_err(got, want) < 2e-2


@pytest.mark.parametrize("b", [1, 2])
def test_layer_layout_in_and_sbhd_out(b):
    h, s = 4, 2048
    q, k, v = layer_layout(*(torch.randn(b, h, s, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3)))
    index = block_index(b, h, s, [2, 7, 12, 32])
    out, lse = sparse_attention_cudnn(q, k, v, index, out_sbhd=True)
    assert out.permute(2, 0, 1, 3).is_contiguous()  # [S, B, H, D] memory
    do = layer_layout(torch.randn(b, h, s, D, device="cuda", dtype=torch.bfloat16))[0]
    grads = torch.autograd.grad(out, (q, k, v), do)
    check_against_reference(q, k, v, index, out, lse, grads, do)


def test_lse_gradient():
    b, h, s = 1, 2, 2048
    q, k, v = (torch.randn(b, h, s, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    index = block_index(b, h, s, [3, 20])
    out, lse = sparse_attention_cudnn(q, k, v, index)
    do, dlse = torch.randn_like(out), torch.randn_like(lse)
    grads = torch.autograd.grad((out.float() * do.float()).sum() + (lse * dlse).sum(), (q, k, v))
    check_against_reference(q, k, v, index, out, lse, grads, do, dlse)


def test_support_rule_on_this_gpu():
    q = torch.empty(1, 4, 256, D, device="cuda", dtype=torch.bfloat16)
    index = block_index(1, 4, 256, 2)
    ok, reason = cudnn_supported(q, q, index)
    assert ok and "SM90" in reason
    assert "bf16 only" in cudnn_supported(q.half(), q.half(), index)[1]
    assert "MHA only" in cudnn_supported(q, q[:, :2], index)[1]
    assert "head dim is 64" in cudnn_supported(q[..., :64], q[..., :64], index)[1]
    with pytest.raises(ValueError, match="bf16 only"):
        sparse_attention_cudnn(q.half(), q.half(), q.half(), index)
