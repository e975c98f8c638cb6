"""Datasets: synthetic tasks and videos, natural-image videos, on-disk latents."""

from megatron_dsv.data.natural import NaturalVideoDataset
from megatron_dsv.data.procedural import ProceduralVideoDataset

__all__ = ["NaturalVideoDataset", "ProceduralVideoDataset"]
