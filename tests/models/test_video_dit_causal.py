"""Chunk-causal VideoDiT (issue 19): config.dsv_causal_chunk frames per chunk, CPU."""

import importlib.util
import os
import sys

import pytest
import torch

from megatron_dsv.layers.attention import dsv_attention_layers
from tests.megatron_shim import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CUBE = (2, 2, 4)  # 16-token query groups


def make(chunk=2, patch=(1, 2, 2), text_dim=0, **cfg):
    """A chunk-causal VideoDiT whose zero-initialised output layers are made random, so the output
    depends on the attention (a fresh DiT returns zeros)."""
    from megatron_dsv.models.video_dit import VideoDiT

    kw = dict(dsv_query_group=CUBE, normalization="RMSNorm", qk_layernorm=True, dsv_mode="auto",
              dsv_causal_chunk=chunk, dsv_backend="reference")
    kw.update(cfg)
    torch.manual_seed(0)
    m = VideoDiT(tiny_config(**kw), in_channels=4, patch=patch, num_classes=5, text_dim=text_dim)
    with torch.no_grad():
        for p in m.parameters():
            if not p.any():
                p.normal_(0.0, 0.2)
    return m


def set_k(model, k):
    """Every self-attention layer sparse with K = k key units per head (k >= all units: dense-equivalent)."""
    for a in dsv_attention_layers(model):
        if a.is_self_attention:
            a.set_sparse(True, torch.full((a.num_heads,), k, dtype=torch.int32))


def set_dense(model):
    for a in dsv_attention_layers(model):
        if a.is_self_attention:
            a.set_sparse(False)


def frames(x, lo, hi):
    return x[:, :, lo:hi]


# (patch, latent T, chunk in patch-grid frames): latent frames per chunk = chunk * patch t
CASES = [
    pytest.param((1, 2, 2), 6, 2, id="pt1"),
    pytest.param((2, 2, 2), 8, 2, id="pt2"),
]


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
@pytest.mark.parametrize("patch,tt,chunk", CASES)
def test_chunk_never_reads_later_chunks_and_reads_earlier_ones(megatron_state, patch, tt, chunk, sparse):
    """The output on the latent frames of chunk c does not change when the latents of later chunks
    change, and does change when an earlier chunk's latents change. Sparse keeps 24 of the 192 or
    256 key units per head, so selection really chooses (among allowed units)."""
    m = make(chunk, patch, dsv_mode="sparse" if sparse else "auto").eval()
    set_k(m, 24) if sparse else set_dense(m)
    per_chunk = chunk * patch[0]  # latent frames per chunk
    n_chunks = tt // per_chunk
    x, t, y = torch.randn(2, 4, tt, 8, 16), torch.tensor([0.3, 0.8]), torch.tensor([1, 4])
    with torch.no_grad():
        base = m(x, t, y)
        for c in range(n_chunks):
            lo, hi = c * per_chunk, (c + 1) * per_chunk
            later = x.clone()
            later[:, :, hi:] = torch.randn_like(later[:, :, hi:])
            out = m(later, t, y)
            torch.testing.assert_close(frames(out, 0, hi), frames(base, 0, hi), rtol=0, atol=1e-6)
            if hi < tt:
                assert (frames(out, hi, tt) - frames(base, hi, tt)).abs().max() > 1e-2  # later chunks did change
            if c > 0:
                earlier = x.clone()
                earlier[:, :, :lo] = torch.randn_like(earlier[:, :, :lo])
                out = m(earlier, t, y)
                assert (frames(out, lo, hi) - frames(base, lo, hi)).abs().max() > 1e-2


def test_bidirectional_model_reads_later_chunks(megatron_state):
    """The same check fails without the chunk: the invariance above comes from the mask."""
    m = make(chunk=0).eval()
    x, t = torch.randn(1, 4, 6, 8, 16), torch.tensor([0.5])
    with torch.no_grad():
        base = m(x, t)
        later = x.clone()
        later[:, :, 2:] = torch.randn_like(later[:, :, 2:])
        assert (m(later, t)[:, :, :2] - base[:, :, :2]).abs().max() > 1e-2


