"""Runtime hooks into ``megatron.training`` installed by our entry scripts (no file patches).

:func:`install` wraps, at run time, the same three points that ``patches/`` changes in a
Megatron-LM clone, and drives the same :mod:`megatron_dsv.hooks` logic:

* ``get_megatron_optimizer_config``: predictor parameters get optimizer groups of their own
  (:func:`megatron_dsv.hooks.predictor_param_overrides`), whose learning rate follows the stage;
* ``setup_model_and_optimizer``: once the model and optimizer exist,
  :func:`megatron_dsv.hooks.install_dsv_hooks` builds the stage controller (statistics over the
  data+context-parallel group, TensorBoard / W&B), and each layer's attention backend is printed;
* ``train_step``: fires ``ITERATION_START`` before and ``ITERATION_END`` after each step.

On a patched Megatron-LM (``training.dsv_hooks`` present) it wraps nothing, so the controller never
runs twice. The throughput report's sparse-FLOPs correction needs the patch (05).

:func:`skip_dataset_helper_compile` makes ``megatron.core.datasets.utils.compile_helpers`` a no-op:
the megatron-core wheel ships the prebuilt ``helpers_cpp`` extension but not the Makefile that
``pretrain()`` runs, so it would exit with "Failed to compile the C++ dataset helper functions";
our datasets do not use the helpers.
"""

from __future__ import annotations

import functools
import logging

from megatron_dsv import hooks
from megatron_dsv.layers.attention import dsv_attention_layers

logger = logging.getLogger("megatron_dsv")

_state = {"installed": False, "hooks": None}


def installed_hooks():
    """The :class:`megatron_dsv.hooks.DSVHooks` of this run (None before the model exists)."""
    return _state["hooks"]


def describe_layers(model) -> str:
    chunks = model if isinstance(model, (list, tuple)) else [model]
    lines = [a.describe() for m in chunks for a in dsv_attention_layers(m)]
    return "DSV attention per layer:\n  " + "\n  ".join(lines)


def skip_dataset_helper_compile() -> None:
    import megatron.core.datasets.utils as dutils

    dutils.compile_helpers = lambda: None


def install() -> None:
    """Install the wrappers (idempotent; nothing but the compile no-op on a patched Megatron)."""
    if _state["installed"]:
        return
    import megatron.training.training as tr
    from megatron.training.global_vars import get_args
    from megatron.training.utils import print_rank_0

    skip_dataset_helper_compile()
    _state["installed"] = True
    if getattr(tr, "dsv_hooks", None) is not None:
        print_rank_0("megatron_dsv: Megatron-LM is patched; its own DSV hooks drive the run.")
        return

    orig_cfg = tr.get_megatron_optimizer_config

    @functools.wraps(orig_cfg)
    def get_megatron_optimizer_config(args):
        config, overrides = orig_cfg(args)
        return config, {**(overrides or {}), **hooks.predictor_param_overrides(config)}

    orig_setup = tr.setup_model_and_optimizer

    @functools.wraps(orig_setup)
    def setup_model_and_optimizer(*args, **kwargs):
        model, optimizer, scheduler = orig_setup(*args, **kwargs)
        _state["hooks"] = hooks.install_dsv_hooks(model, optimizer, get_args())
        print_rank_0(describe_layers(model))
        return model, optimizer, scheduler

    orig_step = tr.train_step

    @functools.wraps(orig_step)
    def train_step(*args, **kwargs):
        it = get_args().curr_iteration
        hooks.fire(hooks.ITERATION_START, it)
        out = orig_step(*args, **kwargs)
        hooks.fire(hooks.ITERATION_END, it)
        return out

    tr.get_megatron_optimizer_config = get_megatron_optimizer_config
    tr.setup_model_and_optimizer = setup_model_and_optimizer
    tr.train_step = train_step


def init_single_process(device: str, seed: int = 1234) -> None:
    """Megatron's process groups for one process (examples and quickstarts without torchrun).

    On the CPU, Megatron's CUDA RNG tracker cannot fork; nothing in a single-process run needs it
    (no dropout in tensor-parallel regions), so its ``fork`` becomes a no-op there.
    """
    import contextlib
    import os
    import socket

    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import random as mrandom

    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(port))
        dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=0, world_size=1)
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel()
    if device == "cuda":
        if "model-parallel-rng" not in mrandom.get_cuda_rng_tracker().get_states():
            mrandom.model_parallel_cuda_manual_seed(seed)
    else:
        mrandom.get_cuda_rng_tracker().fork = lambda *a, **k: contextlib.nullcontext()
