"""Choose a layer's context-parallel split by timing the planner's best candidates on the real path.

The cost model (:mod:`megatron_dsv.cp.cost_model`) cannot see every cost of the sequence path:
the selective exchange's gather/scatter, the log-sum-exp merge, the low-rank key all-gather. On
2 x H200 with measured links it predicted the sequence split 1x2 at 19.0 ms and the head split 2x1
at 19.6 ms for the heterogeneous profile at 64k tokens, where they measured 34.0 and 26.0 ms
(``benchmarks/results/cp_2gpu_h200_20261130*``), so the plan was x0.92 of the better one on the
DiT step. Near parity no re-fit of a link constant settles the choice; a measurement does.

:func:`autotune_layer` takes the planner's ranked candidates (:func:`~megatron_dsv.cp.planner.compare_plans`)
and times the ones predicted within ``margin`` of the best, plus the best pure head and pure
sequence split, with :class:`~megatron_dsv.cp.context.CPAttention` forward + backward on synthetic
tensors of the layer's shape: the head all-to-all, the low-rank key all-gather, top-K selection of
random low-rank projections with the layer's K per head (random keys select near-unrelated blocks,
the selective exchange's worst case, as the ~0.98 key union measured at 95% sparsity), the
selective exchange or the dense ring, and the all-to-all back. Under the layer's causal mask
(``shape.mask``) the step is the masked one the layer runs: masked selection with the shard's
``q_offset`` (K at least the mask's forced units, as the layer's K is), the ring and the
selective exchange skipping disallowed shards, the local dense step under the mask; a candidate
whose sequence shards cut the mask's chunks (:meth:`CausalMask.check_shards`, which the layer
refuses) is not timed. A plan's time is the median of a few repetitions on each rank, then the
**maximum over the CP group** (one all-reduce), so every rank sees the same numbers and picks the
same plan; ties go to the larger head split (as the planner's). :class:`Autotuner` caches results
per signature (shape with its mask, K per head rounded to the K multiple) so layers alike and
re-plans of an unchanged layer measure once. Collective: every rank
of the CP group calls it with the same arguments, in the same order.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_dsv.cp.context import CPAttention
from megatron_dsv.cp.cost_model import AttentionShape, PlanCost
from megatron_dsv.cp.groups import CPGroups
from megatron_dsv.cp.plan import LayerPlan
from megatron_dsv.cp.planner import PlanComparison, check_plans_agree, shards_fit
from megatron_dsv.ops._utils import choose_backend
from megatron_dsv.ops.selection import select_topk
from megatron_dsv.ops.sparse_attention import attention_backend
from megatron_dsv.ops.sparse_index import SparseIndex

Timer = Callable[[LayerPlan, Callable[[], None]], float]
"""``timer(plan, step) -> ms``: this rank's time of one ``step()`` (forward + backward) under ``plan``."""

DEFAULT_MARGIN = 0.25


@dataclass(frozen=True)
class CandidateTime:
    """One timed candidate: the plan, the cost model's prediction, the slowest rank's median."""

    plan: LayerPlan
    predicted_ms: float
    measured_ms: float

    def to_dict(self) -> Dict:
        return {"split": f"{self.plan.head_size}x{self.plan.seq_size}",
                "heads_per_slot": [len(s) for s in self.plan.slots],
                "predicted_ms": self.predicted_ms, "measured_ms": self.measured_ms}


@dataclass(frozen=True)
class AutotuneResult:
    """The measured choice for one layer signature.

    Attributes:
        best: the fastest measured plan (``predicted_ms``: the cost model's time for it).
        model_best: the cost model's own choice.
        table: every timed candidate, ascending head_size.
    """

    best: LayerPlan
    model_best: LayerPlan
    table: Tuple[CandidateTime, ...]

    def to_dict(self) -> Dict:
        return {"best": f"{self.best.head_size}x{self.best.seq_size}",
                "model_best": f"{self.model_best.head_size}x{self.model_best.seq_size}",
                "candidates": [c.to_dict() for c in self.table]}

    def describe(self) -> str:
        """One line: measured vs predicted per candidate, the choice and the model's."""
        rows = ", ".join(f"{c.plan.head_size}x{c.plan.seq_size} measured {c.measured_ms:.3f} ms "
                         f"(predicted {c.predicted_ms:.3f})" for c in self.table)
        agree = "as the cost model" if self.best.key() == self.model_best.key() else (
            f"the cost model preferred {self.model_best.head_size}x{self.model_best.seq_size}")
        return f"picked {self.best.head_size}x{self.best.seq_size} ({agree}); {rows}"


