"""VideoDiT under context parallelism (gloo, CP = 2 and 4) matches the same model at CP = 1.

Every rank builds the CP model (process groups from Megatron's parallel_state) and, with the same
weights, a CP = 1 reference on a single-rank group, feeds both the same latents, labels, t and
noise, and checks:
* the flow-matching loss: the mean over CP ranks of the local losses equals the reference loss;
* parameter gradients averaged over the CP group (Megatron's data x context-parallel averaging)
  equal the reference gradients, predictor included (the predictor's auxiliary loss with the
  schedule's loss scale left at 1, as in tests/cp/test_cp_block.py);
* ``forward()`` returns the whole video on every rank, equal to the reference, and a loss on that
  gathered output gives the reference gradients (the gather's reduce-scatter backward);
* ``sample()`` gives the reference video.
Dense stage 1 (``dsv_mode="auto"``: dense attention, predictor training) and ``dsv_mode="sparse"``
with head, sequence and 2x2 splits. The weights are randomised so that no adaLN gate is zero and
every parameter has a gradient.
"""

from __future__ import annotations

import pytest
import torch

from tests.cp.distributed import run_ranks

LATENT = (2, 4, 4, 8, 16)  # B, C, T, H, W -> patch grid 4x4x8 = 128 tokens = 8 cubes of 2x2x4
TOL = 2e-5
TEXT_DIM = 8  # every model here has cross-attention to text, checked under CP too
CASES = {
    2: [("auto", "head"), ("auto", "seq"), ("sparse", "head"), ("sparse", "seq")],
    4: [("auto", "2x2"), ("sparse", "2x2"), ("sparse", "seq")],
}


# Chunk-causal cases: patch grid 8x2x4 = 64 tokens (4 cubes of 2x2x4), chunks of 2 grid frames =
# 16 tokens, so each CP = 2 rank's 32 tokens hold two chunks.
CAUSAL_LATENT = (2, 4, 8, 4, 8)
CAUSAL_CASES = [("auto", "seq"), ("sparse", "seq"), ("sparse", "head")]


def _config(cp, mode, split, chunk=0):
    from tests.megatron_shim import tiny_config

    return tiny_config(
        # chunk-causal: K = 32 of 64 keys, so a group selects past its own chunk's 16 forced keys
        context_parallel_size=cp, dsv_mode=mode, dsv_cp_split=split, dsv_fixed_sparsity=0.5 if chunk else 0.75,
        dsv_query_group=(2, 2, 4), normalization="RMSNorm", qk_layernorm=True, num_query_groups=2,
        dsv_predictor_fit="gradient",  # the predictor's gradient under CP is checked too
        dsv_causal_chunk=chunk, **({"dsv_backend": "reference"} if chunk else {}),  # the kernels' masks: tests/ops
    )


def _rank(rank, world, cases):
    import torch.distributed as dist

    from tests.megatron_shim import init_megatron_state

    init_megatron_state(cp=world, rank=rank, world_size=world, seed=7)
    singles = [dist.new_group([r]) for r in range(world)]  # collective: every rank makes all
    if world == 2:
        _bad_shape_raises()
    for i, (mode, split) in enumerate(cases):
        _case(rank, world, singles[rank], mode, split, full=i == 0)


def _bad_shape_raises():
    from megatron_dsv.models.video_dit import VideoDiT

    model = VideoDiT(_config(2, "auto", "head"), in_channels=4, patch=(1, 2, 2))
    # grid 2x2x12 = 48 tokens = 3 cubes of 16: no equal split of whole cubes over 2 ranks
    with pytest.raises(ValueError, match=r"multiple of 32 .*--context-parallel-size that divides 3"):
        model(torch.randn(1, 4, 2, 4, 24), torch.rand(1))


def _models(world, single, mode, split, chunk=0):
    from megatron.core.process_groups_config import ProcessGroupCollection

    from megatron_dsv.layers.context_parallel import apply_dsv_context_parallel
    from megatron_dsv.models.video_dit import VideoDiT

    torch.manual_seed(0)
    model = VideoDiT(_config(world, mode, split, chunk), in_channels=4, patch=(1, 2, 2), num_classes=5, text_dim=TEXT_DIM)
    apply_dsv_context_parallel(model)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    tp = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"]).tp
    ref = VideoDiT(_config(1, mode, split, chunk), in_channels=4, patch=(1, 2, 2), num_classes=5, text_dim=TEXT_DIM,
                   pg_collection=ProcessGroupCollection(tp=tp, cp=single))
    ref.load_state_dict(model.state_dict())
    assert model.cp_size == world and ref.cp_size == 1
    return model, ref


