"""Callback points for Megatron-LM, and the DSV logic installed into them.

The patches in ``patches/`` (applied to a Megatron-LM clone) call this module, and only this
module; everything else stays in ``megatron_dsv``:

* ``megatron/training/arguments.py`` -> :func:`add_dsv_args_if_absent` (the ``--dsv-*`` flags);
* ``megatron/training/argument_utils.py`` -> :func:`transformer_config_class` (carry the flags
  into every layer's config);
* ``megatron/training/training.py`` -> :func:`install_dsv_hooks` after the model and optimizer are
  built, :func:`fire` with :data:`ITERATION_START` / :data:`ITERATION_END` in ``train_step``,
  :func:`predictor_param_overrides` for the optimizer's parameter groups and
  :func:`core_attention_flops` in the throughput report.

The registry maps an event to its callbacks and is the module's only state. Anyone may
:func:`register` into it; :func:`install_dsv_hooks` registers the DSV stage controller.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any, Callable, Dict, List, Optional

from megatron_dsv import flops as _flops

logger = logging.getLogger("megatron_dsv")

ITERATION_START = "iteration_start"
"""Fired with ``(iteration,)`` before the iteration's first forward."""
ITERATION_END = "iteration_end"
"""Fired with ``(iteration,)`` after the optimizer step and the learning-rate update."""
CORE_ATTENTION_WORK = "core_attention_work"
"""Fired with ``(default_seq_len,)`` by the FLOPs report; each callback returns a list of
:class:`megatron_dsv.flops.AttentionWork`, one per attention layer it accounts for."""
EVENTS = (ITERATION_START, ITERATION_END, CORE_ATTENTION_WORK)

_REGISTRY: Dict[str, List[Callable]] = {event: [] for event in EVENTS}

PREDICTOR_GROUP_KEY = "dsv_predictor"
"""Marker key of the optimizer parameter groups that hold only DSV predictor parameters."""


def _check_event(event: str) -> None:
    if event not in _REGISTRY:
        raise ValueError(f"unknown megatron_dsv hook event {event!r}; events: {', '.join(EVENTS)}.")


def register(event: str, fn: Callable) -> Callable:
    """Call ``fn`` whenever ``event`` fires; returns ``fn``."""
    _check_event(event)
    _REGISTRY[event].append(fn)
    return fn


def unregister(event: str, fn: Callable) -> bool:
    """Stop calling ``fn`` on ``event``; False when it was not registered."""
    _check_event(event)
    try:
        _REGISTRY[event].remove(fn)
    except ValueError:
        return False
    return True


def registered(event: str) -> tuple:
    """The callbacks of ``event``, in call order."""
    _check_event(event)
    return tuple(_REGISTRY[event])


def fire(event: str, *args, **kwargs) -> list:
    """Call every callback of ``event`` in registration order; returns their results."""
    _check_event(event)
    return [fn(*args, **kwargs) for fn in tuple(_REGISTRY[event])]


# ---------------------------------------------------------------- arguments (patch 01, 02)
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


# ---------------------------------------------------------------- optimizer (patch 04)
def predictor_param_overrides(config) -> Dict:
    """Optimizer ``config_overrides`` entry that puts DSV predictor parameters in their own
    parameter groups (marked ``dsv_predictor``), so the stage-2 learning-rate scale can reach them
    alone. Matches nothing in a model without DSV predictors."""
    from megatron.core.optimizer.optimizer_config import ParamKey, ParamWithNamePredicate

    from megatron_dsv.layers.controller import is_predictor_param

    key = ParamKey(
        with_name_predicate=ParamWithNamePredicate(
            name="dsv_predictor", fn=lambda param, name: is_predictor_param(name, param)
        )
    )
    override = {PREDICTOR_GROUP_KEY: True}
    max_lr, min_lr = predictor_base_lr(config, _megatron_args())
    if max_lr is not None:
        override["max_lr"] = max_lr
    if min_lr is not None:
        override["min_lr"] = min_lr
    return {key: override}


def _megatron_args():
    try:
        from megatron.training.global_vars import get_args

        return get_args()
    except (ImportError, AssertionError):
        return None


def predictor_base_lr(config, args=None):
    """``(max_lr, min_lr)`` of the predictor groups: ``--dsv-predictor-lr`` when set (the minimum
    keeps ``--min-lr``'s ratio to ``--lr``), else the model's ``--lr`` / ``--min-lr``."""
    lr = getattr(config, "lr", None)
    min_lr = getattr(config, "min_lr", None)
    own = getattr(args, "dsv_predictor_lr", 0.0) or 0.0
    if own and lr:
        return own, (min_lr or 0.0) * own / lr
    return lr, min_lr


def set_predictor_lr(optimizer, base_max_lr: float, base_min_lr: float, scale: float) -> int:
    """Set the predictor groups' schedule to ``scale`` times the base learning rates.

    Megatron's scheduler recomputes each group's ``lr`` from its ``max_lr``/``min_lr`` at every
    step, so those are what must change; the current ``lr`` follows by the same ratio so the
    next step already uses it. Idempotent. Returns the number of groups changed.
    """
    changed = 0
    target_max, target_min = base_max_lr * scale, base_min_lr * scale
    for group in optimizer.param_groups:
        if not group.get(PREDICTOR_GROUP_KEY) or group.get("max_lr") == target_max:
            continue
        old = group.get("max_lr") or base_max_lr
        ratio = target_max / old if old else scale
        lr = group.get("lr")
        if hasattr(lr, "mul_"):
            lr.mul_(ratio)
        elif lr is not None:
            group["lr"] = lr * ratio
        group["max_lr"], group["min_lr"] = target_max, target_min
        changed += 1
    return changed


