"""DSVConfig: every ``dsv_*`` knob, validated, with fix-it error messages.

Field names equal the Megatron flags (``dsv_predictor_rank`` <-> ``--dsv-predictor-rank``), so
``core_transformer_config_from_args(args, config_class=DSVTransformerConfig)`` carries them into
the TransformerConfig that every layer sees (see ``megatron_dsv.layers.attention``).

Each field carries its rule (``knob(default, rule)``): the rule checks the value's type and range
in ``__post_init__`` and parses the flag's text in ``megatron_dsv.arguments``, so a bad value gets
the same message from Python and from the command line.

Fields are split into those that change results (mode, rank, groups, sparsity, schedule) and those
that change only speed (backends). This module imports nothing from Megatron.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import types
from dataclasses import dataclass
from typing import Any, Optional, Tuple

MODES = ("dense", "sparse", "auto")
PREDICTOR_INPUTS = ("qk", "hidden")
BACKENDS = ("auto", "cudnn", "triton", "reference")
DENSE_BACKENDS = ("auto", "sdpa", "te")
SPEED_RULES = ("measure", "assume")


def parse_cube(value: Any, what: str = "a cube") -> Tuple[int, int, int]:
    """``"2x4x4"``, ``(2, 4, 4)`` or ``[2, 4, 4]`` -> ``(2, 4, 4)``; ``what`` names the value in
    the error."""
    if isinstance(value, str):
        parts = value.lower().replace("*", "x").split("x")
        try:
            cube = tuple(int(p) for p in parts)
        except ValueError:
            cube = ()
    elif isinstance(value, (tuple, list)) and all(_is_int(p) for p in value):
        cube = tuple(int(p) for p in value)
    else:
        cube = ()
    if len(cube) != 3 or min(cube) < 1:
        raise ValueError(f"{what} must be three positive ints T x H x W such as 2x4x4; got {value!r}.")
    return cube


def parse_cp_split(value: str, what: str = "--dsv-cp-split"):
    """``auto`` | ``head`` | ``seq`` | ``HxS`` -> the string, or ``(H, S)`` for a fixed split."""
    if value in ("auto", "head", "seq"):
        return value
    try:
        h, s = (int(p) for p in str(value).lower().split("x"))
    except ValueError:
        h = s = 0
    if h < 1 or s < 1:
        raise ValueError(
            f"{what} must be auto, head, seq or HxS such as 4x2 (head-parallel x "
            f"sequence-parallel ranks); got {value!r}."
        )
    return h, s


def _is_int(value: Any) -> bool:
    # bool is an int subclass; True for a rank or a block size is a mistake, not 1
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _type_error(what: str, expected: str, value: Any) -> TypeError:
    return TypeError(f"{what} must be {expected}; got {value!r} of type {type(value).__name__}.")


@dataclass(frozen=True)
class Choice:
    """One of ``choices`` (strings)."""

    choices: Tuple[str, ...]

    @property
    def metavar(self) -> str:
        return "{" + ",".join(self.choices) + "}"

    def expected(self) -> str:
        return "one of " + ", ".join(self.choices)

    def parse(self, text: str, what: str) -> str:
        return self.check(text, what)

    def check(self, value: Any, what: str) -> str:
        if not isinstance(value, str):
            raise _type_error(what, f"a string, {self.expected()}", value)
        if value not in self.choices:
            raise ValueError(f"{what} must be {self.expected()}; got {value!r}.")
        return value


@dataclass(frozen=True)
class Int:
    """An integer in ``[lo, hi]`` (``hi`` None: no upper bound)."""

    lo: int
    hi: Optional[int] = None
    metavar = "N"

    def expected(self) -> str:
        return f"an integer >= {self.lo}" if self.hi is None else f"an integer in [{self.lo}, {self.hi}]"

    def parse(self, text: str, what: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise ValueError(f"{what} must be {self.expected()}; got {text!r}.") from None
        return self.check(value, what)

    def check(self, value: Any, what: str) -> int:
        if not _is_int(value):
            raise _type_error(what, self.expected(), value)
        if value < self.lo or (self.hi is not None and value > self.hi):
            raise ValueError(f"{what} must be {self.expected()}; got {value!r}.")
        return int(value)


@dataclass(frozen=True)
class Real:
    """A finite number between ``lo`` and ``hi`` (``hi`` None: no upper bound); ``lo_open`` /
    ``hi_open`` exclude the bound. ``hint`` follows the range in the error message."""

    lo: float
    hi: Optional[float] = None
    lo_open: bool = False
    hi_open: bool = False
    hint: str = ""
    metavar = "X"

    def expected(self) -> str:
        if self.hi is None:
            text = f"a number {'>' if self.lo_open else '>='} {self.lo:g}"
        else:
            text = f"a number in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"
        return f"{text} ({self.hint})" if self.hint else text

    def parse(self, text: str, what: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"{what} must be {self.expected()}; got {text!r}.") from None
        return self.check(value, what)

    def check(self, value: Any, what: str) -> float:
        if not isinstance(value, numbers.Real) or isinstance(value, bool):
            raise _type_error(what, self.expected(), value)
        value = float(value)
        ok = math.isfinite(value) and (value > self.lo if self.lo_open else value >= self.lo)
        if ok and self.hi is not None:
            ok = value < self.hi if self.hi_open else value <= self.hi
        if not ok:
            raise ValueError(f"{what} must be {self.expected()}; got {value!r}.")
        return value


@dataclass(frozen=True)
class Cube:
    """``T x H x W`` positive ints (``"2x4x4"`` or a sequence), stored as a tuple."""

    metavar = "TxHxW"

    def parse(self, text: str, what: str) -> Tuple[int, int, int]:
        return parse_cube(text, what)

    def check(self, value: Any, what: str) -> Tuple[int, int, int]:
        return parse_cube(value, what)


@dataclass(frozen=True)
class CpSplit:
    """``auto``, ``head``, ``seq`` or ``HxS``, stored as the string."""

    metavar = "{auto,head,seq,HxS}"

    def parse(self, text: str, what: str) -> str:
        return self.check(text, what)

    def check(self, value: Any, what: str) -> str:
        if not isinstance(value, str):
            raise _type_error(what, "a string: auto, head, seq or HxS such as 4x2", value)
        parse_cp_split(value, what)
        return value


@dataclass(frozen=True)
class Text:
    """Any string (a path; empty: unset)."""

    metavar = "PATH"

    def parse(self, text: str, what: str) -> str:
        return text

    def check(self, value: Any, what: str) -> str:
        if not isinstance(value, str):
            raise _type_error(what, "a string (a path, or empty)", value)
        return value


@dataclass(frozen=True)
class SpeedSource:
    """``measure``, ``assume`` or the path of a speed-table JSON."""

    metavar = "{measure,assume,PATH}"

    def parse(self, text: str, what: str) -> str:
        return self.check(text, what)

    def check(self, value: Any, what: str) -> str:
        if not isinstance(value, str):
            raise _type_error(what, "a string: measure, assume or the path of a speed-table JSON", value)
        if not value:
            raise ValueError(
                f"{what} must be measure (time sparse vs dense in the run), assume (sparse at density "
                "<= 0.5: what an empty value meant before) or the path of a JSON from benchmarks/attention.py; got ''."
            )
        return value


def knob(default: Any, rule) -> Any:
    """A DSVConfig field with its validation rule (read back with :func:`rule_of`)."""
    return dataclasses.field(default=default, metadata={"rule": rule})


def rule_of(field: dataclasses.Field):
    """The rule of a DSVConfig field: ``parse(text, what)`` for flags, ``check(value, what)``."""
    return field.metadata["rule"]


def check_field(name: str, value: Any) -> Any:
    """Validate one DSVConfig field's value; returns it normalised (e.g. a cube as a tuple).
    Raises TypeError (wrong type) or ValueError (out of range) naming the field and its flag."""
    field = _FIELDS[name]
    return rule_of(field).check(value, f"{name} ({_flag(name)})")


@dataclass
class DSVConfig:
    """Configuration of DSV sparse attention. Defaults follow the paper (arXiv 2502.07590)."""

    # What changes results.
    dsv_mode: str = knob("auto", Choice(MODES))
    """``dense``: DSV off, plain dense attention (the baseline). ``sparse``: sparse attention from
    the first step with a fixed per-head density. ``auto``: the two-stage schedule, dense while
    the predictor learns and the profiler measures sparsity, then sparse."""

    dsv_predictor_rank: int = knob(16, Int(1, 256))
    """Rank r of the low-rank score predictor, per head. 16: on 64-dim RoPE'd heads (H200,
    the pretraining example's 8 layers) its selection reaches 0.990-1.000 of the recall exact q/k
    get at the same K, so a larger rank has at most 1% of recall to win."""

    dsv_predictor_input: str = knob("qk", Choice(PREDICTOR_INPUTS))
    """``qk``: project the layer's q/k (RoPE-aware, local to core attention). ``hidden``: project
    the layer input (the paper's variant; needs the DSV self-attention module)."""

    dsv_query_group: Tuple[int, int, int] = knob((4, 4, 4), Cube())
    """Query-group cube (t, h, w) in tokens; its queries share one key set. 4x4x4 = 64 tokens:
    on a trained 16k-token DiT (H200, benchmarks/results/granularity_h200_20261130_g*.json) 64-token
    groups needed 0.93-1.00x the key-block density of 2x4x4 groups for recall 0.9 per layer,
    and the kernels run them x1.66 faster at equal density (S=64k, D=128, density 0.1: x6.45 vs
    x3.88 over cuDNN dense, attention_h200_20261130_granularity.json)."""

    dsv_kv_block: int = knob(64, Int(1, 1024))
    """Key granularity in tokens: n selects contiguous blocks of n keys (in cube-major order a block
    of 64 is a 4x4x4 cube), 1 selects single keys. 64: at equal recall it is the fastest on the
    H200 (a trained 16k DiT needs density 0.153 for recall 0.9 at 64-key blocks, 0.079 per token;
    the kernels at S=64k, D=128, density 0.1 run x7.04 over cuDNN dense with 64-key blocks and
    64-token groups, x1.36 with single keys), README "Granularity by measurement". Megatron's
    arguments refuse 1 outside dense mode (``validate_dsv_args``); this config keeps it for
    CPU-sized models and tests."""

    dsv_causal_chunk: int = knob(0, Int(0))
    """Chunk-causal attention for autoregressive video: tokens attend fully inside a chunk of this
    many latent frames (after patching) and causally to earlier chunks; 0 = off (bidirectional,
    or token-causal where the spec says ``attn_mask_type=causal``). A multiple of the query
    group's t, so a chunk is whole layers of cubes, a contiguous token range in cube-major order.
    Sparse attention with it runs on the Triton or reference kernels; ``--dsv-backend cudnn`` is
    refused (cuDNN's block-sparse attention has no token mask)."""

    dsv_critical_mass: float = knob(0.9, Real(0.0, 1.0, lo_open=True))
    """Target recall: K per head is the fewest key units whose selection, as the layer really
    selects (query groups x key units ranked by the predictor), holds this fraction of the sampled
    rows' exact attention mass. Token-level sparsity is reported against it too. 0.9: DSV at this
    target stayed within +0.04% / -0.11% of dense in the paired quality protocol (two data sources,
    95% intervals inside +-0.15%), while random key blocks at the same K were +20% / +53% worse;
    lower targets are not measured."""

    dsv_min_sparsity: float = knob(0.5, Real(0.0, 1.0))
    """A layer goes sparse only when the density chosen for the target recall (K/units; under a
    causal mask the share of the allowed pairs K selects) leaves at least this fraction of the
    work out (1 - density >= this); above it the speed table decides
    (``--dsv-speed-table``). 0.5: in the pretraining example (H200, 16k tokens, commit 9df742e)
    layers 1-2 went sparse at density 0.45-0.50, the speed probe timed them 3.43 / 3.55 ms sparse
    against 3.98 / 4.00 ms dense, recall held >= 0.900, and the run's own step got 2.3% faster
    (274.1 -> 267.9 ms); at 0.8 (the old default) no layer of that run went sparse."""

    dsv_fixed_sparsity: float = knob(0.9, Real(0.0, 1.0, hi_open=True))
    """Per-head sparsity used when no profile exists (``sparse`` mode from scratch, or a head the
    profiler has not measured yet): each head keeps ``1 - dsv_fixed_sparsity`` of its keys."""

    dsv_min_keys: int = knob(64, Int(1))
    """Floor on the keys each query group keeps per head, however sparse the head is (in keys;
    with key blocks, rounded up to whole blocks)."""

    dsv_k_multiple: int = knob(64, Int(1))
    """Keys per head are rounded up to a multiple of this (the kernels' key tile), in keys; with
    key blocks, to whole blocks."""

    dsv_predictor_fit: str = knob("closed_form", Choice(("closed_form", "gradient")))
    """How the predictor learns. ``closed_form``: on every profiling iteration the sampled rows'
    score moments (summed over data- and context-parallel ranks) are fitted by weighted
    reduced-rank regression, a [D, D] problem per head, no autograd, no optimizer (the predictor's
    weights are not trainable parameters). ``gradient``: the predictor loss is back-propagated
    through Megatron's auxiliary-loss path and an optimizer group of its own (the paper's way)."""

    dsv_predictor_loss_coeff: float = knob(1.0, Real(0.0))
    """Scale of the predictor loss gradient (it reaches only predictor parameters)."""

    dsv_predictor_cosine_weight: float = knob(0.95, Real(0.0, 1.0))
    """Weight of (1 - cosine similarity) in the predictor loss; MSE gets ``1 - this``."""

    dsv_profile_stride: int = knob(32, Int(1))
    """Profile and train the predictor on every n-th query (16 to 64 in the paper)."""

    dsv_profile_interval_stage1: int = knob(20, Int(1))
    """Profile, and refit the closed-form predictor, every n iterations during stage 1 (dense; the
    gradient fit trains every iteration). 20: a profiling step of 2.7B-shaped layers costs 0.72
    / 0.56 / 0.39 of a dense step (H200, ``benchmarks/overhead.py``), so the stage-1 overhead
    per step is 3.9% / 3.8% / 1.7% at 16k / 32k / 64k tokens, against 7.5% / 6.6% / 3.7% every
    10 (target 5%). Sampling every 64th query instead (``--dsv-profile-stride``) every 10 gives
    5.5% / 3.7% / 2.1% with half the rows per measurement; the statistics are EMAs over
    profiles, so fewer profiles keep each one as precise."""

    dsv_profile_interval_stage2: int = knob(50, Int(1))
    """Profile, and train the predictor, every n iterations during stage 2 (sparse)."""

    dsv_stats_ema: float = knob(0.9, Real(0.0, 1.0, hi_open=True))
    """Decay of the exponential moving average of sparsity, recall and predictor loss."""

    dsv_switch_relative_recall: float = knob(0.95, Real(0.0, 1.0, lo_open=True))
    """Stage switch: the predictor's recall at the chosen K, relative to what the same selection
    rule gets from exact q/k, must reach this (mean over layers and heads) and have plateaued.
    The absolute loss of the paper (0.01) is not a gate: it sits below what a rank-16 predictor
    reaches on RoPE'd 64-dim heads and does not track recall (measured, issue 13)."""

    dsv_switch_plateau: float = knob(0.01, Real(0.0, 1.0))
    """Stage switch: the relative recall has plateaued when its last 3 profiling measurements lie
    within this of each other."""

    dsv_switch_min_iters: int = knob(100, Int(0))
    """Never switch to sparse before this many iterations of stage 1."""

    dsv_switch_max_iters: int = knob(5000, Int(0))
    """Switch to sparse at this iteration even if the predictor has not converged."""

    dsv_recall_floor: float = knob(0.8, Real(0.0, 1.0))
    """In stage 2 a layer whose recall at its K falls below this goes back to dense (its K is
    cleared). A guard, not a tuned value: with K re-chosen for 0.9 at every profile, sparse
    layers held 0.900-0.902 on the H200 and the floor never fired."""

    dsv_recall_margin: float = knob(0.05, Real(0.0, 1.0))
    """Hysteresis: a layer that fell back to dense returns only when its recall reaches the floor
    plus this and it has been dense for ``--dsv-min-dwell`` iterations."""

    dsv_min_dwell: int = knob(100, Int(0))
    """Hysteresis: iterations a layer that fell back to dense stays dense at least."""

    dsv_stage2_predictor_lr_scale: float = knob(0.1, Real(0.0, 1.0, lo_open=True))
    """Predictor learning-rate multiplier in stage 2."""

    dsv_predictor_lr: float = knob(0.0, Real(0.0, hint="0 uses the model's --lr"))
    """Peak learning rate of the predictor's own optimizer groups in Megatron runs (0: the model's
    --lr); its minimum keeps --min-lr's ratio to --lr."""

    # What changes speed only.
    dsv_backend: str = knob("auto", Choice(BACKENDS))
    """Sparse kernels: ``auto`` (cuDNN's block-sparse attention where installed and the case is
    served, else Triton on GPU, the reference on CPU), ``cudnn``, ``triton`` or ``reference``.
    Selection always runs on Triton (or the reference on CPU)."""

    dsv_dense_backend: str = knob("auto", Choice(DENSE_BACKENDS))
    """Dense attention: ``auto`` (TE when importable, else SDPA), ``sdpa`` or ``te``."""

    dsv_log_interval: int = knob(0, Int(0))
    """Log a compact DSV status line every n iterations (0 = at every profiling iteration)."""

    dsv_speed_table: str = knob("measure", SpeedSource())
    """Where a layer's sparse path is faster than its dense path. ``measure``: timed in the run, on
    synthetic tensors of the layer's shape at its K (projection, selection and sparse attention
    forward + backward against the layer's dense path; the slowest data/tensor-parallel rank's
    time), once per shape and K, logged with both times; not checkpointed (measured again after a
    restart). A layer under context parallelism is not probed (the CP autotuner times its real
    path): it keeps the ``assume`` rule. ``assume``: sparse at density <= 0.5, no probing (the
    rule sent layers at density 0.29 / 0.44 sparse on an H200 where their sparse path was slower
    than cuDNN dense: 119.8 vs 100.4 ms per step). A path: a JSON written by
    benchmarks/attention.py; sparse only where it says sparse is faster at that length and density."""

    dsv_speed_margin: float = knob(0.05, Real(0.0, 1.0, hi_open=True))
    """With ``--dsv-speed-table measure``: a layer goes sparse only when its measured sparse time is
    below its dense time x (1 - this); the margin covers timing noise between ranks and runs."""

    dsv_cp_split: str = knob("auto", CpSplit())
    """Context parallelism (``--context-parallel-size`` > 1): how each layer splits the CP group
    into head-parallel x sequence-parallel ranks. ``auto``: the planner's choice per layer from
    the measured sparsity (re-planned as it moves); ``head``: as many head-parallel ranks as the
    heads allow; ``seq``: sequence-parallel only; ``HxS`` (e.g. ``4x2``): fixed for all layers.
    Exact in every case; only speed differs."""

    dsv_cp_replan_interval: int = knob(200, Int(1))
    """With ``--dsv-cp-split auto``: at least this many iterations between two re-plans of a layer."""

    dsv_cp_replan_threshold: float = knob(0.02, Real(0.0, 1.0))
    """With ``--dsv-cp-split auto``: re-plan a layer when a head's density moved more than this."""

    dsv_cp_gpus_per_node: int = knob(8, Int(1))
    """GPUs per node, for the planner's choice of intra-node (all-to-all) vs inter-node links."""

    dsv_cp_calibration: str = knob("", Text())
    """With ``--dsv-cp-split auto``: a calibration JSON of the CP links (bandwidth and latency of
    all-to-all and point-to-point, inside and across nodes), written once per cluster with
    ``torchrun ... -m megatron_dsv.tools.calibrate_cp --out cal.json``; the planner's cost model
    uses it. Empty: every rank measures the links on its CP group at the first plan, at the
    message sizes a layer sends (a few hundred ms on GPUs). Either way the numbers are logged."""

    dsv_cp_autotune: str = knob("on", Choice(("on", "off")))
    """With ``--dsv-cp-split auto``: ``on`` times the planner's candidates (predicted within 25% of
    the best, and the pure head and sequence splits) with the real CP attention forward + backward
    on synthetic tensors of the layer's shape and K per head, and keeps the fastest (the slowest
    rank's time, so every rank agrees); measured once per (length, K per head, shape) and logged
    next to the predictions. ``off``: the cost model's choice alone."""

    dsv_cp_intra_node_gbps: float = knob(150.0, Real(0.0, lo_open=True))
    """Planner fallback: per-GPU bandwidth, GB/s, of links inside a node when the calibration has
    none (measured at start-up or ``--dsv-cp-calibration``: only when every rank it measured sat on
    a node of its own) and the plans use them; logged as assumed. Measured links replace it."""

    dsv_cp_inter_node_gbps: float = knob(40.0, Real(0.0, lo_open=True))
    """Planner fallback: per-GPU bandwidth, GB/s, of links across nodes (400 Gb/s InfiniBand)
    when the calibration has none (it was measured on one node) and the CP group spans nodes
    (``--dsv-cp-gpus-per-node`` < CP size); logged as assumed. Measured links replace it."""

    dsv_stats_log: str = knob("", Text())
    """Append per-layer, per-head statistics as JSON lines to this file (rank 0), for
    ``python -m megatron_dsv.tools.plot_stats``."""

    dsv_on_resume: str = knob("restore", Choice(("restore", "reset")))
    """What a layer does with the DSV state of the checkpoint it loads: ``restore`` it (decisions,
    K, statistics, stage; refused when the checkpoint's DSV config differs), or ``reset`` it: the
    weights (predictor included) load as usual, the DSV schedule starts afresh from stage 1."""

    def __post_init__(self):
        for f in dataclasses.fields(DSVConfig):
            setattr(self, f.name, check_field(f.name, getattr(self, f.name)))
        if self.dsv_switch_max_iters < self.dsv_switch_min_iters:
            raise ValueError(
                f"--dsv-switch-max-iters ({self.dsv_switch_max_iters}) must be >= "
                f"--dsv-switch-min-iters ({self.dsv_switch_min_iters})."
            )
        if self.dsv_recall_floor + self.dsv_recall_margin > 1.0:
            raise ValueError(
                f"--dsv-recall-floor ({self.dsv_recall_floor}) + --dsv-recall-margin "
                f"({self.dsv_recall_margin}) must be <= 1 (recall cannot exceed 1): lower one of them."
            )
        if self.dsv_causal_chunk % self.dsv_query_group[0]:
            raise ValueError(
                f"--dsv-causal-chunk {self.dsv_causal_chunk} frames cuts the query-group cubes "
                f"({self.dsv_query_group[0]} frames deep, --dsv-query-group): in cube-major order a "
                "chunk is a contiguous token range only when it is whole layers of cubes. Use a "
                f"multiple of {self.dsv_query_group[0]}."
            )
        if self.dsv_predictor_fit == "closed_form" and self.dsv_predictor_input == "hidden":
            raise ValueError(
                "--dsv-predictor-fit closed_form fits the 'qk' predictor (q W_q (k W_k)^T to q k^T); "
                "with --dsv-predictor-input hidden use --dsv-predictor-fit gradient."
            )

    @property
    def speed_table_file(self) -> Optional[str]:
        """The speed-table JSON of ``--dsv-speed-table``, None for ``measure`` and ``assume``."""
        return None if self.dsv_speed_table in SPEED_RULES else self.dsv_speed_table

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
    "dsv_backend", "dsv_dense_backend", "dsv_log_interval", "dsv_speed_table", "dsv_speed_margin", "dsv_stats_log",
    "dsv_cp_split", "dsv_cp_replan_interval", "dsv_cp_replan_threshold", "dsv_cp_gpus_per_node",
    "dsv_cp_calibration", "dsv_cp_autotune", "dsv_cp_intra_node_gbps", "dsv_cp_inter_node_gbps", "dsv_on_resume",
    # the schedule may be retuned when resuming; the layers' decisions are what is restored
    "dsv_profile_interval_stage1", "dsv_profile_interval_stage2", "dsv_switch_max_iters",
    "dsv_switch_min_iters", "dsv_stats_ema", "dsv_switch_relative_recall", "dsv_switch_plateau",
    "dsv_recall_margin", "dsv_min_dwell",
    "dsv_recall_floor", "dsv_stage2_predictor_lr_scale", "dsv_min_sparsity", "dsv_predictor_lr",
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


_FIELDS = types.MappingProxyType({f.name: f for f in dataclasses.fields(DSVConfig)})

__all__ = ["DSVConfig", "parse_cube", "parse_cp_split", "check_field", "MODES"]
