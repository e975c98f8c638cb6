"""A video diffusion transformer (DiT) on megatron-core, with DSV self-attention.

Latent video ``[B, C, T, H, W]`` -> patches (default 1x2x2) -> tokens in cube-major order (one
permutation after the patch embedding, one inverse before the output head, so query groups are
contiguous for the whole depth) -> ``num_layers`` DiT layers -> final adaLN + linear -> unpatchify.

A DiT layer is Megatron's ``SelfAttention`` (from the DSV spec: QKV column-parallel, DSV core
attention, row-parallel projection, q/k RMSNorm) and ``MLP`` with adaLN-zero modulation from the
conditioning vector (timestep + class or pooled text embedding): ``x + g1 * attn(mod(norm(x)))``,
``x + g2 * mlp(mod(norm(x)))``, the modulation linear initialised to zero so every layer starts as
the identity. 3D RoPE on q/k follows the permuted tokens. Tensor parallelism works through the
Megatron linears; the adaLN linears are replicated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import build_module

from megatron_dsv.models.rope3d import rope_3d_freqs
from megatron_dsv.ops.layout import check_divisible, cube_major_permutation, inverse_permutation
from megatron_dsv.specs import get_dsv_gpt_layer_spec


@dataclass(frozen=True)
class DiTShape:
    """A named model size: layers, hidden size, heads (head dim = hidden / heads)."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    ffn_hidden_size: int


DIT_CONFIGS: Dict[str, DiTShape] = {
    # the paper's models (DSV, arXiv 2502.07590, Sec. 6): 0.8B (head dim 96) and 2.7B (head dim 128)
    "dsv-0.8b": DiTShape(28, 1152, 12, 4608),
    "dsv-2.7b": DiTShape(32, 2048, 16, 8192),
    # small ones for the pretraining example and tests
    "small": DiTShape(8, 512, 8, 2048),
    "tiny": DiTShape(2, 128, 4, 512),
}


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """``x [s, b, h]``, ``shift/scale [b, h]``."""
    return x * (1 + scale.unsqueeze(0)) + shift.unsqueeze(0)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of ``t`` in [0, 1] (scaled by 1000), ``[B] -> [B, dim]`` fp32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = (t.float() * 1000.0)[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return nn.functional.pad(emb, (0, dim % 2))


class DiTLayer(MegatronModule):
    """adaLN-zero DiT layer on Megatron's SelfAttention (DSV core attention) and MLP."""

    def __init__(self, config, layer_number: int, pg_collection=None):
        super().__init__(config=config)
        spec = get_dsv_gpt_layer_spec(qk_layernorm=config.qk_layernorm, normalization=config.normalization).submodules
        h = config.hidden_size
        self.norm1 = nn.LayerNorm(h, elementwise_affine=False, eps=1e-6)
        self.norm2 = nn.LayerNorm(h, elementwise_affine=False, eps=1e-6)
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])
        self.self_attention = build_module(
            spec.self_attention, config=config, layer_number=layer_number, pg_collection=pg_collection
        )
        # Megatron's layer specs give the MLP as a builder (MLP.as_mlp_submodule partial)
        self.mlp = spec.mlp(config=config, pg_collection=pg_collection, is_mtp_layer=False)
        self.adaln = nn.Linear(h, 6 * h)
        nn.init.zeros_(self.adaln.weight)
        nn.init.zeros_(self.adaln.bias)

    def forward(self, x: Tensor, c: Tensor, rotary_pos_emb: Tensor) -> Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaln(nn.functional.silu(c)).chunk(6, dim=-1)
        out, bias = self.self_attention(modulate(self.norm1(x), shift1, scale1), attention_mask=None,
                                        rotary_pos_emb=rotary_pos_emb)
        x = x + gate1.unsqueeze(0) * (out if bias is None else out + bias)
        out, bias = self.mlp(modulate(self.norm2(x), shift2, scale2))
        return x + gate2.unsqueeze(0) * (out if bias is None else out + bias)


