"""Datasets: synthetic tasks and videos, on-disk latents."""
