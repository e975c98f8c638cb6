"""megatron_dsv: DSV dynamic sparse attention for video DiT training on Megatron-core.

Public API: :class:`DSVConfig`, :func:`add_dsv_args`, the layer specs in ``megatron_dsv.specs`` and
:func:`apply_dsv_context_parallel` (imported lazily: they need megatron-core) and ``__version__``. Kernels live in
``megatron_dsv.ops`` and need only PyTorch and Triton.
"""

from megatron_dsv.arguments import add_dsv_args
from megatron_dsv.config import DSVConfig

__version__ = "0.1.0"


def __getattr__(name):
    import importlib

    if name == "specs":
        return importlib.import_module("megatron_dsv.specs")
    if name == "apply_dsv_context_parallel":
        return importlib.import_module("megatron_dsv.layers.context_parallel").apply_dsv_context_parallel
    raise AttributeError(f"module 'megatron_dsv' has no attribute {name!r}")


__all__ = ["DSVConfig", "add_dsv_args", "apply_dsv_context_parallel", "specs", "__version__"]
