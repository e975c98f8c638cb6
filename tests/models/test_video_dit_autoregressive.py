"""Autoregressive (chunk-by-chunk) sampling of a chunk-causal VideoDiT and per-chunk times (issue 19), CPU."""

import pytest
import torch

from megatron_dsv.models.video_dit import draw_chunk_times, flow_interpolate, flow_matching_loss, sample, sample_autoregressive
from tests.models.test_video_dit_causal import make, set_dense, set_k

SHAPE = (2, 4, 6, 8, 16)  # 6 latent frames = 3 chunks of 2 (patch t = 1)
STEPS = 3


def chunk_frames(x, c, per=2):
    return x[:, :, c * per : (c + 1) * per]


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_per_chunk_times_condition_their_own_chunk_only(megatron_state, sparse):
    """t [B, n] with equal times is t [B]; changing chunk j's time changes chunks >= j (its own
    modulation, then through attention) and leaves earlier chunks as they were."""
    m = make(dsv_mode="sparse" if sparse else "auto").eval()
    set_k(m, 24) if sparse else set_dense(m)
    x, y = torch.randn(SHAPE), torch.tensor([1, 4])
    t = torch.tensor([0.3, 0.8])
    with torch.no_grad():
        base = m(x, t, y)
        # fp32 in another blocking (the time embedding of 6 rows instead of 2): up to 8e-6 measured
        # at outputs up to 20; a wrong chunk's modulation is O(1)
        chunked = m(x, t.view(2, 1).expand(2, 3).contiguous(), y)
        err = (chunked - base).abs().max()
        assert err <= 1e-6 * base.abs().max() + 1e-6, err
        base = chunked
        for j in range(3):
            tj = t.view(2, 1).repeat(1, 3)
            tj[:, j] = 1.0
            out = m(x, tj, y)
            torch.testing.assert_close(out[:, :, : 2 * j], base[:, :, : 2 * j], rtol=0, atol=1e-6)
            assert (chunk_frames(out, j) - chunk_frames(base, j)).abs().max() > 1e-2


def test_per_chunk_times_are_refused_where_they_mean_nothing(megatron_state):
    x = torch.randn(1, 4, 6, 8, 16)
    with pytest.raises(ValueError, match=r"\[B=1, chunks=3\]"):
        make().eval()(x, torch.full((1, 2), 0.5))
    with pytest.raises(ValueError, match="chunk-causal"):
        make(chunk=0).eval()(x, torch.full((1, 3), 0.5))
    with pytest.raises(ValueError, match="chunk-causal"):
        sample_autoregressive(make(chunk=0).eval(), (1, 4, 6, 8, 16), steps=1)
    with pytest.raises(ValueError, match="per_chunk_t"):
        flow_matching_loss(make(chunk=0), x, per_chunk_t=True)


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_sampling_a_chunk_never_changes_earlier_chunks(megatron_state, sparse):
    """Chunks 0..c of a 3-chunk sample are the sample of the first c + 1 chunks alone (same
    noise): generating later chunks changes nothing before them. Other noise in the last chunk
    changes only the last chunk."""
    m = make(dsv_mode="sparse" if sparse else "auto").eval()
    set_k(m, 24) if sparse else set_dense(m)
    y = torch.tensor([1, 4])
    z = torch.randn(SHAPE)
    full = sample_autoregressive(m, SHAPE, y, steps=STEPS, noise=z)
    for c in (1, 2):
        part = sample_autoregressive(m, SHAPE[:2] + (2 * c,) + SHAPE[3:], y, steps=STEPS, noise=z[:, :, : 2 * c])
        torch.testing.assert_close(full[:, :, : 2 * c], part, rtol=0, atol=0)
    z2 = z.clone()
    z2[:, :, 4:] = torch.randn_like(z2[:, :, 4:])
    other = sample_autoregressive(m, SHAPE, y, steps=STEPS, noise=z2)
    torch.testing.assert_close(other[:, :, :4], full[:, :, :4], rtol=0, atol=0)
    assert (chunk_frames(other, 2) - chunk_frames(full, 2)).abs().max() > 1e-2
    # chunk 1 is conditioned on chunk 0: other noise in chunk 0 changes the generated chunk 1
    z3 = z.clone()
    z3[:, :, :2] = torch.randn_like(z3[:, :, :2])
    moved = sample_autoregressive(m, SHAPE, y, steps=STEPS, noise=z3)
    assert torch.equal(moved[:, :, 2:4] != full[:, :, 2:4], torch.ones_like(moved[:, :, 2:4], dtype=torch.bool))


