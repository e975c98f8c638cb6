"""The sparse path of a training step on the GPU adds no host synchronisation: selection from a
host K per head (how the layer passes it), the forward and the backward.

The H200 pretraining run at f8d3904 (algo_v2_h200_20261130_qg64_minsparsity05) stepped 9% slower
once two of eight layers were sparse (282 vs 259 ms median) although the speed probe had timed
those layers' sparse path 9% faster in isolation; each sparse forward then synchronised the host
twice in selection (a pageable copy of K and a read of its max). Run on the lent device:
pytest -m gpu tests/gpu/test_gpu_no_sync.py.
"""

import pytest
import torch

from megatron_dsv.ops.selection import select_topk
from megatron_dsv.ops.sparse_attention import sparse_attention

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("kv_block", [64, 1])
def test_selection_and_sparse_attention_never_synchronise(kv_block):
    torch.manual_seed(0)
    b, h, s, d, r, g = 1, 4, 4096, 64, 16, 64
    q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    q_lr, k_lr = (torch.randn(b, h, s, r, device="cuda") for _ in range(2))
    units = s // kv_block
    k_host = torch.tensor([units // 10, units // 5, units // 4, units // 8], dtype=torch.int32)  # the layer's CPU K

    def step():
        index = select_topk(q_lr, k_lr, g, k_host, kv_block=kv_block)
        out, _ = sparse_attention(q, k, v, index, d**-0.5)
        out.float().square().mean().backward()
        return index

    step()  # compiles every kernel outside the checked region
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        index = step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert index.kv_count.device.type == "cuda"
    assert index.kv_count[0].tolist() == k_host.tolist() and index.kv_idx.shape[-1] == int(k_host.max())
