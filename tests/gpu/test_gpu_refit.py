"""The closed-form refit on the GPU: no host synchronisation, and the CPU's result.

Run on the lent device: pytest -m gpu tests/gpu/test_gpu_refit.py.
"""

import pytest
import torch

from megatron_dsv.layers.predictor import LowRankPredictor, ScoreMoments, reduced_rank_fit_exact
from megatron_dsv.layers.profiler import sample_rows

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("h,d,r", [(16, 128, 16), (8, 64, 32)])
def test_refit_on_cuda_never_synchronises_and_matches_the_cpu(h, d, r):
    torch.manual_seed(0)
    s = 4096
    mix = torch.linspace(1, 0.05, d, device="cuda")  # anisotropic heads with means
    q = (torch.randn(1, h, s, d, device="cuda") * mix + 0.3).bfloat16()
    k = (torch.randn(1, h, s, d, device="cuda") * mix.flip(0) - 0.2).bfloat16()
    rows = sample_rows(s, 32, 3, q.device)
    pred = LowRankPredictor(h, d, r, device="cuda", dtype=torch.bfloat16)
    sketch = (pred.weight_q.detach().clone(), pred.weight_k.detach().clone())
    pred.accumulate_moments(q[:, :, rows], k)
    moments = ScoreMoments(*(f.cpu() for f in pred.moments._fields()))
    pred.refit(reset=False)  # compiles the Jacobi kernel outside the checked region
    with torch.no_grad():
        pred.weight_q.copy_(sketch[0])
        pred.weight_k.copy_(sketch[1])
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        residual = pred.refit()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert residual.device.type == "cuda" and pred.moments is None
    # the same fit on the CPU (reference eigensolver), from the same sketch
    cpu = LowRankPredictor(h, d, r, dtype=torch.float64)
    with torch.no_grad():
        cpu.weight_q.copy_(sketch[0].double().cpu())
        cpu.weight_k.copy_(sketch[1].double().cpu())
    cpu.moments = moments
    want = cpu.refit()
    torch.testing.assert_close(residual.cpu(), want, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(pred.weight_q.double().cpu(), cpu.weight_q.to(torch.bfloat16).double(), rtol=2e-2, atol=2e-2)
    # these Gaussian heads have a smooth spectrum (no gap at the rank): after FIT_ITERATIONS the
    # objective is 1.8e-5 from the exact optimum at D=128 r=16 (CPU, measured), 7e-12 at D=64 r=32
    _, _, exact = reduced_rank_fit_exact(*moments.balanced_metrics(torch.arange(h)), r)
    assert float(((residual.cpu() - exact) / exact).abs().max()) < 1e-4
