"""Where the Triton kernel tests run: CUDA if present, else the Triton interpreter on the CPU
(``TRITON_INTERPRET=1``, set here and in tests/conftest.py before any kernel is defined)."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
CPU_OK = pytest.mark.skipif(
    not INTERPRET and not torch.cuda.is_available(), reason="needs CUDA or TRITON_INTERPRET=1"
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
