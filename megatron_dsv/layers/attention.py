"""DSVCoreAttention: Megatron's core-attention contract with dense and DSV sparse paths.

Megatron's ``SelfAttention`` computes q ``[s, b, np, hn]`` and k/v ``[s, b, ng, hn]`` (RoPE
applied) and calls ``core_attention(q, k, v, mask, attn_mask_type=, attention_bias=,
packed_seq_params=)``, expecting ``[s, b, np*hn]`` back. This module answers that call with

* the dense path: ``scaled_dot_product_attention`` (cuDNN first on GPU), or Transformer Engine's
  attention when it is importable and chosen; used for stage 1, dense layers, cross-attention and
  ``--dsv-mode dense``;
* the sparse path: low-rank predictor -> per-head top-K selection per query group -> sparse
  attention over the selected keys (``megatron_dsv.ops``).

Masks: ``attn_mask_type=no_mask`` is bidirectional (video DiTs); ``causal`` is token-causal (a
causal language model; a given ``attention_mask`` is ignored, as Megatron's causal kernels do);
``--dsv-causal-chunk T`` (with ``no_mask``) is chunk-causal over chunks of T latent frames, whose
size in tokens the model gives with :meth:`DSVCoreAttention.set_frame_tokens`. Both paths apply
the mask: dense through SDPA (``is_causal`` or a boolean block mask), sparse through a
:class:`~megatron_dsv.ops.mask.CausalMask` on the selection and the index. Masked sparse
attention runs on the Triton kernels or the reference (not cuDNN, whose block-sparse API has no
token mask), and so does masked selection. Under context parallelism a mask holds over
the whole sequence: each sequence shard selects with its first token as ``q_offset``, the dense
ring and the selective exchange skip disallowed shards, and the predictor's masked statistics
take the sampled rows' positions in the whole sequence; a chunk-causal mask needs shards that
hold whole chunks or lie inside one (:meth:`CausalMask.check_shards`).

While the predictor trains, its loss on sampled query rows (against exact, detached scores) is
attached to the output with :class:`PredictorLossAutoScaler`, Megatron's auxiliary-loss pattern:
the forward returns the output unchanged, the backward injects the loss's gradient, which reaches
only predictor parameters. DDP, the optimizer, checkpointing and activation recompute therefore
treat the predictor like any other parameter; under recompute the loss is built only in the pass
that has autograd on, so an iteration updates the predictor once.
"""

from __future__ import annotations

import logging
import math
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide

from megatron_dsv.config import DSVConfig, parse_cp_split
from megatron_dsv.cp.context import CPAttention
from megatron_dsv.cp.groups import CPGroups
from megatron_dsv.cp.plan import LayerPlan, fixed_plan
from megatron_dsv.layers.predictor import LowRankPredictor, predictor_loss
from megatron_dsv.layers.profiler import RecallCurve, recall_curve, sample_rows, sampled_attention_stats
from megatron_dsv.layers.state import LayerState, LayerStats, StepControl
from megatron_dsv.ops._utils import BackendChoice, check_head_dim, choose_backend, log_once
from megatron_dsv.ops.mask import CausalMask
from megatron_dsv.ops.selection import select_topk
from megatron_dsv.ops.sparse_attention import attention_backend
from megatron_dsv.ops.sparse_index import k_from_sparsity

logger = logging.getLogger("megatron_dsv")

TOKEN_SPARSITY_EVERY = 8
"""Token-level sparsity (reported only) is measured on every n-th sampled row: it sorts S scores
per row, the most expensive part of profiling at long sequences."""

try:
    from megatron.core.extensions.transformer_engine import HAVE_TE, TEDotProductAttention
except ImportError:  # pragma: no cover - TE is optional
    HAVE_TE, TEDotProductAttention = False, None


class PredictorLossScale:
    """The main loss's backward scale (loss scaler and ``1/num_microbatches``) for the predictor loss.

    Megatron's schedules pass it to ``config.experimental_attention_variant_loss_scale_func`` before
    each backward; :func:`predictor_loss_scale` installs :meth:`set` there, one holder per config,
    shared by that config's layers.
    """

    def __init__(self):
        self.value: Optional[Tensor] = None

    def set(self, scale: Tensor) -> None:
        self.value = scale.detach().clone()

    def reset(self) -> None:
        self.value = None


def predictor_loss_scale(config: TransformerConfig) -> PredictorLossScale:
    """The :class:`PredictorLossScale` that ``config``'s loss-scale hook feeds (installed on first use)."""
    fn = getattr(config, "experimental_attention_variant_loss_scale_func", None)
    owner = getattr(fn, "__self__", None)
    if isinstance(owner, PredictorLossScale):
        return owner
    holder = PredictorLossScale()
    if fn is None:
        config.experimental_attention_variant_loss_scale_func = holder.set
    else:
        log_once(
            logging.WARNING,
            "DSV: config.experimental_attention_variant_loss_scale_func is taken by another attention "
            "variant; the DSV predictor loss is not scaled by the main loss scale (with fp16 loss "
            "scaling or several microbatches its gradient is off by that factor).",
        )
    return holder


class PredictorLossAutoScaler(torch.autograd.Function):
    """Attach the predictor loss to an activation: identity forward, loss gradient in backward,
    scaled by the main loss's backward scale held in ``scale``."""

    @staticmethod
    def forward(ctx, output: Tensor, loss: Tensor, scale: PredictorLossScale) -> Tensor:
        ctx.save_for_backward(loss)
        ctx.scale = scale
        return output

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        (loss,) = ctx.saved_tensors
        value = ctx.scale.value
        value = 1.0 if value is None else value.to(loss.device)
        return grad_output, torch.ones_like(loss) * value, None


