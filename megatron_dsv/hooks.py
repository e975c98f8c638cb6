"""The names a patched Megatron-LM calls (``patches/``); the logic is in :mod:`megatron_dsv.runtime`.

* ``megatron/training/arguments.py`` -> :func:`add_dsv_args_if_absent` (the ``--dsv-*`` flags);
* ``megatron/training/argument_utils.py`` -> :func:`transformer_config_class`;
* ``megatron/training/training.py`` -> :func:`install_dsv_hooks` after the model and optimizer are
  built (it stores the run's ``DSVRuntime`` as ``args.dsv_runtime``), :func:`fire` with
  :data:`ITERATION_START` / :data:`ITERATION_END` in ``train_step``, :func:`predictor_param_overrides`
  for the optimizer's parameter groups and :func:`core_attention_flops` in the throughput report.

This module holds no state; it keeps the patches' import name stable while the runtime evolves.
"""

from megatron_dsv.runtime.lr import PREDICTOR_GROUP_KEY
from megatron_dsv.runtime.megatron import (
    CORE_ATTENTION_WORK,
    EVENTS,
    ITERATION_END,
    ITERATION_START,
    DSVRuntime,
    add_dsv_args_if_absent,
    core_attention_flops,
    current_runtime,
    fire,
    install_dsv_hooks,
    layer_attention_work,
    predictor_param_overrides,
    transformer_config_class,
)

__all__ = [
    "CORE_ATTENTION_WORK",
    "DSVRuntime",
    "EVENTS",
    "ITERATION_END",
    "ITERATION_START",
    "PREDICTOR_GROUP_KEY",
    "add_dsv_args_if_absent",
    "core_attention_flops",
    "current_runtime",
    "fire",
    "install_dsv_hooks",
    "layer_attention_work",
    "predictor_param_overrides",
    "transformer_config_class",
]
