"""Video token order: (t, h, w) raster order <-> cube-major order.

A video latent of ``T x H x W`` tokens is usually flattened in raster order ``(t, h, w)``. DSV
shares one set of critical keys per query group, a small cube of the video (default 4x4x4).
In cube-major order the tokens of each cube are contiguous, so a query group is a contiguous
run of ``G = ct*ch*cw`` tokens and kernels read contiguous memory. The model permutes tokens once
after patch embedding and un-permutes once before the output head.

Cube-major order sorts tokens by ``(t // ct, h // ch, w // cw, t % ct, h % ch, w % cw)``. When a
dimension is not a multiple of its cube side, the cubes on that edge are partial; the order is
still well defined, but query groups (contiguous runs of G tokens) then straddle edge cubes.
"""

from __future__ import annotations

import functools
from typing import Sequence, Tuple

import torch

Shape3 = Tuple[int, int, int]


def _check(thw: Sequence[int], cube: Sequence[int]) -> Tuple[Shape3, Shape3]:
    thw, cube = tuple(int(x) for x in thw), tuple(int(x) for x in cube)
    if len(thw) != 3 or len(cube) != 3 or min(thw) < 1 or min(cube) < 1:
        raise ValueError(f"need positive (T, H, W) and cube (ct, ch, cw); got {thw} and {cube}.")
    return thw, cube


@functools.lru_cache(maxsize=64)
def _perm_cpu(thw: Shape3, cube: Shape3) -> torch.Tensor:
    t, h, w = thw
    ct, ch, cw = cube
    tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
    nh, nw = -(-h // ch), -(-w // cw)
    cube_id = ((tt // ct) * nh + hh // ch) * nw + ww // cw
    inner = ((tt % ct) * ch + hh % ch) * cw + ww % cw
    key = (cube_id * (ct * ch * cw) + inner).flatten()
    return torch.argsort(key, stable=True)


def cube_major_permutation(thw: Sequence[int], cube: Sequence[int], device=None) -> torch.Tensor:
    """Permutation ``perm`` (int64 ``[T*H*W]``) with ``x_cube = x_raster[perm]``."""
    return _perm_cpu(*_check(thw, cube)).to(device)


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    """``inv`` with ``inv[perm[i]] = i``, so ``x_raster = x_cube[inv]``."""
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device, dtype=perm.dtype)
    return inv


def to_cube_major(x: torch.Tensor, thw: Sequence[int], cube: Sequence[int], dim: int = 1) -> torch.Tensor:
    """Reorder dimension ``dim`` of ``x`` (length ``T*H*W``, raster order) into cube-major order."""
    perm = cube_major_permutation(thw, cube, x.device)
    _check_len(x, dim, perm.numel())
    return x.index_select(dim, perm)


def from_cube_major(x: torch.Tensor, thw: Sequence[int], cube: Sequence[int], dim: int = 1) -> torch.Tensor:
    """Inverse of :func:`to_cube_major`."""
    inv = inverse_permutation(cube_major_permutation(thw, cube, x.device))
    _check_len(x, dim, inv.numel())
    return x.index_select(dim, inv)


def cube_major_positions(thw: Sequence[int], cube: Sequence[int], device=None) -> torch.Tensor:
    """(t, h, w) coordinates of the tokens in cube-major order, int64 ``[T*H*W, 3]``.

    3D RoPE uses these so positions follow the permuted tokens.
    """
    (t, h, w), _ = _check(thw, cube)
    perm = cube_major_permutation(thw, cube, device)
    return torch.stack((perm // (h * w), (perm // w) % h, perm % w), dim=-1)


def group_size_of(cube: Sequence[int]) -> int:
    """Tokens per query group for a cube shape."""
    _, cube = _check((1, 1, 1), cube)
    return cube[0] * cube[1] * cube[2]


def check_divisible(thw: Sequence[int], cube: Sequence[int]) -> None:
    """Raise a fix-it error unless every video dimension is a multiple of the cube side."""
    thw, cube = _check(thw, cube)
    bad = [f"{n}={a} % {c}" for n, a, c in zip("THW", thw, cube) if a % c]
    if bad:
        raise ValueError(
            f"video token grid {thw} is not a multiple of the query-group cube {cube} "
            f"({', '.join(bad)} != 0): query groups would straddle cubes. Pick a latent size "
            "or patch size that makes each dimension a multiple, or another --dsv-query-group."
        )


def _check_len(x: torch.Tensor, dim: int, n: int) -> None:
    if x.shape[dim] != n:
        raise ValueError(f"dimension {dim} of x has {x.shape[dim]} tokens, the video has {n}.")


__all__ = [
    "cube_major_permutation",
    "inverse_permutation",
    "to_cube_major",
    "from_cube_major",
    "cube_major_positions",
    "group_size_of",
    "check_divisible",
]
