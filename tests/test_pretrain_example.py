"""The Megatron pretraining example up to pretrain() (which needs CUDA): argument handling with
Megatron's parser and validation, the config container, the runtime wrappers on the unpatched
wheel, the model provider, the dataset provider and one forward step, on CPU, in a fresh process
(Megatron keeps global args). The example on a patched clone: tests/test_patches.py."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = r"""
import os, sys, torch
sys.path.insert(0, ROOT); sys.path.insert(0, os.path.join(ROOT, "examples"))
from tests.megatron_shim import init_megatron_state
init_megatron_state()
import pretrain_video_dit as p
argv = ["--dit-config", "tiny", "--latent-shape", "4x4x8x16", "--micro-batch-size", "2",
        "--train-iters", "3", "--lr", "1e-3", "--dsv-query-group", "2x2x4", "--use-cpu-initialization",
        "--dit-num-classes", "3", "--dsv-predictor-rank", "8"]
defaults, extra = p._pre_parse(argv)
sys.argv = ["pretrain_video_dit.py"] + argv + extra
from megatron.training.arguments import parse_and_validate_args
from megatron.training.argument_utils import pretrain_cfg_container_from_args
args = parse_and_validate_args(extra_args_provider=p.add_video_args, args_defaults=defaults)
cfg = pretrain_cfg_container_from_args(args)
import megatron.training.training as tr
from megatron_dsv.runtime import megatron as dsv_runtime
assert not hasattr(tr, "dsv_hooks")  # the installed wheel is not patched: the example wraps it
dsv_runtime.install()
assert tr.train_step.__dsv_wrapped__ and tr.setup_model_and_optimizer.__wrapped__ is not None
assert (args.num_layers, args.hidden_size, args.seq_length, args.transformer_impl) == (2, 128, 128, "local")
assert args.dsv_predictor_rank == 8 and args.dit_patch == (1, 2, 2)
args.curr_iteration = 0
model = p.model_provider()
model.set_input_tensor([None])  # what Megatron's schedule calls on a single-stage model
from megatron_dsv.layers.attention import dsv_attention_layers
layers = dsv_attention_layers(model)
assert len(layers) == 2 and layers[0].predictor.rank == 8 and layers[0].dsv.group_size == 16
train, valid, _ = p.datasets_provider([10, 2, 0])
assert len(train) >= 10 and len(valid) == 2
batch = torch.utils.data.default_collate([train[0], train[1]])
out, loss_func = p.forward_step(iter([batch]), model)
loss, count, report = loss_func(out)
assert out.shape == (2, 128, 16) and count.item() == out.numel() and count.dtype == torch.int  # [B, tokens, patch]
loss.backward()
# the default closed-form predictor fit: the training forward profiled and kept its score moments
assert layers[0].predictor.moments is not None and len(layers[0].pending_stats) == 1
# gloo groups must not outlive the interpreter's finalisation (tests/cp/distributed.py says why)
import gc
from megatron.core import parallel_state as ps
ps.destroy_model_parallel(); torch.distributed.destroy_process_group(); del model, layers; gc.collect()
print("OK", float(loss / count))
"""


def _run_fresh(script):
    env = dict(os.environ, WORLD_SIZE="1", RANK="0", LOCAL_RANK="0", TRITON_INTERPRET="1")
    for var in ("MASTER_PORT", "MASTER_ADDR"):  # the parent's gloo store holds its port
        env.pop(var, None)
    code = "ROOT = " + repr(ROOT) + "\n" + script
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "OK" in res.stdout
    return res.stdout


@pytest.mark.slow
def test_example_until_pretrain():
    _run_fresh(SCRIPT)


CAUSAL_SCRIPT = r"""
import os, sys, torch
sys.path.insert(0, ROOT); sys.path.insert(0, os.path.join(ROOT, "examples"))
from tests.megatron_shim import init_megatron_state
init_megatron_state()
import pretrain_video_dit as p
# patch grid 6x4x4 = 96 tokens in 3 chunks of 2 frames (32 tokens); 4 validation items = 2 videos x 2 t
argv = ["--dit-config", "tiny", "--latent-shape", "4x6x8x8", "--micro-batch-size", "2",
        "--train-iters", "5", "--lr", "1e-3", "--dsv-query-group", "2x2x4", "--use-cpu-initialization",
        "--dit-num-classes", "3", "--dsv-predictor-rank", "8", "--num-workers", "0", "--dsv-causal-chunk", "2",
        "--eval-iters", "2", "--val-t-quantiles", "2", "--dsv-kv-block", "16"]  # 96 tokens: 6 blocks of 16
