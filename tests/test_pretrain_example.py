"""The Megatron pretraining example up to pretrain() (which needs CUDA): argument handling with
Megatron's parser and validation, the config container, the model provider, the dataset provider
and one forward step, on CPU, in a fresh process (Megatron keeps global args)."""

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
assert out.shape == (2, 4, 4, 8, 16) and count.item() == out.numel() and count.dtype == torch.int
loss.backward()
assert layers[0].predictor.weight_q.grad is not None
print("OK", float(loss / count))
"""


@pytest.mark.slow
def test_example_until_pretrain():
    env = dict(os.environ, WORLD_SIZE="1", RANK="0", LOCAL_RANK="0", TRITON_INTERPRET="1")
    for var in ("MASTER_PORT", "MASTER_ADDR"):  # the parent's gloo store holds its port
        env.pop(var, None)
    code = "ROOT = " + repr(ROOT) + "\n" + SCRIPT
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "OK" in res.stdout