def candidates(comparison: PlanComparison, margin: float = DEFAULT_MARGIN) -> List[PlanCost]:
    """The candidates worth timing: predicted within ``margin`` (relative) of the best, and the
    pure head and pure sequence splits when feasible; ascending head_size (one per head size)."""
    if not (margin >= 0 and math.isfinite(margin)):
        raise ValueError(f"the autotune margin must be a finite number >= 0, got {margin}.")
    limit = comparison.best.total_ms * (1 + margin)
    keep = {c.plan.head_size: c for c in comparison.candidates if c.total_ms <= limit}
    keep[comparison.best.plan.head_size] = comparison.best
    for pure in (comparison.pure_head, comparison.pure_seq):
        if pure is not None:
            keep[pure.plan.head_size] = pure
    return [keep[g] for g in sorted(keep)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_ms(step: Callable[[], None], device, warmup: int = 2, reps: int = 5) -> float:
    """This rank's median ms of ``step()`` after ``warmup`` calls: CUDA events on a GPU,
    ``perf_counter`` on a CPU. The counts are fixed (not estimated per rank), so ranks whose steps
    run collectives stay in step."""
    device = torch.device(device)
    if warmup < 0 or reps < 1:
        raise ValueError(f"autotune needs warmup >= 0 and reps >= 1, got warmup={warmup}, reps={reps}.")
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for start, end in events:
            start.record()
            step()
            end.record()
        _sync(device)
        return statistics.median(s.elapsed_time(e) for s, e in events)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def max_over_ranks(values: Sequence[float], groups, device) -> Tuple[List[float], bool]:
    """``values`` maxed over every process group of ``groups`` (None and size-1 groups skipped), so
    every rank decides on the slowest rank's times, with a flag that some rank's values were
    non-finite or negative: carried through the same reduction, so every rank raises and none
    waits alone."""
    bad = not all(math.isfinite(v) and v >= 0 for v in values)
    t = torch.tensor([0.0 if bad else float(v) for v in values] + [float(bad)], dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        for group in groups:
            if group is not None and dist.get_world_size(group) > 1:
                dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    out = t.cpu().tolist()
    return out[:-1], out[-1] > 0


def _check_inputs(shape: AttentionShape, kv_units, cp_size: int, group_size: int, kv_block: int) -> Optional[List[int]]:
    s_local, units = shape.seq_len // cp_size, shape.seq_len // kv_block
    if shape.seq_len % cp_size or s_local % group_size or s_local % kv_block:
        raise ValueError(
            f"autotune: each of the {cp_size} CP ranks' {shape.seq_len / cp_size:g} tokens must be whole query "
            f"groups ({group_size}) and key blocks ({kv_block}); use a length that is a multiple of "
            f"{cp_size * math.lcm(group_size, kv_block)}."
        )
    if kv_units is None:
        return None
    kv = [int(k) for k in (kv_units.tolist() if isinstance(kv_units, torch.Tensor) else kv_units)]
    if len(kv) != shape.num_heads or not all(1 <= k <= units for k in kv):
        raise ValueError(
            f"autotune needs K per query head: {shape.num_heads} values in [1, {units}] key units "
            f"({shape.seq_len} tokens / {kv_block}); got {kv}."
        )
    if shape.mask is not None:
        shape.mask.check_k(min(kv), shape.seq_len, group_size, kv_block)
    return kv


class SyntheticStep:
    """One synthetic layer call (forward + backward) under ``plan``, as ``DSVCoreAttention`` runs
    it, under ``shape.mask`` when the layer has one. Callable; after a call, ``index`` holds the
    selection it made (None for a dense layer) and ``out`` the output ``[s_local, b, H, D]``, so a
    test's timer can check which path ran."""

    def __init__(self, plan: LayerPlan, groups: CPGroups, shape: AttentionShape, kv: Optional[List[int]], inputs,
                 *, group_size: int, kv_block: int, backend: str, seed: int):
        self.cp = cp = CPAttention(plan, groups, shape.num_heads, shape.num_kv_heads)
        self.shape, self.inputs, self.mask = shape, inputs, shape.mask
        self.group_size, self.kv_block, self.backend = group_size, kv_block, backend
        self.scale = shape.head_dim ** -0.5
        q_in = inputs[0]
        b, s_chunk = shape.batch, shape.seq_len // plan.seq_size
        self.q_offset = cp.query_offset(s_chunk, self.mask)
        self.lowrank = self.k_here = None
        if kv is not None:
            # the predictor's projections of this rank's heads on its chunk; random: unrelated selections
            g = torch.Generator(device=q_in.device).manual_seed(seed + groups.rank)
            lr_shape = (b, len(cp.heads), s_chunk, shape.predictor_rank)
            self.lowrank = tuple(torch.randn(lr_shape, generator=g, device=q_in.device).to(q_in.dtype) for _ in range(2))
            self.k_here = torch.tensor([kv[h] for h in cp.heads], dtype=torch.int32, device=q_in.device)
        # as DSVCoreAttention.selection_backend: cuDNN has no selection
        self.selection_backend = "auto" if backend == "cudnn" else backend
        self.index: Optional[SparseIndex] = None
        self.out: Optional[torch.Tensor] = None

    def _local_dense(self, q, k, v):
        """The dense layer's own path without a sequence split (SDPA under the layer's mask)."""
        attn_mask, causal = None, False
        if self.mask is not None and self.mask.kind == "chunk_causal":
            attn_mask = self.mask.dense(q.shape[2], device=q.device)
        elif self.mask is not None:
            causal = True
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal, scale=self.scale,
                                              enable_gqa=q.shape[1] != k.shape[1])

    def __call__(self) -> None:
        cp, q_in, k_in, v_in, dout = self.cp, *self.inputs
        for t in (q_in, k_in, v_in):
            t.grad = None
        q, k, v = cp.to_heads(q_in, k_in, v_in)
        if self.lowrank is None:
            out = cp.dense(q, k, v, self.scale, self.group_size, self.kv_block, self.backend, self._local_dense,
                           mask=self.mask)
        else:
            with torch.no_grad():
                self.index = select_topk(self.lowrank[0], cp.gather_keys(self.lowrank[1]), self.group_size,
                                         self.k_here, kv_block=self.kv_block, backend=self.selection_backend,
                                         mask=self.mask, q_offset=self.q_offset)
            kernels = (attention_backend(self.backend, q, k, self.index) if cp.seq_group is None
                       else choose_backend("auto" if self.backend == "cudnn" else self.backend, q.device,
                                           what="DSV selective exchange"))
            out = cp.sparse(q, k, v, self.index, self.scale, kernels.name)
        out = cp.from_heads(out)
        out.backward(dout)
        self.out = out.detach()


def autotune_layer(
    groups: CPGroups,
    shape: AttentionShape,
    kv_units: Optional[Sequence[int]],
    comparison: PlanComparison,
    *,
    dtype: torch.dtype,
    device,
    group_size: int,
    kv_block: int,
    backend: str = "auto",
    margin: float = DEFAULT_MARGIN,
    warmup: int = 2,
    reps: int = 5,
    timer: Optional[Timer] = None,
    seed: int = 0,
) -> AutotuneResult:
    """Time the planner's candidates for one layer on the real CP attention path and pick the fastest.

    Collective over ``groups.cp_group``: every rank calls it with the same arguments (the
    synchronised statistics the planner used), the candidates' identity is checked across ranks
    before anything is timed.

    Args:
        groups: the layer's :class:`CPGroups` (every candidate's split must have its groups).
        shape: the layer (heads of this tensor-parallel rank; ``seq_len`` over the CP group), with
            its causal mask (``shape.mask``), under which every candidate is timed; candidates
            whose shards cut the mask's chunks are skipped.
        kv_units: K per query head in key units ``[H]``, or None for a dense layer.
        comparison: :func:`~megatron_dsv.cp.planner.compare_plans` for this layer.
        dtype, device: of the layer's activations (the synthetic q/k/v, dout and projections).
        group_size, kv_block: the layer's query group and key block (tokens).
        backend: ``--dsv-backend`` (the kernels the layer would run).
        margin: time candidates predicted within this fraction of the best (0.25: 25%).
        warmup, reps: untimed then timed calls per candidate (median over ``reps``).
        timer: replaces :func:`measure_ms` (tests inject times); it gets each plan and its step.
        seed: of the random projections (each rank adds its CP rank).

    Returns:
        :class:`AutotuneResult`, the same on every rank.
    """
    kv = _check_inputs(shape, kv_units, groups.size, group_size, kv_block)
    ranked = candidates(comparison, margin)
    timed = [c for c in ranked if shards_fit(shape, c.plan.seq_size)]
    if not timed:
        raise ValueError(
            f"autotune: every candidate split ({[f'{c.plan.head_size}x{c.plan.seq_size}' for c in ranked]}) has "
            f"sequence shards that cut the {shape.mask.kind} mask's chunks of {shape.mask.chunk_tokens} tokens; "
            "compare the plans with this shape (its mask), which keeps only splits the layer can run."
        )
    check_plans_agree([c.plan for c in timed], group=groups.cp_group)
    device = torch.device(device)
    s_local = shape.seq_len // groups.size
    g = torch.Generator(device=device).manual_seed(seed + 7919 * (groups.rank + 1))

    def randn(heads):
        x = torch.randn((s_local, shape.batch, heads, shape.head_dim), generator=g, device=device)
        return x.to(dtype).requires_grad_(True)

    inputs = (randn(shape.num_heads), randn(shape.num_kv_heads), randn(shape.num_kv_heads),
              randn(shape.num_heads).detach())
    local_ms = []
    for c in timed:
        step = SyntheticStep(c.plan, groups, shape, kv, inputs, group_size=group_size, kv_block=kv_block,
                             backend=backend, seed=seed)
        ms = timer(c.plan, step) if timer is not None else measure_ms(step, device, warmup, reps)
        local_ms.append(float(ms))
        del step
    del inputs
    worst, bad = max_over_ranks(local_ms, (groups.cp_group,), device)
    if bad:
        raise RuntimeError(
            f"autotune measured a non-finite or negative time on some CP rank (this rank {groups.rank}: {local_ms}); "
            "check the timer, or set --dsv-cp-autotune off."
        )
    table = tuple(CandidateTime(c.plan, c.total_ms, float(ms)) for c, ms in zip(timed, worst))
    best = min(table, key=lambda c: (c.measured_ms, -c.plan.head_size))
    return AutotuneResult(best.plan, comparison.best.plan, table)


class Autotuner:
    """:func:`autotune_layer` with a cache per layer signature; owned by the caller (the runtime).

    The signature is the shape (``seq_len``, heads, head dim, key/value heads, batch, element size,
    predictor rank, causal mask: a masked layer runs fewer ring steps and exchanges fewer blocks,
    so it is measured apart from an unmasked one of the same size) and K per head rounded up to ``k_multiple`` key units (None for a dense layer):
    layers alike and re-plans of a layer whose K did not change reuse the measurement. ``log`` gets
    one line per measured signature.

    Args:
        dtype, device, group_size, kv_block, backend, margin, warmup, reps, timer: as :func:`autotune_layer`.
        k_multiple: the K rounding of ``--dsv-k-multiple`` in key units.
        log: where the measured-vs-predicted line goes (None: nowhere).
    """

    def __init__(self, *, dtype: torch.dtype, device, group_size: int, kv_block: int, k_multiple: int = 1,
                 backend: str = "auto", margin: float = DEFAULT_MARGIN, warmup: int = 2, reps: int = 5,
                 timer: Optional[Timer] = None, log: Optional[Callable[[str], None]] = None):
        if k_multiple < 1:
            raise ValueError(f"k_multiple must be >= 1, got {k_multiple}.")
        if not (margin >= 0 and math.isfinite(margin)):  # refused at start-up, not at the first re-plan
            raise ValueError(f"the autotune margin must be a finite number >= 0, got {margin}.")
        if warmup < 0 or reps < 1:
            raise ValueError(f"autotune needs warmup >= 0 and reps >= 1, got warmup={warmup}, reps={reps}.")
        self.kw = dict(dtype=dtype, device=device, group_size=group_size, kv_block=kv_block, backend=backend,
                       margin=margin, warmup=warmup, reps=reps, timer=timer)
        self.k_multiple, self.log = int(k_multiple), log
        self.cache: Dict[Tuple, AutotuneResult] = {}
        self.hits = self.misses = 0

    def signature(self, shape: AttentionShape, kv_units: Optional[Sequence[int]]) -> Tuple:
        if kv_units is None:
            return (shape, None)
        kv = kv_units.tolist() if isinstance(kv_units, torch.Tensor) else kv_units
        m = self.k_multiple
        return (shape, tuple(-(-int(k) // m) * m for k in kv))

    def choose(self, groups: CPGroups, shape: AttentionShape, kv_units: Optional[Sequence[int]],
               comparison: PlanComparison, what: str = "layer") -> AutotuneResult:
        """The measured choice for this layer: from the cache, or measured now (collective).
        ``what`` names the layer in the log line."""
        key = self.signature(shape, kv_units)
        hit = self.cache.get(key)
        if hit is not None:
            self.hits += 1
            return hit
        result = autotune_layer(groups, shape, kv_units, comparison, **self.kw)
        self.cache[key] = result
        self.misses += 1
        if self.log is not None:
            k = "dense" if key[1] is None else f"K/head {list(key[1])}"
            self.log(f"DSV CP autotune {what} (S={shape.seq_len}, batch {shape.batch}, {k}): {result.describe()}")
        return result


__all__ = ["Autotuner", "AutotuneResult", "CandidateTime", "SyntheticStep", "autotune_layer", "candidates",
           "measure_ms", "DEFAULT_MARGIN"]