defaults, extra = p._pre_parse(argv)
sys.argv = ["pretrain_video_dit.py"] + argv + extra
from megatron.training.arguments import parse_and_validate_args
from megatron.core.pipeline_parallel.schedules import forward_step_calc_loss
from megatron.training.datasets.data_samplers import build_pretraining_data_loader
from megatron_dsv.layers.attention import dsv_attention_layers
from megatron_dsv.models.video_dit import flow_matching_loss
args = parse_and_validate_args(extra_args_provider=p.add_video_args, args_defaults=defaults)
assert args.dsv_causal_chunk == 2 and p.chunk_count(args) == 3
args.curr_iteration = 0
torch.manual_seed(0)
model = p.model_provider()
model.set_input_tensor([None])
selfs = [a for a in dsv_attention_layers(model) if a.is_self_attention]
train, valid, _ = p.datasets_provider([10, 4, 0])

def validation():
    loader = iter(build_pretraining_data_loader(valid, consumed_samples=0))
    total = torch.zeros(2)
    model.eval()
    with torch.no_grad():
        for _ in range(2):
            out, lf = p.forward_step(loader, model)
            _, _, report = lf(out)
            assert len(report) == 3  # the overall loss and 2 t buckets: every chunk at the item's t
            total += report["flow loss"]
    model.train()
    return float(total[0] / total[1])

seen = {}
get_batch = p.get_batch
p.get_batch = lambda it, dev: seen.clear() or seen.update(get_batch(it, dev)) or seen
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
before = validation()
clean_prefixes, losses = 0, []
loader = iter(build_pretraining_data_loader(train, consumed_samples=0))
for it in range(5):
    args.curr_iteration = it
    out, lf = p.forward_step(loader, model)
    t = seen["t"]
    assert t.shape == (2, 3), t.shape  # one t per chunk
    clean = t == 1  # t = 1 is the data itself (x_t = (1 - t) noise + t x): the clean context
    assert torch.equal(clean, clean.cummin(dim=1).values) and not bool(clean[:, -1].any()), t
    assert bool((t[~clean] > 0).all())
    clean_prefixes += int(clean[:, 0].sum())
    store = []
    loss, _ = forward_step_calc_loss(model, out, lf, model.config, None, False, 1, store, cp_group_size=1,
                                     is_last_stage=True)
    if it == 0:  # the library's per-chunk objective on the same draws: noisy chunks only
        with torch.no_grad():
            want = flow_matching_loss(model, seen["latents"], seen["labels"], t=t, noise=seen["noise"], per_chunk_t=True)
        assert abs(float(loss) - float(want)) <= 1e-5 * float(want), (float(loss), float(want))
        report = store[0]["flow loss"]
        assert abs(float(report[0] / report[1]) - float(want)) <= 1e-5 * float(want)
        assert report[1] == (~clean).sum() * 32 * 16  # noisy chunks x 32 tokens x 16 patch values
    loss.backward()
    opt.step()
    opt.zero_grad()
    losses.append(float(loss))
assert clean_prefixes > 0  # some draws condition on clean earlier chunks
assert all(a.causal_mask().chunk_tokens == 32 for a in selfs)
after = validation()
assert after < 0.95 * before, (before, after, losses)  # measured: 1.159 -> 1.035
import gc
from megatron.core import parallel_state as ps
ps.destroy_model_parallel(); torch.distributed.destroy_process_group(); del model, selfs; gc.collect()
print("OK", before, after, losses)
"""


@pytest.mark.slow
def test_chunk_causal_example_trains_with_per_chunk_times():
    """--dsv-causal-chunk 2: the example builds a chunk-causal DiT, get_batch draws one t per chunk
    with a clean prefix (t = 1) and a noisy last chunk, the loss through Megatron's loss path is
    flow_matching_loss(per_chunk_t=True) on the same draws (noisy chunks only), five training steps
    lower the fixed validation loss, which scores every chunk at the item's t."""
    print(_run_fresh(CAUSAL_SCRIPT))


