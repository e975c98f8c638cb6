"""Run a test function on N gloo processes (spawned) and re-raise any rank's failure here.

Rank arithmetic lives in pure functions tested without processes; this helper is for the
collectives. Each spawned rank calls ``fn(rank, world_size, *args)`` after
``init_process_group("gloo")``; a failing rank's traceback is raised in the parent.

Every process group is destroyed, and every reference to it dropped, before a rank's interpreter
exits. A gloo group that outlives ``destroy_process_group`` (held by Megatron's parallel state, or
by the module-level group cache that ``megatron_dsv.cp.groups`` had) keeps its worker threads; a
worker that releases the last collective's work after the main thread began finalising must take
the GIL to free the work's tensors, and a thread that
takes the GIL during finalisation is ended by ``pthread_exit``, whose unwind through a noexcept
frame calls ``std::terminate``: "terminate called without an active exception", SIGABRT, no
Python error (core dump: ``AsyncAlltoallWork::~AsyncAlltoallWork`` -> ``decref_pyobject`` ->
``take_gil`` -> ``PyThread_exit_thread``). Looped ``test_cp_attention_matches_single_process[2]``:
12 of 42 runs aborted before; 0 of 30 after the teardown below.
"""

from __future__ import annotations

import gc
import os
import tempfile
import traceback

import torch.distributed as dist
import torch.multiprocessing as mp

from tests.megatron_shim import free_port


def _entry(rank, world, port, errdir, fn, args):
    try:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
        )
        fn(rank, world, *args)
    except BaseException:  # noqa: BLE001 - reported to the parent
        with open(os.path.join(errdir, f"rank{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        _teardown()


def _teardown() -> None:
    """Destroy Megatron's groups and the default group, then collect, so that every gloo group's
    destructor joins its worker threads while the interpreter is alive."""
    import sys

    ps = sys.modules.get("megatron.core.parallel_state")
    if ps is not None and ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()


def run_ranks(fn, world: int, *args) -> None:
    """Spawn ``world`` ranks running ``fn(rank, world, *args)``; fail with the first traceback,
    or with the signal of a rank that died without a Python error (never retried)."""
    env = {k: os.environ.pop(k) for k in ("MASTER_ADDR", "MASTER_PORT") if k in os.environ}
    try:
        with tempfile.TemporaryDirectory() as errdir:
            try:
                mp.start_processes(
                    _entry, args=(world, free_port(), errdir, fn, args), nprocs=world, join=True,
                    start_method="spawn",
                )
            except Exception as exc:
                msgs = [open(os.path.join(errdir, f)).read() for f in sorted(os.listdir(errdir))]
                raise AssertionError("a rank failed:\n" + "\n".join(msgs or [str(exc)])) from None
    finally:
        os.environ.update(env)
