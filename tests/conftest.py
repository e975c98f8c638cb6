"""Shared test setup. The Triton interpreter must be chosen before any kernel is defined, so
CPU runs set TRITON_INTERPRET=1 here, before test modules import megatron_dsv.ops."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (marker gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def poisoned():
    """Kernel options that fill fresh kernel outputs with NaN, so an element a kernel never
    writes fails the comparison; pass as ``options=poisoned`` (add fields with dataclasses.replace)."""
    from megatron_dsv.ops.options import KernelOptions

    return KernelOptions(poison_outputs=True)


@pytest.fixture(scope="session")
def megatron_state():
    """Single-process Megatron state (gloo, TP=1) for tests that build megatron-core blocks."""
    from tests.megatron_shim import init_megatron_state

    init_megatron_state()
    yield
