"""DSV in a Megatron training run: :class:`DSVRuntime` and the two ways to install it.

* A patched Megatron-LM clone (``patches/``) calls :mod:`megatron_dsv.hooks`, which forwards here:
  :func:`install_dsv_hooks` once the model and optimizer exist, ``fire`` with
  :data:`ITERATION_START` / :data:`ITERATION_END` in ``train_step``, the predictor optimizer groups
  and the sparse-FLOPs report.
* An unpatched megatron-core install: our entry scripts call :func:`install`, which wraps the same
  three points of ``megatron.training.training`` at run time (no file patches). On a patched
  clone it wraps nothing, so the runtime never runs twice.

The run's :class:`DSVRuntime` (the stage controller, the predictor learning rate, the FLOPs account
and the callbacks registered on its events) is stored on Megatron's ``args`` as ``args.dsv_runtime``:
Megatron's run state, not a global of ours.

:func:`skip_dataset_helper_compile` makes ``megatron.core.datasets.utils.compile_helpers`` a no-op:
the megatron-core wheel ships the prebuilt ``helpers_cpp`` extension but not the Makefile that
``pretrain()`` runs, so it would exit with "Failed to compile the C++ dataset helper functions";
our datasets do not use the helpers.
"""

from __future__ import annotations

import argparse
import functools
import logging
from typing import Callable, Dict, List, Optional

import torch

from megatron_dsv import flops as _flops
from megatron_dsv.layers.attention import dsv_attention_layers
from megatron_dsv.runtime import lr as _lr
from megatron_dsv.runtime.writers import print_rank_0

logger = logging.getLogger("megatron_dsv")

ITERATION_START = "iteration_start"
"""Fired with ``(iteration,)`` before the iteration's first forward."""
ITERATION_END = "iteration_end"
"""Fired with ``(iteration,)`` after the optimizer step and the learning-rate update."""
CORE_ATTENTION_WORK = "core_attention_work"
"""Fired with ``(default_seq_len,)`` by the FLOPs report; each callback returns a list of
:class:`megatron_dsv.flops.AttentionWork`, one per attention layer it accounts for."""
EVENTS = (ITERATION_START, ITERATION_END, CORE_ATTENTION_WORK)


class DSVRuntime:
    """DSV's state in one training run: its event callbacks, stage controller and optimizer.

    Anyone may :meth:`register` on its events; :func:`install_dsv_hooks` registers the DSV stage
    controller, the predictor learning rate and the FLOPs account of the model's DSV layers.
    """

    def __init__(self, controller=None, layers=(), optimizer=None, base_lr=None, stage2_lr_scale: float = 1.0):
        self.controller = controller
        self.layers = list(layers)
        self.optimizer = optimizer
        self.base_lr = base_lr  # (max_lr, min_lr) of the predictor groups, or None
        self.stage2_lr_scale = stage2_lr_scale
        self._callbacks: Dict[str, List[Callable]] = {event: [] for event in EVENTS}

    def __reduce__(self):
        # Megatron pickles ``args`` into every checkpoint (and may deep-copy it); the runtime holds
        # the model and process groups, which must not travel there: it pickles as None.
        return (_no_runtime, ())

    def _check_event(self, event: str) -> None:
        if event not in self._callbacks:
            raise ValueError(f"unknown megatron_dsv hook event {event!r}; events: {', '.join(EVENTS)}.")

    def register(self, event: str, fn: Callable) -> Callable:
        """Call ``fn`` whenever ``event`` fires; returns ``fn``."""
        self._check_event(event)
        self._callbacks[event].append(fn)
        return fn

    def unregister(self, event: str, fn: Callable) -> bool:
        """Stop calling ``fn`` on ``event``; False when it was not registered."""
        self._check_event(event)
        try:
            self._callbacks[event].remove(fn)
        except ValueError:
            return False
        return True

    def registered(self, event: str) -> tuple:
        """The callbacks of ``event``, in call order."""
        self._check_event(event)
        return tuple(self._callbacks[event])

    def fire(self, event: str, *args, **kwargs) -> list:
        """Call every callback of ``event`` in registration order; returns their results."""
        self._check_event(event)
        return [fn(*args, **kwargs) for fn in tuple(self._callbacks[event])]

    def on_iteration_start(self, iteration: int) -> None:
        self.controller.on_iteration_start(iteration)

    def on_iteration_end(self, iteration: int) -> Dict:
        summary = self.controller.on_iteration_end(iteration)
        self.sync_predictor_lr()
        return summary

    def sync_predictor_lr(self) -> None:
        """Predictor groups at ``--dsv-stage2-predictor-lr-scale`` times the base rates in stage 2,
        at the base rates before (recomputed from the stage, so a resumed run agrees)."""
        if self.optimizer is None or self.base_lr is None or self.controller is None:
            return
        scale = self.stage2_lr_scale if self.controller.stage == 2 else 1.0
        _lr.set_predictor_lr_scale(self.optimizer, scale)

    def attention_work(self, default_seq_len: Optional[int]) -> list:
        works = [layer_attention_work(l, default_seq_len) for l in self.layers]
        return [w for w in works if w is not None]


