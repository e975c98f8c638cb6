"""The fixed validation set: deterministic, stratified over logit-normal t, forced-dense
evaluation restores the layers, and the dataset form gives the same items."""

import math

import pytest
import torch

from megatron_dsv.models.evaluation import (
    FixedValidationDataset, evaluate_fixed, fixed_noise, logit_normal_quantiles, stack_videos,
)
from tests.megatron_shim import tiny_config


def make(mode="auto", seed=0):
    from megatron_dsv.models.video_dit import VideoDiT

    cfg = tiny_config(dsv_query_group=(2, 2, 4), normalization="RMSNorm", qk_layernorm=True, dsv_mode=mode)
    torch.manual_seed(seed)
    m = VideoDiT(cfg, in_channels=4, patch=(1, 2, 2), num_classes=5)
    with torch.no_grad():  # leave adaLN-zero's identity start, so attention changes the output
        g = torch.Generator().manual_seed(3)
        for name, prm in m.named_parameters():
            if "predictor" not in name:
                prm.add_(0.05 * torch.randn(prm.shape, generator=g))
    return m


def videos(n=3):
    g = torch.Generator().manual_seed(5)
    return torch.randn(n, 4, 4, 8, 16, generator=g) * 0.5, torch.tensor([0, 3, 4, 1, 2][:n])