def _example_cp_rank(rank, world, root, causal=False):
    """One CP rank of the example's data and loss path, against CP = 1 on the same weights.
    ``causal``: --dsv-causal-chunk 2 on a 6x4x4 patch grid (3 chunks of 32 tokens), so each of
    the 2 ranks' 48 tokens holds one chunk and half of the middle one, with per-chunk times."""
    import torch
    import torch.distributed as dist

    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank))
    sys.path.insert(0, os.path.join(root, "examples"))
    from tests.megatron_shim import init_megatron_state

    init_megatron_state(cp=world, rank=rank, world_size=world)
    single = [dist.new_group([r]) for r in range(world)][rank]
    import megatron.training.arguments as margs

    margs.get_device_arch_version = lambda: 10  # CPU: no GPU arch for Megatron's CUDA_DEVICE_MAX_CONNECTIONS check
    import pretrain_video_dit as p
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel.schedules import forward_step_calc_loss
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.training.arguments import core_transformer_config_from_args, parse_and_validate_args
    from megatron.training.datasets.data_samplers import build_pretraining_data_loader

    from megatron_dsv.layers.transformer_config import DSVTransformerConfig
    from megatron_dsv.models.video_dit import VideoDiT, flow_interpolate

    tokens = 96 if causal else 128
    argv = ["--dit-config", "tiny", "--latent-shape", "4x6x8x8" if causal else "4x4x8x16", "--micro-batch-size", "2",
            "--train-iters", "3", "--lr", "1e-3", "--dsv-query-group", "2x2x4", "--use-cpu-initialization",
            "--dit-num-classes", "3", "--dsv-predictor-rank", "8", "--context-parallel-size", str(world),
            "--dsv-cp-split", "auto", "--num-workers", "0",
            "--dsv-predictor-fit", "gradient"]  # the predictor's auxiliary-loss gradient under CP
    argv += ["--dsv-causal-chunk", "2", "--dsv-kv-block", "16"] if causal else []  # 96 tokens: 3 blocks of 16 per rank
    defaults, extra = p._pre_parse(argv)
    sys.argv = ["pretrain_video_dit.py"] + argv + extra
    args = parse_and_validate_args(extra_args_provider=p.add_video_args, args_defaults=defaults)
    assert args.context_parallel_size == world and args.data_parallel_size == 1
    args.curr_iteration = 0
    torch.manual_seed(0)
    model = p.model_provider()
    assert model.cp_size == world
    with torch.no_grad():  # no zero adaLN gate: every parameter gets a gradient
        gen = torch.Generator().manual_seed(3)
        for prm in model.parameters():
            prm.add_(0.05 * torch.randn(prm.shape, generator=gen))
    cfg = core_transformer_config_from_args(args, DSVTransformerConfig)
    cfg.context_parallel_size = 1
    tp = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"]).tp
    ref = VideoDiT(cfg, in_channels=4, patch=args.dit_patch, num_classes=3, pg_collection=ProcessGroupCollection(tp=tp, cp=single))
    ref.load_state_dict(model.state_dict())

    cp_group = ps.get_context_parallel_group()

    def same_on_cp_ranks(name, x):
        xs = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(xs, x.contiguous(), group=cp_group)
        assert all(torch.equal(xs[0], y) for y in xs), f"{name} differs across CP ranks"

    train, _, _ = p.datasets_provider([10, 2, 0])
    batch = next(iter(build_pretraining_data_loader(train, consumed_samples=0)))  # Megatron's sampler
    seen = {}
    get_batch = p.get_batch
    p.get_batch = lambda it, dev: seen.update(get_batch(it, dev)) or seen
    out, loss_func = p.forward_step(iter([batch]), model)
    for name in ("latents", "labels", "t", "noise"):
        same_on_cp_ranks(name, seen[name])
    assert out.shape == (2, tokens // world, 16)
    assert seen["t"].shape == ((2, 3) if causal else (2,))

    def megatron_loss(m, output, lf, cp):
        """Megatron's own loss path (scaling by token count, microbatches and CP; aux-loss scale)."""
        store = []
        loss, _ = forward_step_calc_loss(m, output, lf, m.config, None, False, 1, store, cp_group_size=cp, is_last_stage=True)
        loss.backward()
        return loss.detach(), store[0]["flow loss"]

    loss, report = megatron_loss(model, out, loss_func, world)
    x_t, velocity = flow_interpolate(seen["latents"], seen["t"], seen["noise"])
    ref_out = (ref(x_t, seen["t"], seen["labels"], local_tokens=True) - ref.shard_tokens(velocity)).pow(2)
    scored = None
    if causal:  # the noisy chunks of the whole video, scored on one process
        noisy = seen["t"] < 1
        scored = (noisy.repeat_interleave(tokens // 3, dim=1).float(), noisy.float().mean())
        assert 0 < noisy.sum() < noisy.numel(), seen["t"]  # these draws hold clean and noisy chunks
    ref_loss, ref_report = megatron_loss(ref, ref_out, lambda o: p.loss_func(None, o, scored=scored), 1)

    dist.all_reduce(report, group=ps.get_data_parallel_group(with_context_parallel=True))  # as training.py
    assert abs(report[0] / report[1] - ref_report[0] / ref_report[1]) <= 2e-5 * ref_report[0] / ref_report[1]
    assert report[1] == ref_report[1]  # every token counted once
    mean_loss = loss.clone()
    dist.all_reduce(mean_loss, group=cp_group)
    assert abs(mean_loss / world - ref_loss) <= 2e-5 * ref_loss
    n_checked = 0
    for (name, prm), (_, ref_prm) in zip(model.named_parameters(), ref.named_parameters()):
        g = prm.grad.clone()
        dist.all_reduce(g, group=cp_group)  # Megatron's DDP: average over data x context parallel
        err = (g / world - ref_prm.grad).abs().max()
        assert err <= 2e-5 * ref_prm.grad.abs().max() + 1e-9, f"grad {name}: {err} vs {ref_prm.grad.abs().max()}"
        n_checked += "predictor" in name
    assert n_checked > 0

    # the draws are a function of (seed, iteration, DP rank, microbatch): another DP rank differs
    def draw(dp_rank):
        p._draws["microbatch"] -= 1  # the same microbatch again
        orig, ps.get_data_parallel_rank = ps.get_data_parallel_rank, lambda *a, **k: dp_rank
        try:
            return get_batch(iter([batch]), torch.device("cpu"))
        finally:
            ps.get_data_parallel_rank = orig

    again, other = draw(0), draw(1)
    assert torch.equal(again["t"], seen["t"]) and torch.equal(again["noise"], seen["noise"])
    assert not torch.equal(other["t"], seen["t"]) and not torch.equal(other["noise"], seen["noise"])


@pytest.mark.slow
def test_example_data_and_loss_under_context_parallel():
    """CP = 2 on gloo: Megatron's sampler gives both CP ranks the same videos, get_batch the same
    t and noise; Megatron's loss path (forward_step_calc_loss) on each rank's tokens reports the
    CP = 1 loss, and gradients averaged over the CP group (predictor included) are the CP = 1 ones.
    pretrain() itself needs CUDA and is not run here."""
    from tests.cp.distributed import run_ranks

    run_ranks(_example_cp_rank, 2, ROOT)


@pytest.mark.slow
def test_chunk_causal_example_under_context_parallel():
    """As above with --dsv-causal-chunk 2 and per-chunk times, on shards that cut the middle
    chunk: Megatron's loss path on each rank (unequal noisy-token counts) reports the CP = 1
    noisy-chunk loss, and the CP-averaged gradients are the CP = 1 ones."""
    from tests.cp.distributed import run_ranks

    run_ranks(_example_cp_rank, 2, ROOT, True)
