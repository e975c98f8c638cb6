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

Context parallelism (CP group of N ranks from ``pg_collection.cp``): every CP rank receives the same
full latent, embeds only its contiguous run of cube-major tokens (rank r: tokens
``r*S/N .. (r+1)*S/N``, whole query-group cubes; never Megatron's zigzag split) with the RoPE angles
sliced the same way, and the DSV attention layers exchange heads/keys inside. The training loss is
taken on the rank's own tokens (``forward(..., local_tokens=True)``, :func:`flow_matching_loss`);
``forward()`` without it all-gathers the output so every rank holds the whole video (sampling).
The timestep, the noise and the conditioning must be identical on the CP ranks of one sample (draw
them from generators seeded per data-parallel rank, not per CP rank).

Chunk-causal attention (autoregressive video, issue 19): with the config's ``dsv_causal_chunk = f``
(``--dsv-causal-chunk``, in frames of the patch grid) every self-attention layer attends fully
inside a chunk of ``f`` patch-grid frames and causally to earlier chunks. Time is the slowest axis
of cube-major order and ``f`` is a multiple of the query group's ``t``, so a chunk is a contiguous
token range ``f * H/ph * W/pw`` tokens long; the forward tells each DSV self-attention layer the
tokens per frame of its input. Cross-attention to text stays unmasked. Under CP the rank's run of
whole cubes keeps the mask over the whole sequence; a sequence-parallel split needs shards that hold
whole chunks or lie inside one, which the DSV layers check at the first forward
(:meth:`~megatron_dsv.ops.mask.CausalMask.check_shards`; a head-parallel split has no such limit).
"""

from __future__ import annotations

import copy
import functools
import math
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import build_module

from megatron_dsv.models.rope3d import rope_3d_freqs
from megatron_dsv.ops.layout import check_divisible, cube_major_permutation, group_size_of, inverse_permutation
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


def _per_chunk(x: Tensor, n: int) -> Tensor:
    """``x [s, b, h]`` as ``[n, s/n, b, h]``: n equal runs of consecutive tokens (causal chunks)."""
    if x.shape[0] % n:
        raise ValueError(f"{x.shape[0]} tokens do not split into {n} equal chunks.")
    return x.reshape(n, x.shape[0] // n, *x.shape[1:])


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """``x [s, b, h]``; ``shift/scale [b, h]`` (one per sample) or ``[n, b, h]`` (one per chunk of
    ``s/n`` consecutive tokens: per-chunk timesteps)."""
    if shift.dim() == 2:
        return x * (1 + scale.unsqueeze(0)) + shift.unsqueeze(0)
    return (_per_chunk(x, shift.shape[0]) * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)).flatten(0, 1)


def gate(g: Tensor, y: Tensor) -> Tensor:
    """``g * y`` for ``y [s, b, h]`` and a gate ``[b, h]`` or ``[n, b, h]`` (as :func:`modulate`)."""
    if g.dim() == 2:
        return g.unsqueeze(0) * y
    return (g.unsqueeze(1) * _per_chunk(y, g.shape[0])).flatten(0, 1)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of ``t`` in [0, 1] (scaled by 1000), ``[B] -> [B, dim]`` fp32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = (t.float() * 1000.0)[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return nn.functional.pad(emb, (0, dim % 2))


class _GatherTokens(torch.autograd.Function):
    """All-gather token shards ``[s, ...]`` over a CP group along dim 0 -> ``[N*s, ...]``.

    Backward is the adjoint, a reduce-scatter: the rank's slice of the gradient *summed* over
    the group. Under Megatron's convention (gradients averaged over the data x context-parallel
    group) that is what makes a loss that every rank computes on the gathered output exact: each
    rank injects ``dL/dy_r`` from all N copies, N * dL/dy_r in total, and the average over the N
    ranks gives dL/dtheta (taking only the local slice would give dL/dtheta / N).
    """

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        n = dist.get_world_size(group)
        out = x.new_empty((n * x.shape[0],) + tuple(x.shape[1:]))
        dist.all_gather_into_tensor(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        group = ctx.group
        n, rank = dist.get_world_size(group), dist.get_rank(group)
        s = grad.shape[0] // n
        if dist.get_backend(group) == "gloo":  # gloo has no reduce_scatter
            full = grad.contiguous().clone()
            dist.all_reduce(full, group=group)
            return full[rank * s : (rank + 1) * s].contiguous(), None
        out = grad.new_empty((s,) + tuple(grad.shape[1:]))
        dist.reduce_scatter_tensor(out, grad.contiguous(), group=group)
        return out, None


class DiTLayer(MegatronModule):
    """adaLN-zero DiT layer on Megatron's SelfAttention (DSV core attention) and MLP, with an
    optional cross-attention to text tokens between them (PixArt-style, ungated, dense and
    never context-parallel: each CP rank's query shard attends to the whole text)."""

    def __init__(self, config, layer_number: int, pg_collection=None, cross_attention: bool = False):
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
        self.cross_attention = None
        if cross_attention:
            self.norm_cross = nn.LayerNorm(h, elementwise_affine=True, eps=1e-6)
            self.cross_attention = _build_cross_attention(config, layer_number, pg_collection)

    def forward(self, x: Tensor, c: Tensor, rotary_pos_emb: Tensor, context: Optional[Tensor] = None,
                context_mask: Optional[Tensor] = None) -> Tensor:
        """``x [s, b, h]``, ``c [b, h]`` (or ``[n, b, h]``: one per chunk of ``s/n`` tokens, per-chunk
        timesteps); ``context [L, b, h]`` text tokens and ``context_mask``
        ``[b, 1, 1, L]`` (True = padding, Megatron's convention) for the cross-attention."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaln(nn.functional.silu(c)).chunk(6, dim=-1)
        out, bias = self.self_attention(modulate(self.norm1(x), shift1, scale1), attention_mask=None,
                                        rotary_pos_emb=rotary_pos_emb)
        x = x + gate(gate1, out if bias is None else out + bias)
        if self.cross_attention is not None:
            if context is None:
                raise ValueError("this DiT layer has cross-attention: pass the text context.")
            out, bias = self.cross_attention(self.norm_cross(x), attention_mask=context_mask, key_value_states=context)
            x = x + (out if bias is None else out + bias)
        out, bias = self.mlp(modulate(self.norm2(x), shift2, scale2))
        return x + gate(gate2, out if bias is None else out + bias)


def _build_cross_attention(config, layer_number: int, pg_collection):
    """Megatron's CrossAttention with DSV core attention (dense for cross-attention, padding mask),
    its output projection zeroed so the layer starts as the identity (as adaLN-zero does)."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.attention import CrossAttention, CrossAttentionSubmodules
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_dsv.layers.attention import DSVCoreAttention

    if config.num_query_groups != config.num_attention_heads:
        # Megatron's CrossAttention has no grouped-query attention; the text keys are few anyway
        config = copy.copy(config)
        config.num_query_groups = config.num_attention_heads
    attn = CrossAttention(
        config,
        CrossAttentionSubmodules(
            linear_q=ColumnParallelLinear, linear_kv=ColumnParallelLinear,
            core_attention=DSVCoreAttention, linear_proj=RowParallelLinear,
        ),
        layer_number=layer_number, attn_mask_type=AttnMaskType.padding, pg_collection=pg_collection,
    )
    with torch.no_grad():
        attn.linear_proj.weight.zero_()
        if getattr(attn.linear_proj, "bias", None) is not None:
            attn.linear_proj.bias.zero_()
    return attn


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
        text_dim: size of precomputed text-encoder token embeddings ``[B, L, text_dim]``; > 0 adds a
            cross-attention to them in every layer (dense; under context parallelism each rank's
            query shard attends to the whole text, no communication). A learned null text (one
            token) stands in when ``text`` is None (classifier-free guidance).
        pg_collection: Megatron's process groups (``tp``, ``cp``); None = Megatron's
            ``parallel_state``. A CP group of size N > 1 makes each rank compute its own contiguous
            1/N of the tokens (see the module docstring).

    Chunk-causal self-attention comes from ``config.dsv_causal_chunk`` (frames of the patch grid,
    0 = bidirectional), the one setting the DSV layers read too; :attr:`chunk_causal` reports it.
    The latent's frame count after patching must be a multiple of it; under a sequence-parallel
    CP split each rank's shard must hold whole chunks or lie inside one.
    """

    def __init__(self, config, in_channels: int = 4, patch: Sequence[int] = (1, 2, 2), num_classes: int = 0,
                 cond_dim: int = 0, text_dim: int = 0, pg_collection=None):
        super().__init__(config=config)
        h = config.hidden_size
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])
        self.cp_group = getattr(pg_collection, "cp", None)
        self.in_channels, self.patch = in_channels, tuple(patch)
        self.cube = tuple(config.dsv_query_group)
        self.head_dim = h // config.num_attention_heads
        pvol = self.patch[0] * self.patch[1] * self.patch[2] * in_channels
        self.patch_embed = nn.Linear(pvol, h)
        self.t_embed = nn.Sequential(nn.Linear(256, h), nn.SiLU(), nn.Linear(h, h))
        self.num_classes = num_classes
        self.class_embed = nn.Embedding(num_classes + 1, h) if num_classes else None
        self.cond_proj = nn.Linear(cond_dim, h) if cond_dim else None
        self.text_dim = text_dim
        if text_dim:
            # caption projection (PixArt): text-encoder tokens -> the model width
            self.text_proj = nn.Sequential(nn.Linear(text_dim, h), nn.GELU(approximate="tanh"), nn.Linear(h, h))
            self.null_text = nn.Parameter(torch.randn(1, 1, h) / math.sqrt(h))
        self.layers = nn.ModuleList(
            [DiTLayer(config, i + 1, pg_collection=pg_collection, cross_attention=bool(text_dim))
             for i in range(config.num_layers)]
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

    @property
    def chunk_causal(self) -> int:
        """Frames (of the patch grid) per causal chunk, from ``config.dsv_causal_chunk``; 0 = off."""
        return int(getattr(self.config, "dsv_causal_chunk", 0))

    def set_causal_grid(self, grid: Sequence[int]) -> None:
        """Tell every DSV self-attention layer the tokens per frame (H * W of the patch ``grid``),
        which its chunk of ``dsv_causal_chunk`` frames is counted in; a no-op when bidirectional.
        Raises unless the chunk divides the grid's frame count."""
        chunk = self.chunk_causal
        if not chunk:
            return
        if grid[0] % chunk:
            raise ValueError(
                f"the latent has {grid[0]} frames after patching (patch t = {self.patch[0]}), not a multiple "
                f"of the causal chunk of {chunk} frames (dsv_causal_chunk): choose a latent frame count that "
                f"is a multiple of {chunk * self.patch[0]}, or a --dsv-causal-chunk that divides {grid[0]}."
            )
        from megatron_dsv.layers.attention import dsv_attention_layers

        for layer in self.layers:
            for attn in dsv_attention_layers(layer.self_attention):
                attn.set_frame_tokens(grid[1] * grid[2])

    @property
    def cp_size(self) -> int:
        return 1 if self.cp_group is None else self.cp_group.size()

    def token_range(self, grid: Sequence[int]) -> Tuple[int, int]:
        """This CP rank's run ``[lo, hi)`` of the cube-major tokens of a ``(T, H, W)`` patch grid.

        The S tokens split into N equal contiguous runs of whole query-group cubes (and whole
        ``--dsv-kv-block`` key blocks); anything else raises with the shapes and CP sizes that fit.
        """
        s, n = grid[0] * grid[1] * grid[2], self.cp_size
        if n == 1:
            return 0, s
        g, kvb = group_size_of(self.cube), int(getattr(self.config, "dsv_kv_block", 1))
        unit = math.lcm(g, kvb)
        if s % (n * unit):
            fits = [d for d in range(2, min(s // unit, 1024) + 1) if (s // unit) % d == 0][:8]
            what = f"{g}-token query-group cubes {self.cube}" + (f" and {kvb}-token key blocks" if unit != g else "")
            raise ValueError(
                f"context parallelism over {n} ranks needs an equal run of whole {what} on every "
                f"rank, but the latent's patch grid (T, H, W) = {tuple(grid)} (patch {self.patch}) has "
                f"{s} tokens = {s // unit} units of {unit} tokens, not a multiple of {n}. Choose a "
                f"latent shape whose token count is a multiple of {n * unit} (CP size x {unit}), e.g. "
                f"more latent frames, or a --context-parallel-size that divides {s // unit} "
                f"({fits or 'only 1'})."
            )
        return self.cp_group.rank() * (s // n), (self.cp_group.rank() + 1) * (s // n)

    def local_token_ids(self, video_shape: Sequence[int], device=None) -> Tensor:
        """Raster patch indices ``[S/N]`` of this CP rank's tokens, in the model's cube-major order."""
        grid = self.grid(video_shape)
        lo, hi = self.token_range(grid)
        return cube_major_permutation(grid, self.cube, device)[lo:hi]

    def shard_tokens(self, video: Tensor) -> Tensor:
        """``[B, C, T, H, W] -> [B, S/N, C*pt*ph*pw]``: the patches of this CP rank's tokens in the
        order of ``forward(..., local_tokens=True)`` (e.g. the flow-matching target)."""
        return self.patchify(video)[:, self.local_token_ids(video.shape[-3:], video.device)]

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

    def num_chunks(self, video_shape: Sequence[int]) -> int:
        """Causal chunks of a latent ``(T, H, W)`` (1 for a bidirectional model)."""
        grid = self.grid(video_shape)
        return grid[0] // self.chunk_causal if self.chunk_causal else 1

    def local_chunk_ids(self, video_shape: Sequence[int], device=None) -> Tensor:
        """Causal chunk (long ``[S/N]``) of each of this CP rank's tokens, in the order of
        :meth:`shard_tokens`: chunk ``j`` is the ``j``-th run of ``S/n`` cube-major tokens (all 0
        for a bidirectional model). A rank's run may hold parts of two chunks (e.g. 1.5 chunks)."""
        grid = self.grid(video_shape)
        lo, hi = self.token_range(grid)
        s = grid[0] * grid[1] * grid[2]
        return torch.arange(lo, hi, device=device) // (s // self.num_chunks(video_shape))

    def _local_chunk_conditioning(self, cvec: Tensor, grid: Sequence[int], lo: int, hi: int) -> Tensor:
        """Per-chunk conditioning ``[n, B, h]`` of the whole video -> ``[m, B, h]`` over ``m`` equal
        runs of this rank's tokens ``[lo, hi)``, the form :func:`modulate` and :func:`gate` take.
        Without CP, or a shard of whole chunks, the runs are the chunks; a shard that chunk
        boundaries cut unequally (1.5 chunks: pieces of 2L/3 and L/3 tokens) takes runs of the gcd
        of its pieces, each with its chunk's row. Pieces are whole query-group cubes (chunk and
        shard boundaries both are), so m <= shard / G rows: the adaLN linears then run on at most
        1/G as many rows as the layer's own linears."""
        n, s = cvec.shape[0], grid[0] * grid[1] * grid[2]
        if n == 1 or (lo, hi) == (0, s):
            return cvec
        size = s // n
        chunks = range(lo // size, (hi - 1) // size + 1)
        pieces = [min(hi, (j + 1) * size) - max(lo, j * size) for j in chunks]
        run = functools.reduce(math.gcd, pieces)
        rows = [j for j, piece in zip(chunks, pieces) for _ in range(piece // run)]
        return cvec.index_select(0, torch.tensor(rows, device=cvec.device))

    def _check_chunk_times(self, t: Tensor, grid: Sequence[int], batch: int) -> None:
        if not self.chunk_causal:
            raise ValueError(
                f"per-chunk times t {tuple(t.shape)} need a chunk-causal model (dsv_causal_chunk > 0); "
                "pass t [B] to a bidirectional VideoDiT."
            )
        n = grid[0] // self.chunk_causal
        if tuple(t.shape) != (batch, n):
            raise ValueError(
                f"per-chunk times must be [B={batch}, chunks={n}] ({grid[0]} patch-grid frames in chunks of "
                f"{self.chunk_causal}); got {tuple(t.shape)}."
            )

    # -- forward --------------------------------------------------------------------------------
    def conditioning(self, t: Tensor, labels: Optional[Tensor] = None, cond: Optional[Tensor] = None) -> Tensor:
        """``[B, h]`` for ``t [B]``, or ``[n, B, h]`` for per-chunk times ``t [B, n]``."""
        c = self.t_embed(timestep_embedding(t.flatten(), 256).to(self.patch_embed.weight.dtype))
        if t.dim() == 2:
            c = c.view(t.shape[0], t.shape[1], -1).transpose(0, 1)  # [n, B, h]; labels broadcast
        if self.class_embed is not None:
            if labels is None:
                labels = torch.full((t.shape[0],), self.num_classes, device=t.device, dtype=torch.long)
            c = c + self.class_embed(labels)
        if self.cond_proj is not None and cond is not None:
            c = c + self.cond_proj(cond.to(c.dtype))
        return c

    def text_context(self, text: Optional[Tensor], text_mask: Optional[Tensor], batch: int):
        """``text [B, L, text_dim]`` and ``text_mask [B, L]`` (True = real token) -> context
        ``[L, B, h]`` and Megatron's padding mask ``[B, 1, 1, L]`` (True = ignore); the learned
        null text when ``text`` is None."""
        if not self.text_dim:
            if text is not None:
                raise ValueError("this VideoDiT has no cross-attention (text_dim=0); build it with text_dim.")
            return None, None
        if text is None:
            return self.null_text.expand(1, batch, -1).to(self.patch_embed.weight.dtype), None
        if text.dim() != 3 or text.shape[0] != batch or text.shape[2] != self.text_dim:
            raise ValueError(f"text must be [B={batch}, L, {self.text_dim}], got {tuple(text.shape)}.")
        context = self.text_proj(text.to(self.patch_embed.weight.dtype)).transpose(0, 1).contiguous()
        if text_mask is None:
            return context, None
        if tuple(text_mask.shape) != tuple(text.shape[:2]) or not bool(text_mask.any(-1).all()):
            raise ValueError("text_mask must be bool [B, L] with at least one real token per sample.")
        return context, ~text_mask.bool()[:, None, None, :]

    def forward(self, latents: Tensor, t: Tensor, labels: Optional[Tensor] = None, cond: Optional[Tensor] = None,
                local_tokens: bool = False, text: Optional[Tensor] = None, text_mask: Optional[Tensor] = None) -> Tensor:
        """Velocity ``[B, C, T, H, W]`` for noisy latents ``[B, C, T, H, W]`` at times ``t [B]``.

        A chunk-causal model also takes per-chunk times ``t [B, n]`` (``n`` = the latent's chunks
        of ``dsv_causal_chunk`` patch-grid frames): chunk ``j``'s tokens are modulated by the
        embedding of ``t[:, j]`` (autoregressive generation feeds earlier chunks clean, ``t = 1``,
        with the chunk being sampled at its own ``t``; :func:`sample_autoregressive`). Under CP
        each rank modulates its own tokens by their chunks' times, also when its run of tokens
        holds parts of two chunks.

        ``text [B, L, text_dim]`` / ``text_mask [B, L]`` (True = real token): text-encoder tokens
        for the cross-attention (models built with ``text_dim``).

        ``local_tokens=True`` returns this CP rank's tokens only, ``[B, S/N, C*pt*ph*pw]`` in the
        order of :meth:`shard_tokens` (no gather: what a training loss should use). Otherwise, under
        context parallelism, the output tokens are all-gathered over the CP group so every rank
        returns the whole video (the gather's backward is a reduce-scatter; see ``_GatherTokens``).
        All CP ranks must pass the same ``latents``, ``t``, ``labels`` and ``cond``.
        """
        b, c, tt, hh, ww = latents.shape
        if c != self.in_channels:
            raise ValueError(f"model expects {self.in_channels} latent channels, got {c}.")
        grid = self.grid((tt, hh, ww))
        self.set_causal_grid(grid)
        if t.dim() == 2:
            self._check_chunk_times(t, grid, b)
        lo, hi = self.token_range(grid)
        perm = cube_major_permutation(grid, self.cube, latents.device)
        # embed only this rank's tokens (all of them without CP), already in cube-major order
        patches = self.patchify(latents)[:, perm[lo:hi]]
        x = self.patch_embed(patches.to(self.patch_embed.weight.dtype)).transpose(0, 1).contiguous()  # [s, B, h]
        cvec = self.conditioning(t, labels, cond)
        if t.dim() == 2:
            cvec = self._local_chunk_conditioning(cvec, grid, lo, hi)
        # The angles of this rank's tokens. Megatron's SelfAttention applies rotary_pos_emb as given
        # on the [s, b, h, d] path (its CP zigzag slicing is in RotaryEmbedding/THD only, unused here).
        rope = rope_3d_freqs(grid, self.cube, self.head_dim, device=latents.device)[lo:hi]
        context, context_mask = self.text_context(text, text_mask, b)
        for layer in self.layers:
            x = layer(x, cvec, rope, context, context_mask)
        shift, scale = self.final_adaln(nn.functional.silu(cvec)).chunk(2, dim=-1)
        x = self.out(modulate(self.final_norm(x), shift, scale))  # [s, B, pvol]
        if local_tokens:
            return x.transpose(0, 1)
        if self.cp_size > 1:
            x = _GatherTokens.apply(x, self.cp_group)
        x = x.transpose(0, 1)[:, inverse_permutation(perm)]
        return self.unpatchify(x, (tt, hh, ww))


def flow_interpolate(latents: Tensor, t: Tensor, noise: Tensor) -> Tuple[Tensor, Tensor]:
    """Rectified flow: ``x_t = (1 - t) noise + t x`` and the target velocity ``x - noise``.

    ``t [B]``, or ``[B, n]``: one time per chunk of ``T / n`` consecutive latent frames."""
    if t.dim() == 2:
        frames = latents.shape[2]
        if frames % t.shape[1]:
            raise ValueError(f"{frames} latent frames do not split into {t.shape[1]} equal chunks.")
        tb = t.repeat_interleave(frames // t.shape[1], dim=1).view(latents.shape[0], 1, frames, 1, 1)
    else:
        tb = t.view(latents.shape[0], 1, 1, 1, 1)
    tb = tb.to(latents.dtype)
    return (1 - tb) * noise + tb * latents, latents - noise


def draw_chunk_times(batch: int, chunks: int, generator=None, device=None) -> Tensor:
    """Per-chunk training times ``[B, n]`` for a chunk-causal model: a clean prefix of ``c`` chunks
    (``t = 1``, ``c`` uniform in ``[0, n)`` per sample), the other chunks at independent
    logit-normal times (diffusion forcing).

    The clean prefix is the condition autoregressive sampling runs in (earlier chunks generated
    and clean, the current one noisy; :func:`sample_autoregressive`): with logit-normal times alone
    a context chunk is almost never near clean (``t > 0.95`` for 0.2% of draws)."""
    if batch < 1 or chunks < 1:
        raise ValueError(f"batch ({batch}) and chunks ({chunks}) must be >= 1.")
    t = torch.sigmoid(torch.randn(batch, chunks, generator=generator, device=device))
    clean = torch.randint(0, chunks, (batch, 1), generator=generator, device=device)
    return torch.where(torch.arange(chunks, device=device).view(1, -1) < clean, torch.ones_like(t), t)


def flow_matching_loss(model: VideoDiT, latents: Tensor, labels: Optional[Tensor] = None, generator=None,
                       t: Optional[Tensor] = None, noise: Optional[Tensor] = None, text: Optional[Tensor] = None,
                       text_mask: Optional[Tensor] = None, per_chunk_t: bool = False) -> Tensor:
    """Rectified-flow matching: MSE between the predicted and the target velocity ``x - noise``
    at ``x_t = (1 - t) noise + t x``.

    ``t`` is drawn logit-normal (as SD3) and ``noise`` standard normal from ``generator`` unless
    given. Under context parallelism (N ranks) the loss is the MSE over this rank's tokens only
    (output and target both as :meth:`VideoDiT.shard_tokens`; nothing is gathered). The shards are
    equal, so the mean over the CP ranks of these losses is the single-process loss, and so are
    their gradients averaged over the CP group (Megatron's data x context-parallel averaging).
    Every CP rank must therefore see the same ``latents``, ``labels``, ``t`` and ``noise``: pass
    them, or a generator seeded identically on the CP ranks of a data-parallel rank (and
    differently across data-parallel ranks).

    Chunk-causal models: by default one ``t`` per video, so every chunk is equally noisy and a
    chunk's context is never cleaner than the chunk itself. That trains :func:`sample` (all chunks
    denoised together) but not :func:`sample_autoregressive`, which conditions each chunk on clean
    earlier chunks (``t = 1``) while the chunk itself is noisy: a train/sample mismatch.
    ``per_chunk_t=True`` draws ``t [B, n]`` per chunk (:func:`draw_chunk_times`: a clean prefix,
    then independent times), or takes a given ``t [B, n]``; chunks at ``t = 1`` are context, input
    only: the loss is the MSE over the other chunks' tokens (a clean input carries no noise to
    predict a velocity from). Under CP a rank's tokens may hold more, fewer or no noisy tokens than
    another's; its loss is its noisy tokens' squared-error sum over the whole video's noisy-token
    count, times N, so the mean over the CP ranks is still the single-process loss.
    """
    b = latents.shape[0]
    chunks = model.num_chunks(latents.shape[-3:]) if per_chunk_t else 1
    if per_chunk_t and not model.chunk_causal:
        raise ValueError("per_chunk_t needs a chunk-causal VideoDiT (dsv_causal_chunk > 0).")
    if t is None:
        t = (draw_chunk_times(b, chunks, generator, latents.device) if per_chunk_t
             else torch.sigmoid(torch.randn(b, generator=generator, device=latents.device)))
    if tuple(t.shape) != ((b, chunks) if per_chunk_t else (b,)):
        raise ValueError(f"t must be [{b}, {chunks}] with per_chunk_t, else [{b}]; got {tuple(t.shape)}.")
    if noise is None:
        noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    x_t, velocity = flow_interpolate(latents, t, noise)
    v = model(x_t, t, labels, local_tokens=True, text=text, text_mask=text_mask)  # [B, S/N, pvol]
    err = (v.float() - model.shard_tokens(velocity).float()).pow(2)
    if not per_chunk_t:
        return err.mean()
    scored = t < 1  # [B, n]
    if not bool(scored.any()):
        raise ValueError("every chunk is at t = 1 (clean context): the loss has no noisy chunk to score.")
    noisy = scored[:, model.local_chunk_ids(latents.shape[-3:], latents.device)].to(err.dtype)  # [B, S/N]
    # The mean over the whole video's noisy tokens, as this rank's share: its sum over the global
    # noisy-token count (known on every rank: t is), times N, so the mean over the CP ranks is the
    # single-process loss also when the ranks hold unequal numbers of noisy tokens (or none).
    noisy_tokens = scored.sum() * (err.shape[1] * model.cp_size // chunks)
    return (err.mean(-1) * noisy).sum() * model.cp_size / noisy_tokens


def _velocity(model, x, t, labels, guidance, text, text_mask) -> Tensor:
    v = model(x, t, labels, text=text, text_mask=text_mask)
    if guidance != 1.0 and (labels is not None or text is not None):
        null = None if labels is None else torch.full_like(labels, model.num_classes)
        v_null = model(x, t, null)  # null class and null text
        v = v_null + guidance * (v - v_null)
    return v


@torch.no_grad()
def sample(model: VideoDiT, shape: Sequence[int], labels: Optional[Tensor] = None, steps: int = 50,
           guidance: float = 1.0, generator=None, device=None, text: Optional[Tensor] = None,
           text_mask: Optional[Tensor] = None, noise: Optional[Tensor] = None) -> Tensor:
    """Euler integration of the learned velocity from noise (t=0) to data (t=1).

    The model's DSV layers keep their learned sparse/dense decisions, so generation uses the
    learned sparse attention. ``guidance > 1`` applies classifier-free guidance with the null class
    (and the null text for models with cross-attention). ``noise``: the starting noise ``shape``
    (default drawn from ``generator``).
    Under context parallelism every CP rank must pass the same ``labels`` and an identically
    seeded ``generator`` (the same starting noise); each rank then holds the whole video.
    A chunk-causal model is sampled with all its chunks at one ``t`` (what the default one-``t``-
    per-video training teaches); :func:`sample_autoregressive` generates it chunk by chunk.
    """
    x = _start_noise(shape, generator, device, noise)
    ts = torch.linspace(0, 1, steps + 1, device=x.device)
    for i in range(steps):
        v = _velocity(model, x, ts[i].expand(x.shape[0]), labels, guidance, text, text_mask)
        x = x + (ts[i + 1] - ts[i]) * v.float()
    return x


def _start_noise(shape, generator, device, noise: Optional[Tensor]) -> Tensor:
    if noise is None:
        return torch.randn(tuple(shape), generator=generator, device=device)
    if tuple(noise.shape) != tuple(shape):
        raise ValueError(f"noise must have the sample's shape {tuple(shape)}, got {tuple(noise.shape)}.")
    return noise.to(device=device if device is not None else noise.device, dtype=torch.float32).clone()


@torch.no_grad()
def sample_autoregressive(model: VideoDiT, shape: Sequence[int], labels: Optional[Tensor] = None, steps: int = 50,
                          guidance: float = 1.0, generator=None, device=None, text: Optional[Tensor] = None,
                          text_mask: Optional[Tensor] = None, noise: Optional[Tensor] = None) -> Tensor:
    """Chunk-by-chunk generation with a chunk-causal model: chunk ``c`` is integrated from its own
    noise (t = 0) to data (t = 1) with ``steps`` Euler steps, conditioned on the chunks ``0..c-1``
    already generated, which enter clean (``t = 1`` in this file's convention, data at t = 1) through
    per-chunk times ``[1, ..., 1, t]``. Earlier chunks are never changed; later chunks are not
    fed (the mask keeps them from chunk ``c`` anyway).

    The starting noise of the whole video is drawn at once (``noise`` or ``generator``), so with
    one chunk (``dsv_causal_chunk`` = all frames) this is :func:`sample` for the same noise.
    Train the model for it with ``flow_matching_loss(..., per_chunk_t=True)``: one ``t`` per video
    never shows a noisy chunk next to clean context.

    Cost: no KV cache. Every step recomputes the whole prefix, chunks ``0..c``, so ``n`` chunks cost
    ``steps * n (n + 1) / 2`` chunk-forwards instead of ``steps * n`` for :func:`sample` ((n + 1)/2
    times the tokens; attention, quadratic in the prefix, more). The clean context's keys and
    values do not change within a chunk's steps, so a cache computed once per chunk would make
    each step cost one chunk's queries; that is a later optimisation.

    DSV sparse layers select per query group among the key units the mask allows, which are the
    same in the prefix as in the whole video, so a learned K per head (``LayerState.kv_units``)
    gives the prefix the whole video's selection; a K from ``dsv_fixed_sparsity`` is a fraction of
    the prefix's units instead.
    """
    if not model.chunk_causal:
        raise ValueError("sample_autoregressive needs a chunk-causal VideoDiT (dsv_causal_chunk > 0); use sample().")
    x = _start_noise(shape, generator, device, noise)
    n = model.num_chunks(tuple(shape)[-3:])
    frames = x.shape[2] // n  # latent frames per chunk
    ts = torch.linspace(0, 1, steps + 1, device=x.device)
    for c in range(n):
        lo, hi = c * frames, (c + 1) * frames
        t = torch.ones(x.shape[0], c + 1, device=x.device)
        for i in range(steps):
            t[:, c] = ts[i]
            v = _velocity(model, x[:, :, :hi], t, labels, guidance, text, text_mask)
            x[:, :, lo:hi] += (ts[i + 1] - ts[i]) * v[:, :, lo:hi].float()
    return x
