"""Is a layer's sparse path faster than its dense path at its K? Timed in situ, once per shape and K.

A static speed table from another GPU or shape cannot know where the sparse path wins. On the
H200 (8 layers, 6 heads of 64, 16k tokens, query groups 2x4x4 = 32 tokens, key blocks 64, batch 2;
``benchmarks/results/quality_h200_20261130*``) the ``density <= 0.5`` assumption sent layers at
density 0.29 / 0.44 sparse and the stage-2 step took 119.8 ms against 100.4 ms dense; a
random-block control without predictor was as slow, so the sparse path itself lost to cuDNN dense
at that shape.

:func:`probe_layer` times, on synthetic tensors of the layer's shape, (a) the sparse path as a
layer runs it in stage 2: the predictor's low-rank projection (a
:class:`~megatron_dsv.layers.predictor.LowRankPredictor` of the layer's rank, random weights),
top-K selection with the layer's K per head (``select_topk``), the kernels ``attention_backend``
picks and ``sparse_attention`` forward + backward; and (b) the dense path forward + backward (the
layer's own, :meth:`~megatron_dsv.layers.attention.DSVCoreAttention.dense_attention`, passed in:
cuDNN-first SDPA or Transformer Engine). Each arm: ``warmup`` untimed calls then the median of
``reps`` (CUDA events on a GPU, ``perf_counter`` on a CPU; :func:`megatron_dsv.cp.autotune.measure_ms`),
then the **maximum over the given process groups** (the tensor-parallel group and the statistics
group the controller averages over), so every rank sees the same times and decides alike.

:class:`SpeedProbe` caches results per signature (the shape, the dense path's name and K per head
of all heads rounded up to the K multiple), so layers alike and a layer whose K did not change
measure once. The cache is not checkpointed: a restarted run measures again.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron_dsv.cp.autotune import max_over_ranks, measure_ms
from megatron_dsv.layers.attention import sdpa_backends
from megatron_dsv.layers.predictor import LowRankPredictor
from megatron_dsv.ops.mask import CausalMask
from megatron_dsv.ops.selection import select_topk
from megatron_dsv.ops.sparse_attention import attention_backend, sparse_attention

Timer = Callable[[str, Callable[[], None]], float]
"""``timer(arm, step) -> ms``: this rank's time of one ``step()`` (forward + backward); ``arm`` is
``"sparse"`` or ``"dense"``."""

DenseFn = Callable[[Tensor, Tensor, Tensor], Tensor]
"""The dense path: q ``[s, b, H, D]``, k/v ``[s, b, Hkv, D]`` -> ``[s, b, H*D]`` (Megatron's layout)."""

DEFAULT_MARGIN = 0.05


@dataclass(frozen=True)
class ProbeShape:
    """One layer's attention as the probe times it (heads of this tensor-parallel rank).

    Attributes:
        batch, seq_len, num_heads, num_kv_heads, head_dim: of the layer's last forward.
        dtype, device: of its activations (``device`` as a string, e.g. ``"cuda:0"``).
        group_size, kv_block: query group and key block (tokens).
        predictor_rank: the predictor's rank r.
        backend: ``--dsv-backend`` (``attention_backend`` resolves it as the layer does).
        selection_backend: what the layer's selection runs (Triton, or the reference on CPU).
        mask: the layer's causal mask, None when bidirectional.
        hidden_size: the layer input's width for ``--dsv-predictor-input hidden``, None for ``qk``.
        scale: softmax scale (default ``head_dim ** -0.5``).
    """

    batch: int
    seq_len: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: str
    group_size: int
    kv_block: int
    predictor_rank: int
    backend: str = "auto"
    selection_backend: str = "auto"
    mask: Optional[CausalMask] = None
    hidden_size: Optional[int] = None
    scale: Optional[float] = None

    @property
    def units(self) -> int:
        return self.seq_len // self.kv_block

    def describe(self) -> str:
        dt = str(self.dtype).replace("torch.", "")
        return (f"S={self.seq_len}, batch {self.batch}, {self.num_heads} heads ({self.num_kv_heads} kv) of "
                f"{self.head_dim}, {dt}, groups {self.group_size}, key blocks {self.kv_block}")


@dataclass(frozen=True)
class ProbeResult:
    """Times of one signature (the slowest rank's medians, ms) and the sparse kernels timed."""

    sparse_ms: float
    dense_ms: float
    density: float
    kernels: str

    def sparse_faster(self, margin: float = DEFAULT_MARGIN) -> bool:
        """Sparse only when it beats dense by ``margin``: ``sparse < dense x (1 - margin)``."""
        return self.sparse_ms < self.dense_ms * (1.0 - margin)

    def describe(self, margin: float = DEFAULT_MARGIN) -> str:
        """``"sparse 1.21 ms vs dense 1.05 ms at density 0.29: dense is faster"``."""
        if self.sparse_faster(margin):
            verdict = "sparse is faster"
        elif self.sparse_ms < self.dense_ms:
            verdict = f"sparse is less than {margin:.0%} faster (--dsv-speed-margin): dense"
        else:
            verdict = "dense is faster"
        return (f"sparse {self.sparse_ms:.2f} ms ({self.kernels}) vs dense {self.dense_ms:.2f} ms "
                f"at density {self.density:.2f}: {verdict}")

    def to_dict(self) -> Dict:
        return {"sparse_ms": self.sparse_ms, "dense_ms": self.dense_ms, "density": self.density,
                "kernels": self.kernels}


def sdpa_dense(shape: ProbeShape) -> DenseFn:
    """SDPA (cuDNN first on GPU, the math kernel on CPU) with ``shape``'s mask: the dense path of a
    layer without Transformer Engine, for callers without a layer."""
    scale = shape.scale if shape.scale is not None else shape.head_dim ** -0.5

    def dense(q, k, v):
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))
        mask, causal = None, False
        if shape.mask is not None and shape.mask.kind == "chunk_causal":
            mask = shape.mask.dense(q.shape[2], device=q.device)
        elif shape.mask is not None:
            causal = True
        with sdpa_backends(q):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale,
                                                 enable_gqa=k.shape[1] != q.shape[1])
        return out.permute(2, 0, 1, 3).flatten(2)

    return dense


