"""megatron_dsv: DSV dynamic sparse attention for video DiT training on Megatron-core.

Public API: :class:`DSVConfig`, :func:`add_dsv_args`, the layer specs in ``megatron_dsv.specs``
(imported lazily: they need megatron-core) and ``__version__``. Kernels live in
``megatron_dsv.ops`` and need only PyTorch and Triton.
"""

from megatron_dsv.arguments import add_dsv_args
from megatron_dsv.config import DSVConfig

__version__ = "0.1.0"


def __getattr__(name):
    if name == "specs":
        import importlib

        return importlib.import_module("megatron_dsv.specs")
    raise AttributeError(f"module 'megatron_dsv' has no attribute {name!r}")


__all__ = ["DSVConfig", "add_dsv_args", "specs", "__version__"]
