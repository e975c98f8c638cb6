import pytest
import torch

from megatron_dsv.models.rope3d import band_sizes, rope_3d_freqs
from megatron_dsv.ops.layout import cube_major_positions
from tests.megatron_shim import tiny_config


def make(**cfg):
    from megatron_dsv.models.video_dit import VideoDiT

    kw = dict(dsv_query_group=(2, 2, 4), normalization="RMSNorm", qk_layernorm=True, dsv_mode="auto")
    kw.update(cfg)
    torch.manual_seed(0)
    return VideoDiT(tiny_config(**kw), in_channels=4, patch=(1, 2, 2), num_classes=5)


def test_shapes_and_zero_init(megatron_state):
    m = make()
    x = torch.randn(2, 4, 4, 8, 16)
    out = m(x, torch.rand(2), torch.tensor([0, 4]))
    assert out.shape == x.shape
    assert torch.count_nonzero(out) == 0  # adaLN-zero + zero output layer: DiT starts at zero
    with pytest.raises(ValueError, match="multiple of the patch"):
        m(torch.randn(1, 4, 4, 7, 16), torch.rand(1))
    with pytest.raises(ValueError, match="query-group cube"):
        m(torch.randn(1, 4, 3, 8, 16), torch.rand(1))
    with pytest.raises(ValueError, match="latent channels"):
        m(torch.randn(1, 3, 4, 8, 16), torch.rand(1))


def test_patchify_round_trip(megatron_state):
    m = make()
    x = torch.randn(2, 4, 4, 8, 16)
    p = m.patchify(x)
    assert p.shape == (2, 4 * 4 * 8, 16)
    assert torch.equal(m.unpatchify(p, (4, 8, 16)), x)
    # patch n in raster order holds voxels t=n//32, h in 2*((n//8)%4)..., w in 2*(n%8)...
    assert torch.equal(p[0, 9].view(4, 1, 2, 2), x[0, :, 0:1, 2:4, 2:4])


def test_cube_major_round_trip_through_the_model(megatron_state):
    """With identity layers and embeddings, the model must return its input: the token
    permutation into cube-major order and its inverse are consistent."""
    m = make()
    with torch.no_grad():
        m.patch_embed.weight.zero_()
        m.patch_embed.weight[:16].copy_(torch.eye(16))
        m.patch_embed.bias.zero_()
        m.out.weight.zero_()
        m.out.weight[:, :16].copy_(torch.eye(16))
    m.final_norm = torch.nn.Identity()
    seen = []

    class Spy(torch.nn.Module):
        def forward(self, x, c, rope, *context):
            seen.append((x.clone(), rope))
            return x

    m.layers = torch.nn.ModuleList([Spy()])
    x = torch.randn(1, 4, 4, 8, 16)
    torch.testing.assert_close(m(x, torch.rand(1)), x)
    tokens, rope = seen[0]
    # inside the model the first G=16 tokens are one 2x2x4 cube of patches
    pos = cube_major_positions((4, 4, 8), (2, 2, 4))[:16]
    patches = m.patchify(x)[0]
    raster = pos[:, 0] * 32 + pos[:, 1] * 8 + pos[:, 2]
    torch.testing.assert_close(tokens[:16, 0, :16], patches[raster])
    assert rope.shape == (128, 1, 1, 32)