def _check(shape: ProbeShape, kv_units) -> list:
    s, g, kvb = shape.seq_len, shape.group_size, shape.kv_block
    if s < 1 or s % g or s % kvb:
        raise ValueError(
            f"speed probe: {s} tokens must be whole query groups ({g}) and key blocks ({kvb}); "
            f"use a length that is a multiple of {math.lcm(g, kvb)}."
        )
    if shape.num_heads % shape.num_kv_heads:
        raise ValueError(f"speed probe: {shape.num_heads} query heads are not a multiple of {shape.num_kv_heads} "
                         "key/value heads.")
    kv = [int(k) for k in (kv_units.tolist() if isinstance(kv_units, Tensor) else kv_units)]
    if len(kv) != shape.num_heads or not all(1 <= k <= shape.units for k in kv):
        raise ValueError(
            f"speed probe needs K per query head of this rank: {shape.num_heads} values in [1, {shape.units}] "
            f"key units ({s} tokens / {kvb}); got {kv}."
        )
    return kv


def _steps(shape: ProbeShape, kv: list, dense: DenseFn, seed: int):
    """The two synthetic layer calls (forward + backward), and the sparse kernels' name."""
    device = torch.device(shape.device)
    g = torch.Generator(device=device).manual_seed(seed)
    s, b, h, hkv, d = shape.seq_len, shape.batch, shape.num_heads, shape.num_kv_heads, shape.head_dim

    def randn(*size, grad=True):
        x = torch.randn(size, generator=g, device=device).to(shape.dtype)
        return x.requires_grad_(grad)

    q_in, k_in, v_in = randn(s, b, h, d), randn(s, b, hkv, d), randn(s, b, hkv, d)
    dout = randn(s, b, h * d, grad=False)
    x = None if shape.hidden_size is None else randn(b, s, shape.hidden_size, grad=False)
    predictor = LowRankPredictor(h, d, shape.predictor_rank, num_kv_heads=hkv, input_dim=shape.hidden_size,
                                 device=device, dtype=shape.dtype, seed=seed).requires_grad_(False)
    units = shape.units
    floor = 1
    if shape.mask is not None:  # the layer keeps at least every group's forced (diagonal) units
        floor = min(units, shape.mask.max_forced(s, shape.group_size, shape.kv_block))
    k_here = torch.tensor(kv, dtype=torch.int32, device=device).clamp(min=floor)
    scale = shape.scale if shape.scale is not None else d ** -0.5
    kernels = []

    def clear():
        for t in (q_in, k_in, v_in):
            t.grad = None

    def sparse_step():
        clear()
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q_in, k_in, v_in))
        with torch.no_grad():
            q_lr, k_lr = predictor.project(q, k) if x is None else predictor.project_hidden(x)
            index = select_topk(q_lr, k_lr, shape.group_size, k_here, kv_block=shape.kv_block,
                                backend=shape.selection_backend, mask=shape.mask)
        choice = attention_backend(shape.backend, q, k, index)
        if not kernels:
            kernels.append(choice.name)
        out, _ = sparse_attention(q, k, v, index, scale, backend=choice.name, out_layout="sbhd")
        out.permute(2, 0, 1, 3).reshape(s, b, h * d).backward(dout)

    def dense_step():
        clear()
        dense(q_in, k_in, v_in).reshape(s, b, h * d).backward(dout)

    return sparse_step, dense_step, kernels


