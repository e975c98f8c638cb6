"""3D rotary position embedding for video tokens, in Megatron's RoPE layout.

The head dim D is split into three bands for t, h and w (D/2 rotary frequencies shared as
``[D/2 - 2*(D/2 // 3)]`` for t and ``D/2 // 3`` each for h and w). For a token at (t, h, w) the angle
vector is ``[t * f_t, h * f_h, w * f_w]`` and Megatron's unfused RoPE (``rotate_half`` on two
halves) takes ``freqs = cat(angles, angles)`` of shape ``[S, 1, 1, D]``. Positions follow the
tokens in cube-major order (``ops.layout.cube_major_positions``).
"""

from __future__ import annotations

from typing import Sequence

import torch

from megatron_dsv.ops.layout import cube_major_positions


def band_sizes(head_dim: int):
    half = head_dim // 2
    hw = half // 3
    return half - 2 * hw, hw, hw


def rope_3d_freqs(grid: Sequence[int], cube: Sequence[int], head_dim: int, theta: float = 10000.0, device=None) -> torch.Tensor:
    """``[S, 1, 1, head_dim]`` fp32 RoPE angles for a ``(T, H, W)`` token grid in cube-major order."""
    if head_dim % 2:
        raise ValueError(f"3D RoPE needs an even head dim, got {head_dim}.")
    pos = cube_major_positions(grid, cube, device=device).float()  # [S, 3]
    parts = []
    for axis, n in enumerate(band_sizes(head_dim)):
        if n == 0:
            continue
        inv = 1.0 / theta ** (torch.arange(n, device=pos.device, dtype=torch.float32) / n)
        parts.append(pos[:, axis : axis + 1] * inv)
    angles = torch.cat(parts, dim=-1)  # [S, D/2]
    return torch.cat([angles, angles], dim=-1)[:, None, None, :]
