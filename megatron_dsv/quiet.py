"""Silence the known third-party start-up noise in our entry points, never our own messages.

Without Transformer Engine and apex, megatron-core warns once per module that it falls back to its
own implementations (8 warnings, 16 stderr lines per quickstart), and torch logs that no CUDA
runtime is found on a CPU machine. Each filter names the message and the module that raises it,
so a warning from ``megatron_dsv`` (or a new one from Megatron) still shows.
"""

from __future__ import annotations

import logging
import warnings

THIRD_PARTY_NOISE = (
    # (message regex, category, module regex)
    (r"Transformer Engine and Apex are not installed", UserWarning, r"megatron\.core"),
    (r"Apex is not installed", UserWarning, r"megatron\.core"),
    (r"absl\.logging is not installed", UserWarning, r"megatron\.core"),
    (r"full scope is deprecated", UserWarning, r"megatron\.core\.transformer\.transformer_config"),
)


def quiet_third_party() -> None:
    """Install the filters (call before importing megatron-core)."""
    for message, category, module in THIRD_PARTY_NOISE:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    # torch.utils.cpp_extension logs "No CUDA runtime is found" at import on CPU-only machines
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


__all__ = ["THIRD_PARTY_NOISE", "quiet_third_party"]