def probe_layer(
    shape: ProbeShape,
    kv_units,
    *,
    dense: Optional[DenseFn] = None,
    groups: Sequence = (),
    warmup: int = 2,
    reps: int = 5,
    timer: Optional[Timer] = None,
    seed: int = 0,
) -> ProbeResult:
    """Time the sparse path at ``kv_units`` and the dense path of one layer shape (see the module doc).

    Collective over each group of ``groups`` of size > 1: every rank calls it with the same shape
    and K (the runtime's synchronised decision inputs), in the same order.

    Args:
        shape: the layer (:class:`ProbeShape`).
        kv_units: K per query head of this rank ``[H]``, in key units.
        dense: the layer's dense path (:data:`DenseFn`); default :func:`sdpa_dense`.
        groups: process groups whose slowest rank's times every rank takes (None entries skipped).
        warmup, reps: untimed then timed calls per arm (median over ``reps``).
        timer: replaces :func:`~megatron_dsv.cp.autotune.measure_ms` (tests inject times).
        seed: of the synthetic tensors and predictor (a private generator: the run's RNG is untouched).
    """
    kv = _check(shape, kv_units)
    if warmup < 0 or reps < 1:
        raise ValueError(f"speed probe needs warmup >= 0 and reps >= 1, got warmup={warmup}, reps={reps}.")
    device = torch.device(shape.device)
    sparse_step, dense_step, kernels = _steps(shape, kv, dense or sdpa_dense(shape), seed)
    with torch.enable_grad():
        times = []
        for arm, step in (("sparse", sparse_step), ("dense", dense_step)):
            ms = timer(arm, step) if timer is not None else measure_ms(step, device, warmup, reps)
            times.append(float(ms))
    worst, bad = max_over_ranks(times, groups, device)
    if bad:
        raise RuntimeError(
            f"the speed probe measured a non-finite or negative time on some rank (this rank: sparse "
            f"{times[0]} ms, dense {times[1]} ms); check the timer, or set --dsv-speed-table assume."
        )
    density = sum(kv) / (len(kv) * shape.units)
    return ProbeResult(worst[0], worst[1], density, kernels[0] if kernels else shape.backend)


class SpeedProbe:
    """:func:`probe_layer` with a cache per signature and the decision rule; owned by the runtime.

    The signature is the shape, the dense path's name and K per head of ALL the layer's heads
    (identical on every rank, so every rank hits or misses the cache alike) rounded up to
    ``k_multiple`` key units. ``log`` gets one line per measured signature.

    Args:
        margin: sparse only when its time is below dense x (1 - margin) (``--dsv-speed-margin``).
        k_multiple: the K rounding of ``--dsv-k-multiple`` in key units.
        warmup, reps, timer, seed: as :func:`probe_layer`.
        log: where the measured line goes (None: nowhere).
    """

    def __init__(self, *, margin: float = DEFAULT_MARGIN, k_multiple: int = 1, warmup: int = 2, reps: int = 5,
                 timer: Optional[Timer] = None, seed: int = 0, log: Optional[Callable[[str], None]] = None):
        if not (0.0 <= margin < 1.0):
            raise ValueError(f"the speed margin must be in [0, 1) (0.05: sparse must be 5% faster), got {margin}.")
        if k_multiple < 1:
            raise ValueError(f"k_multiple must be >= 1, got {k_multiple}.")
        if warmup < 0 or reps < 1:
            raise ValueError(f"speed probe needs warmup >= 0 and reps >= 1, got warmup={warmup}, reps={reps}.")
        self.margin, self.k_multiple = float(margin), int(k_multiple)
        self.kw = dict(warmup=warmup, reps=reps, timer=timer, seed=seed)
        self.log = log
        self.cache: Dict[Tuple, ProbeResult] = {}
        self.hits = self.misses = 0

    def _rounded(self, kv) -> Tuple[int, ...]:
        kv = kv.tolist() if isinstance(kv, Tensor) else kv
        m = self.k_multiple
        return tuple(-(-int(k) // m) * m for k in kv)

    def signature(self, shape: ProbeShape, kv_all, dense_name: str) -> Tuple:
        return (shape, dense_name, self._rounded(kv_all))

    def measure(self, shape: ProbeShape, kv_all, *, head_offset: int = 0, dense: Optional[DenseFn] = None,
                dense_name: str = "sdpa", groups: Sequence = (), what: str = "layer") -> ProbeResult:
        """The times of this layer shape at K per head ``kv_all`` (all the layer's heads, rounded up to
        the K multiple), from the cache or measured now on this rank's heads (collective over ``groups``).

        Args:
            head_offset: this rank's first head within ``kv_all`` (tensor parallelism splits heads).
            dense, dense_name: the layer's dense path and its name (in the signature).
            what: names the layer in the log line.
        """
        key = self.signature(shape, kv_all, dense_name)
        hit = self.cache.get(key)
        if hit is not None:
            self.hits += 1
            return hit
        timed = [min(k, shape.units) for k in key[2][head_offset: head_offset + shape.num_heads]]
        result = probe_layer(shape, timed, dense=dense, groups=groups, **self.kw)
        # the density of all heads (a tensor-parallel rank times only its own), the same on every rank
        result = dataclasses.replace(result, density=sum(min(k, shape.units) for k in key[2]) / (len(key[2]) * shape.units))
        self.cache[key] = result
        self.misses += 1
        if self.log is not None:
            self.log(f"DSV speed probe {what} ({shape.describe()}, dense {dense_name}, K/head {list(key[2])}): "
                     f"{result.describe(self.margin)}")
        return result


__all__ = ["DEFAULT_MARGIN", "DenseFn", "ProbeResult", "ProbeShape", "SpeedProbe", "Timer", "probe_layer",
           "sdpa_dense"]
