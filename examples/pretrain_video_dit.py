"""Pretrain a video DiT with DSV sparse attention on megatron.training (GPU).

    torchrun --nproc-per-node 1 examples/pretrain_video_dit.py --dit-config small \\
        --latent-shape 4x16x64x64 --train-iters 2000 --micro-batch-size 2 --lr 2e-4 --bf16

Data: the embedded procedural videos (default, no files) or ``--data-path DIR``, a latent folder
written by ``python -m megatron_dsv.data.latents write``. The model is
``megatron_dsv.models.VideoDiT`` (named sizes: ``--dit-config tiny|small|dsv-0.8b|dsv-2.7b``);
the loss is rectified-flow matching. ``--dsv-mode dense`` is the dense baseline with the same
script, seed and data. All ``--dsv-*`` flags and Megatron's own flags apply.

What this script does besides ``pretrain()``: it fills Megatron's required model arguments from
``--dit-config`` and ``--latent-shape`` (layers, hidden, heads, seq length = tokens per video), names
a NullTokenizer (Megatron validates a tokenizer even for non-text models), selects the local
transformer implementation and the fusions that need neither Transformer Engine nor apex
(``--transformer-impl local --no-persist-layer-norm --no-gradient-accumulation-fusion
--no-masked-softmax-fusion``; TE is used when installed and ``--transformer-impl
transformer_engine`` is passed), and installs ``megatron_dsv.megatron_runtime`` hooks: predictor
optimizer groups, the DSV stage controller around ``train_step``, and a no-op for the C++
dataset-helper compile step that the megatron-core wheel cannot run.
"""

from __future__ import annotations

import argparse
import os
import sys
from functools import partial

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megatron_dsv import add_dsv_args  # noqa: E402
from megatron_dsv.config import parse_cube  # noqa: E402
from megatron_dsv.models.video_dit import DIT_CONFIGS  # noqa: E402


def add_video_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    add_dsv_args(parser)
    g = parser.add_argument_group("video DiT (megatron_dsv)")
    g.add_argument("--dit-config", default="small", choices=sorted(DIT_CONFIGS), help="named model size")
    g.add_argument("--latent-shape", default="4x16x64x64", help="latent video C x T x H x W")
    g.add_argument("--dit-patch", default="1x2x2", type=parse_cube, help="patch size t x h x w")
    g.add_argument("--dit-num-classes", type=int, default=8, help="class conditioning (0: none)")
    g.add_argument("--num-train-samples", type=int, default=100000, help="procedural dataset size")
    return parser