def resolve_dsv_config(config: TransformerConfig, dsv_config: Optional[DSVConfig]) -> DSVConfig:
    """The DSV config of a layer: an explicit one, else the ``dsv_*`` fields of ``config``."""
    if dsv_config is not None:
        return dsv_config
    if not any(name.startswith("dsv_") for name in vars(config)):
        log_once(
            logging.WARNING,
            "DSVCoreAttention got a TransformerConfig without dsv_* fields; using DSVConfig() "
            "defaults. Build the config with DSVTransformerConfig (or "
            "core_transformer_config_from_args(args, config_class=DSVTransformerConfig)).",
        )
    return DSVConfig.from_namespace(config)


def autocast_inputs(query: Tensor, key: Tensor, value: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """q, k, v in autocast's dtype when autocast is on, as torch's SDPA runs (it is on autocast's
    lower-precision list): both of a layer's paths, the speed probe and the statistics then see
    the dtype the dense path computes in. Under autocast q and k often arrive in fp32 although the
    projections ran in bf16 (a qk RMSNorm is on autocast's fp32 list); before this cast the sparse
    kernels ran those in fp32 and the probe timed both paths in fp32 (H200, quality protocol at
    ec1df4a: sparse 7.7 ms vs dense SDPA 83.9 ms in the probe, while training's dense path ran in
    bf16 and the DSV arm's step was 4-13% slower than dense)."""
    device_type = query.device.type
    if not torch.is_autocast_enabled(device_type):
        return query, key, value
    dtype = torch.get_autocast_dtype(device_type)
    cast = lambda t: t.to(dtype) if t.is_floating_point() and t.dtype != dtype else t  # noqa: E731
    return cast(query), cast(key), cast(value)


class DSVCoreAttention(MegatronModule):
    """Core attention with DSV's dense and sparse paths; drop-in for Megatron's core attention.

    The layer owns its :class:`LayerState` (decision, K per head, CP plan, statistics EMA), changed
    only through :meth:`apply`; the runtime tells it what an iteration does with
    :meth:`begin_iteration` and collects what profiling forwards measured with :meth:`pop_stats`.
    Context parallelism is switched on by :func:`megatron_dsv.layers.context_parallel.apply_dsv_context_parallel`
    after the model is built, never by the constructor (which runs no collective).
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        cp_comm_type: Optional[str] = None,
        softmax_scale: Optional[float] = None,
        pg_collection: Optional[ProcessGroupCollection] = None,
        attention_dropout: Optional[float] = None,
        dsv_config: Optional[DSVConfig] = None,
        **kwargs,
    ):
        super().__init__(config=config)
        self.dsv = resolve_dsv_config(config, dsv_config)
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        self.cp_comm_type = cp_comm_type
        if pg_collection is None:
            required = ["tp", "cp"] if config.context_parallel_size > 1 else ["tp"]
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=required)
        self.pg_collection = pg_collection
        tp = pg_collection.tp.size()
        self.head_dim = divide(config.kv_channels * config.num_attention_heads, config.num_attention_heads)
        self.num_heads = divide(config.num_attention_heads, tp)
        self.num_heads_global = self.num_heads * tp
        self.num_kv_heads = max(1, config.num_query_groups // tp) if config.num_query_groups else self.num_heads
        self.softmax_scale = 1.0 / math.sqrt(self.head_dim) if softmax_scale is None else softmax_scale
        if config.apply_query_key_layer_scaling:
            self.softmax_scale /= self.layer_number
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        if getattr(config, "softmax_type", "vanilla") != "vanilla":
            raise ValueError(f"DSV attention supports softmax_type='vanilla' only, got {config.softmax_type!r}.")

        self.is_self_attention = attention_type == "self"
        self.predictor = None
        self.loss_scale: Optional[PredictorLossScale] = None
        if self.dsv.enabled and self.is_self_attention:
            check_head_dim(self.head_dim)
            if self.dropout_p > 0:
                raise ValueError(
                    f"DSV sparse attention has no attention dropout; set --attention-dropout 0 "
                    f"(got {self.dropout_p}) or --dsv-mode dense."
                )
            device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
            hidden = config.hidden_size if self.dsv.dsv_predictor_input == "hidden" else None
            self.predictor = LowRankPredictor(
                self.num_heads, self.head_dim, self.dsv.dsv_predictor_rank,
                num_kv_heads=self.num_kv_heads, input_dim=hidden, device=device,
                head_offset=self.head_slice().start, num_heads_total=self.num_heads_global,
                seed=(torch.initial_seed() * 1_000_003 + self.layer_number) % (2**63),
            )
            self.predictor.tp_group = pg_collection.tp
            if self.dsv.dsv_predictor_fit == "closed_form":
                # Fitted in closed form, never by an optimizer: Megatron's DDP and optimizer skip
                # parameters that do not require grad, so no master copy overwrites a fit.
                self.predictor.requires_grad_(False)
            else:
                self.loss_scale = predictor_loss_scale(config)
        sparse = self.dsv.dsv_mode == "sparse" and self.predictor is not None
        self._state = LayerState(sparse=sparse)
        self._control = StepControl(train_predictor=self.predictor is not None, collect_stats=self.predictor is not None)
        self._pending: List[LayerStats] = []
        self._seen: Optional[Tuple[int, int, torch.dtype]] = None  # (sequence length, batch, q dtype) of the last forward
        self._layer_input: Optional[Tensor] = None
        self._frame_tokens: Optional[int] = None  # tokens per latent frame, for --dsv-causal-chunk
        self._cp_groups: Optional[CPGroups] = None
        self._exchange = None
        self._kernels: Optional[BackendChoice] = None  # what the last sparse forward ran, and why
        self._profiled = False  # this iteration's one profiled microbatch is done

        self.dense_backend = self._resolve_dense_backend()
        self.te_attention = None
        if self.dense_backend == "te":
            self.te_attention = TEDotProductAttention(
                config=config, layer_number=layer_number, attn_mask_type=attn_mask_type,
                attention_type=attention_type, softmax_scale=softmax_scale,
                cp_comm_type=cp_comm_type, pg_collection=pg_collection,
            )

    @property
    def state(self) -> LayerState:
        """This layer's :class:`LayerState` (read it; change it with :meth:`apply`)."""
        return self._state

    @property
    def sparse(self) -> bool:
        return self._state.sparse

    @property
    def kv_units_global(self) -> Optional[Tensor]:
        return self._state.kv_units

    @property
    def stats_ema(self) -> Dict[str, Tensor]:
        return self._state.stats_ema

    @property
    def schedule_state(self) -> Dict:
        return self._state.schedule

    @property
    def decision(self) -> str:
        return self._state.reason

    @property
    def cp_plan(self) -> Optional[LayerPlan]:
        return self._state.cp_plan

    @property
    def cp_groups(self) -> Optional[CPGroups]:
        return self._cp_groups

    @property
    def cp_exchange(self):
        """Bytes the last selective key/value exchange moved (``ExchangeStats``), None without one."""
        return self._exchange

    @property
    def cp_size(self) -> int:
        return 1 if self._cp_groups is None else self._cp_groups.size

    @property
    def control(self) -> StepControl:
        return self._control

    @property
    def last_seq_len(self) -> Optional[int]:
        """Full sequence length of the last forward (all CP ranks' tokens), None before one."""
        return None if self._seen is None else self._seen[0]

    @property
    def last_batch(self) -> int:
        return 1 if self._seen is None else self._seen[1]

    @property
    def last_dtype(self) -> torch.dtype:
        """The activations' dtype in the last forward (bf16 under autocast with fp32 parameters),
        the parameters' before one."""
        return self.config.params_dtype if self._seen is None else self._seen[2]

    @property
    def pending_stats(self) -> Tuple[LayerStats, ...]:
        """This iteration's measurements so far (one per profiled microbatch)."""
        return tuple(self._pending)

    def head_slice(self) -> slice:
        """This rank's heads within the layer's global heads (tensor parallelism splits heads)."""
        rank = self.pg_collection.tp.rank()
        return slice(rank * self.num_heads, (rank + 1) * self.num_heads)

    def apply(self, state: LayerState) -> None:
        """Adopt ``state`` (the runtime's decision, or a restored checkpoint), checked first."""
        if state.sparse and self.predictor is None:
            raise RuntimeError(
                f"layer {self.layer_number} has no predictor (dsv_mode=dense or cross-attention) "
                "and cannot run sparse."
            )
        if state.kv_units is not None:
            kv = torch.as_tensor(state.kv_units, dtype=torch.int32).flatten().cpu()
            if kv.numel() != self.num_heads_global:
                raise ValueError(f"need K for the layer's {self.num_heads_global} heads, got {kv.numel()}.")
            if (kv < 1).any():
                raise ValueError(f"layer {self.layer_number}: K per head must be >= 1 key unit, got {kv.tolist()}.")
            state = state.replace(kv_units=kv)
        if state.cp_plan is not None:
            if self._cp_groups is None:
                raise RuntimeError(
                    f"layer {self.layer_number} got a CP plan but runs without context parallelism; "
                    "call apply_dsv_context_parallel(model, ...) first."
                )
            plan = state.cp_plan
            if plan.cp_size != self._cp_groups.size or plan.num_heads != self.num_heads:
                raise ValueError(
                    f"layer {self.layer_number}: plan {plan.head_size}x{plan.seq_size} over "
                    f"{plan.num_heads} heads does not fit CP size {self._cp_groups.size} with "
                    f"{self.num_heads} heads on this rank."
                )
        self._state = state

    def set_sparse(self, sparse: bool, kv_units_per_head: Optional[Tensor] = None) -> None:
        """Switch this layer's path (shorthand for :meth:`apply`); ``kv_units_per_head``: int
        ``[H]`` key units per head for all the layer's heads (across tensor-parallel ranks)."""
        kv = self._state.kv_units if kv_units_per_head is None else kv_units_per_head
        self.apply(self._state.replace(sparse=bool(sparse), kv_units=kv))

    def begin_iteration(self, control: StepControl) -> None:
        """What this iteration does (before its first forward); drops unread statistics."""
        self._control = control
        self._pending = []
        self._profiled = False

    def pop_stats(self) -> List[LayerStats]:
        """The statistics measured since :meth:`begin_iteration`, handed over once."""
        out, self._pending = self._pending, []
        return out

    def enable_context_parallel(self, groups: CPGroups, plan: Optional[LayerPlan] = None) -> None:
        """Run this layer's self-attention over ``groups`` (from ``apply_dsv_context_parallel``).

        ``plan`` defaults to ``--dsv-cp-split`` (``auto`` starts head-parallel where the heads
        allow it, and the runtime re-plans from measured sparsity)."""
        if not self.is_self_attention:
            raise ValueError("cross-attention is never context-parallel: a query shard attends to the whole context.")
        if self.dsv.dsv_predictor_input == "hidden":
            raise NotImplementedError(
                "--dsv-predictor-input hidden is not supported with context parallelism (the layer "
                "input is split by tokens, the predictor by heads); use --dsv-predictor-input qk."
            )
        if self.te_attention is not None:
            raise NotImplementedError(
                "DSV context parallelism runs its own dense ring; use --dsv-dense-backend sdpa with CP."
            )
        if plan is None:
            plan = fixed_plan(parse_cp_split(self.dsv.dsv_cp_split), groups.size, self.num_heads, self.num_kv_heads)
        self._cp_groups = groups
        self.apply(self._state.replace(cp_plan=plan))

    def set_frame_tokens(self, tokens: int) -> None:
        """Tokens per latent frame (H*W of the patch grid), which ``--dsv-causal-chunk`` frames
        are counted in; the model calls it before the forward."""
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
            raise ValueError(f"tokens per frame must be a positive int (H*W of the patch grid), got {tokens!r}.")
        self._frame_tokens = tokens

    def causal_mask(self, mask_type: Optional[AttnMaskType] = None) -> Optional[CausalMask]:
        """The :class:`CausalMask` this layer applies for ``mask_type`` (default: its own), None
        when bidirectional or for other Megatron masks (which the dense path passes to SDPA)."""
        mask_type = self.attn_mask_type if mask_type is None else mask_type
        chunk = self.dsv.dsv_causal_chunk
        if not self.is_self_attention:
            return None  # cross-attention keys are another sequence; its masks go to SDPA as given
        if chunk:
            if mask_type != AttnMaskType.no_mask:
                raise ValueError(
                    f"--dsv-causal-chunk {chunk} is a chunk-causal mask of its own; layer "
                    f"{self.layer_number} has attn_mask_type={mask_type.name}. Use the bidirectional DSV "
                    "spec (attn_mask_type=no_mask) with it, or --dsv-causal-chunk 0."
                )
            if self._frame_tokens is None:
                raise ValueError(
                    f"--dsv-causal-chunk {chunk} counts frames, but layer {self.layer_number} does not know "
                    "the tokens per frame: call layer.set_frame_tokens(H * W of the patch grid) before "
                    "the forward (a VideoDiT with chunk-causal attention will, issue 19)."
                )
            return CausalMask.from_frames(chunk, self._frame_tokens, self.dsv.dsv_query_group[0])
        return CausalMask("causal") if mask_type == AttnMaskType.causal else None

    @property
    def planning_mask(self) -> Optional[CausalMask]:
        """The layer's own causal mask for the CP planner, None when bidirectional or while a
        chunk-causal layer has not yet been given its frame size (before the first forward)."""
        if self.dsv.dsv_causal_chunk and self._frame_tokens is None:
            return None
        return self.causal_mask()

    def _forced_units(self, seq_len_kv: int) -> int:
        """Key units a causal mask makes every group keep (0 without one): a floor on K."""
        if self.dsv.dsv_causal_chunk and self._frame_tokens is None:
            return 0  # not known before the model gives the frame size; the forward then raises
        mask = self.causal_mask()
        return 0 if mask is None else mask.max_forced(seq_len_kv, self.dsv.group_size, self.dsv.dsv_kv_block)

    def set_layer_input(self, hidden_states: Optional[Tensor]) -> None:
        """Layer input ``[s, b, h]`` for the ``hidden`` predictor variant (set by DSVSelfAttention)."""
        self._layer_input = hidden_states

    def k_for_sparsity(self, sparsity: Tensor, seq_len_kv: int) -> Tensor:
        """Key units per head for per-head ``sparsity``: ``ceil((1 - s) * units)`` rounded up to
        ``--dsv-k-multiple``, at least ``--dsv-min-keys``, at most all units (int32)."""
        units = seq_len_kv // self.dsv.dsv_kv_block
        return k_from_sparsity(sparsity, units, multiple=self.dsv.multiple_units(), floor=self.dsv.min_units(units))

    def kv_count_global(self, seq_len_kv: int) -> Tensor:
        """K per head of the layer (all TP ranks) in key units, int32 ``[H]``: the state's K (chosen
        by the runtime for the target recall), else from ``dsv_fixed_sparsity``. Under a causal mask
        at least the units every group must keep (its diagonal, :meth:`CausalMask.max_forced`)."""
        state = self._state
        units = seq_len_kv // self.dsv.dsv_kv_block
        floor = max(self.dsv.min_units(units), min(units, self._forced_units(seq_len_kv)))
        if state.kv_units is not None:
            return state.kv_units.clamp(min=floor, max=units)
        k = self.k_for_sparsity(torch.full((self.num_heads_global,), self.dsv.dsv_fixed_sparsity), seq_len_kv)
        return k.clamp(min=floor)

    def kv_count(self, seq_len_kv: int) -> Tensor:
        """K per local head in key units, int32 ``[H_local]`` (see :meth:`kv_count_global`)."""
        return self.kv_count_global(seq_len_kv)[self.head_slice()]

    def describe(self) -> str:
        """One line naming the kernels this layer uses and why (and its CP split)."""
        line = self._describe_path()
        p = self._state.cp_plan
        if p is not None:
            line += (
                f"; CP {p.head_size}x{p.seq_size} (head x sequence), heads per rank "
                f"{[len(h) for h in p.slots]}"
            )
        return line

    def _describe_path(self) -> str:
        if self.predictor is None:
            why = "cross-attention is always dense" if not self.is_self_attention else "dsv_mode=dense"
            return f"layer {self.layer_number}: dense ({self.dense_backend}) - {why}"
        if self._state.sparse:
            k = self._state.kv_units
            ks = "fixed sparsity %.2f" % self.dsv.dsv_fixed_sparsity if k is None else f"K/head={k.tolist()}"
            kernels = (
                f"--dsv-backend {self.dsv.dsv_backend}, resolved at the first sparse forward" if self._kernels is None
                else f"{self._kernels.name} kernels: {self._kernels.reason}"
            )
            return f"layer {self.layer_number}: DSV sparse ({ks}; {kernels})"
        c = self._control
        why = self._state.reason or (
            "DSV stage 1, predictor training" if c.train_predictor or c.collect_stats
            else "held dense, no predictor work this iteration"
        )
        return f"layer {self.layer_number}: dense ({self.dense_backend}) - {why}"

    def get_extra_state(self):
        """This layer's :class:`LayerState` for all heads (identical on every rank, so Megatron's
        replicated ShardedObject handling of ``_extra_state`` is exact)."""
        return self._state.to_dict(self.dsv.result_fields())

    def set_extra_state(self, state) -> None:
        if state is None or (isinstance(state, Tensor) and state.numel() == 0):
            return
        if self.dsv.dsv_on_resume == "reset":
            log_once(logging.INFO, "DSV: --dsv-on-resume reset: the checkpoint's DSV state is not restored; stage 1 starts afresh.")
            return
        if isinstance(state, Tensor):  # Megatron stores some extra states as byte tensors
            import io

            state = torch.load(io.BytesIO(state.cpu().numpy().tobytes()), weights_only=False)
        restored = LayerState.from_dict(
            state, config_fields=self.dsv.result_fields(), num_heads=self.num_heads_global,
            layer=f"layer {self.layer_number}",
        )
        sparse = restored.sparse and self.predictor is not None
        self.apply(restored.replace(sparse=sparse, cp_plan=self._state.cp_plan))

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Optional[Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[Tensor] = None,
        packed_seq_params=None,
        **kwargs,
    ) -> Tensor:
        """q ``[sq, b, np, hn]``, k/v ``[skv, b, ng, hn]`` -> ``[sq, b, np*hn]``.

        One pipeline: heads to this rank (identity without CP) -> project -> select -> attend
        (sparse) or dense -> the predictor step on training iterations -> heads back.
        """
        if packed_seq_params is not None:
            raise NotImplementedError("DSV attention does not support packed (THD) sequences; pass [s, b, h, d].")
        if attention_bias is not None:
            raise NotImplementedError("DSV attention does not support attention_bias.")
        query, key, value = autocast_inputs(query, key, value)
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        trains = self._trains_now()
        sparse = self._state.sparse
        causal = self.causal_mask(mask_type)
        if (sparse or trains or self._profiles_now()) and causal is None:
            self._check_bidirectional(mask_type, attention_mask)
        sq, b, np_, hn = query.shape
        cp = self._attention_plan(sq, mask_type, causal)
        self._seen = (key.shape[0] * cp.cp_size, b, query.dtype)
        if self.te_attention is not None and not sparse:
            out = self.te_attention(query, key, value, attention_mask, attn_mask_type=mask_type)
            if trains or self._profiles_now():
                q, k, _ = cp.to_heads(query, key, value)
                out = self._learn(out, cp, q, k, None, causal)
            return out
        q, k, v = cp.to_heads(query, key, value)  # [b, H_slot, S/seq_size, hn]
        lowrank = None
        if sparse:
            with torch.no_grad():
                lowrank = self._project(cp, q, k)
                index = select_topk(
                    lowrank[0], lowrank[1], self.dsv.group_size, self._kv_count_for(cp, self.last_seq_len, causal),
                    kv_block=self.dsv.dsv_kv_block, backend=self.selection_backend(), mask=causal,
                    q_offset=cp.query_offset(q.shape[2], causal),
                )
            self._kernels = (
                attention_backend(self.dsv.dsv_backend, q, k, index) if cp.seq_group is None
                else choose_backend(self.selection_backend(), q.device, what="DSV selective exchange")
            )
            out = cp.sparse(q, k, v, index, self.softmax_scale, self._kernels.name)
            self._exchange = cp.exchange
        else:
            local = lambda q_, k_, v_: self._dense_forward(q_, k_, v_, attention_mask, mask_type, causal)  # noqa: E731
            out = cp.dense(
                q, k, v, self.softmax_scale, self.dsv.group_size, self.dsv.dsv_kv_block,
                self.dsv.dsv_backend, local, mask=causal,
            )
        if trains or self._profiles_now():
            out = self._learn(out, cp, q, k, lowrank, causal)
        return cp.from_heads(out).reshape(sq, b, np_ * hn)

    def _attention_plan(self, s_local: int, mask_type, causal: Optional[CausalMask] = None) -> CPAttention:
        """How this call's heads and tokens are laid out: the CP plan, or the size-1 case."""
        cp_group = getattr(self.pg_collection, "cp", None)
        if self._cp_groups is None:
            if self.is_self_attention and cp_group is not None and cp_group.size() > 1:
                raise RuntimeError(
                    f"layer {self.layer_number} runs under context parallelism (CP size "
                    f"{cp_group.size()}) but DSV's CP is not set up: call "
                    "megatron_dsv.apply_dsv_context_parallel(model) once after building the model "
                    "(the pretraining example does)."
                )
            return CPAttention.local(self.num_heads, self.num_kv_heads)
        if causal is None and mask_type != AttnMaskType.no_mask:
            raise ValueError(
                "DSV context parallelism takes bidirectional attention (attn_mask_type=no_mask), "
                "token-causal (attn_mask_type=causal) and chunk-causal (--dsv-causal-chunk) masks; "
                f"got attn_mask_type={mask_type.name}, which it cannot split over sequence shards. Use one "
                "of those, or run this layer without --context-parallel-size."
            )
        self._check_cp_shard(s_local)
        plan = self._state.cp_plan
        if causal is not None and plan.seq_size > 1:
            seq_len = s_local * self._cp_groups.size
            causal.check_shards(seq_len, seq_len // plan.seq_size)
        return CPAttention(plan, self._cp_groups, self.num_heads, self.num_kv_heads)

    def _check_cp_shard(self, s_local: int) -> None:
        g, kvb = self.dsv.group_size, self.dsv.dsv_kv_block
        if s_local % g or s_local % kvb:
            raise ValueError(
                f"with context parallelism each rank's token shard ({s_local} tokens) must be whole "
                f"query groups ({g} tokens, --dsv-query-group) and key blocks ({kvb}, --dsv-kv-block): "
                "choose a latent shape whose token count is a multiple of CP size x query group, "
                "and shard contiguous runs of whole cubes (VideoDiT does)."
            )

    def selection_backend(self) -> str:
        """Selection has no cuDNN kernel: Triton (or the reference on CPU) under ``cudnn``; with
        or without a causal mask (both selection backends take it)."""
        return "auto" if self.dsv.dsv_backend == "cudnn" else self.dsv.dsv_backend

    def _kv_count_for(self, cp: CPAttention, seq_len_kv: int, causal: Optional[CausalMask] = None) -> Tensor:
        """K per head of the heads ``cp`` gives this rank; under this forward's causal mask at
        least its forced units (the same floor as :meth:`kv_count_global` where the forward's
        mask type is the layer's own)."""
        kv = self.kv_count(seq_len_kv)
        if causal is not None:
            units = seq_len_kv // self.dsv.dsv_kv_block
            kv = kv.clamp(min=min(units, causal.max_forced(seq_len_kv, self.dsv.group_size, self.dsv.dsv_kv_block)))
        return kv if cp.is_local else kv[list(cp.heads)]

    def _project(self, cp: CPAttention, q: Tensor, k: Tensor) -> Tuple[Tensor, Tensor]:
        """Low-rank ``q_lr`` of this rank's chunk and ``k_lr`` of the whole sequence (no grad)."""
        if self.dsv.dsv_predictor_input == "hidden":
            return self.predictor.project_hidden(self._layer_input_bsh())
        heads = None if cp.is_local else cp.heads
        q_lr, k_lr = self.predictor.project(q, k, heads=heads)
        return q_lr, cp.gather_keys(k_lr)

    def _learn(self, out: Tensor, cp: CPAttention, q: Tensor, k: Tensor, lowrank, causal: Optional[CausalMask]) -> Tensor:
        """The predictor's share of a training forward: its gradient loss attached to ``out``
        (``gradient`` fit), its score moments accumulated (``closed_form``), statistics on
        profiling iterations. ``lowrank``: the forward's projection when it made one (sparse
        layers), reused here, so nothing is projected or selected twice. Under a causal mask the
        loss, the moments and the statistics see only the (query, key) pairs the mask allows: they
        get the rows' positions in the whole sequence (a sequence shard's rows are shard-local),
        and rows without a ranking choice are left out (:meth:`_sampled_rows`)."""
        rows, n_total = self._sampled_rows(cp, q, causal=causal)
        if causal is not None and n_total == 0:
            seq_len = q.shape[2] * cp.seq_size
            raise ValueError(
                f"layer {self.layer_number}: none of the rows sampled every {self.dsv.dsv_profile_stride} tokens "
                f"of {seq_len} has a ranking choice under the {causal.kind} mask (every key they may read lies "
                f"in units their query group of {self.dsv.group_size} always keeps, key blocks of "
                f"{self.dsv.dsv_kv_block}), so the predictor has nothing to fit. Lower --dsv-profile-stride, "
                "use a longer sequence or a smaller --dsv-kv-block, or --dsv-mode dense."
            )
        seq_rows = rows + cp.chunk_range(q.shape[2])[0]
        heads = None if cp.is_local else list(cp.heads)
        norm = q.shape[0] * self.num_heads * n_total
        x = self._layer_input_bsh() if self.dsv.dsv_predictor_input == "hidden" else None
        gradient = self._trains_now()
        with torch.enable_grad() if gradient else torch.no_grad():
            u_rows = self.predictor.project_queries(q[:, :, rows] if x is None else x[:, rows], torch.float32, heads=heads)
            loss_sum = predictor_loss(
                self.predictor, q[:, :, rows], u_rows, k.detach(), self.softmax_scale,
                self.dsv.dsv_predictor_cosine_weight, x=None if x is None else x.detach(), heads=heads,
                group=cp.seq_group, reduction="sum", mask=causal, rows=seq_rows,
            )
        if self._profiles_now():
            # One microbatch per profiling iteration (its sampled rows are enough: the EMA over
            # profiling iterations smooths them); with activation recompute the first forward has
            # autograd off and only the recompute reaches here.
            if self.dsv.dsv_predictor_fit == "closed_form":
                self.predictor.accumulate_moments(
                    q[:, :, rows], k, heads=heads, group=cp.seq_group, mask=causal, rows=seq_rows
                )
            self._pending.append(self._measure(cp, q, k, lowrank, rows, loss_sum.detach(), norm, n_total, causal))
            self._profiled = True
        if not gradient:
            return out
        # Under CP the loss is this rank's share of the single-process loss: Megatron's schedule
        # multiplies auxiliary-loss scales by the CP size and averages gradients over the
        # data x context-parallel group, so the predictor's gradient equals the single-process one.
        return PredictorLossAutoScaler.apply(out, loss_sum / norm * self.dsv.dsv_predictor_loss_coeff, self.loss_scale)

    def _sampled_rows(self, cp: CPAttention, q: Tensor, every: int = 1,
                      causal: Optional[CausalMask] = None) -> Tuple[Tensor, int]:
        """Every ``every``-th row of the single-process sample of query rows, restricted to this
        rank's chunk (chunk-local positions), and the sample's size over the whole sequence.

        With ``causal``, rows without a choice (:meth:`CausalMask.rows_with_choice`: every key
        they may read lies in units their group always keeps) leave the sample, chosen on their
        positions in the whole sequence, so CP ranks drop the rows one process drops. The
        predictor's loss, its closed-form moments and the recall curve use this sample: such rows
        carry no ranking decision for the predictor to fit, and their recall is 1 at every K, so
        they would pull the K rule below the target on the rows where selection decides. Their
        few readable keys also made the loss ill-conditioned: a row reading 2 keys made one
        layer's predictor gradient 33x the other's, 1.2x without such rows (measured in
        tests/layers/test_masked_predictor.py). Token sparsity, a property of attention, not of
        selection, keeps every sampled row (``causal=None``)."""
        s_chunk = q.shape[2]
        rows = sample_rows(
            s_chunk * cp.seq_size, self.dsv.dsv_profile_stride, self._control.iteration + 7 * self.layer_number, q.device
        )[::every]
        if causal is not None:
            rows = rows[causal.rows_with_choice(rows, self.dsv.group_size, self.dsv.dsv_kv_block, s_chunk * cp.seq_size)]
        n_total = rows.numel()
        if not cp.is_local:
            lo, hi = cp.chunk_range(s_chunk)
            rows = rows[(rows >= lo) & (rows < hi)] - lo
        return rows, n_total

    @torch.no_grad()
    def _measure(self, cp: CPAttention, q, k, lowrank, rows, loss_sum, norm, n_total, causal=None) -> LayerStats:
        """Token sparsity and the selection's recall curve of the sampled rows, summed over the CP
        group per head (every CP rank reports the single-process values).

        The curve ranks key units per row as selection does (the predictor's group score) and by
        the same rule on exact q/k, so the runtime reads the recall of any K, and the predictor's
        recall relative to exact q/k, from it. Exact sampled rows need every key: under CP,
        profiling iterations (every 10 in stage 1, every 50 in stage 2 by default) all-gather
        this slot's keys over the sequence group."""
        h = self.num_heads
        heads = torch.as_tensor(list(cp.heads), device=q.device)
        offset = cp.chunk_range(q.shape[2])[0]  # the shard's first token: its rows in the sequence
        k_full = cp.gather_keys(k.detach())
        q_lr, k_lr = self._project(cp, q, k) if lowrank is None else lowrank
        units = k_full.shape[2] // self.dsv.dsv_kv_block
        curve = torch.zeros(4, h, units, dtype=torch.float64, device=q.device)
        sparsity = torch.zeros(h, dtype=torch.float64, device=q.device)
        tok_rows = torch.zeros(h, dtype=torch.float64, device=q.device)  # rows x batch measured per head
        # Token sparsity is reported, not decided on: it sorts each row's S scores, so it is
        # measured on every 8th row of the sample (64 of 512 at 16k tokens).
        tok, _ = self._sampled_rows(cp, q, every=TOKEN_SPARSITY_EVERY)
        if tok.numel():
            rep = len(cp.heads) // k_full.shape[1]
            k_exp = k_full.repeat_interleave(rep, dim=1) if rep > 1 else k_full
            sp = sampled_attention_stats(
                q[:, :, tok], k_exp, self.softmax_scale, self.dsv.dsv_critical_mass, mask=causal, rows=tok + offset
            )
            sparsity[heads] = sp["sparsity"].sum(0).double() * tok.numel()
            tok_rows[heads] = float(q.shape[0] * tok.numel())
        if rows.numel():
            part = recall_curve(
                q, k_full, q_lr, k_lr, rows, group_size=self.dsv.group_size, kv_block=self.dsv.dsv_kv_block,
                scale=self.softmax_scale, critical_mass=self.dsv.dsv_critical_mass, mask=causal,
                q_offset=offset if causal is not None else 0,
            )
            curve[:, heads] = torch.stack(list(part._fields()))
        # NaN/Inf in the sampled q, the keys or the predictor's projections: counted here (no extra
        # host sync: it travels with the statistics), and the runtime falls back to dense.
        nonfinite = sum((~torch.isfinite(t)).sum() for t in (q[:, :, rows], k, q_lr, k_lr)).double().reshape(1)
        packed = torch.cat([loss_sum.double().reshape(1), nonfinite, tok_rows, sparsity, curve.flatten()])
        if not cp.is_local:
            torch.distributed.all_reduce(packed, group=self._cp_groups.cp_group)
        loss = packed[0] / norm
        sparsity = packed[2 + h : 2 + 2 * h] / packed[2 : 2 + h].clamp(min=1)
        full = RecallCurve(*packed[2 + 2 * h :].view(4, h, units).unbind(0), critical_mass=self.dsv.dsv_critical_mass)
        recall = full.recall(self.kv_count(self.last_seq_len).clamp(max=units))
        return LayerStats(loss.float(), sparsity.float(), recall, self.last_seq_len, full, packed[1].float())

    def refit_predictor(self, group=None) -> Optional[Tensor]:
        """Closed-form fit of the predictor to the score moments accumulated since the last fit,
        summed over ``group`` (default this layer's CP group; the runtime passes the data x
        context-parallel group so every rank writes the same weights). Returns the fit's residual
        per head, or None when nothing was accumulated (no profiling forward since the last fit)."""
        if self.predictor is None or self.predictor.moments is None:
            return None
        if group is None and self._cp_groups is not None:
            group = self._cp_groups.cp_group
        return self.predictor.refit(group=group)

    def _trains_now(self) -> bool:
        """The gradient fit's predictor step runs on this forward."""
        return (
            self.predictor is not None
            and self.dsv.dsv_predictor_fit == "gradient"
            and self._control.train_predictor
            and self.training
            and torch.is_grad_enabled()
        )

    def _profiles_now(self) -> bool:
        """This forward measures statistics (and, closed-form, accumulates score moments)."""
        return (
            self.predictor is not None
            and self._control.collect_stats
            and not self._profiled
            and self.training
            and torch.is_grad_enabled()
        )

    def _check_bidirectional(self, mask_type, attention_mask) -> None:
        if mask_type not in (AttnMaskType.no_mask,) or attention_mask is not None:
            raise ValueError(
                f"DSV sparse attention supports no mask, attn_mask_type=causal and --dsv-causal-chunk "
                f"(got attn_mask_type={mask_type.name}, mask {'given' if attention_mask is not None else 'None'}); "
                "use the DSV specs (no_mask for video DiTs, get_dsv_gpt_layer_spec(causal=True) for causal "
                "models), or --dsv-mode dense."
            )

    def dense_attention(self, query: Tensor, key: Tensor, value: Tensor) -> Tensor:
        """The path a dense layer of this module runs without context parallelism (Transformer
        Engine, or SDPA cuDNN-first, with the layer's own mask) on q ``[s, b, np, hn]``, k/v
        ``[s, b, ng, hn]`` -> ``[s, b, np*hn]``; no predictor step, no statistics, no state change.
        The runtime's speed probe times it against the sparse path on synthetic tensors."""
        sq, b, np_, hn = query.shape
        if self.te_attention is not None:
            return self.te_attention(query, key, value, None, attn_mask_type=self.attn_mask_type)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        out = self._dense_forward(q, k, v, None, self.attn_mask_type, self.causal_mask())
        return out.permute(2, 0, 1, 3).reshape(sq, b, np_ * hn)

    def _dense_forward(self, q, k, v, attention_mask, mask_type, causal_mask: Optional[CausalMask] = None) -> Tensor:
        mask, causal = None, False
        if causal_mask is not None and causal_mask.kind == "chunk_causal":
            mask = causal_mask.dense(q.shape[2], device=q.device)
        elif mask_type == AttnMaskType.causal:
            causal = True
        elif attention_mask is not None and mask_type != AttnMaskType.no_mask:
            mask = ~attention_mask  # Megatron: True = masked out; SDPA: True = attend
        with sdpa_backends(q):
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=causal, scale=self.softmax_scale,
                dropout_p=self.dropout_p if self.training else 0.0,
                enable_gqa=k.shape[1] != q.shape[1],
            )

    def _layer_input_bsh(self) -> Tensor:
        """The layer input ``[b, s, h]`` for the ``hidden`` predictor variant."""
        if self._layer_input is None:
            raise RuntimeError(
                "dsv_predictor_input='hidden' needs the layer input: use DSVSelfAttention "
                "(the DSV specs do) or call set_layer_input()."
            )
        return self._layer_input.transpose(0, 1)

    def _resolve_dense_backend(self) -> str:
        choice = self.dsv.dsv_dense_backend
        if choice == "te" and not HAVE_TE:
            raise ImportError(
                "--dsv-dense-backend te needs Transformer Engine, which is not importable; "
                "install it or use --dsv-dense-backend sdpa."
            )
        if choice == "te" and self.dsv.dsv_causal_chunk:
            raise NotImplementedError(
                "--dsv-causal-chunk applies its chunk-causal mask through SDPA; use --dsv-dense-backend sdpa."
            )
        if choice == "auto":
            te_ok = HAVE_TE and self._cp_group_size() == 1 and not self.dsv.dsv_causal_chunk
            choice = "te" if te_ok else "sdpa"
        return choice

    def _cp_group_size(self) -> int:
        cp = getattr(self.pg_collection, "cp", None)
        return 1 if cp is None else cp.size()


def sdpa_backends(x: Tensor):
    """SDPA with cuDNN first on GPU (its forward ran at 628 TF/s at 32k tokens, D=128, on the H100:
    benchmarks/results/dense_path_h100_20261124.json), then flash, efficient and math; the math
    kernel on CPU."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if not x.is_cuda:
        return sdpa_kernel([SDPBackend.MATH])
    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    return sdpa_kernel(order, set_priority=True)


def dsv_attention_layers(model: torch.nn.Module):
    """All DSVCoreAttention modules of ``model``, in layer order."""
    return [m for m in model.modules() if isinstance(m, DSVCoreAttention)]