# ---------------------------------------------------------------- FLOPs (patch 05)
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
    """Megatron's core-attention FLOPs with the registered layers' share replaced by the
    query-key pairs they compute (see :mod:`megatron_dsv.flops`); unchanged when nothing is
    registered under :data:`CORE_ATTENTION_WORK`."""
    works = [w for result in fire(CORE_ATTENTION_WORK, getattr(args, "seq_length", None)) for w in result]
    if not works:
        return megatron_core_flops
    return _flops.replace_core_attention_flops(
        megatron_core_flops, num_attention_layers, works, num_sequences
    )


# ---------------------------------------------------------------- installation (patch 03)
class DSVHooks:
    """What :func:`install_dsv_hooks` registered; :meth:`remove` unregisters it all."""

    def __init__(self, controller, layers, optimizer, base_lr, stage2_lr_scale):
        self.controller = controller
        self.layers = layers
        self.optimizer = optimizer
        self.base_lr = base_lr  # (max_lr, min_lr) of the predictor groups, or None
        self.stage2_lr_scale = stage2_lr_scale
        self._registered: List[tuple] = []

    def _add(self, event: str, fn: Callable) -> None:
        register(event, fn)
        self._registered.append((event, fn))

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
        set_predictor_lr(self.optimizer, self.base_lr[0], self.base_lr[1], scale)

    def attention_work(self, default_seq_len: Optional[int]) -> list:
        works = [layer_attention_work(l, default_seq_len) for l in self.layers]
        return [w for w in works if w is not None]

    def remove(self) -> None:
        for event, fn in self._registered:
            unregister(event, fn)
        self._registered = []


def _megatron_defaults(args):
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
                      log: Optional[Callable[[str], None]] = None) -> Optional[DSVHooks]:
    """Attach DSV to a Megatron training run; called by the patched ``pretrain()``.

    Finds the DSVCoreAttention self-attention layers of ``model`` (a module or Megatron's list of
    chunks). Without any, registers nothing and returns None. Otherwise registers the FLOPs
    account of those layers and, when they have predictors, a :class:`DSVController` (statistics
    averaged over Megatron's data+context-parallel group, Megatron's TensorBoard/W&B writers)
    driven by :data:`ITERATION_START` / :data:`ITERATION_END`, and keeps the predictor optimizer
    groups (see :func:`predictor_param_overrides`) at the stage's learning rate. A previous
    installation is removed first.
    """
    from megatron_dsv.layers.attention import dsv_attention_layers
    from megatron_dsv.layers.controller import DSVController

    for fn in registered(ITERATION_START) + registered(ITERATION_END) + registered(CORE_ATTENTION_WORK):
        owner = getattr(fn, "__self__", None)
        if isinstance(owner, DSVHooks):
            owner.remove()

    chunks = model if isinstance(model, (list, tuple)) else [model]
    layers = [l for m in chunks for l in dsv_attention_layers(m) if l.is_self_attention]
    if not layers:
        return None
    if stats_group is None or tb_writer is None or wandb_writer is None:
        group, tb, wb = _megatron_defaults(args)
        stats_group = group if stats_group is None else stats_group
        tb_writer = tb if tb_writer is None else tb_writer
        wandb_writer = wb if wandb_writer is None else wandb_writer
    if log is None:
        log = _print_rank_0
    # The controller gets no optimizer: its lr/lr_mult scaling does not survive Megatron's
    # scheduler, which recomputes lr from max_lr/min_lr; DSVHooks.sync_predictor_lr does that.
    controller = DSVController(
        chunks, stats_group=stats_group, tb_writer=tb_writer, wandb_writer=wandb_writer, log=log
    )
    base_lr = None
    if optimizer is not None and getattr(args, "lr", None) is not None:
        max_lr, min_lr = predictor_base_lr(args, args)
        base_lr = (max_lr, min_lr if min_lr is not None else 0.0)
    hooks = DSVHooks(controller, layers, optimizer, base_lr, controller.cfg.dsv_stage2_predictor_lr_scale)
    hooks._add(CORE_ATTENTION_WORK, hooks.attention_work)
    if controller.layers:
        hooks._add(ITERATION_START, hooks.on_iteration_start)
        hooks._add(ITERATION_END, hooks.on_iteration_end)
        hooks.sync_predictor_lr()
        n_groups = sum(bool(g.get(PREDICTOR_GROUP_KEY)) for g in getattr(optimizer, "param_groups", []))
        log(
            f"DSV hooks installed: {len(controller.layers)} DSV layers, stage {controller.stage}, "
            f"{n_groups} predictor optimizer groups"
        )
        if optimizer is not None and n_groups == 0:
            log("DSV warning: no predictor optimizer group (patch 04 not applied?); the stage-2 "
                "predictor learning-rate scale is not applied.")
    return hooks


def _print_rank_0(msg: str) -> None:
    try:
        from megatron.training.utils import print_rank_0
    except ImportError:
        print(msg, flush=True)
        return
    print_rank_0(msg)


__all__ = [
    "CORE_ATTENTION_WORK",
    "DSVHooks",
    "EVENTS",
    "ITERATION_END",
    "ITERATION_START",
    "PREDICTOR_GROUP_KEY",
    "add_dsv_args_if_absent",
    "core_attention_flops",
    "fire",
    "install_dsv_hooks",
    "layer_attention_work",
    "predictor_param_overrides",
    "register",
    "registered",
    "set_predictor_lr",
    "transformer_config_class",
    "unregister",
]