def test_sparse_with_all_units_equals_dense(megatron_state):
    """K = every key unit on the reference kernels gives the masked dense model: output, input
    gradient and every parameter gradient."""
    m = make(dsv_mode="sparse")
    x, t, y = torch.randn(2, 4, 6, 8, 16), torch.tensor([0.3, 0.8]), torch.tensor([1, 4])
    weight = torch.linspace(-1, 1, x.numel()).view_as(x)

    def run():
        xi = x.clone().requires_grad_(True)
        out = m(xi, t, y)
        (out * weight).sum().backward()
        grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
        m.zero_grad(set_to_none=True)
        return out.detach(), xi.grad, grads

    set_dense(m)
    out_d, dx_d, g_d = run()
    set_k(m, 6 * 4 * 8)  # all 192 tokens (kv_block 1)
    out_s, dx_s, g_s = run()
    assert g_s.keys() == g_d.keys() and len(g_d) > 0
    for name, got, want in [("out", out_s, out_d), ("dx", dx_s, dx_d)] + [(n, g_s[n], g_d[n]) for n in g_d]:
        # fp32 sums in another order: measured max error 1.7e-7 of the tensor's largest entry
        # (gradients reach 1.7e3 with the random output layers); a mask or selection error is O(1)
        err, scale = (got - want).abs().max().item(), want.abs().max().item()
        assert err <= 1e-5 * scale + 1e-7, f"{name}: max error {err:.3g} at scale {scale:.3g}"


def test_frame_tokens_follow_the_input_and_cross_attention_is_unmasked(megatron_state):
    m = make(text_dim=8).eval()
    selfs = [a for a in dsv_attention_layers(m) if a.is_self_attention]
    crosses = [a for a in dsv_attention_layers(m) if not a.is_self_attention]
    assert len(selfs) == len(crosses) == 2
    assert m.chunk_causal == 2
    text = torch.randn(1, 5, 8)
    with torch.no_grad():
        for shape, tokens_per_frame in (((6, 8, 16), 4 * 8), ((4, 4, 16), 2 * 8)):
            x = torch.randn(1, 4, *shape)
            base = m(x, torch.tensor([0.5]), text=text)
            for a in selfs:
                mask = a.causal_mask()
                assert (mask.kind, mask.chunk_tokens) == ("chunk_causal", 2 * tokens_per_frame)
            assert all(a.causal_mask() is None for a in crosses)
            # every chunk reads every text token: the last text token moves the first chunk
            other = text.clone()
            other[:, -1] = torch.randn(8)
            assert (m(x, torch.tensor([0.5]), text=other)[:, :, :2] - base[:, :, :2]).abs().max() > 1e-3


def test_chunk_must_divide_the_patched_frames(megatron_state):
    m = make(chunk=4)
    with pytest.raises(ValueError, match=r"6 frames after patching .* multiple of 4"):
        m(torch.randn(1, 4, 6, 8, 16), torch.rand(1))
    m = make(chunk=4, patch=(2, 2, 2))
    with pytest.raises(ValueError, match=r"2 frames after patching .* multiple of 8"):
        m(torch.randn(1, 4, 4, 8, 16), torch.rand(1))  # 4 latent frames = 2 grid frames < one chunk
    with pytest.raises(ValueError, match="multiple of 2"):
        make(chunk=3)  # the config: a chunk must be whole layers of query-group cubes


@pytest.mark.slow
def test_quickstart_trains_a_chunk_causal_dit(megatron_state, monkeypatch):
    spec = importlib.util.spec_from_file_location("qs_dit", os.path.join(ROOT, "examples", "quickstart_video_dit.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(sys, "argv", ["quickstart_video_dit.py", "--device", "cpu", "--speed-table", "assume", "--causal-chunk", "2"])
    res = mod.main()
    selfs = [a for a in res["layers"] if a.is_self_attention]
    assert all(a.causal_mask().chunk_tokens == 2 * 8 * 8 for a in selfs)  # 2 frames of an 8x8 patch grid
    assert sum("stage switch" in line for line in res["log"]) == 1
    assert any(a.sparse for a in selfs)  # the masked layers did switch to sparse attention
    assert res["sparse_loss"] < res["first_loss"]
    assert abs(res["sparse_loss"] / res["dense_loss"] - 1) < 0.05
    assert torch.isfinite(res["video"]).all()