def test_one_chunk_is_the_ordinary_sampler(megatron_state):
    """dsv_causal_chunk = all 6 frames: one chunk, no context, the same Euler steps as sample()
    for the same noise (t [B, 1] against t [B]), with and without guidance."""
    m = make(chunk=6).eval()
    shape = (2, 4, 6, 8, 16)
    y = torch.tensor([1, 4])
    for guidance in (1.0, 2.5):
        g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
        a = sample_autoregressive(m, shape, y, steps=STEPS, guidance=guidance, generator=g1)
        b = sample(m, shape, y, steps=STEPS, guidance=guidance, generator=g2)
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        assert b.std() > 0.5


def test_autoregressive_sampling_is_deterministic_for_a_seed(megatron_state):
    m = make().eval()
    y = torch.tensor([1, 4])
    run = lambda seed: sample_autoregressive(m, SHAPE, y, steps=2, generator=torch.Generator().manual_seed(seed))  # noqa: E731
    a, b, c = run(3), run(3), run(4)
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 0.1
    # not sample(): the chunks are generated in turn on clean context, not denoised together
    together = sample(m, SHAPE, y, steps=2, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(together[:, :, :2], a[:, :, :2], rtol=1e-6, atol=1e-6)  # chunk 0 has no context
    assert (together[:, :, 2:] - a[:, :, 2:]).abs().max() > 1e-2


def test_draw_chunk_times_has_a_clean_prefix_then_noisy_chunks():
    g = torch.Generator().manual_seed(0)
    t = draw_chunk_times(4000, 4, generator=g)
    clean = t == 1
    assert clean.shape == (4000, 4)
    # clean chunks form a prefix, and the last chunk is always noisy
    assert torch.equal(clean, clean.cummin(dim=1).values)
    assert not bool(clean[:, -1].any())
    prefix = clean.sum(1)
    for c in range(4):  # the prefix length is uniform over 0..3
        assert abs(float((prefix == c).float().mean()) - 0.25) < 0.03
    noisy = t[~clean]
    assert float(noisy.min()) > 0 and float(noisy.max()) < 1
    assert abs(float(torch.logit(noisy).mean())) < 0.05 and abs(float(torch.logit(noisy).std()) - 1) < 0.05
    assert torch.equal(draw_chunk_times(7, 1, generator=torch.Generator().manual_seed(1)) < 1, torch.ones(7, 1, dtype=torch.bool))


def test_per_chunk_flow_loss_scores_the_noisy_chunks(megatron_state):
    """The loss at per-chunk times is the MSE over the tokens of chunks with t < 1, with each
    chunk's frames interpolated at its own time."""
    m = make()
    x, y = torch.randn(SHAPE), torch.tensor([1, 4])
    noise = torch.randn(SHAPE)
    t = torch.tensor([[1.0, 0.4, 0.7], [1.0, 1.0, 0.2]])
    x_t, vel = flow_interpolate(x, t, noise)
    torch.testing.assert_close(x_t[1, :, 2:4], x[1, :, 2:4])  # clean context: the data itself
    torch.testing.assert_close(x_t[0, :, 2:4], 0.6 * noise[0, :, 2:4] + 0.4 * x[0, :, 2:4])
    got = flow_matching_loss(m, x, y, t=t, noise=noise, per_chunk_t=True)
    with torch.no_grad():
        err = (m(x_t, t, y) - vel).pow(2)
    want = torch.cat([err[0, :, 2:].flatten(), err[1, :, 4:].flatten()]).mean()
    torch.testing.assert_close(got.detach(), want, rtol=1e-5, atol=1e-7)
    plain = flow_matching_loss(m, x, y, t=t[:, 2].contiguous(), noise=noise)
    assert abs(float(got.detach()) - float(plain.detach())) > 1e-3
    got.backward()
    assert m.patch_embed.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="no noisy chunk"):
        flow_matching_loss(m, x, y, t=torch.ones(2, 3), noise=noise, per_chunk_t=True)
    with pytest.raises(ValueError, match=r"t must be \[2, 3\]"):
        flow_matching_loss(m, x, y, t=torch.rand(2), noise=noise, per_chunk_t=True)