def _no_runtime():
    return None


# Megatron reads its checkpoints with torch.load's default weights_only=True (torch >= 2.6), which
# refuses any global it was not told is safe: without this, the ``args`` of every checkpoint of a
# DSV run failed to load, and Megatron's --ckpt-format torch path then prints "could not load the
# checkpoint" and exits with code 0. Registered at import: the patched training.py imports
# megatron_dsv.hooks (and so this module) before any checkpoint is read.
torch.serialization.add_safe_globals([_no_runtime])


def layer_attention_work(layer, default_seq_len: Optional[int]) -> Optional[_flops.AttentionWork]:
    """What a DSVCoreAttention self-attention layer computes per sequence, from its state.

    The length is the one the layer last saw (``default_seq_len`` before its first forward).
    """
    seq_len = layer.last_seq_len or default_seq_len
    if not seq_len:
        return None
    heads, head_dim = layer.num_heads_global, layer.head_dim
    if not layer.sparse:
        return _flops.AttentionWork.dense(seq_len, heads, head_dim)
    kv = layer.kv_count_global(seq_len).tolist()
    return _flops.AttentionWork.sparse(seq_len, head_dim, kv, layer.dsv.dsv_kv_block)


def core_attention_flops(megatron_core_flops, num_attention_layers, num_sequences, args=None):
    """Megatron's core-attention FLOPs with the DSV layers' share replaced by the query-key pairs
    they compute (see :mod:`megatron_dsv.flops`); unchanged without a runtime on ``args`` or when
    nothing is registered under :data:`CORE_ATTENTION_WORK`."""
    runtime = getattr(args, "dsv_runtime", None)
    if runtime is None:
        return megatron_core_flops
    works = [w for result in runtime.fire(CORE_ATTENTION_WORK, getattr(args, "seq_length", None)) for w in result]
    if not works:
        return megatron_core_flops
    return _flops.replace_core_attention_flops(megatron_core_flops, num_attention_layers, works, num_sequences)