def test_rope_positions_follow_the_tokens():
    grid, cube, d = (4, 4, 8), (2, 2, 4), 64
    freqs = rope_3d_freqs(grid, cube, d)[:, 0, 0]
    pos = cube_major_positions(grid, cube)
    nt, nh, nw = band_sizes(d)
    assert nt + nh + nw == d // 2
    for i in (0, 5, 77, 127):
        t, h, w = pos[i].tolist()
        want = torch.cat([t / 10000 ** (torch.arange(nt) / nt), h / 10000 ** (torch.arange(nh) / nh),
                          w / 10000 ** (torch.arange(nw) / nw)])
        torch.testing.assert_close(freqs[i, : d // 2], want)
        torch.testing.assert_close(freqs[i, d // 2 :], want)


def test_rope_makes_attention_relative(megatron_state):
    """q.k after Megatron's RoPE depends on the position difference only (per axis)."""
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    d = 48
    freqs = rope_3d_freqs((4, 4, 4), (1, 1, 1), d)
    q, k = torch.randn(1, 1, 1, d), torch.randn(1, 1, 1, d)
    pos = cube_major_positions((4, 4, 4), (1, 1, 1)).tolist()
    idx = {tuple(p): i for i, p in enumerate(pos)}

    def score(a, b):
        qa = _apply_rotary_pos_emb_bshd(q, freqs[idx[a]][None])
        kb = _apply_rotary_pos_emb_bshd(k, freqs[idx[b]][None])
        return float((qa * kb).sum())

    assert score((0, 1, 0), (1, 2, 3)) == pytest.approx(score((2, 1, 0), (3, 2, 3)), rel=1e-4)
    assert score((0, 1, 0), (1, 2, 3)) != pytest.approx(score((0, 1, 0), (1, 3, 3)), rel=1e-3)


def test_flow_matching_loss_definition(megatron_state):
    from megatron_dsv.models.video_dit import flow_matching_loss

    m = make()
    x = torch.randn(2, 4, 4, 8, 16)
    noise = torch.randn_like(x)
    t = torch.tensor([0.3, 0.9])
    calls = []
    orig = m.forward
    m.forward = lambda x_t, tt, labels=None, **kw: (calls.append((x_t, tt)), orig(x_t, tt, labels, **kw))[1]
    loss = flow_matching_loss(m, x, t=t, noise=noise)
    x_t, tt = calls[0]
    torch.testing.assert_close(x_t, (1 - t.view(2, 1, 1, 1, 1)) * noise + t.view(2, 1, 1, 1, 1) * x)
    # the model outputs 0 at init, so the loss is E[(x - noise)^2]
    torch.testing.assert_close(loss, ((x - noise) ** 2).mean())


@pytest.mark.slow
def test_few_steps_of_training_reduce_the_loss(megatron_state):
    from megatron_dsv.data.procedural import ProceduralVideoDataset
    from megatron_dsv.models.video_dit import flow_matching_loss, sample

    m = make(dsv_mode="sparse", dsv_fixed_sparsity=0.5)
    data = ProceduralVideoDataset(8, (4, 8, 16), channels=4, num_classes=5)
    batch = torch.stack([data[i]["latents"] for i in range(4)])
    labels = torch.stack([data[i]["label"] for i in range(4)])
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(25):
        loss = flow_matching_loss(m, batch, labels, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    video = sample(m, (1, 4, 4, 8, 16), labels[:1], steps=3, guidance=2.0, generator=g)
    assert video.shape == (1, 4, 4, 8, 16) and torch.isfinite(video).all()


def test_cross_attention_to_text(megatron_state):
    """Text tokens reach the output through the cross-attention; padded tokens do not; the null
    text stands in when no text is given; a model without text_dim rejects text."""
    from megatron_dsv.layers.attention import dsv_attention_layers
    from megatron_dsv.models.video_dit import VideoDiT

    torch.manual_seed(0)
    cfg = tiny_config(dsv_query_group=(2, 2, 4), normalization="RMSNorm", qk_layernorm=True, dsv_mode="auto")
    m = VideoDiT(cfg, in_channels=4, patch=(1, 2, 2), num_classes=5, text_dim=8)
    cross = [l.cross_attention.core_attention for l in m.layers]
    assert all(c.predictor is None and not c.is_self_attention for c in cross)  # dense, no DSV
    assert len(dsv_attention_layers(m)) == 4 and all(torch.count_nonzero(l.cross_attention.linear_proj.weight) == 0 for l in m.layers)
    with torch.no_grad():  # leave the zero init so the text can matter
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x, t, y = torch.randn(2, 4, 4, 8, 16), torch.rand(2), torch.tensor([0, 4])
    text = torch.randn(2, 5, 8)
    mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    out = m(x, t, y, text=text, text_mask=mask)
    assert not torch.allclose(out, m(x, t, y, text=text + 1.0, text_mask=mask))
    poked = text.clone()
    poked[1, 3:] += 100.0  # padded tokens of sample 1
    torch.testing.assert_close(m(x, t, y, text=poked, text_mask=mask), out)
    assert not torch.allclose(m(x, t, y), out)  # null text
    with pytest.raises(ValueError, match="text must be"):
        m(x, t, y, text=torch.randn(2, 5, 7))
    with pytest.raises(ValueError, match="no cross-attention"):
        make()(x, t, y, text=text)
