"""Runtime hooks into ``megatron.training`` installed by our entry scripts (no file patches).

:func:`install` wraps three functions of ``megatron.training.training`` that ``pretrain()`` looks
up at call time:

* ``get_megatron_optimizer_config``: adds a parameter-group override so DSV predictor parameters
  get optimizer groups of their own (``dsv_predictor: True``, no weight decay), which the stage
  controller scales in stage 2;
* ``setup_model_and_optimizer``: after the model and optimizer exist, builds the
  :class:`DSVController` (statistics averaged over the data+context-parallel group, Megatron's
  TensorBoard / W&B writers) and prints which attention backend each layer got and why;
* ``train_step``: calls ``on_iteration_start`` before and ``on_iteration_end`` after each step.

:func:`skip_dataset_helper_compile` makes ``megatron.core.datasets.utils.compile_helpers`` a no-op:
the megatron-core wheel ships the prebuilt ``helpers_cpp`` extension but not the Makefile that
``pretrain()`` runs, so it would exit with "Failed to compile the C++ dataset helper functions";
our datasets do not use the helpers anyway.
"""

from __future__ import annotations

import functools
import logging
from typing import Optional

from megatron_dsv.layers.attention import dsv_attention_layers
from megatron_dsv.layers.controller import DSVController

logger = logging.getLogger("megatron_dsv")

_state = {"controller": None, "installed": False}


def controller() -> Optional[DSVController]:
    """The controller built for this run (None before the model exists)."""
    return _state["controller"]


def predictor_param_overrides(config_overrides):
    """Megatron optimizer overrides with DSV predictor parameters in groups of their own."""
    from megatron.core.optimizer.optimizer_config import ParamKey

    overrides = dict(config_overrides or {})
    overrides[ParamKey(attr="is_dsv_predictor")] = {"dsv_predictor": True, "wd_mult": 0.0}
    return overrides


def describe_layers(model) -> str:
    chunks = model if isinstance(model, (list, tuple)) else [model]
    lines = [a.describe() for m in chunks for a in dsv_attention_layers(m)]
    return "DSV attention per layer:\n  " + "\n  ".join(lines)


def skip_dataset_helper_compile() -> None:
    import megatron.core.datasets.utils as dutils

    dutils.compile_helpers = lambda: None


def install() -> None:
    """Install the three wrappers (idempotent). Call before ``pretrain()``."""
    if _state["installed"]:
        return
    import megatron.training.training as tr
    from megatron.core import parallel_state as mpu
    from megatron.training.global_vars import get_tensorboard_writer, get_wandb_writer
    from megatron.training.utils import print_rank_0

    orig_cfg = tr.get_megatron_optimizer_config

    @functools.wraps(orig_cfg)
    def get_megatron_optimizer_config(args):
        config, overrides = orig_cfg(args)
        return config, predictor_param_overrides(overrides)

    orig_setup = tr.setup_model_and_optimizer

    @functools.wraps(orig_setup)
    def setup_model_and_optimizer(*args, **kwargs):
        model, optimizer, scheduler = orig_setup(*args, **kwargs)
        _state["controller"] = DSVController(
            model,
            stats_group=mpu.get_data_parallel_group(with_context_parallel=True),
            optimizer=optimizer,
            tb_writer=get_tensorboard_writer(),
            wandb_writer=get_wandb_writer(),
            log=print_rank_0,
        )
        print_rank_0(describe_layers(model))
        return model, optimizer, scheduler

    orig_step = tr.train_step

    @functools.wraps(orig_step)
    def train_step(*args, **kwargs):
        from megatron.training.global_vars import get_args

        ctl, it = _state["controller"], get_args().curr_iteration
        if ctl is not None:
            ctl.on_iteration_start(it)
        out = orig_step(*args, **kwargs)
        if ctl is not None:
            ctl.on_iteration_end(it)
        return out

    tr.get_megatron_optimizer_config = get_megatron_optimizer_config
    tr.setup_model_and_optimizer = setup_model_and_optimizer
    tr.train_step = train_step
    skip_dataset_helper_compile()
    _state["installed"] = True