def _avg_grads(model, world):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    grads = {}
    for n, p in model.named_parameters():
        if p.grad is not None:
            g = p.grad.clone()
            dist.all_reduce(g, group=ps.get_context_parallel_group())
            grads[n] = g / world
    return grads


def _close(label, got, want):
    err = (got.detach() - want.detach()).abs().max().item()
    scale = want.detach().abs().max().item()
    assert err <= TOL * scale + 1e-9, f"{label}: max error {err:.3g} vs max |ref| {scale:.3g}"


def _check_grads(label, model, ref, world):
    got = _avg_grads(model, world)
    want = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    used = [n for n, _ in ref.named_parameters() if n != "null_text"]  # null text: only without text
    assert got.keys() == want.keys() and sorted(want) == sorted(used), sorted(set(want) ^ set(used))
    for n in want:
        _close(f"{label} grad {n}", got[n], want[n])


def _megatron_backward(model, loss, world):
    """Backward as Megatron's schedule runs it under CP: the auxiliary-loss (predictor) scale is
    multiplied by the CP size (``forward_step_calc_loss``); gradients are then averaged over CP."""
    from megatron_dsv.layers.attention import predictor_loss_scale

    scale = predictor_loss_scale(model.config)
    scale.set(torch.tensor(float(world)))
    try:
        loss.backward()
    finally:
        scale.reset()


def _case(rank, world, single, mode, split, full, chunk=0):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_dsv.layers.attention import dsv_attention_layers
    from megatron_dsv.layers.state import StepControl
    from megatron_dsv.models.video_dit import flow_matching_loss, sample

    label = f"CP={world} rank {rank} mode={mode} split={split} chunk={chunk}"
    model, ref = _models(world, single, mode, split, chunk)
    assert model.chunk_causal == ref.chunk_causal == chunk
    latent_shape = CAUSAL_LATENT if chunk else LATENT
    for layer in dsv_attention_layers(model) + dsv_attention_layers(ref):
        layer.begin_iteration(StepControl(iteration=3, train_predictor=layer.predictor is not None,
                                          collect_stats=layer.predictor is not None))
    gen = torch.Generator().manual_seed(11)  # identical draws on every CP rank
    latents = torch.randn(latent_shape, generator=gen)
    labels = torch.tensor([0, 3])

    # text tokens for the cross-attention (dense, never context-parallel), the second sample padded
    text = torch.randn(2, 5, TEXT_DIM, generator=gen)
    tmask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    kw = dict(text=text, text_mask=tmask)
    loss = flow_matching_loss(model, latents, labels, generator=torch.Generator().manual_seed(5), **kw)
    _megatron_backward(model, loss, world)
    ref_loss = flow_matching_loss(ref, latents, labels, generator=torch.Generator().manual_seed(5), **kw)
    ref_loss.backward()
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss, group=ps.get_context_parallel_group())
    _close(f"{label} loss", mean_loss / world, ref_loss)
    _check_grads(f"{label} flow loss", model, ref, world)
    selfs = [l for l in dsv_attention_layers(model) if l.is_self_attention]
    if chunk:
        assert all(l.causal_mask().chunk_tokens == chunk * 8 for l in selfs)  # 8 tokens per grid frame
    if mode == "sparse" and split == "seq":
        # chunk-causal: rank 0's chunks read no later key, so it fetches nothing
        assert all((0 < l.cp_exchange.ratio <= 1) != (chunk and rank == 0) for l in selfs), [l.cp_exchange for l in selfs]

    t = torch.tensor([0.2, 0.7])
    with torch.no_grad():
        out, want = model(latents, t, labels, **kw), ref(latents, t, labels, **kw)
    assert out.shape == latents.shape
    _close(f"{label} forward", out, want)
    if not full:
        return
    # a loss that every rank computes on the gathered output: exact through the gather's backward
    w = torch.randn(LATENT, generator=gen)
    model.zero_grad(), ref.zero_grad()
    _megatron_backward(model, (model(latents, t, labels, **kw) * w).sum(), world)
    (ref(latents, t, labels, **kw) * w).sum().backward()
    _check_grads(f"{label} gathered-output loss", model, ref, world)
    shape = (1,) + LATENT[1:]
    video = sample(model, shape, labels[:1], steps=2, guidance=2.0, generator=torch.Generator().manual_seed(9))
    _close(f"{label} sample", video, sample(ref, shape, labels[:1], steps=2, guidance=2.0,
                                             generator=torch.Generator().manual_seed(9)))


