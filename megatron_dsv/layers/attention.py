"""DSVCoreAttention: Megatron's core-attention contract with dense and DSV sparse paths.

Megatron's ``SelfAttention`` computes q ``[s, b, np, hn]`` and k/v ``[s, b, ng, hn]`` (RoPE
applied) and calls ``core_attention(q, k, v, mask, attn_mask_type=, attention_bias=,
packed_seq_params=)``, expecting ``[s, b, np*hn]`` back. This module answers that call with

* the dense path: ``scaled_dot_product_attention`` (cuDNN first on GPU), or Transformer Engine's
  attention when it is importable and chosen; used for stage 1, dense layers, cross-attention and
  ``--dsv-mode dense``;
* the sparse path: low-rank predictor -> per-head top-K selection per query group -> sparse
  attention over the selected keys (``megatron_dsv.ops``).

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
from typing import Dict, Optional

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
from megatron_dsv.cp.groups import get_cp_groups
from megatron_dsv.cp.plan import LayerPlan, fixed_plan
from megatron_dsv.layers.predictor import LowRankPredictor, predictor_loss
from megatron_dsv.layers.profiler import sample_rows, sampled_attention_stats
from megatron_dsv.ops._utils import check_head_dim, log_once
from megatron_dsv.ops.selection import select_topk
from megatron_dsv.ops.sparse_attention import sparse_attention
from megatron_dsv.ops.sparse_index import k_from_sparsity, num_groups

logger = logging.getLogger("megatron_dsv")

try:
    from megatron.core.extensions.transformer_engine import HAVE_TE, TEDotProductAttention
except ImportError:  # pragma: no cover - TE is optional
    HAVE_TE, TEDotProductAttention = False, None


class PredictorLossAutoScaler(torch.autograd.Function):
    """Attach the predictor loss to an activation: identity forward, loss gradient in backward.

    Megatron's schedules call :meth:`set_loss_scale` with the main loss's scale (loss scaler and
    ``1/num_microbatches``) through ``config.experimental_attention_variant_loss_scale_func``.
    """

    main_loss_backward_scale: Optional[Tensor] = None

    @staticmethod
    def forward(ctx, output: Tensor, loss: Tensor) -> Tensor:
        ctx.save_for_backward(loss)
        return output

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        (loss,) = ctx.saved_tensors
        scale = PredictorLossAutoScaler.main_loss_backward_scale
        scale = 1.0 if scale is None else scale.to(loss.device)
        return grad_output, torch.ones_like(loss) * scale

    @staticmethod
    def set_loss_scale(scale: Tensor) -> None:
        PredictorLossAutoScaler.main_loss_backward_scale = scale.detach().clone()


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


class DSVCoreAttention(MegatronModule):
    """Core attention with DSV's dense and sparse paths; drop-in for Megatron's core attention.

    Per-layer state that the stage controller sets and checkpoints carry: ``sparse`` (run the
    sparse path), ``kv_units_global`` (K per head of the layer, all TP ranks, in key units; None =
    from ``dsv_fixed_sparsity``), ``train_predictor`` and ``collect_stats``.
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
            if getattr(config, "experimental_attention_variant_loss_scale_func", None) is None:
                config.experimental_attention_variant_loss_scale_func = PredictorLossAutoScaler.set_loss_scale
        self.sparse = self.dsv.dsv_mode == "sparse" and self.predictor is not None
        self.kv_units_global: Optional[Tensor] = None
        self.schedule_state: Dict = {}  # the controller's stage, replicated into every layer
        self.last_seq_len: Optional[int] = None
        self.last_batch = 1
        self.decision = ""  # the controller's last reason for this layer's path
        self.train_predictor = self.predictor is not None
        self.collect_stats = self.predictor is not None
        self.iteration = 0
        self.last_stats: Dict[str, Tensor] = {}
        self.pending_stats: list = []  # one dict per microbatch, consumed by the controller
        self.stats_ema: Dict[str, Tensor] = {}  # written by the controller (synced over ranks)
        self._layer_input: Optional[Tensor] = None

        self.cp_groups = None
        self.cp_plan: Optional[LayerPlan] = None  # set by the controller's planner, else fixed
        self.cp_exchange = None  # bytes moved by the last selective exchange
        cp = getattr(pg_collection, "cp", None)
        # cross-attention is never context-parallel: a query shard attends to the whole context
        if cp is not None and cp.size() > 1 and self.is_self_attention:
            self._init_context_parallel(config, cp, cp_comm_type)

        self.dense_backend = self._resolve_dense_backend()
        self.te_attention = None
        if self.dense_backend == "te" and self.cp_groups is None:
            self.te_attention = TEDotProductAttention(
                config=config, layer_number=layer_number, attn_mask_type=attn_mask_type,
                attention_type=attention_type, softmax_scale=softmax_scale,
                cp_comm_type=cp_comm_type, pg_collection=pg_collection,
            )

    def _init_context_parallel(self, config, cp, cp_comm_type) -> None:
        """Sparsity-aware CP (``megatron_dsv/cp``): groups for every head x sequence split."""
        if self.dsv.dsv_predictor_input == "hidden":
            raise NotImplementedError(
                "--dsv-predictor-input hidden is not supported with context parallelism (the layer "
                "input is split by tokens, the predictor by heads); use --dsv-predictor-input qk."
            )
        hcp = None
        if cp_comm_type == "a2a+p2p" and len(getattr(config, "hierarchical_context_parallel_sizes", None) or []) == 2:
            hcp = getattr(self.pg_collection, "hcp", None)
        self.cp_groups = get_cp_groups(cp, hcp)
        self.cp_plan = fixed_plan(
            parse_cp_split(self.dsv.dsv_cp_split), cp.size(), self.num_heads, self.num_kv_heads
        )

    @property
    def cp_size(self) -> int:
        return 1 if self.cp_groups is None else self.cp_groups.size

    # ---------------------------------------------------------------- state the controller sets
    def set_sparse(self, sparse: bool, kv_units_per_head: Optional[Tensor] = None) -> None:
        """Switch this layer's path.

        ``kv_units_per_head``: int ``[H]`` key units per head for all the layer's heads (across
        tensor-parallel ranks; each rank keeps its slice), or ``[H_local]`` when TP is 1.
        """
        if sparse and self.predictor is None:
            raise RuntimeError(
                f"layer {self.layer_number} has no predictor (dsv_mode=dense or cross-attention) "
                "and cannot run sparse."
            )
        if kv_units_per_head is not None:
            kv = torch.as_tensor(kv_units_per_head, dtype=torch.int32).flatten().cpu()
            if kv.numel() != self.num_heads_global:
                raise ValueError(f"need K for the layer's {self.num_heads_global} heads, got {kv.numel()}.")
            self.kv_units_global = kv
        self.sparse = bool(sparse)

    def head_slice(self) -> slice:
        """This rank's heads within the layer's global heads (tensor parallelism splits heads)."""
        rank = self.pg_collection.tp.rank()
        return slice(rank * self.num_heads, (rank + 1) * self.num_heads)

    def set_iteration(self, iteration: int) -> None:
        """Rotates the sampled query rows; the same iteration samples the same rows (recompute)."""
        self.iteration = int(iteration)

    def set_layer_input(self, hidden_states: Optional[Tensor]) -> None:
        """Layer input ``[s, b, h]`` for the ``hidden`` predictor variant (set by DSVSelfAttention)."""
        self._layer_input = hidden_states

    def k_for_sparsity(self, sparsity: Tensor, seq_len_kv: int) -> Tensor:
        """Key units per head for per-head ``sparsity``: ``ceil((1 - s) * units)`` rounded up to
        ``--dsv-k-multiple``, at least ``--dsv-min-keys``, at most all units (int32)."""
        units = seq_len_kv // self.dsv.dsv_kv_block
        return k_from_sparsity(sparsity, units, multiple=self.dsv.multiple_units(), floor=self.dsv.min_units(units))

    def kv_count_global(self, seq_len_kv: int, for_recall: bool = False) -> Tensor:
        """K per head of the layer (all TP ranks) in key units, int32 ``[H]``.

        Set explicitly by :meth:`set_sparse`, else from ``dsv_fixed_sparsity``. For measuring
        recall in stage 1 it is what the head would get when switched: K from its measured
        sparsity (EMA), so recall answers "would the predictor's top-K hold the mass?".
        """
        if self.kv_units_global is not None:
            units = seq_len_kv // self.dsv.dsv_kv_block
            return self.kv_units_global.clamp(min=self.dsv.min_units(units), max=units)
        if for_recall and not self.sparse and "sparsity" in self.stats_ema:
            sparsity = self.stats_ema["sparsity"].cpu()
        else:
            sparsity = torch.full((self.num_heads_global,), self.dsv.dsv_fixed_sparsity)
        return self.k_for_sparsity(sparsity, seq_len_kv)

    def kv_count(self, seq_len_kv: int, for_recall: bool = False) -> Tensor:
        """K per local head in key units, int32 ``[H_local]`` (see :meth:`kv_count_global`)."""
        return self.kv_count_global(seq_len_kv, for_recall)[self.head_slice()]

    def describe(self) -> str:
        """One line naming the backend this layer uses and why (and its CP split)."""
        line = self._describe_path()
        if self.cp_plan is not None:
            p = self.cp_plan
            line += (
                f"; CP {p.head_size}x{p.seq_size} (head x sequence), heads per rank "
                f"{[len(h) for h in p.slots]}"
            )
        return line

    def _describe_path(self) -> str:
        if self.predictor is None:
            why = "cross-attention is always dense" if not self.is_self_attention else "dsv_mode=dense"
            return f"layer {self.layer_number}: dense ({self.dense_backend}) - {why}"
        if self.sparse:
            k = self.kv_units_global
            ks = "fixed sparsity %.2f" % self.dsv.dsv_fixed_sparsity if k is None else f"K/head={k.tolist()}"
            return f"layer {self.layer_number}: DSV sparse ({self.dsv.dsv_backend} kernels, {ks})"
        why = self.decision or "DSV stage 1, predictor training"
        return f"layer {self.layer_number}: dense ({self.dense_backend}) - {why}"

    # ---------------------------------------------------------------- checkpoint
    def get_extra_state(self):
        """Decisions, statistics and schedule state, for all heads (identical on every rank, so
        Megatron's replicated ShardedObject handling of ``_extra_state`` is exact)."""
        return {
            "version": 1,
            "config": self.dsv.result_fields(),
            "sparse": self.sparse,
            "kv_units": None if self.kv_units_global is None else self.kv_units_global.tolist(),
            "stats_ema": {k: v.float().cpu().tolist() for k, v in self.stats_ema.items()},
            "schedule": dict(self.schedule_state),
            "decision": self.decision,
        }

    def set_extra_state(self, state) -> None:
        if state is None or (isinstance(state, Tensor) and state.numel() == 0):
            return
        if isinstance(state, Tensor):  # Megatron stores some extra states as byte tensors
            import io

            state = torch.load(io.BytesIO(state.cpu().numpy().tobytes()), weights_only=False)
        saved, now = state["config"], self.dsv.result_fields()
        diff = {k: (saved.get(k), v) for k, v in now.items() if _canon(saved.get(k)) != _canon(v)}
        if diff:
            lines = ", ".join(f"{k}: checkpoint {a!r} vs this run {b!r}" for k, (a, b) in diff.items())
            raise ValueError(
                f"layer {self.layer_number}: this checkpoint was trained with another DSV config "
                f"({lines}). Resume with the checkpoint's --dsv-* values, or start the DSV "
                "schedule afresh by loading without this layer's _extra_state."
            )
        self.stats_ema = {k: torch.tensor(v) for k, v in state["stats_ema"].items()}
        self.schedule_state = dict(state["schedule"])
        self.decision = state.get("decision", "")
        self.kv_units_global = None
        self.set_sparse(state["sparse"] and self.predictor is not None, state["kv_units"])

    # ---------------------------------------------------------------- forward
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
        """q ``[sq, b, np, hn]``, k/v ``[skv, b, ng, hn]`` -> ``[sq, b, np*hn]``."""
        if packed_seq_params is not None:
            raise NotImplementedError("DSV attention does not support packed (THD) sequences; pass [s, b, h, d].")
        if attention_bias is not None:
            raise NotImplementedError("DSV attention does not support attention_bias.")
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        trains = self._trains_now()
        if self.sparse or trains:
            self._check_bidirectional(mask_type, attention_mask)
        sq, b, np_, hn = query.shape
        if self.cp_groups is not None:
            return self._cp_forward(query, key, value, mask_type, trains)
        self.last_seq_len = key.shape[0]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, hn]
        if self.sparse:
            out = self._sparse_forward(q, k, v).permute(2, 0, 1, 3).reshape(sq, b, np_ * hn)
        elif self.te_attention is not None:
            out = self.te_attention(query, key, value, attention_mask, attn_mask_type=mask_type)
        else:
            out = self._dense_forward(q, k, v, attention_mask, mask_type)
            out = out.permute(2, 0, 1, 3).reshape(sq, b, np_ * hn)
        if trains:
            out = PredictorLossAutoScaler.apply(out, self._predictor_step(q, k))
        return out

    def _cp_forward(self, query, key, value, mask_type, trains) -> Tensor:
        """Context-parallel attention on this rank's token shard ``[s/N, b, ...]`` (whole cubes)."""
        if mask_type != AttnMaskType.no_mask:
            raise ValueError(
                "DSV context parallelism is for bidirectional attention without a mask (video DiTs); "
                f"got attn_mask_type={mask_type.name}."
            )
        s_local, b, np_, hn = query.shape
        cp = CPAttention(self.cp_plan, self.cp_groups, self.num_heads, self.num_kv_heads)
        s_total = s_local * self.cp_size
        self._check_cp_shard(s_local)
        self.last_seq_len, self.last_batch = s_total, b
        q, k, v = cp.to_heads(query, key, value)  # [b, H_slot, S/seq_size, hn]
        cfg = self.dsv
        if self.sparse:
            with torch.no_grad():
                q_lr, k_lr = self.predictor.project(q, k, heads=cp.heads)
                index = select_topk(
                    q_lr, cp.gather_keys(k_lr), cfg.group_size,
                    self.kv_count(s_total)[list(cp.heads)].to(q.device),
                    kv_block=cfg.dsv_kv_block, backend=cfg.dsv_backend,
                )
            out = cp.sparse(q, k, v, index, self.softmax_scale, cfg.dsv_backend)
            self.cp_exchange = cp.exchange
        else:
            local = lambda q_, k_, v_: self._dense_forward(q_, k_, v_, None, AttnMaskType.no_mask)
            out = cp.dense(q, k, v, self.softmax_scale, cfg.group_size, cfg.dsv_kv_block, cfg.dsv_backend, local)
        if trains:
            out = PredictorLossAutoScaler.apply(out, self._predictor_step_cp(cp, q, k))
        return cp.from_heads(out).reshape(s_local, b, np_ * hn)

    def _check_cp_shard(self, s_local: int) -> None:
        g, kvb = self.dsv.group_size, self.dsv.dsv_kv_block
        if s_local % g or s_local % kvb:
            raise ValueError(
                f"with context parallelism each rank's token shard ({s_local} tokens) must be whole "
                f"query groups ({g} tokens, --dsv-query-group) and key blocks ({kvb}, --dsv-kv-block): "
                "choose a latent shape whose token count is a multiple of CP size x query group, "
                "and shard contiguous runs of whole cubes (VideoDiT does)."
            )

    def _predictor_step_cp(self, cp: CPAttention, q, k) -> Tensor:
        """The predictor step of :meth:`_predictor_step` on a CP rank's heads and token chunk.

        Rows are the single-process sample restricted to this chunk; the Gram matrices are summed
        over the sequence group; the loss is this rank's share of the single-process loss.
        Megatron's schedule multiplies auxiliary-loss scales by the CP size and then averages
        gradients over the data x context-parallel group, so the predictor's gradient equals the
        single-process one. Statistics are summed over the CP group per head and row, so every
        CP rank reports the single-process values.
        """
        s_chunk = q.shape[2]
        s_total = s_chunk * cp.seq_size
        lo, hi = cp.chunk_range(s_chunk)
        rows = sample_rows(s_total, self.dsv.dsv_profile_stride, self.iteration + 7 * self.layer_number, q.device)
        n_total = rows.numel()
        rows = rows[(rows >= lo) & (rows < hi)] - lo
        heads = list(cp.heads)
        b = q.shape[0]
        norm = b * self.num_heads * n_total
        with torch.enable_grad():
            u_rows = self.predictor.project_queries(q[:, :, rows], torch.float32, heads=heads)
            loss_sum = predictor_loss(
                self.predictor, q[:, :, rows], u_rows, k.detach(), self.softmax_scale,
                self.dsv.dsv_predictor_cosine_weight, heads=heads, group=cp.seq_group, reduction="sum",
            )
        loss = loss_sum / norm
        if self.collect_stats:
            with torch.no_grad():
                # Exact sampled rows need every key: profiling iterations (every 10 in stage 1,
                # every 50 in stage 2 by default) all-gather this slot's keys over the sequence group.
                k_full = cp.gather_keys(k.detach())
                q_lr, k_lr = self.predictor.project(q, k_full, heads=heads)
                rep = len(heads) // k_full.shape[1]
                k_full = k_full.repeat_interleave(rep, dim=1) if rep > 1 else k_full
                local = torch.zeros(1 + 2 * self.num_heads, device=q.device, dtype=torch.float32)
                local[0] = loss_sum.detach().float()
                if rows.numel():
                    part = self._row_stats(q, k_full, q_lr, k_lr, rows, heads=heads)
                    idx = torch.as_tensor(heads, device=q.device)
                    local[1 + idx] = part["sparsity"].float() * rows.numel()
                    local[1 + self.num_heads + idx] = part["recall"].float() * rows.numel()
                torch.distributed.all_reduce(local, group=self.cp_groups.cp_group)
                h = self.num_heads
                stats = {
                    "loss": local[0] / norm,
                    "sparsity": local[1 : 1 + h] / n_total,
                    "recall": local[1 + h :] / n_total,
                }
            self.last_stats = stats
            self.pending_stats.append(stats)
        else:
            self.last_stats = {"loss": loss.detach()}  # this rank's share
        return loss * self.dsv.dsv_predictor_loss_coeff

    def _trains_now(self) -> bool:
        return (
            self.predictor is not None
            and self.train_predictor
            and self.training
            and torch.is_grad_enabled()
        )

    def _check_bidirectional(self, mask_type, attention_mask) -> None:
        if mask_type not in (AttnMaskType.no_mask,) or attention_mask is not None:
            raise ValueError(
                f"DSV sparse attention is bidirectional without a mask (got attn_mask_type="
                f"{mask_type.name}, mask {'given' if attention_mask is not None else 'None'}); use "
                "the DSV specs (attn_mask_type=no_mask) for video DiTs, or --dsv-mode dense."
            )

    def _dense_forward(self, q, k, v, attention_mask, mask_type) -> Tensor:
        mask, causal = None, False
        if mask_type == AttnMaskType.causal:
            causal = True
        elif attention_mask is not None and mask_type != AttnMaskType.no_mask:
            mask = ~attention_mask  # Megatron: True = masked out; SDPA: True = attend
        with _sdpa_backends(q):
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

    def _project(self, q, k):
        if self.dsv.dsv_predictor_input == "hidden":
            return self.predictor.project_hidden(self._layer_input_bsh())
        return self.predictor.project(q, k)

    def _sparse_forward(self, q, k, v) -> Tensor:
        with torch.no_grad():
            q_lr, k_lr = self._project(q, k)
            index = select_topk(
                q_lr, k_lr, self.dsv.group_size, self.kv_count(k.shape[2]).to(q.device),
                kv_block=self.dsv.dsv_kv_block, backend=self.dsv.dsv_backend,
            )
        out, _ = sparse_attention(q, k, v, index, self.softmax_scale, backend=self.dsv.dsv_backend, out_layout="sbhd")
        return out

    def _predictor_step(self, q, k) -> Tensor:
        """Predictor loss on sampled rows (grad to the predictor only); stats if asked."""
        s = q.shape[2]
        rows = sample_rows(s, self.dsv.dsv_profile_stride, self.iteration + 7 * self.layer_number, q.device)
        x = self._layer_input_bsh() if self.dsv.dsv_predictor_input == "hidden" else None
        with torch.enable_grad():
            u_rows = self.predictor.project_queries(q[:, :, rows] if x is None else x[:, rows], torch.float32)
            loss = predictor_loss(
                self.predictor, q[:, :, rows], u_rows, k.detach(), self.softmax_scale,
                self.dsv.dsv_predictor_cosine_weight, x=None if x is None else x.detach(),
            )
        stats = {"loss": loss.detach()}
        if self.collect_stats:
            with torch.no_grad():
                q_lr, k_lr = self._project(q, k)
            rep = q.shape[1] // k.shape[1]
            k_full = (k.repeat_interleave(rep, dim=1) if rep > 1 else k).detach()
            stats.update(self._row_stats(q, k_full, q_lr, k_lr, rows))
        self.last_stats = stats
        # Once per microbatch: with activation recompute the first forward has autograd off
        # (no _predictor_step) and only the recompute reaches here.
        if self.collect_stats:
            self.pending_stats.append(stats)
        return loss * self.dsv.dsv_predictor_loss_coeff

    @torch.no_grad()
    def _row_stats(self, q, k_full, q_lr, k_lr, rows, heads=None) -> Dict[str, Tensor]:
        g = self.dsv.group_size
        gq = num_groups(q.shape[2], g)
        groups, row_group = torch.unique(rows // g, return_inverse=True)
        b, h, _, r = q_lr.shape
        q_lr_groups = q_lr.view(b, h, gq, g, r)[:, :, groups].flatten(2, 3)
        kv = self.kv_count(k_full.shape[2], for_recall=True)
        kv = kv if heads is None else kv[list(heads)]
        index = select_topk(
            q_lr_groups, k_lr, g, kv.to(q.device),
            kv_block=self.dsv.dsv_kv_block, backend=self.dsv.dsv_backend,
        )
        stats = sampled_attention_stats(
            q[:, :, rows], k_full, self.softmax_scale, self.dsv.dsv_critical_mass,
            row_groups=row_group, index=index,
        )
        return {name: val.mean(0) for name, val in stats.items()}  # per local head

    def _resolve_dense_backend(self) -> str:
        choice = self.dsv.dsv_dense_backend
        if choice == "te" and not HAVE_TE:
            raise ImportError(
                "--dsv-dense-backend te needs Transformer Engine, which is not importable; "
                "install it or use --dsv-dense-backend sdpa."
            )
        if choice == "auto":
            choice = "te" if HAVE_TE else "sdpa"
        return choice


def _canon(v):
    return list(v) if isinstance(v, (tuple, list)) else v


def _sdpa_backends(x: Tensor):
    """SDPA with cuDNN first on GPU (fastest on H100: 629 vs 360 TF/s for flash at D=128,
    TARGETS.md), then flash, efficient and math; the math kernel on CPU."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if not x.is_cuda:
        return sdpa_kernel([SDPBackend.MATH])
    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    return sdpa_kernel(order, set_priority=True)


def dsv_attention_layers(model: torch.nn.Module):
    """All DSVCoreAttention modules of ``model``, in layer order."""
    return [m for m in model.modules() if isinstance(m, DSVCoreAttention)]
