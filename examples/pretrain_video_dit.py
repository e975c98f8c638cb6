"""Pretrain a video DiT with DSV sparse attention on megatron.training (GPU).

    torchrun --nproc-per-node 1 examples/pretrain_video_dit.py --dit-config small \\
        --latent-shape 4x16x64x64 --train-iters 2000 --micro-batch-size 2 --lr 2e-4 --bf16

Data (``--data``): ``procedural`` (default, embedded videos, no files), ``natural`` (scikit-image's
bundled photographs filmed by a moving camera and encoded by a fixed linear VAE,
``megatron_dsv.data.natural``) or ``latents`` (``--data-path DIR``, a latent folder written by
``python -m megatron_dsv.data.latents write``; ``--data-path`` alone selects it). The model is
``megatron_dsv.models.VideoDiT`` (named sizes: ``--dit-config tiny|small|dsv-0.8b|dsv-2.7b``);
the loss is rectified-flow matching. ``--dsv-mode dense`` is the dense baseline with the same
script, seed and data. All ``--dsv-*`` flags and Megatron's own flags apply.

What this script does besides ``pretrain()``: it fills Megatron's required model arguments from
``--dit-config`` and ``--latent-shape`` (layers, hidden, heads, seq length = tokens per video), names
a NullTokenizer (Megatron validates a tokenizer even for non-text models), selects the local
transformer implementation and the fusions that need neither Transformer Engine nor apex
(``--transformer-impl local --no-persist-layer-norm --no-gradient-accumulation-fusion
--no-masked-softmax-fusion``; TE is used when installed and ``--transformer-impl
transformer_engine`` is passed; without TE and apex Megatron's local layers refuse persist-layer-norm
and gradient-accumulation fusion), and calls ``megatron_dsv.runtime.megatron.install()``: on the
megatron-core wheel it wraps ``megatron.training.training`` (predictor optimizer groups, the DSV
stage controller around ``train_step``) and no-ops the C++ dataset-helper compile step that the
wheel cannot run. On a Megatron-LM clone patched with ``patches/apply.py`` (the clone's ``megatron``
first on ``PYTHONPATH``) the patches call the same runtime, so ``install()`` wraps nothing there
(it detects ``megatron.training.training.dsv_hooks``) and only no-ops the helper compile.

Validation is a fixed set (``megatron_dsv.models.evaluation``): ``--eval-iters`` x
``--eval-global-batch-size`` items = N held-out videos x ``--val-t-quantiles`` logit-normal t
quantiles, each item with its own fixed noise, the same at every evaluation (Megatron's sampler
walks on through the validation set; each evaluation consumes exactly one pass of it). Besides
the overall flow loss, validation reports the loss per t bucket (``flow loss t=0.xxx``).

Chunk-causal (autoregressive) video, issue 19: ``--dsv-causal-chunk T`` (the config's
``dsv_causal_chunk``, the flag the quickstart's ``--causal-chunk`` sets) makes every self-attention
layer full inside chunks of T patch-grid frames and causal across them (a latent whose patched
frame count T does not divide is refused when the model is built). Training then draws one t per
chunk (``draw_chunk_times``, as ``flow_matching_loss(per_chunk_t=True)``): a clean prefix of chunks
at t = 1 (clean data; t = 0 is pure noise here), uniform over 0..n-1 chunks per video, and
logit-normal times for the rest, and scores only the noisy chunks' tokens (a clean chunk is
context: the condition ``sample_autoregressive`` generates each chunk in). The fixed validation set
keeps one t per video for every chunk (each item's quantile; all chunks noisy, the condition of
``sample``), so its per-bucket losses stay comparable across evaluations and with dense runs.

Context parallelism (``--context-parallel-size N``, ``--dsv-cp-split auto|head|seq|HxS``; see
``examples/scripts/pretrain_cp.sh``): Megatron's sampler shards the data by data-parallel rank
only, so the N CP ranks of a data-parallel rank load the same videos, and :func:`get_batch` seeds
t and the noise from the data-parallel rank (not the CP rank), so they draw the same ones. Each
CP rank then computes its contiguous 1/N of the tokens (``VideoDiT``) and the loss on those tokens
only. ``loss_func`` returns (sum of squared errors, element count, report) over the local tokens:
Megatron divides by the count (the local mean) and averages gradients over the data x
context-parallel group, which gives the gradient of the global mean because the shards are equal;
the report's [sum, count] pairs are summed over that group, so the logged loss is the global mean,
counted once. The token count per rank must be whole query-group cubes (checked at start, with
the shapes that fit), and ``CUDA_DEVICE_MAX_CONNECTIONS=1`` (Megatron asserts it for CP/TP before
Blackwell) is set unless already set.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from functools import partial

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megatron_dsv.quiet import quiet_third_party  # noqa: E402

quiet_third_party()  # megatron-core's TE/apex fallback notices; never our own warnings

from megatron_dsv.arguments import add_dsv_args, validate_dsv_args  # noqa: E402
from megatron_dsv.config import parse_cube  # noqa: E402
from megatron_dsv.models.video_dit import DIT_CONFIGS  # noqa: E402


def add_video_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    add_dsv_args(parser)
    g = parser.add_argument_group("video DiT (megatron_dsv)")
    g.add_argument("--dit-config", default="small", choices=sorted(DIT_CONFIGS), help="named model size")
    g.add_argument("--latent-shape", default="4x16x64x64", help="latent video C x T x H x W")
    g.add_argument("--dit-patch", default="1x2x2", type=parse_cube, help="patch size t x h x w")
    g.add_argument("--dit-num-classes", type=int, default=8, help="class conditioning (0: none)")
    g.add_argument("--num-train-samples", type=int, default=100000, help="procedural / natural dataset size")
    g.add_argument("--data", default=None, choices=DATA_SOURCES,
                   help="training videos: procedural (default), natural (scikit-image photographs filmed by a "
                        "moving camera) or latents (--data-path; the default when --data-path is given)")
    g.add_argument("--val-t-quantiles", type=int, default=8,
                   help="t quantiles of the fixed validation set (eval-iters x eval-global-batch-size items = "
                        "held-out videos x quantiles)")
    return parser


DATA_SOURCES = ("procedural", "natural", "latents")


def data_source(args) -> str:
    """``--data``, defaulting to ``latents`` with ``--data-path`` and ``procedural`` without;
    a contradiction is refused."""
    chosen = args.data or ("latents" if args.data_path else "procedural")
    if chosen == "latents" and not args.data_path:
        raise ValueError("--data latents reads a latent folder: pass --data-path DIR.")
    if chosen != "latents" and args.data_path:
        raise ValueError(f"--data {chosen} generates its videos; drop --data-path {args.data_path[0]} "
                         "or use --data latents.")
    return chosen


def validation_videos(args) -> int:
    """Held-out videos of the fixed validation set: eval-iters x eval-global-batch-size items over
    ``--val-t-quantiles`` t quantiles (0 without validation); checked before any work."""
    if not args.eval_iters:
        return 0
    if getattr(args, "full_validation", False):
        raise ValueError("the example validates on a fixed set of --eval-iters x --eval-global-batch-size "
                         "items; drop --full-validation.")
    if args.dataloader_type == "cyclic":
        raise ValueError("--dataloader-type cyclic shuffles the validation set, so evaluations would see "
                         "different items; use --dataloader-type single (the default) for the fixed set.")
    items = args.eval_iters * args.eval_global_batch_size
    q = args.val_t_quantiles
    if q < 1 or items % q:
        raise ValueError(
            f"the fixed validation set has --eval-iters x --eval-global-batch-size = {args.eval_iters} x "
            f"{args.eval_global_batch_size} = {items} items, which must be whole videos x --val-t-quantiles "
            f"{q}: choose --eval-iters so that the product is a multiple of {q} (e.g. "
            f"{-(-q // math.gcd(q, args.eval_global_batch_size))} x a whole number), or another --val-t-quantiles."
        )
    return items // q


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


def _model_parallel(argv) -> bool:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--context-parallel-size", type=int, default=1)
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    known, _ = p.parse_known_args(argv)
    return known.context_parallel_size > 1 or known.tensor_model_parallel_size > 1


def model_provider(pre_process=True, post_process=True, vp_stage=None, config=None, pg_collection=None):
    from megatron.training import get_args, print_rank_0
    from megatron.training.arguments import core_transformer_config_from_args

    from megatron_dsv.layers.attention import dsv_attention_layers
    from megatron_dsv.layers.context_parallel import apply_dsv_context_parallel
    from megatron_dsv.layers.transformer_config import DSVTransformerConfig
    from megatron_dsv.models.video_dit import VideoDiT

    args = get_args()
    if not (pre_process and post_process):
        raise NotImplementedError("VideoDiT does not support pipeline parallelism yet; use --pipeline-model-parallel-size 1.")
    cfg = core_transformer_config_from_args(args, DSVTransformerConfig)
    cp = pg_collection.cp.size() if pg_collection is not None and pg_collection.cp is not None else args.context_parallel_size
    c, t, h, w = (int(v) for v in args.latent_shape.split("x"))
    model = VideoDiT(cfg, in_channels=c, patch=args.dit_patch, num_classes=args.dit_num_classes, pg_collection=pg_collection)
    grid = model.grid((t, h, w))
    model.token_range(grid)  # fails now, with the shapes that fit, not at step 1
    model.set_causal_grid(grid)  # and a causal chunk that does not divide the patched frames
    apply_dsv_context_parallel(model)  # collective: every rank builds the same groups, once
    print_rank_0(f"VideoDiT {args.dit_config}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
                 f"{args.seq_length} tokens per video, DSV mode {cfg.dsv_mode}")
    if model.chunk_causal:
        print_rank_0(f"chunk-causal: {model.num_chunks((t, h, w))} chunks of {model.chunk_causal} frames = "
                     f"{model.chunk_causal * grid[1] * grid[2]} tokens; trained with per-chunk t (a clean prefix "
                     "of chunks, the loss on the noisy chunks), validated at one t per video")
    if cp > 1:
        plans = [f"layer {a.layer_number}: " + (f"{a.cp_plan.head_size}x{a.cp_plan.seq_size}" if a.cp_plan else "-")
                 for a in dsv_attention_layers(model)]
        print_rank_0(f"context parallel: {cp} ranks x {args.seq_length // cp} tokens, --dsv-cp-split "
                     f"{cfg.dsv_cp_split} (head x sequence ranks; 'auto' starts from the head split and the "
                     f"controller re-plans per layer from measured sparsity): " + ", ".join(plans))
    return model


def datasets_provider(train_val_test_num_samples):
    from megatron.core.datasets.utils import Split
    from megatron.training import get_args

    from megatron_dsv.data.latents import LatentFolderDataset
    from megatron_dsv.data.natural import NaturalVideoDataset
    from megatron_dsv.data.procedural import ProceduralVideoDataset
    from megatron_dsv.models.evaluation import FixedValidationDataset

    args = get_args()
    c, t, h, w = (int(v) for v in args.latent_shape.split("x"))
    source, n_val = data_source(args), validation_videos(args)
    classes = max(1, args.dit_num_classes)
    n_train = max(train_val_test_num_samples[0], args.num_train_samples)
    if source == "latents":
        full = LatentFolderDataset(args.data_path[0])
        if tuple(full.shape) != (c, t, h, w):
            raise ValueError(f"{args.data_path[0]} holds latents {full.shape}; --latent-shape is {(c, t, h, w)}.")
        if n_val >= len(full):
            raise ValueError(f"the fixed validation set holds out {n_val} videos but {args.data_path[0]} has "
                             f"{len(full)}; lower --eval-iters or --eval-global-batch-size.")
        idx = torch.arange(len(full)).tolist()
        train, held_out = torch.utils.data.Subset(full, idx[n_val:]), torch.utils.data.Subset(full, idx[:n_val])
    elif source == "natural":
        train = NaturalVideoDataset(n_train, (t, h, w), c, classes, seed=args.seed, split="train")
        held_out = NaturalVideoDataset(max(1, n_val), (t, h, w), c, classes, seed=args.seed + 1, split="val")
    else:
        train = ProceduralVideoDataset(n_train, (t, h, w), c, classes, seed=args.seed)
        held_out = ProceduralVideoDataset(max(1, n_val), (t, h, w), c, classes, seed=args.seed + 1)
    valid = None
    if n_val and train_val_test_num_samples[1]:
        # the same items at every evaluation: Megatron's sampler continues where the last
        # evaluation stopped, and each evaluation consumes exactly one pass of the set
        valid = FixedValidationDataset(held_out, n_val, args.val_t_quantiles, seed=args.seed,
                                       length=train_val_test_num_samples[1])
        valid.split = Split.valid  # Megatron's loader then uses the eval batch sizes
    return train, valid, None


datasets_provider.is_distributed = True  # every rank builds its own (procedural: no I/O)


def loss_func(buckets, output_tensor, scored=None):
    """``output_tensor``: squared errors ``[B, tokens, patch]`` of this rank's tokens. Returns (sum,
    element count, report); with CP the counts are the local ones (see the module docstring).
    ``buckets``: None in training; on the fixed validation set ``(t_bucket [B], t values [Q])``,
    and the report adds ``[sum, count]`` per t bucket.

    ``scored``: None (every token scored), or for per-chunk times ``(mask [B, tokens], fraction)``:
    which of this rank's tokens lie in noisy chunks, and the noisy share of the whole microbatch's
    tokens (all CP ranks; a scalar tensor). The loss is then the mean over the noisy tokens only."""
    count = torch.tensor(output_tensor.numel(), device=output_tensor.device, dtype=torch.int)
    if scored is None:
        loss_sum = output_tensor.sum()
        report = {"flow loss": torch.cat([loss_sum.detach().view(1), count.view(1).float()])}
    else:
        mask, fraction = scored
        noisy_sum = (output_tensor.sum(-1) * mask).sum()
        # Megatron divides by this rank's element count and averages over the CP ranks, so the
        # returned sum is scaled to make that the mean over the microbatch's noisy elements on all
        # ranks: the ranks hold unequal numbers of noisy tokens (a clean prefix may fill a shard).
        loss_sum = noisy_sum / fraction
        noisy_count = mask.sum() * output_tensor.shape[-1]
        report = {"flow loss": torch.stack([noisy_sum.detach(), noisy_count.float()])}
    if buckets is not None:
        bucket, t_values = buckets
        per_sample = output_tensor.detach().flatten(1).sum(1)
        per_count = output_tensor[0].numel()
        for q, tq in enumerate(t_values.tolist()):
            hit = (bucket == q).to(per_sample.dtype)
            report[f"flow loss t={tq:.3f}"] = torch.stack([(per_sample * hit).sum(), hit.sum() * per_count]).float()
    return loss_sum, count, report


def chunk_count(args) -> int:
    """Causal chunks per video for ``--dsv-causal-chunk`` (0 without): the patched frames over
    the chunk (the model refuses a chunk that does not divide them when it is built)."""
    if not args.dsv_causal_chunk:
        return 0
    return (int(args.latent_shape.split("x")[1]) // args.dit_patch[0]) // args.dsv_causal_chunk


_draws = {"microbatch": 0}  # microbatches drawn by this process (the same count on every CP rank)


def get_batch(data_iterator, device):
    """One microbatch and its flow-matching draws: ``latents [B, C, T, H, W]``, ``labels [B]`` (or
    None), ``t [B]`` (chunk-causal: ``[B, n]``, :func:`chunk_count`) and ``noise``; validation items bring their own t, noise and ``t_bucket``
    (the fixed validation set), so evaluations do not depend on the iteration.

    t and the noise depend on (seed, iteration, data-parallel rank, microbatch), never on the
    context-parallel rank: the CP ranks of a sample draw the same ones, data-parallel ranks differ.
    """
    from megatron.core import parallel_state as mpu
    from megatron.training import get_args

    from megatron_dsv.models.video_dit import draw_chunk_times

    args = get_args()
    batch = next(data_iterator)
    latents = batch["latents"].to(device, non_blocking=True)
    labels = batch["label"].to(device, non_blocking=True) if args.dit_num_classes else None
    if "t" in batch:  # the fixed validation set carries its own t and noise; no training draw is used
        return {"latents": latents, "labels": labels, "t": batch["t"].to(device), "noise": batch["noise"].to(device),
                "t_bucket": batch["t_bucket"].to(device)}
    _draws["microbatch"] += 1
    seed = (args.seed * 1_000_003 + args.curr_iteration) * 65_537 + mpu.get_data_parallel_rank() * 257 + _draws["microbatch"]
    g = torch.Generator(device=device).manual_seed(seed % (2**62))
    chunks = chunk_count(args)
    if chunks:  # [B, n]: a clean prefix (t = 1), then logit-normal times
        t = draw_chunk_times(latents.shape[0], chunks, generator=g, device=device)
    else:
        t = torch.sigmoid(torch.randn(latents.shape[0], generator=g, device=device))
    noise = torch.randn(latents.shape, generator=g, device=device)
    return {"latents": latents, "labels": labels, "t": t, "noise": noise}


def forward_step(data_iterator, model):
    """Flow matching on one microbatch, on this context-parallel rank's tokens."""
    from megatron.core.utils import unwrap_model
    from megatron.training import get_args

    from megatron_dsv.models.evaluation import logit_normal_quantiles
    from megatron_dsv.models.video_dit import flow_interpolate

    batch = get_batch(data_iterator, next(model.parameters()).device)
    x_t, velocity = flow_interpolate(batch["latents"], batch["t"], batch["noise"])
    v = model(x_t, batch["t"], batch["labels"], local_tokens=True)  # [B, S/CP, pvol]
    dit = unwrap_model(model)
    target = dit.shard_tokens(velocity)
    per_elem = (v.float() - target.float()).pow(2)
    if "t_bucket" in batch:
        t_values = logit_normal_quantiles(get_args().val_t_quantiles).float()
        return per_elem, partial(loss_func, (batch["t_bucket"], t_values))
    scored = None
    if batch["t"].dim() == 2:  # per-chunk times: only the noisy chunks are scored
        noisy = batch["t"] < 1  # [B, n]
        mask = noisy[:, dit.local_chunk_ids(batch["latents"].shape[-3:], per_elem.device)].float()
        scored = (mask, noisy.float().mean())
    return per_elem, partial(loss_func, None, scored=scored)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    defaults, extra = _pre_parse(argv)
    if _model_parallel(argv):
        # Megatron asserts this for CP/TP > 1 on GPUs before Blackwell; set before CUDA starts
        os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    sys.argv = [sys.argv[0]] + argv + extra

    from megatron.core.enums import ModelType
    from megatron.training import pretrain
    from megatron.training.argument_utils import pretrain_cfg_container_from_args
    from megatron.training.arguments import parse_and_validate_args

    from megatron_dsv.runtime import megatron as dsv_runtime

    import megatron.training.training as megatron_training

    args = parse_and_validate_args(extra_args_provider=add_video_args, args_defaults=defaults)
    if args.rank == 0:
        patched = getattr(megatron_training, "dsv_hooks", None) is not None
        print(f"megatron.training from {os.path.dirname(megatron_training.__file__)} "
              f"({'patched Megatron-LM' if patched else 'not patched: megatron_dsv wraps it'})", flush=True)
    validate_dsv_args(args)  # cross-flag checks (CP split, speed table) before the model is built
    data_source(args), validation_videos(args)  # data flags and the fixed validation set's size, checked now
    dsv_runtime.install()
    cfg = pretrain_cfg_container_from_args(args)
    pretrain(cfg, datasets_provider, ModelType.encoder_or_decoder, forward_step, model_provider=model_provider)


if __name__ == "__main__":
    main()