@pytest.mark.parametrize("world", sorted(CASES))
def test_video_dit_cp_matches_single_process(world):
    run_ranks(_rank, world, CASES[world])


def _causal_rank(rank, world):
    import torch.distributed as dist

    from tests.megatron_shim import init_megatron_state

    init_megatron_state(cp=world, rank=rank, world_size=world, seed=7)
    singles = [dist.new_group([r]) for r in range(world)]
    for mode, split in CAUSAL_CASES:
        _case(rank, world, singles[rank], mode, split, full=False, chunk=2)


def test_chunk_causal_video_dit_cp_matches_single_process():
    """A chunk-causal VideoDiT (dsv_causal_chunk=2) at CP = 2: loss, gradients and the forward
    equal CP = 1, dense stage 1 and sparse, sequence and head splits."""
    run_ranks(_causal_rank, 2)


# Per-chunk times under CP: patch grid 6x4x4 = 96 tokens (6 cubes of 2x2x4) in 3 chunks of 2 grid
# frames = 32 tokens, so each CP = 2 rank's 48 tokens hold one chunk and half of the middle one
# (a head split: a sequence split refuses shards that cut a chunk).
PER_CHUNK_LATENT = (2, 4, 6, 8, 8)


def _per_chunk_rank(rank, world):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_dsv.models.video_dit import flow_interpolate, flow_matching_loss
    from tests.megatron_shim import init_megatron_state

    init_megatron_state(cp=world, rank=rank, world_size=world, seed=7)
    singles = [dist.new_group([r]) for r in range(world)]
    model, ref = _models(world, singles[rank], "auto", "head", chunk=2)
    want_ids = [0] * 32 + [1] * 16 if rank == 0 else [1] * 16 + [2] * 32
    assert model.local_chunk_ids(PER_CHUNK_LATENT[2:]).tolist() == want_ids
    gen = torch.Generator().manual_seed(11)
    latents, noise = torch.randn(PER_CHUNK_LATENT, generator=gen), torch.randn(PER_CHUNK_LATENT, generator=gen)
    labels, kw = torch.tensor([0, 3]), dict(text=torch.randn(2, 5, TEXT_DIM, generator=gen))
    # sample 1 has no noisy token on rank 0; in the second case rank 0 has none at all
    for t in (torch.tensor([[1.0, 0.4, 0.7], [1.0, 1.0, 0.2]]), torch.tensor([[1.0, 1.0, 0.3], [1.0, 1.0, 0.6]])):
        label = f"per-chunk t={t.tolist()} rank {rank}"
        model.zero_grad(), ref.zero_grad()
        loss = flow_matching_loss(model, latents, labels, t=t, noise=noise, per_chunk_t=True, **kw)
        _megatron_backward(model, loss, world)
        ref_loss = flow_matching_loss(ref, latents, labels, t=t, noise=noise, per_chunk_t=True, **kw)
        ref_loss.backward()
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss, group=ps.get_context_parallel_group())
        _close(f"{label} loss", mean_loss / world, ref_loss)
        _check_grads(f"{label} flow loss", model, ref, world)
        x_t, _ = flow_interpolate(latents, t, noise)
        with torch.no_grad():
            _close(f"{label} forward", model(x_t, t, labels, **kw), ref(x_t, t, labels, **kw))


def test_per_chunk_times_under_cp_match_single_process():
    """Per-chunk times t [B, n] at CP = 2 with shards that cut a chunk in half: each rank modulates
    its tokens by their own chunk's time, and the per-chunk flow loss (noisy chunks only; a rank
    may hold none) averaged over the CP ranks, its gradients and the forward equal CP = 1."""
    run_ranks(_per_chunk_rank, 2)
