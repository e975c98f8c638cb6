"""Object-retrieval task: a small stand-in for the attention structure of video DiTs.

A T x H x W token grid holds ``objects`` objects; every cube of the grid (``cube``, by default
2x2x4, one query group of the Triton kernels) belongs to one object, drawn at random per sample, so an object's tokens are scattered over the video. Each token
carries its object's fixed code (upper half of the features), a random value (lower half) and a
sinusoidal 3D position; its target is the mean value over all tokens of its object. A layer solves
it by attending to its object's tokens wherever they are: sparse (about 1 - 1/objects) and
non-local, like a trained video DiT, and learnable in tens of CPU steps.
"""

from __future__ import annotations

import math
from typing import Sequence, Tuple

import torch

from megatron_dsv.ops.layout import check_divisible, cube_major_positions, group_size_of



class ObjectRetrievalTask:
    """Batches ``(x, y)``, each ``[S, B, hidden]`` in cube-major order (Megatron's layout)."""

    def __init__(self, thw: Sequence[int], objects: int, hidden: int, seed: int = 0, device=None,
                 cube: Sequence[int] = (2, 2, 4)):
        if hidden % 2 or hidden < 12:
            raise ValueError(f"hidden must be even and >= 12, got {hidden}.")
        self.thw, self.objects, self.hidden, self.device = tuple(thw), objects, hidden, device
        check_divisible(thw, cube)
        self.cube_tokens = group_size_of(cube)
        self.gen = torch.Generator().manual_seed(seed)
        half = hidden // 2
        self.codes = torch.nn.functional.pad(torch.randn(objects, half, generator=self.gen) * 2.0, (half, 0))
        pos = cube_major_positions(self.thw, cube).float()
        freqs = torch.arange(1, hidden // 6 + 1).float()
        ang = torch.cat([pos[:, i : i + 1] / n * freqs * math.pi for i, n in enumerate(self.thw)], -1)
        enc = torch.cat([ang.sin(), ang.cos()], -1)[:, :hidden]
        self.pos = torch.nn.functional.pad(enc, (0, hidden - enc.shape[1])) * 0.5
        self.seq_len = self.pos.shape[0]

    def batch(self, b: int) -> Tuple[torch.Tensor, torch.Tensor]:
        s, half = self.seq_len, self.hidden // 2
        c = self.cube_tokens
        cube_obj = torch.randint(0, self.objects, (b, s // c), generator=self.gen)
        obj = cube_obj.repeat_interleave(c, dim=1)  # [B, S]
        value = torch.nn.functional.pad(torch.randn(b, s, half, generator=self.gen), (0, half))
        x = self.codes[obj] + value + self.pos
        onehot = torch.nn.functional.one_hot(obj, self.objects).float()  # [B, S, O]
        mean = (onehot.transpose(1, 2) @ value) / onehot.sum(1).clamp(min=1).unsqueeze(-1)
        y = onehot @ mean
        return x.transpose(0, 1).to(self.device), y.transpose(0, 1).to(self.device)

    def state_dict(self):
        return {"gen": self.gen.get_state()}

    def load_state_dict(self, state):
        self.gen.set_state(state["gen"])