def add_dsv_args_if_absent(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``--dsv-*`` flags unless an ``extra_args_provider`` already did."""
    from megatron_dsv.arguments import add_dsv_args

    if parser.get_default("dsv_mode") is not None:
        return parser
    return add_dsv_args(parser)


def transformer_config_class(args, config_class):
    """``DSVTransformerConfig`` in place of a plain ``TransformerConfig`` when ``args`` holds the
    DSV flags, so ``core_transformer_config_from_args`` copies them into every layer's config."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    if config_class is TransformerConfig and hasattr(args, "dsv_mode"):
        from megatron_dsv.layers.transformer_config import DSVTransformerConfig

        return DSVTransformerConfig
    return config_class


def predictor_param_overrides(config) -> Dict:
    """Megatron ``config_overrides`` for the predictor groups (see :mod:`megatron_dsv.runtime.lr`)."""
    return _lr.predictor_param_overrides(config, _megatron_args())


def _megatron_args():
    try:
        from megatron.training.global_vars import get_args

        return get_args()
    except (ImportError, AssertionError):
        return None


def _megatron_defaults():
    """Megatron's data+context-parallel group and writers, when Megatron is initialised."""
    stats_group = tb = wb = None
    try:
        from megatron.core import parallel_state

        if parallel_state.model_parallel_is_initialized():
            stats_group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    except (ImportError, AssertionError):
        pass
    try:
        from megatron.training.global_vars import get_tensorboard_writer, get_wandb_writer

        tb, wb = get_tensorboard_writer(), get_wandb_writer()
    except ImportError:
        pass
    return stats_group, tb, wb


def install_dsv_hooks(model, optimizer, args, *, stats_group=None, tb_writer=None, wandb_writer=None,
                      log: Optional[Callable[[str], None]] = None, require_layers: bool = False) -> Optional[DSVRuntime]:
    """Attach DSV to a Megatron training run and store the :class:`DSVRuntime` as ``args.dsv_runtime``.

    Finds the DSVCoreAttention self-attention layers of ``model`` (a module or Megatron's list of
    chunks). Without any, says so and returns None (a patched clone runs non-DSV models too), or
    raises with ``require_layers`` (our entry scripts, where DSV was asked for). Otherwise it
    registers the FLOPs account of those layers and, when they have predictors, a stage
    controller (statistics averaged over Megatron's data+context-parallel group, Megatron's
    TensorBoard/W&B writers) driven by :data:`ITERATION_START` / :data:`ITERATION_END`, keeps the
    predictor optimizer groups at the stage's learning rate and clips the predictors by their own
    gradient norm. A previous runtime on ``args`` is replaced.

    Refused (ValueError, before any iteration): bidirectional DSV layers inside a causal language
    model (``GPTModel``, ``HybridModel``), e.g. Megatron-LM's ``pretrain_gpt.py --spec
    megatron_dsv.specs dsv_gpt_layer_spec``: such a model sees the tokens it predicts, also with
    ``--dsv-mode dense``. Causal DSV layers (``dsv_gpt_causal_layer_spec``,
    ``get_dsv_gpt_layer_spec(causal=True)``, ``attn_mask_type=causal``) are accepted, sparse or dense,
    except sparse with ``--dsv-backend cudnn`` (no token mask in cuDNN's block-sparse attention).
    """
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.hybrid.hybrid_model import HybridModel
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_dsv.runtime.controller import DSVController

    log = log or print_rank_0
    chunks = model if isinstance(model, (list, tuple)) else [model]
    for lm in (m for c in chunks for m in c.modules() if isinstance(m, (GPTModel, HybridModel))):
        # Causal DSV layers mask their dense and sparse paths token-causally (ops/mask.py).
        wrong = [l for l in dsv_attention_layers(lm) if l.is_self_attention and l.attn_mask_type != AttnMaskType.causal]
        if wrong:
            masks = sorted({l.attn_mask_type.name for l in wrong})
            raise ValueError(
                f"DSV refuses this model: {type(lm).__name__} is a causal language model, but "
                f"{len(wrong)} of its DSV attention layers are not causal (attn_mask_type "
                f"{'/'.join(masks)}): each token would see the tokens it is trained to predict (a loss "
                "that falls and means nothing), also with --dsv-mode dense. Use the causal DSV spec: "
                "--spec megatron_dsv.specs dsv_gpt_causal_layer_spec (or get_dsv_gpt_layer_spec(causal=True)); "
                "the bidirectional dsv_gpt_layer_spec is for video DiTs (examples/pretrain_video_dit.py)."
            )
    layers = [l for m in chunks for l in dsv_attention_layers(m) if l.is_self_attention]
    masked_cudnn = [
        l for l in layers
        if l.predictor is not None and l.dsv.dsv_backend == "cudnn"
        and (l.attn_mask_type == AttnMaskType.causal or l.dsv.dsv_causal_chunk)
    ]
    if masked_cudnn:
        raise ValueError(
            f"{len(masked_cudnn)} causal DSV layers would run sparse with --dsv-backend cudnn, but "
            "cuDNN's block-sparse attention takes whole 64x64 blocks and no token-wise mask. Use "
            "--dsv-backend auto or triton (the Triton kernels apply the causal mask), or --dsv-mode dense."
        )
    if not layers:
        msg = (
            "DSV: the model has no DSV self-attention layer, so DSV is off for this run; build a video "
            "DiT with DSV attention (examples/pretrain_video_dit.py, or megatron_dsv.specs in your own "
            "bidirectional model)."
        )
        if require_layers:
            raise ValueError(msg)
        log(msg)
        _set_runtime(args, None)
        return None
    if stats_group is None or tb_writer is None or wandb_writer is None:
        group, tb, wb = _megatron_defaults()
        stats_group = group if stats_group is None else stats_group
        tb_writer = tb if tb_writer is None else tb_writer
        wandb_writer = wb if wandb_writer is None else wandb_writer
    trainable = any(l.predictor is not None for l in layers)
    # Megatron's scheduler recomputes lr from max_lr/min_lr, so the runtime (not the controller)
    # scales the predictor groups: DSVRuntime.sync_predictor_lr.
    controller = (
        DSVController(chunks, stats_group=stats_group, tb_writer=tb_writer, wandb_writer=wandb_writer, log=log)
        if trainable else None
    )
    base_lr = None
    if optimizer is not None and getattr(args, "lr", None) is not None:
        max_lr, min_lr = _lr.predictor_base_lr(args, args)
        base_lr = (max_lr, min_lr if min_lr is not None else 0.0)
    scale = controller.cfg.dsv_stage2_predictor_lr_scale if controller else 1.0
    runtime = DSVRuntime(controller, layers, optimizer, base_lr, scale)
    runtime.register(CORE_ATTENTION_WORK, runtime.attention_work)
    if controller is not None:
        runtime.register(ITERATION_START, runtime.on_iteration_start)
        runtime.register(ITERATION_END, runtime.on_iteration_end)
        runtime.sync_predictor_lr()
        missing = False
        if any(p.requires_grad for l in layers if l.predictor is not None for p in l.predictor.parameters()):
            tagged = _lr.separate_predictor_grad_norm(chunks)
            n_groups = len(_lr.predictor_groups(optimizer))
            how = f"{n_groups} predictor optimizer groups, {tagged} predictor parameters clipped apart"
            missing = optimizer is not None and n_groups == 0
        else:
            # --dsv-predictor-fit closed_form (the default): the predictors take no gradient, so
            # Megatron's optimizer holds none of them and no group is expected
            how = "predictors fitted in closed form (no optimizer groups)"
        log(f"DSV hooks installed: {len(controller.layers)} DSV layers, stage {controller.stage}, {how}")
        if missing:
            log("DSV warning: no predictor optimizer group (patch 04 not applied?); the stage-2 "
                "predictor learning-rate scale is not applied.")
    _set_runtime(args, runtime)
    return runtime


def _set_runtime(args, runtime: Optional[DSVRuntime]) -> None:
    if args is not None:
        args.dsv_runtime = runtime


def current_runtime() -> Optional[DSVRuntime]:
    """The runtime of this Megatron run (``get_args().dsv_runtime``), or None."""
    return getattr(_megatron_args(), "dsv_runtime", None)


def fire(event: str, *args, **kwargs) -> list:
    """Fire ``event`` on the current run's runtime (nothing without one)."""
    runtime = current_runtime()
    return [] if runtime is None else runtime.fire(event, *args, **kwargs)


def describe_layers(model) -> str:
    chunks = model if isinstance(model, (list, tuple)) else [model]
    lines = [a.describe() for m in chunks for a in dsv_attention_layers(m)]
    return "DSV attention per layer:\n  " + "\n  ".join(lines)


def skip_dataset_helper_compile() -> None:
    import megatron.core.datasets.utils as dutils

    dutils.compile_helpers = lambda: None


def install() -> None:
    """Wrap ``megatron.training.training`` for DSV (idempotent: a wrapped function is marked);
    on a patched Megatron-LM only the dataset-helper no-op, its own hooks drive the run."""
    import megatron.training.training as tr
    from megatron.training.global_vars import get_args

    skip_dataset_helper_compile()
    if getattr(tr.train_step, "__dsv_wrapped__", False):
        return
    if getattr(tr, "dsv_hooks", None) is not None:
        print_rank_0("megatron_dsv: Megatron-LM is patched; its own DSV hooks drive the run.")
        return

    orig_cfg = tr.get_megatron_optimizer_config

    @functools.wraps(orig_cfg)
    def get_megatron_optimizer_config(args):
        config, overrides = orig_cfg(args)
        return config, {**(overrides or {}), **predictor_param_overrides(config)}

    orig_setup = tr.setup_model_and_optimizer

    @functools.wraps(orig_setup)
    def setup_model_and_optimizer(*args, **kwargs):
        model, optimizer, scheduler = orig_setup(*args, **kwargs)
        install_dsv_hooks(model, optimizer, get_args(), require_layers=True)
        print_rank_0(describe_layers(model))
        return model, optimizer, scheduler

    orig_step = tr.train_step

    @functools.wraps(orig_step)
    def train_step(*args, **kwargs):
        it = get_args().curr_iteration
        fire(ITERATION_START, it)
        out = orig_step(*args, **kwargs)
        fire(ITERATION_END, it)
        return out

    train_step.__dsv_wrapped__ = True
    tr.get_megatron_optimizer_config = get_megatron_optimizer_config
    tr.setup_model_and_optimizer = setup_model_and_optimizer
    tr.train_step = train_step


def init_megatron(device: str = "cpu", *, tp: int = 1, cp: int = 1, rank: int = 0, world_size: int = 1,
                  seed: int = 1234) -> None:
    """Megatron's process groups and RNG for scripts that run without ``pretrain()``.

    Quickstarts and benchmarks (one process), and spawned ranks that set ``MASTER_ADDR`` /
    ``MASTER_PORT`` themselves. Idempotent. On the CPU, Megatron's CUDA RNG tracker cannot fork;
    nothing here needs it (no dropout in tensor-parallel regions), so its ``fork`` becomes a
    no-op there.
    """
    import contextlib
    import os
    import socket

    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import random as mrandom

    if not dist.is_initialized():
        if "MASTER_PORT" not in os.environ:
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                os.environ["MASTER_PORT"] = str(sock.getsockname()[1])
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=rank, world_size=world_size)
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(tensor_model_parallel_size=tp, context_parallel_size=cp)
    tracker = mrandom.get_cuda_rng_tracker()
    if device == "cuda":
        if "model-parallel-rng" not in tracker.get_states():
            mrandom.model_parallel_cuda_manual_seed(seed)
    else:
        tracker.fork = lambda *a, **k: contextlib.nullcontext()


def init_single_process(device: str, seed: int = 1234) -> None:
    """One process (quickstarts without torchrun): :func:`init_megatron` with the defaults."""
    init_megatron(device, seed=seed)


__all__ = [
    "CORE_ATTENTION_WORK",
    "DSVRuntime",
    "EVENTS",
    "ITERATION_END",
    "ITERATION_START",
    "add_dsv_args_if_absent",
    "core_attention_flops",
    "current_runtime",
    "describe_layers",
    "fire",
    "init_megatron",
    "init_single_process",
    "install",
    "install_dsv_hooks",
    "layer_attention_work",
    "predictor_param_overrides",
    "skip_dataset_helper_compile",
    "transformer_config_class",
]
