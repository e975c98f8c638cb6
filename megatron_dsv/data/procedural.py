"""Procedural videos in latent space: the embedded default dataset.

Each sample is a ``[C, T, H, W]`` latent video with real spatio-temporal structure: a smooth,
slowly drifting background field and 2-4 textured objects (soft disks with a per-object colour
and stripe texture) that move, scale and occlude one another in depth order. The class is the
motion: all objects of a class-``k`` video follow motion ``MOTIONS[k % 8]`` at their own speed
and phase. Deterministic by ``(seed, index)`` at any (T, H, W), so every data-parallel rank can
index its own samples with no files.
"""

from __future__ import annotations

import math
from typing import Dict, Sequence

import torch

MOTIONS = ("right", "left", "down", "up", "orbit", "grow", "shrink", "bounce")


class ProceduralVideoDataset(torch.utils.data.Dataset):
    """``len`` samples of ``{"latents": fp32 [C, T, H, W], "label": int64}``."""

    def __init__(self, num_samples: int, thw: Sequence[int], channels: int = 4, num_classes: int = 8, seed: int = 0):
        t, h, w = (int(v) for v in thw)
        if min(t, h, w) < 1 or channels < 1 or num_samples < 1 or num_classes < 1:
            raise ValueError(f"need positive sizes, got samples={num_samples}, thw={thw}, channels={channels}.")
        self.num_samples, self.thw, self.channels = num_samples, (t, h, w), channels
        self.num_classes, self.seed = num_classes, seed

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        if not 0 <= index < self.num_samples:
            raise IndexError(index)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        label = int(torch.randint(self.num_classes, (1,), generator=g))
        return {"latents": render(self.thw, self.channels, MOTIONS[label % len(MOTIONS)], g), "label": torch.tensor(label)}


def _smooth_field(c: int, t: int, h: int, w: int, g: torch.Generator) -> torch.Tensor:
    low = torch.randn(1, c, max(2, t // 4), max(2, h // 8), max(2, w // 8), generator=g)
    return torch.nn.functional.interpolate(low, size=(t, h, w), mode="trilinear", align_corners=True)[0] * 0.5


def render(thw: Sequence[int], channels: int, motion: str, g: torch.Generator) -> torch.Tensor:
    t, h, w = thw
    video = _smooth_field(channels, t, h, w, g)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    n_obj = int(torch.randint(2, 5, (1,), generator=g))
    for _ in range(n_obj):  # later objects are in front: they occlude earlier ones
        cy, cx = (torch.rand(2, generator=g) * 0.6 + 0.2).tolist()
        r0 = float(torch.rand(1, generator=g)) * 0.12 + 0.08
        speed = float(torch.rand(1, generator=g)) * 0.5 + 0.3
        phase = float(torch.rand(1, generator=g)) * 2 * math.pi
        colour = torch.randn(channels, generator=g)
        stripe = torch.randn(channels, generator=g) * 0.5
        freq = float(torch.randint(4, 12, (1,), generator=g))
        angle = float(torch.rand(1, generator=g)) * math.pi
        for f in range(t):
            s = f / max(1, t - 1)  # time in [0, 1]
            y, x, r = cy, cx, r0
            if motion == "right":
                x = cx - 0.3 + speed * s
            elif motion == "left":
                x = cx + 0.3 - speed * s
            elif motion == "down":
                y = cy - 0.3 + speed * s
            elif motion == "up":
                y = cy + 0.3 - speed * s
            elif motion == "orbit":
                y, x = cy + 0.2 * math.sin(phase + 2 * math.pi * speed * s), cx + 0.2 * math.cos(phase + 2 * math.pi * speed * s)
            elif motion == "grow":
                r = r0 * (0.5 + 1.5 * s)
            elif motion == "shrink":
                r = r0 * (2.0 - 1.5 * s)
            elif motion == "bounce":
                y = cy + 0.25 * abs(math.sin(phase + math.pi * speed * 2 * s)) - 0.1
                x = cx - 0.2 + 0.4 * s * speed
            dist = torch.sqrt((yy - y) ** 2 + (xx - x) ** 2)
            alpha = torch.sigmoid((r - dist) / 0.015)  # soft edge
            u = (yy - y) * math.cos(angle) + (xx - x) * math.sin(angle)
            texture = colour[:, None, None] + stripe[:, None, None] * torch.sin(2 * math.pi * freq * u)[None]
            video[:, f] = alpha[None] * texture + (1 - alpha[None]) * video[:, f]
    return video
