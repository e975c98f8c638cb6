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


EXAMPLE = r"""
import os, sys, torch
sys.path.insert(0, ROOT); sys.path.insert(0, os.path.join(ROOT, "examples"))
from tests.megatron_shim import init_megatron_state
init_megatron_state()
import pretrain_video_dit as p
from megatron.training.arguments import parse_and_validate_args

argv = ["--dit-config", "tiny", "--latent-shape", "4x4x8x16", "--micro-batch-size", "2",
        "--train-iters", "3", "--lr", "1e-3", "--dsv-query-group", "2x2x4", "--use-cpu-initialization",
        "--dit-num-classes", "3", "--num-workers", "0", "--eval-iters", "8"]  # 16 items = 2 videos x 8 t
defaults, extra = p._pre_parse(argv)
sys.argv = ["pretrain_video_dit.py"] + argv + extra
args = parse_and_validate_args(extra_args_provider=p.add_video_args, args_defaults=defaults)

# the set's size is checked with the flags that fix it (Megatron's args are global: copies here)
import copy
bad = copy.copy(args); bad.eval_iters = 3
try:
    p.validation_videos(bad); raise SystemExit("6 items over 8 quantiles accepted")
except ValueError as e:
    assert "--val-t-quantiles" in str(e), e
bad = copy.copy(args); bad.data = "latents"
try:
    p.data_source(bad); raise SystemExit("--data latents without --data-path accepted")
except ValueError as e:
    assert "--data-path" in str(e), e

for source in ("procedural", "natural"):
    args.data = source
    args.curr_iteration = 0
    assert p.validation_videos(args) == 2
    torch.manual_seed(0)
    model = p.model_provider()
    with torch.no_grad():  # leave adaLN-zero's identity start
        g = torch.Generator().manual_seed(3)
        for prm in model.parameters():
            prm.add_(0.05 * torch.randn(prm.shape, generator=g))
    train, valid, _ = p.datasets_provider([10, 48, 0])  # 3 evaluations of 16 items
    assert len(valid) == 48 and valid.size == 16
    from megatron.training.datasets.data_samplers import build_pretraining_data_loader
    from megatron_dsv.models.evaluation import evaluate_fixed, stack_videos

    model.eval()
    losses = []
    for consumed in (0, 16, 32):  # where Megatron's sampler starts each evaluation
        loader = iter(build_pretraining_data_loader(valid, consumed_samples=consumed))
        total, report_sum = torch.zeros(2), {}
        with torch.no_grad():
            for _ in range(8):
                out, lf = p.forward_step(loader, model)
                loss, count, report = lf(out)
                for k, v in report.items():
                    report_sum[k] = report_sum.get(k, 0) + v
        assert len(report_sum) == 9  # the overall loss and 8 t buckets
        losses.append({k: float(v[0] / v[1]) for k, v in report_sum.items()})
    assert losses[0] == losses[1] == losses[2], losses  # every evaluation sees the same items
    x, y = stack_videos(valid.videos, 2)
    ref = evaluate_fixed(model, x, labels=y, seed=args.seed)
    assert abs(losses[0]["flow loss"] - ref["loss"]) <= 1e-5 * ref["loss"], (losses[0], ref)
    buckets = [v for k, v in losses[0].items() if k.startswith("flow loss t=")]
    assert all(abs(a - b) <= 1e-5 * b for a, b in zip(buckets, ref["loss_by_t"]))
    # a training batch still draws t and noise from the iteration
    out, lf = p.forward_step(iter([torch.utils.data.default_collate([train[0], train[1]])]), model)
    assert len(lf(out)[2]) == 1
import gc
from megatron.core import parallel_state as ps
ps.destroy_model_parallel(); torch.distributed.destroy_process_group(); gc.collect()
print("OK")
"""


@pytest.mark.slow
def test_pretraining_example_validates_on_the_fixed_set():
    """examples/pretrain_video_dit.py: Megatron's validation loader over the fixed set, at three
    evaluation points, gives the same per-bucket losses, equal to evaluate_fixed's; the set's
    size and the data flags are checked first (a fresh process: Megatron keeps global args)."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, WORLD_SIZE="1", RANK="0", LOCAL_RANK="0", TRITON_INTERPRET="1")
    for var in ("MASTER_PORT", "MASTER_ADDR"):
        env.pop(var, None)
    res = subprocess.run([sys.executable, "-c", "ROOT = " + repr(root) + "\n" + EXAMPLE], cwd=root, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "OK" in res.stdout, res.stdout[-3000:] + res.stderr[-3000:]