class VideoDiT(MegatronModule):
    """Video DiT: ``forward(latents [B, C, T, H, W], t [B], labels [B] | cond [B, cond_dim])``
    predicts the flow-matching velocity ``[B, C, T, H, W]``.

    Args:
        config: a DSVTransformerConfig (hidden size, heads, layers, DSV fields).
        in_channels: latent channels C.
        patch: (pt, ph, pw) patch size in latent voxels.
        num_classes: class conditioning (one extra index, ``num_classes``, is the null class for
            classifier-free guidance); 0 to disable.
        cond_dim: size of a precomputed (e.g. pooled text) embedding added to the conditioning.
    """

    def __init__(self, config, in_channels: int = 4, patch: Sequence[int] = (1, 2, 2), num_classes: int = 0,
                 cond_dim: int = 0, pg_collection=None):
        super().__init__(config=config)
        h = config.hidden_size
        self.in_channels, self.patch = in_channels, tuple(patch)
        self.cube = tuple(config.dsv_query_group)
        self.head_dim = h // config.num_attention_heads
        pvol = self.patch[0] * self.patch[1] * self.patch[2] * in_channels
        self.patch_embed = nn.Linear(pvol, h)
        self.t_embed = nn.Sequential(nn.Linear(256, h), nn.SiLU(), nn.Linear(h, h))
        self.num_classes = num_classes
        self.class_embed = nn.Embedding(num_classes + 1, h) if num_classes else None
        self.cond_proj = nn.Linear(cond_dim, h) if cond_dim else None
        self.layers = nn.ModuleList(
            [DiTLayer(config, i + 1, pg_collection=pg_collection) for i in range(config.num_layers)]
        )
        self.final_norm = nn.LayerNorm(h, elementwise_affine=False, eps=1e-6)
        self.final_adaln = nn.Linear(h, 2 * h)
        self.out = nn.Linear(h, pvol)
        for m in (self.final_adaln, self.out):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def set_input_tensor(self, input_tensor) -> None:
        """Megatron's pipeline hook; the DiT runs as a single pipeline stage (checked by the
        example's model provider), so there is never a tensor from a previous stage."""
        if input_tensor is not None and any(t is not None for t in (input_tensor if isinstance(input_tensor, list) else [input_tensor])):
            raise NotImplementedError("VideoDiT does not support pipeline parallelism yet.")

    # -- token layout ---------------------------------------------------------------------------
    def grid(self, video_shape: Sequence[int]) -> Tuple[int, int, int]:
        t, hh, ww = video_shape
        pt, ph, pw = self.patch
        if t % pt or hh % ph or ww % pw:
            raise ValueError(f"latent (T, H, W) = {tuple(video_shape)} is not a multiple of the patch {self.patch}.")
        g = (t // pt, hh // ph, ww // pw)
        check_divisible(g, self.cube)
        return g

    def patchify(self, x: Tensor) -> Tensor:
        """``[B, C, T, H, W] -> [B, N, C*pt*ph*pw]`` in raster (t, h, w) patch order."""
        b, c, t, h, w = x.shape
        pt, ph, pw = self.patch
        x = x.reshape(b, c, t // pt, pt, h // ph, ph, w // pw, pw)
        return x.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(b, (t // pt) * (h // ph) * (w // pw), -1)

    def unpatchify(self, x: Tensor, video_shape: Sequence[int]) -> Tensor:
        t, h, w = video_shape
        pt, ph, pw = self.patch
        b = x.shape[0]
        x = x.reshape(b, t // pt, h // ph, w // pw, self.in_channels, pt, ph, pw)
        return x.permute(0, 4, 1, 5, 2, 6, 3, 7).reshape(b, self.in_channels, t, h, w)

    # -- forward --------------------------------------------------------------------------------
    def conditioning(self, t: Tensor, labels: Optional[Tensor] = None, cond: Optional[Tensor] = None) -> Tensor:
        c = self.t_embed(timestep_embedding(t, 256).to(self.patch_embed.weight.dtype))
        if self.class_embed is not None:
            if labels is None:
                labels = torch.full((t.shape[0],), self.num_classes, device=t.device, dtype=torch.long)
            c = c + self.class_embed(labels)
        if self.cond_proj is not None and cond is not None:
            c = c + self.cond_proj(cond.to(c.dtype))
        return c

    def forward(self, latents: Tensor, t: Tensor, labels: Optional[Tensor] = None, cond: Optional[Tensor] = None) -> Tensor:
        b, c, tt, hh, ww = latents.shape
        if c != self.in_channels:
            raise ValueError(f"model expects {self.in_channels} latent channels, got {c}.")
        grid = self.grid((tt, hh, ww))
        perm = cube_major_permutation(grid, self.cube, latents.device)
        tokens = self.patch_embed(self.patchify(latents).to(self.patch_embed.weight.dtype))[:, perm]
        x = tokens.transpose(0, 1).contiguous()  # [S, B, h], cube-major
        cvec = self.conditioning(t, labels, cond)
        rope = rope_3d_freqs(grid, self.cube, self.head_dim, device=latents.device)
        for layer in self.layers:
            x = layer(x, cvec, rope)
        shift, scale = self.final_adaln(nn.functional.silu(cvec)).chunk(2, dim=-1)
        x = self.out(modulate(self.final_norm(x), shift, scale))  # [S, B, pvol]
        x = x.transpose(0, 1)[:, inverse_permutation(perm)]
        return self.unpatchify(x, (tt, hh, ww))


def flow_matching_loss(model: VideoDiT, latents: Tensor, labels: Optional[Tensor] = None, generator=None,
                       t: Optional[Tensor] = None, noise: Optional[Tensor] = None) -> Tensor:
    """Rectified flow: ``x_t = (1 - t) noise + t x``, target velocity ``x - noise``, MSE.

    ``t`` is drawn logit-normal (as SD3) unless given. Under context parallelism pass the same
    ``t`` on every CP rank (draw it from a generator seeded identically across CP ranks) and
    noise seeded per data-parallel rank.
    """
    b = latents.shape[0]
    if t is None:
        t = torch.sigmoid(torch.randn(b, generator=generator, device=latents.device))
    if noise is None:
        noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    tb = t.view(b, 1, 1, 1, 1).to(latents.dtype)
    x_t = (1 - tb) * noise + tb * latents
    v = model(x_t, t, labels)
    return nn.functional.mse_loss(v.float(), (latents - noise).float())


@torch.no_grad()
def sample(model: VideoDiT, shape: Sequence[int], labels: Optional[Tensor] = None, steps: int = 50,
           guidance: float = 1.0, generator=None, device=None) -> Tensor:
    """Euler integration of the learned velocity from noise (t=0) to data (t=1).

    The model's DSV layers keep their learned sparse/dense decisions, so generation uses the
    learned sparse attention. ``guidance > 1`` applies classifier-free guidance with the null class.
    """
    x = torch.randn(tuple(shape), generator=generator, device=device)
    ts = torch.linspace(0, 1, steps + 1, device=device)
    for i in range(steps):
        t = ts[i].expand(x.shape[0])
        v = model(x, t, labels)
        if guidance != 1.0 and labels is not None:
            v_null = model(x, t, torch.full_like(labels, model.num_classes))
            v = v_null + guidance * (v - v_null)
        x = x + (ts[i + 1] - ts[i]) * v.float()
    return x