def test_quantiles_are_logit_normal_bucket_midpoints():
    t = logit_normal_quantiles(8)
    # sigmoid(Phi^-1(p)): the median is 0.5, buckets are symmetric, the first is sigmoid(Phi^-1(1/16))
    assert t.shape == (8,) and torch.all(t[1:] > t[:-1])
    assert torch.allclose(t + t.flip(0), torch.ones(8, dtype=torch.float64), atol=1e-12)
    assert math.isclose(float(t[0]), 1 / (1 + math.exp(1.5341205443525465)), rel_tol=1e-9)
    # stratification: the bucket means of sigmoid(randn) match the midpoints to within the bucket width
    draws = torch.sigmoid(torch.randn(200_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    edges = torch.sigmoid(torch.special.ndtri(torch.arange(1, 8, dtype=torch.float64) / 8))
    bucket = torch.bucketize(draws, edges)
    counts = torch.bincount(bucket, minlength=8).double() / draws.numel()
    assert torch.allclose(counts, torch.full((8,), 0.125, dtype=torch.float64), atol=0.005)
    with pytest.raises(ValueError, match="at least one"):
        logit_normal_quantiles(0)


def test_fixed_noise_depends_on_item_and_seed_only():
    a = fixed_noise(5, (2, 3), seed=1)
    assert torch.equal(a, fixed_noise(5, (2, 3), seed=1))
    assert not torch.equal(a, fixed_noise(6, (2, 3), seed=1))
    assert not torch.equal(a, fixed_noise(5, (2, 3), seed=2))


def same_state(a, b) -> bool:
    """Field by field (tensors by value): ``apply`` may hand back an equal copy."""
    import dataclasses

    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and torch.equal(x, y)):
                return False
        elif f.name == "stats_ema":
            if x.keys() != y.keys() or not all(torch.equal(x[k], y[k]) for k in x):
                return False
        elif x != y:
            return False
    return True


def _sparse_layer(model):
    from megatron_dsv.layers.attention import dsv_attention_layers

    layer = dsv_attention_layers(model)[0]
    layer.set_sparse(True, torch.full((4,), 2, dtype=torch.int32))  # 2 of 8 key units per head
    return layer


def test_evaluation_is_deterministic_and_batch_independent(megatron_state):
    m = make()
    _sparse_layer(m)
    x, y = videos()
    a = evaluate_fixed(m, x, labels=y, seed=7)
    b = evaluate_fixed(m, x, labels=y, seed=7)
    assert a == b  # bitwise: same t, same noise, same model
    c = evaluate_fixed(m, x, labels=y, seed=7, batch_size=5)
    assert math.isclose(a["loss"], c["loss"], rel_tol=1e-5)
    assert a["num_videos"] == 3 and len(a["loss_by_t"]) == 8 and a["sparse_layers"] == [1]
    assert math.isclose(sum(a["loss_by_t"]) / 8, a["loss"], rel_tol=1e-9)  # equal videos per bucket
    assert evaluate_fixed(m, x, labels=y, seed=8)["loss"] != a["loss"]  # the seed is the noise
    assert m.training  # the model's mode is restored


def test_per_item_loss_is_the_flow_matching_loss(megatron_state):
    """Each item is flow_matching_loss at its quantile t with its fixed noise."""
    from megatron_dsv.models.video_dit import flow_matching_loss

    m = make()
    x, y = videos(2)
    res = evaluate_fixed(m, x, labels=y, t_quantiles=4, seed=3)
    t = logit_normal_quantiles(4).float()
    m.eval()
    with torch.no_grad():
        expect = [
            flow_matching_loss(m, x[v : v + 1], y[v : v + 1], t=t[q : q + 1], noise=fixed_noise(v * 4 + q, x.shape[1:], 3)[None]).item()
            for v in range(2) for q in range(4)
        ]
    m.train()
    by_t = torch.tensor(expect, dtype=torch.float64).view(2, 4).mean(0)
    assert torch.allclose(torch.tensor(res["loss_by_t"], dtype=torch.float64), by_t, rtol=1e-5)


def test_force_dense_evaluates_dense_and_restores_the_layers(megatron_state):
    from megatron_dsv.layers.attention import dsv_attention_layers

    m = make()
    layer = _sparse_layer(m)
    before = [a.state for a in dsv_attention_layers(m)]
    x, y = videos()
    sparse = evaluate_fixed(m, x, labels=y, seed=7)
    dense = evaluate_fixed(m, x, labels=y, seed=7, force_dense=True)
    assert dense["sparse_layers"] == [] and dense["force_dense"]
    assert all(same_state(a.state, s) for a, s in zip(dsv_attention_layers(m), before))  # restored, same objects
    assert layer.sparse and layer.kv_units_global.tolist() == [2, 2, 2, 2]
    assert abs(sparse["loss"] - dense["loss"]) > 1e-6  # 2 of 8 key units changes the output
    # forced dense is the same weights built dense
    ref = make(mode="dense")
    ref.load_state_dict({k: v for k, v in m.state_dict().items() if "predictor" not in k and "_extra_state" not in k},
                        strict=False)
    assert math.isclose(evaluate_fixed(ref, x, labels=y, seed=7)["loss"], dense["loss"], rel_tol=1e-6)


def test_force_dense_restores_the_layers_on_error(megatron_state):
    from megatron_dsv.layers.attention import dsv_attention_layers

    m = make()
    layer = _sparse_layer(m)
    before = [a.state for a in dsv_attention_layers(m)]
    with pytest.raises(ValueError, match="latent channels"):
        evaluate_fixed(m, torch.randn(1, 3, 4, 8, 16), force_dense=True)
    assert layer.sparse and all(same_state(a.state, s) for a, s in zip(dsv_attention_layers(m), before))
    assert m.training
    with pytest.raises(ValueError, match=r"\[N, C, T, H, W\]"):
        evaluate_fixed(m, torch.randn(4, 8, 16))


def test_dataset_form_matches_evaluate_fixed(megatron_state):
    """FixedValidationDataset's items, run through the model, give evaluate_fixed's numbers, and
    the set repeats past its size (a sampler walking on sees the same set again)."""
    from megatron_dsv.data.procedural import ProceduralVideoDataset
    from megatron_dsv.models.video_dit import flow_interpolate

    base = ProceduralVideoDataset(5, (4, 8, 16), 4, 5, seed=2)
    ds = FixedValidationDataset(base, num_videos=2, t_quantiles=4, seed=9, length=20)
    assert len(ds) == 20 and ds.size == 8
    for key in ("latents", "t", "noise", "label"):
        assert torch.equal(ds[3][key], ds[11][key])
    assert int(ds[5]["t_bucket"]) == 1 and torch.equal(ds[5]["latents"], base[1]["latents"])
    x, y = stack_videos(base, 2)
    m = make()
    res = evaluate_fixed(m, x, labels=y, t_quantiles=4, seed=9)
    batch = torch.utils.data.default_collate([ds[i] for i in range(8)])
    m.eval()
    with torch.no_grad():
        x_t, vel = flow_interpolate(batch["latents"], batch["t"], batch["noise"])
        per = (m(x_t, batch["t"], batch["label"]) - vel).pow(2).flatten(1).mean(1)
    assert math.isclose(per.double().mean().item(), res["loss"], rel_tol=1e-5)
    with pytest.raises(ValueError, match="num_videos"):
        FixedValidationDataset(base, num_videos=6)
