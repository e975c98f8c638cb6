"""What the runtime decides for one DSV layer, and what the layer measures for the runtime.

* :class:`LayerState`: the layer's decision (sparse or dense, and why), K per head, its CP plan,
  the statistics EMA and the run's schedule (replicated into every layer so Megatron checkpoints
  carry it). Owned by the layer; changed only through ``DSVCoreAttention.apply``. One
  ``to_dict``/``from_dict`` pair is the layer's ``_extra_state``.
* :class:`StepControl`: what one iteration asks of the layer (train the predictor, measure).
* :class:`LayerStats`: what a profiling forward measured, one per microbatch.

The runtime reads ``LayerStats`` and writes ``LayerState``; it never touches a layer's tensors.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional

import torch
from torch import Tensor

from megatron_dsv.cp.plan import LayerPlan
from megatron_dsv.layers.profiler import RecallCurve

STATS = ("loss", "sparsity", "recall")
"""The statistics a profiling forward reports: predictor loss (scalar), sparsity and recall per head."""

STATE_VERSION = 2
"""Version of :meth:`LayerState.to_dict`. 1: the fields of the pre-``LayerState`` layer (same keys)."""


@dataclass
class LayerState:
    """One layer's decision and the statistics it was taken on.

    Attributes:
        sparse: run the sparse path.
        kv_units: int32 ``[H]`` key units per head for all the layer's heads (across tensor-parallel
            ranks); None = K from ``dsv_fixed_sparsity``. Cleared when the layer goes dense.
        reason: why the layer runs as it does (shown by ``describe()`` and the runtime's log).
        stats_ema: ``{"loss": [], "sparsity": [H], "recall": [H]}``, synchronised over ranks.
        schedule: the run's stage (``{"stage": int, "switch_iteration": int | None}``).
        cp_plan: the layer's head x sequence split under context parallelism (not checkpointed:
            it is re-derived from the statistics).
        changed_at: iteration of the last sparse/dense change (hysteresis), None before one.

    ``stats_ema`` also holds the recall curve (``megatron_dsv.layers.profiler.RecallCurve``
    fields, ``[H, units]``): the selection's recall at every K, from which K is chosen.
    """

    sparse: bool = False
    kv_units: Optional[Tensor] = None
    reason: str = ""
    stats_ema: Dict[str, Tensor] = field(default_factory=dict)
    schedule: Dict[str, Any] = field(default_factory=dict)
    cp_plan: Optional[LayerPlan] = None
    changed_at: Optional[int] = None

    def replace(self, **changes) -> "LayerState":
        """A copy with ``changes`` (the way the runtime proposes a new state)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self, config_fields: Mapping[str, Any]) -> Dict[str, Any]:
        """Plain data for Megatron's ``_extra_state`` (identical on every rank)."""
        return {
            "version": STATE_VERSION,
            "config": dict(config_fields),
            "sparse": self.sparse,
            "kv_units": None if self.kv_units is None else self.kv_units.tolist(),
            "stats_ema": {k: v.float().cpu().tolist() for k, v in self.stats_ema.items()},
            "schedule": dict(self.schedule),
            "decision": self.reason,
            "changed_at": self.changed_at,
        }

    @classmethod
    def from_dict(
        cls, state: Any, *, config_fields: Mapping[str, Any], num_heads: int, layer: str
    ) -> "LayerState":
        """Check and read :meth:`to_dict` output.

        Every refusal names the layer and what to do: a checkpoint of another DSV config or of
        another head count, an unknown version, or damaged data.
        """
        fix = (
            "resume with the checkpoint's model and --dsv-* values, or start the DSV schedule afresh "
            "with --dsv-on-resume reset (the weights, predictor included, load as usual; the DSV "
            "statistics and decisions are measured again)."
        )
        if not isinstance(state, Mapping):
            raise ValueError(f"{layer}: DSV _extra_state is {type(state).__name__}, not a dict; {fix}")
        version = state.get("version")
        if version not in (1, STATE_VERSION):
            raise ValueError(
                f"{layer}: DSV _extra_state version {version!r} is not one this megatron_dsv reads "
                f"(1 or {STATE_VERSION}); upgrade megatron_dsv to the version that wrote it, or {fix}"
            )
        missing = [k for k in ("config", "sparse", "kv_units", "stats_ema", "schedule") if k not in state]
        if missing:
            raise ValueError(f"{layer}: DSV _extra_state lacks {missing}: the checkpoint is damaged; {fix}")
        saved, now = state["config"], dict(config_fields)
        diff = {k: (saved.get(k), v) for k, v in now.items() if _canon(saved.get(k)) != _canon(v)}
        if diff:
            lines = ", ".join(f"{k}: checkpoint {a!r} vs this run {b!r}" for k, (a, b) in diff.items())
            raise ValueError(f"{layer}: this checkpoint was trained with another DSV config ({lines}); {fix}")
        try:
            ema = {k: torch.tensor(v, dtype=torch.float32) for k, v in state["stats_ema"].items()}
            kv = None if state["kv_units"] is None else torch.tensor(state["kv_units"], dtype=torch.int32).flatten()
            schedule = dict(state["schedule"])
        except (TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"{layer}: DSV _extra_state holds malformed values ({exc}); {fix}") from None
        for name, value in ema.items():
            heads = value.shape[0] if value.dim() else 1
            if name != "loss" and heads != num_heads:
                raise ValueError(
                    f"{layer}: the checkpoint's {name} statistics cover {heads} heads, this "
                    f"layer has {num_heads}; {fix}"
                )
        if kv is not None and kv.numel() != num_heads:
            raise ValueError(f"{layer}: the checkpoint's K covers {kv.numel()} heads, this layer has {num_heads}; {fix}")
        return cls(
            sparse=bool(state["sparse"]), kv_units=kv, reason=str(state.get("decision", "")),
            stats_ema=ema, schedule=schedule, changed_at=state.get("changed_at"),
        )


@dataclass(frozen=True)
class StepControl:
    """What the current iteration asks of a layer (set by the runtime before the first forward).

    ``iteration`` rotates the sampled query rows (the same iteration samples the same rows, so a
    recomputed forward measures what the first one did).
    """

    iteration: int = 0
    train_predictor: bool = True
    collect_stats: bool = True


@dataclass(frozen=True)
class LayerStats:
    """One profiling forward's measurements (per microbatch).

    ``loss``: scalar predictor loss; ``sparsity`` (token level) / ``recall`` (at the K in use):
    ``[H_local]`` per local head; ``seq_len``: the full sequence length the layer attended over;
    ``curve``: the selection's recall curve of the sampled rows (``RecallCurve``, per local head);
    ``nonfinite``: how many NaN/Inf values the sampled q, the keys and their projections held.
    """

    loss: Tensor
    sparsity: Tensor
    recall: Tensor
    seq_len: int
    curve: Optional["RecallCurve"] = None
    nonfinite: Optional[Tensor] = None

    def __getitem__(self, name: str) -> Tensor:
        if name not in STATS:
            raise KeyError(name)
        return getattr(self, name)


def _canon(v):
    return list(v) if isinstance(v, (tuple, list)) else v


__all__ = ["LayerState", "LayerStats", "StepControl", "STATS", "STATE_VERSION"]