def _pre_parse(argv):
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--dit-config", default="small")
    p.add_argument("--latent-shape", default="4x16x64x64")
    p.add_argument("--dit-patch", default="1x2x2")
    known, _ = p.parse_known_args(argv)
    shape = DIT_CONFIGS[known.dit_config]
    c, t, h, w = (int(v) for v in known.latent_shape.split("x"))
    pt, ph, pw = parse_cube(known.dit_patch)
    tokens = (t // pt) * (h // ph) * (w // pw)
    defaults = {
        "num_layers": shape.num_layers, "hidden_size": shape.hidden_size,
        "num_attention_heads": shape.num_attention_heads, "ffn_hidden_size": shape.ffn_hidden_size,
        "seq_length": tokens, "max_position_embeddings": tokens,
        "tokenizer_type": "NullTokenizer", "vocab_size": 1,
    }
    extra = []
    for flag, val in (("--transformer-impl", "local"), ("--normalization", "RMSNorm"),
                      ("--attention-dropout", "0"), ("--hidden-dropout", "0"),
                      ("--position-embedding-type", "none")):
        if flag not in argv:
            extra += [flag, val]
    for flag in ("--qk-layernorm", "--no-persist-layer-norm", "--no-gradient-accumulation-fusion",
                 "--no-masked-softmax-fusion", "--no-bias-dropout-fusion", "--no-rope-fusion"):
        if flag not in argv:
            extra.append(flag)
    return defaults, extra


def model_provider(pre_process=True, post_process=True, vp_stage=None, config=None, pg_collection=None):
    from megatron.training import get_args, print_rank_0
    from megatron.training.arguments import core_transformer_config_from_args

    from megatron_dsv.layers.transformer_config import DSVTransformerConfig
    from megatron_dsv.models.video_dit import VideoDiT

    args = get_args()
    if not (pre_process and post_process):
        raise NotImplementedError("VideoDiT does not support pipeline parallelism yet; use --pipeline-model-parallel-size 1.")
    cfg = core_transformer_config_from_args(args, DSVTransformerConfig)
    c = int(args.latent_shape.split("x")[0])
    model = VideoDiT(cfg, in_channels=c, patch=args.dit_patch, num_classes=args.dit_num_classes, pg_collection=pg_collection)
    print_rank_0(f"VideoDiT {args.dit_config}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
                 f"{args.seq_length} tokens per video, DSV mode {cfg.dsv_mode}")
    return model


def datasets_provider(train_val_test_num_samples):
    from megatron.training import get_args

    from megatron_dsv.data.latents import LatentFolderDataset
    from megatron_dsv.data.procedural import ProceduralVideoDataset

    args = get_args()
    c, t, h, w = (int(v) for v in args.latent_shape.split("x"))
    if args.data_path:
        full = LatentFolderDataset(args.data_path[0])
        if tuple(full.shape) != (c, t, h, w):
            raise ValueError(f"{args.data_path[0]} holds latents {full.shape}; --latent-shape is {(c, t, h, w)}.")
        n_val = max(1, len(full) // 100)
        idx = torch.arange(len(full))
        return (torch.utils.data.Subset(full, idx[n_val:].tolist()), torch.utils.data.Subset(full, idx[:n_val].tolist()), None)
    classes = max(1, args.dit_num_classes)
    make = lambda n, seed: ProceduralVideoDataset(max(1, n), (t, h, w), c, classes, seed=seed)  # noqa: E731
    train = make(max(train_val_test_num_samples[0], args.num_train_samples), args.seed)
    valid = make(train_val_test_num_samples[1], args.seed + 1)  # fixed held-out videos
    return train, valid, None


datasets_provider.is_distributed = True  # every rank builds its own (procedural: no I/O)


def loss_func(per_sample, output_tensor):
    loss_sum = output_tensor.sum()
    # Megatron sums the token counts of microbatches into an int tensor
    count = torch.tensor(output_tensor.numel(), device=output_tensor.device, dtype=torch.int)
    return loss_sum, count, {"flow loss": torch.cat([loss_sum.detach().view(1), count.view(1).float()])}


def forward_step(data_iterator, model):
    """Flow matching on one microbatch; t and noise depend on (seed, iteration, DP rank, microbatch)
    so context-parallel ranks of a sample draw the same t and noise."""
    from megatron.core import parallel_state as mpu
    from megatron.training import get_args

    args = get_args()
    device = next(model.parameters()).device
    batch = next(data_iterator)
    latents = batch["latents"].to(device, non_blocking=True)
    labels = batch["label"].to(device, non_blocking=True) if args.dit_num_classes else None
    forward_step.microbatch = getattr(forward_step, "microbatch", 0) + 1
    seed = (args.seed * 1_000_003 + args.curr_iteration) * 65_537 + mpu.get_data_parallel_rank() * 257 + forward_step.microbatch
    g = torch.Generator(device=device).manual_seed(seed % (2**62))
    b = latents.shape[0]
    t = torch.sigmoid(torch.randn(b, generator=g, device=device))
    noise = torch.randn(latents.shape, generator=g, device=device)
    tb = t.view(b, 1, 1, 1, 1)
    x_t = (1 - tb) * noise + tb * latents
    v = model(x_t, t, labels)
    per_elem = (v.float() - (latents - noise)).pow(2)
    return per_elem, partial(loss_func, None)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    defaults, extra = _pre_parse(argv)
    sys.argv = [sys.argv[0]] + argv + extra

    from megatron.core.enums import ModelType
    from megatron.training import pretrain
    from megatron.training.argument_utils import pretrain_cfg_container_from_args
    from megatron.training.arguments import parse_and_validate_args

    from megatron_dsv import megatron_runtime

    args = parse_and_validate_args(extra_args_provider=add_video_args, args_defaults=defaults)
    megatron_runtime.install()
    cfg = pretrain_cfg_container_from_args(args)
    pretrain(cfg, datasets_provider, ModelType.encoder_or_decoder, forward_step, model_provider=model_provider)


if __name__ == "__main__":
    main()
