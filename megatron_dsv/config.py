"""DSVConfig: every ``dsv_*`` knob, validated, with fix-it error messages.

Field names equal the Megatron flags (``dsv_predictor_rank`` <-> ``--dsv-predictor-rank``), so
``core_transformer_config_from_args(args, config_class=DSVTransformerConfig)`` carries them into
the TransformerConfig that every layer sees (see ``megatron_dsv.layers.attention``).

Fields are split into those that change results (mode, rank, groups, sparsity, schedule) and those
that change only speed (backends). This module imports nothing from Megatron.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional, Tuple

MODES = ("dense", "sparse", "auto")
PREDICTOR_INPUTS = ("qk", "hidden")
BACKENDS = ("auto", "triton", "reference")
DENSE_BACKENDS = ("auto", "sdpa", "te")


def parse_cube(value: Any) -> Tuple[int, int, int]:
    """``"2x4x4"``, ``(2, 4, 4)`` or ``[2, 4, 4]`` -> ``(2, 4, 4)``."""
    if isinstance(value, str):
        parts = value.lower().replace("*", "x").split("x")
    else:
        parts = list(value)
    try:
        cube = tuple(int(p) for p in parts)
    except (TypeError, ValueError):
        cube = ()
    if len(cube) != 3 or min(cube) < 1:
        raise ValueError(
            f"query group cube must be three positive ints T x H x W such as 2x4x4, got {value!r}."
        )
    return cube


def parse_cp_split(value: str):
    """``auto`` | ``head`` | ``seq`` | ``HxS`` -> the string, or ``(H, S)`` for a fixed split."""
    if value in ("auto", "head", "seq"):
        return value
    try:
        h, s = (int(p) for p in str(value).lower().split("x"))
    except ValueError:
        h = s = 0
    if h < 1 or s < 1:
        raise ValueError(
            f"--dsv-cp-split must be auto, head, seq or HxS such as 4x2 (head-parallel x "
            f"sequence-parallel ranks); got {value!r}."
        )
    return h, s


@dataclass
class DSVConfig:
    """Configuration of DSV sparse attention. Defaults follow the paper (arXiv 2502.07590)."""

    # ---- what changes results ------------------------------------------------------------
    dsv_mode: str = "auto"
    """``dense``: DSV off, plain dense attention (the baseline). ``sparse``: sparse attention from
    the first step with a fixed per-head density. ``auto``: the two-stage schedule, dense while
    the predictor learns and the profiler measures sparsity, then sparse."""

    dsv_predictor_rank: int = 16
    """Rank r of the low-rank score predictor, per head."""

    dsv_predictor_input: str = "qk"
    """``qk``: project the layer's q/k (RoPE-aware, local to core attention). ``hidden``: project
    the layer input (the paper's variant; needs the DSV self-attention module)."""

    dsv_query_group: Tuple[int, int, int] = (2, 4, 4)
    """Query-group cube (t, h, w) in tokens; its queries share one key set. 2x4x4 = 32 tokens."""

    dsv_kv_block: int = 1
    """Key granularity: 1 selects single keys, n selects contiguous blocks of n keys."""

    dsv_critical_mass: float = 0.9
    """Attention mass a query's critical keys must hold; sparsity is measured against it."""

    dsv_min_sparsity: float = 0.8
    """A layer goes sparse only when its measured sparsity is at least this."""

    dsv_fixed_sparsity: float = 0.9
    """Per-head sparsity used when no profile exists (``sparse`` mode from scratch, or a head the
    profiler has not measured yet): each head keeps ``1 - dsv_fixed_sparsity`` of its keys."""

    dsv_min_keys: int = 64
    """Floor on the keys each query group keeps per head, however sparse the head is (in keys;
    with key blocks, rounded up to whole blocks)."""

    dsv_k_multiple: int = 64
    """Keys per head are rounded up to a multiple of this (the kernels' key tile), in keys; with
    key blocks, to whole blocks."""

    dsv_predictor_loss_coeff: float = 1.0
    """Scale of the predictor loss gradient (it reaches only predictor parameters)."""

    dsv_predictor_cosine_weight: float = 0.95
    """Weight of (1 - cosine similarity) in the predictor loss; MSE gets ``1 - this``."""

    dsv_profile_stride: int = 32
    """Profile and train the predictor on every n-th query (16 to 64 in the paper)."""

    dsv_profile_interval_stage1: int = 10
    """Profile every n iterations during stage 1 (dense); the predictor trains every iteration.
    Measured on an H100 (2 layers, 64k tokens): a profiling step costs about one dense step."""

    dsv_profile_interval_stage2: int = 50
    """Profile, and train the predictor, every n iterations during stage 2 (sparse)."""

    dsv_stats_ema: float = 0.9
    """Decay of the exponential moving average of sparsity, recall and predictor loss."""

    dsv_switch_loss_threshold: float = 0.01
    """Stage switch: mean predictor loss must be below this (paper: 0.01)."""

    dsv_switch_recall_target: float = 0.9
    """Stage switch: mean predictor recall (exact attention mass captured) at least this."""

    dsv_switch_min_iters: int = 100
    """Never switch to sparse before this many iterations of stage 1."""

    dsv_switch_max_iters: int = 5000
    """Switch to sparse at this iteration even if the predictor has not converged."""

    dsv_recall_floor: float = 0.8
    """In stage 2 a layer whose recall falls below this goes back to dense."""

    dsv_stage2_predictor_lr_scale: float = 0.1
    """Predictor learning-rate multiplier in stage 2."""

    dsv_predictor_lr: float = 0.0
    """Peak learning rate of the predictor's own optimizer groups in Megatron runs (0: the model's
    --lr); its minimum keeps --min-lr's ratio to --lr."""

    # ---- what changes speed only ---------------------------------------------------------
    dsv_backend: str = "auto"
    """Sparse kernels: ``auto`` (Triton on GPU, reference on CPU), ``triton`` or ``reference``."""

    dsv_dense_backend: str = "auto"
    """Dense attention: ``auto`` (TE when importable, else SDPA), ``sdpa`` or ``te``."""

    dsv_log_interval: int = 0
    """Log a compact DSV status line every n iterations (0 = at every profiling iteration)."""

    dsv_speed_table: str = ""
    """JSON written by benchmarks/attention.py; a layer goes sparse only where it says sparse is
    faster at that length and density. Empty: sparse when density <= 0.5 (logged)."""

    dsv_cp_split: str = "auto"
    """Context parallelism (``--context-parallel-size`` > 1): how each layer splits the CP group
    into head-parallel x sequence-parallel ranks. ``auto``: the planner's choice per layer from
    the measured sparsity (re-planned as it moves); ``head``: as many head-parallel ranks as the
    heads allow; ``seq``: sequence-parallel only; ``HxS`` (e.g. ``4x2``): fixed for all layers.
    Exact in every case; only speed differs."""

    dsv_cp_replan_interval: int = 200
    """With ``--dsv-cp-split auto``: at least this many iterations between two re-plans of a layer."""

    dsv_cp_replan_threshold: float = 0.02
    """With ``--dsv-cp-split auto``: re-plan a layer when a head's density moved more than this."""

    dsv_cp_gpus_per_node: int = 8
    """GPUs per node, for the planner's choice of intra-node (all-to-all) vs inter-node links."""

    dsv_cp_intra_node_gbps: float = 150.0
    """Planner: per-GPU all-to-all bandwidth inside a node, GB/s (NVLink; an assumption until
    measured on the cluster)."""

    dsv_cp_inter_node_gbps: float = 40.0
    """Planner: per-GPU point-to-point bandwidth across nodes, GB/s (400 Gb/s InfiniBand)."""

    dsv_stats_log: str = ""
    """Append per-layer, per-head statistics as JSON lines to this file (rank 0), for
    ``python -m megatron_dsv.tools.plot_stats``."""

    def __post_init__(self):
        self.dsv_query_group = parse_cube(self.dsv_query_group)
        _choice("dsv_mode", self.dsv_mode, MODES)
        _choice("dsv_predictor_input", self.dsv_predictor_input, PREDICTOR_INPUTS)
        _choice("dsv_backend", self.dsv_backend, BACKENDS)
        _choice("dsv_dense_backend", self.dsv_dense_backend, DENSE_BACKENDS)
        _int_range("dsv_predictor_rank", self.dsv_predictor_rank, 1, 256)
        _int_range("dsv_kv_block", self.dsv_kv_block, 1, 1024)
        _int_range("dsv_min_keys", self.dsv_min_keys, 1, None)
        _int_range("dsv_k_multiple", self.dsv_k_multiple, 1, None)
        _int_range("dsv_profile_stride", self.dsv_profile_stride, 1, None)
        _int_range("dsv_profile_interval_stage1", self.dsv_profile_interval_stage1, 1, None)
        _int_range("dsv_profile_interval_stage2", self.dsv_profile_interval_stage2, 1, None)
        _int_range("dsv_switch_min_iters", self.dsv_switch_min_iters, 0, None)
        _int_range("dsv_log_interval", self.dsv_log_interval, 0, None)
        _int_range("dsv_cp_replan_interval", self.dsv_cp_replan_interval, 1, None)
        _int_range("dsv_cp_gpus_per_node", self.dsv_cp_gpus_per_node, 1, None)
        parse_cp_split(self.dsv_cp_split)
        if self.dsv_cp_intra_node_gbps <= 0 or self.dsv_cp_inter_node_gbps <= 0:
            raise ValueError("--dsv-cp-intra-node-gbps and --dsv-cp-inter-node-gbps must be > 0.")
        _unit("dsv_cp_replan_threshold", self.dsv_cp_replan_threshold)
        if self.dsv_switch_max_iters < self.dsv_switch_min_iters:
            raise ValueError(
                f"--dsv-switch-max-iters ({self.dsv_switch_max_iters}) must be >= "
                f"--dsv-switch-min-iters ({self.dsv_switch_min_iters})."
            )
        _open_unit("dsv_critical_mass", self.dsv_critical_mass, hi_inclusive=True)
        _unit("dsv_min_sparsity", self.dsv_min_sparsity)
        _unit("dsv_fixed_sparsity", self.dsv_fixed_sparsity, hi_open=True)
        _unit("dsv_predictor_cosine_weight", self.dsv_predictor_cosine_weight)
        _unit("dsv_stats_ema", self.dsv_stats_ema, hi_open=True)
        _unit("dsv_switch_recall_target", self.dsv_switch_recall_target)
        _unit("dsv_recall_floor", self.dsv_recall_floor)
        if self.dsv_switch_loss_threshold <= 0:
            raise ValueError("--dsv-switch-loss-threshold must be > 0 (the paper uses 0.01).")
        if self.dsv_predictor_loss_coeff < 0:
            raise ValueError("--dsv-predictor-loss-coeff must be >= 0.")
        if self.dsv_predictor_lr < 0:
            raise ValueError("--dsv-predictor-lr must be >= 0 (0 uses the model's --lr).")
        if not 0 < self.dsv_stage2_predictor_lr_scale <= 1:
            raise ValueError("--dsv-stage2-predictor-lr-scale must be in (0, 1] (paper: lower LR).")

    @property
    def group_size(self) -> int:
        """Queries per group: the product of the cube sides."""
        t, h, w = self.dsv_query_group
        return t * h * w

    def min_units(self, num_units: int) -> int:
        """``dsv_min_keys`` in key units (blocks of ``dsv_kv_block``), at most ``num_units``."""
        return min(num_units, -(-self.dsv_min_keys // self.dsv_kv_block))

    def multiple_units(self) -> int:
        """``dsv_k_multiple`` in key units."""
        return max(1, -(-self.dsv_k_multiple // self.dsv_kv_block))

    @property
    def enabled(self) -> bool:
        """False for ``dense`` mode: no predictor, no profiler, plain dense attention."""
        return self.dsv_mode != "dense"

    @classmethod
    def from_namespace(cls, obj: Any) -> "DSVConfig":
        """Build from any object with ``dsv_*`` attributes (Megatron args, a TransformerConfig);
        attributes it lacks keep their defaults."""
        kw = {f.name: getattr(obj, f.name) for f in dataclasses.fields(cls) if hasattr(obj, f.name)}
        return cls(**kw)

    def result_fields(self) -> dict:
        """Fields a resumed run must share with its checkpoint (what the learned state depends on)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in _RETUNABLE_ON_RESUME}


# Speed-only fields, and schedule knobs a user may retune when resuming (the layers restore their
# decisions; the schedule only steers what happens next).
_RETUNABLE_ON_RESUME = {
    "dsv_backend", "dsv_dense_backend", "dsv_log_interval", "dsv_speed_table", "dsv_stats_log",
    "dsv_cp_split", "dsv_cp_replan_interval", "dsv_cp_replan_threshold", "dsv_cp_gpus_per_node",
    "dsv_cp_intra_node_gbps", "dsv_cp_inter_node_gbps",
    # the schedule may be retuned when resuming; the layers' decisions are what is restored
    "dsv_profile_interval_stage1", "dsv_profile_interval_stage2", "dsv_switch_max_iters",
    "dsv_switch_min_iters", "dsv_stats_ema", "dsv_switch_loss_threshold", "dsv_switch_recall_target",
    "dsv_recall_floor", "dsv_stage2_predictor_lr_scale", "dsv_min_sparsity", "dsv_predictor_lr",
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _choice(name: str, value: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"{_flag(name)} must be one of {', '.join(choices)}; got {value!r}.")


def _int_range(name: str, value: int, lo: int, hi: Optional[int]) -> None:
    if not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        bound = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{_flag(name)} must be an integer {bound}; got {value!r}.")


def _unit(name: str, value: float, hi_open: bool = False) -> None:
    ok = 0.0 <= value < 1.0 if hi_open else 0.0 <= value <= 1.0
    if not ok:
        raise ValueError(f"{_flag(name)} must be in [0, 1{')' if hi_open else ']'}; got {value!r}.")


def _open_unit(name: str, value: float, hi_inclusive: bool) -> None:
    if not (0.0 < value <= 1.0 if hi_inclusive else 0.0 < value < 1.0):
        raise ValueError(f"{_flag(name)} must be in (0, 1]; got {value!r}.")


__all__ = ["DSVConfig", "parse_cube", "MODES"]
