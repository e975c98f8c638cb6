"""The DSV stage machine: when to go sparse, which layers, how many keys per head.

Stage 1 (``--dsv-mode auto``): every layer runs dense; predictors train every iteration; the
profiler measures per-head sparsity, predictor recall and loss every
``--dsv-profile-interval-stage1`` iterations. The controller switches to stage 2 when the mean
predictor loss is below ``--dsv-switch-loss-threshold`` and the mean recall reaches
``--dsv-switch-recall-target`` (never before ``--dsv-switch-min-iters``), or at
``--dsv-switch-max-iters``.

Stage 2: a layer runs sparse when its sparsity reaches ``--dsv-min-sparsity``, its recall is at
least ``--dsv-recall-floor`` and the speed table says sparse is faster at its length and density;
K per head follows that head's sparsity (rounded up to ``--dsv-k-multiple``, at least
``--dsv-min-keys``). Predictors train, and the profiler measures, every
``--dsv-profile-interval-stage2`` iterations, with the predictor learning rate scaled by
``--dsv-stage2-predictor-lr-scale``. A sparse layer whose recall falls below the floor goes back
to dense (logged) and may return when it recovers.

``--dsv-mode sparse`` keeps every layer sparse with ``--dsv-fixed-sparsity`` and only measures.

Statistics are averaged over microbatches, gathered over tensor-parallel ranks (heads are split
there) and averaged over the ``stats_group`` (Megatron's data+context-parallel group), so every rank
computes the same numbers and takes the same decisions. The controller reads each layer's
``LayerStats`` and proposes its ``LayerState`` through ``layer.apply``; the state lives in each
layer's ``_extra_state`` and is saved and restored with Megatron's checkpoints.

Call :meth:`DSVController.on_iteration_start` before an iteration's first forward and
:meth:`DSVController.on_iteration_end` after the optimizer step.
"""

from __future__ import annotations

import logging
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist

from megatron_dsv.config import DSVConfig
from megatron_dsv.layers.attention import DSVCoreAttention, dsv_attention_layers
from megatron_dsv.layers.state import STATS, StepControl
from megatron_dsv.runtime.lr import check_predictor_groups, set_predictor_lr_scale
from megatron_dsv.runtime.speed_table import SpeedTable
from megatron_dsv.runtime.writers import StatsWriter, print_rank_0, status_line

logger = logging.getLogger("megatron_dsv")


class DSVController:
    """Runs the two-stage schedule over every DSV layer of ``model`` (a module or list of chunks).

    Args:
        model: module(s) containing DSVCoreAttention layers; at least one must have a predictor
            (a model built without the DSV spec, or with ``--dsv-mode dense``, is refused).
        stats_group: process group over which statistics are averaged (Megatron's data-parallel
            group with context parallel); None = this process alone.
        speed_table: :class:`SpeedTable`; default from ``--dsv-speed-table``.
        optimizer: a torch optimizer whose predictor parameter groups (their own groups, see
            ``megatron_dsv.runtime.lr.predictor_param_groups``) follow the stage's learning rate.
            Megatron runs leave it out: ``megatron_dsv.runtime.megatron`` drives Megatron's groups.
        tb_writer / wandb_writer: Megatron's TensorBoard / W&B writers, if configured.
        log: where decisions and status lines go (default: printed on rank 0).
    """

    def __init__(
        self,
        model,
        stats_group: Optional[dist.ProcessGroup] = None,
        speed_table: Optional[SpeedTable] = None,
        optimizer=None,
        tb_writer=None,
        wandb_writer=None,
        log: Optional[Callable[[str], None]] = None,
    ):
        chunks = model if isinstance(model, (list, tuple)) else [model]
        self.layers: List[DSVCoreAttention] = [
            a for m in chunks for a in dsv_attention_layers(m) if a.predictor is not None
        ]
        if not self.layers:
            found = sum(len(dsv_attention_layers(m)) for m in chunks)
            raise ValueError(
                f"DSVController found no DSV layer with a predictor in the model ({found} DSV "
                "attention modules, none trainable sparse): build the model with a DSV spec "
                "(--spec megatron_dsv.specs dsv_gpt_layer_spec, or VideoDiT) and --dsv-mode auto "
                "or sparse; with --dsv-mode dense there is nothing to control."
            )
        self.cfg: DSVConfig = self.layers[0].dsv
        self.stats_group = stats_group
        if speed_table is None:
            speed_table = (
                SpeedTable.from_json(self.cfg.dsv_speed_table, kv_block=self.cfg.dsv_kv_block)
                if self.cfg.dsv_speed_table else SpeedTable()
            )
        self.speed_table = speed_table
        self.writer = StatsWriter(tb_writer, wandb_writer, self.cfg.dsv_stats_log)
        self.log = log or print_rank_0
        sched = self.layers[0].state.schedule
        initial = {"auto": 1, "sparse": 2}.get(self.cfg.dsv_mode, 0)
        self.stage: int = sched.get("stage", initial)
        self.switch_iteration: Optional[int] = sched.get("switch_iteration")
        self.cp_policy = None  # the CP planner's per-layer plans (--dsv-cp-split auto)
        self.optimizer = optimizer
        if optimizer is not None:
            check_predictor_groups(optimizer, [p for l in self.layers for p in l.predictor.parameters()])
            self._sync_predictor_lr()

    # ------------------------------------------------------------------ schedule
    def profile_due(self, iteration: int) -> bool:
        every = self.cfg.dsv_profile_interval_stage1 if self.stage == 1 else self.cfg.dsv_profile_interval_stage2
        return iteration % every == 0

    def on_iteration_start(self, iteration: int) -> None:
        """Tell every layer what this iteration does: sampled rows, predictor training, profiling."""
        due = self.profile_due(iteration)
        control = StepControl(iteration=iteration, train_predictor=self.stage == 1 or due, collect_stats=due)
        for layer in self.layers:
            layer.begin_iteration(control)

    def on_iteration_end(self, iteration: int) -> Dict:
        """Aggregate this iteration's statistics, update decisions, log. Returns a summary."""
        measured = self._gather()
        events = []
        if measured is not None:
            self._update_ema(measured)
        if self.stage == 1 and self._switch_due(iteration):
            events += self._switch(iteration)
        elif self.stage == 2 and measured is not None and self.cfg.dsv_mode == "auto":
            events += self._redecide()
        events += self._replan(iteration)
        self._store_schedule()
        summary = self.summary(iteration)
        interval = self.cfg.dsv_log_interval
        for e in events:
            self.log(e)
        if events or (measured is not None and (interval == 0 or iteration % interval == 0)):
            self.log(status_line(summary))
        if measured is not None:
            self.writer.write(summary)
        summary["events"] = events
        return summary

    def _switch_due(self, iteration: int) -> bool:
        cfg = self.cfg
        if iteration < cfg.dsv_switch_min_iters or not all(l.state.stats_ema for l in self.layers):
            return iteration >= cfg.dsv_switch_max_iters
        loss, recall = self._mean("loss"), self._mean("recall")
        good = loss < cfg.dsv_switch_loss_threshold and recall >= cfg.dsv_switch_recall_target
        return good or iteration >= cfg.dsv_switch_max_iters

    def _switch(self, iteration: int) -> List[str]:
        self.stage, self.switch_iteration = 2, iteration
        why = (
            f"predictor loss {self._mean('loss'):.4f} (threshold {self.cfg.dsv_switch_loss_threshold}), "
            f"recall {self._mean('recall'):.3f} (target {self.cfg.dsv_switch_recall_target})"
            if all(l.state.stats_ema for l in self.layers) else "no statistics yet"
        )
        if iteration >= self.cfg.dsv_switch_max_iters:
            why += f"; reached --dsv-switch-max-iters {self.cfg.dsv_switch_max_iters}"
        events = [f"DSV stage switch at iteration {iteration}: {why}"]
        events += self._redecide(switching=True)
        self._sync_predictor_lr()
        return events

    def _redecide(self, switching: bool = False) -> List[str]:
        events = []
        for layer in self.layers:
            state = layer.state
            if not state.stats_ema:
                continue
            sparse, k, reason = self._decide(layer)
            if sparse != state.sparse or switching:
                events.append(f"DSV layer {layer.layer_number}: {'sparse' if sparse else 'dense'} ({reason})")
            layer.apply(state.replace(sparse=sparse, kv_units=k if sparse else state.kv_units, reason=reason))
        return events

    def _decide(self, layer: DSVCoreAttention):
        cfg = self.cfg
        ema = layer.state.stats_ema
        s_len = layer.last_seq_len
        if s_len is None:
            return False, None, "no forward seen yet"
        units = s_len // cfg.dsv_kv_block
        k = layer.k_for_sparsity(ema["sparsity"], s_len)
        sparsity, recall = float(ema["sparsity"].mean()), float(ema["recall"].mean())
        density = float(k.float().mean()) / units
        if sparsity < cfg.dsv_min_sparsity:
            return False, k, f"sparsity {sparsity:.3f} < --dsv-min-sparsity {cfg.dsv_min_sparsity}"
        if recall < cfg.dsv_recall_floor:
            return False, k, f"recall {recall:.3f} < --dsv-recall-floor {cfg.dsv_recall_floor}"
        if not self.speed_table.sparse_faster(s_len, layer.head_dim, density):
            return False, k, f"speed table: dense is faster at S={s_len}, density {density:.3f}"
        return True, k, f"sparsity {sparsity:.3f}, recall {recall:.3f}, K/head {k.tolist()}"

    # ------------------------------------------------------------------ context parallelism
    def _replan(self, iteration: int) -> List[str]:
        """``--dsv-cp-split auto``: re-plan each layer's head x sequence split and head assignment
        from its measured sparsity (bounded cadence, see ``ReplanPolicy``). The inputs are the
        synchronised EMA statistics, so every rank computes the same plans (checked)."""
        layers = [l for l in self.layers if l.cp_groups is not None]
        if not layers or self.cfg.dsv_cp_split != "auto" or any(l.last_seq_len is None for l in layers):
            return []
        from megatron_dsv.cp.cost_model import AttentionShape, CostModel
        from megatron_dsv.cp.planner import ReplanPolicy, check_plans_agree

        cfg = self.cfg
        if self.cp_policy is None:
            cost = CostModel.from_benchmark(
                cfg.dsv_speed_table or None,
                intra_node_gbps=cfg.dsv_cp_intra_node_gbps, inter_node_gbps=cfg.dsv_cp_inter_node_gbps,
            )
            shapes = [
                AttentionShape(l.last_seq_len, l.num_heads, l.head_dim, l.num_kv_heads, batch=l.last_batch)
                for l in layers
            ]
            self.cp_policy = ReplanPolicy(
                cost, shapes, cp_size=layers[0].cp_size, gpus_per_node=cfg.dsv_cp_gpus_per_node,
                granule=cfg.group_size, threshold=cfg.dsv_cp_replan_threshold,
                min_interval=cfg.dsv_cp_replan_interval,
            )
        sparsity = [
            l.state.stats_ema["sparsity"][l.head_slice()].tolist() if l.sparse and "sparsity" in l.state.stats_ema else None
            for l in layers
        ]
        changed = self.cp_policy.maybe_replan(iteration, sparsity, sparse=[l.sparse for l in layers])
        if not changed:
            return []
        check_plans_agree(self.cp_policy.plans, group=layers[0].cp_groups.cp_group)
        events = []
        for i in changed:
            plan = self.cp_policy.plans[i]
            layers[i].apply(layers[i].state.replace(cp_plan=plan))
            events.append(
                f"DSV layer {layers[i].layer_number}: CP plan {plan.head_size}x{plan.seq_size} "
                f"(head-parallel x sequence-parallel), heads per rank {[len(h) for h in plan.slots]}, "
                f"predicted {plan.predicted_ms:.2f} ms"
            )
        return events

    # ------------------------------------------------------------------ statistics
    def _gather(self) -> Optional[torch.Tensor]:
        """[L, 1 + 2H] (loss, sparsity per head, recall per head) over all ranks, or None."""
        pending = [layer.pop_stats() for layer in self.layers]
        if not pending[0]:
            return None
        rows = []
        for pend in pending:
            mean = {n: torch.stack([p[n].float().reshape(-1) for p in pend]).mean(0) for n in STATS}
            rows.append(torch.cat([mean["loss"], mean["sparsity"], mean["recall"]]))
        local = torch.stack(rows)  # [L, 1 + 2 H_local]
        tp = self.layers[0].pg_collection.tp
        if tp is not None and tp.size() > 1:
            parts = [torch.empty_like(local) for _ in range(tp.size())]
            dist.all_gather(parts, local.contiguous(), group=tp)
            local = merge_tp_rows(parts)
        if self.stats_group is not None and dist.get_world_size(self.stats_group) > 1:
            dist.all_reduce(local, group=self.stats_group)
            local = local / dist.get_world_size(self.stats_group)
        return local.cpu()

    def _update_ema(self, measured: torch.Tensor) -> None:
        decay = self.cfg.dsv_stats_ema
        for layer, row in zip(self.layers, measured):
            h = layer.num_heads_global
            new = {"loss": row[0], "sparsity": row[1 : 1 + h], "recall": row[1 + h :]}
            old = layer.state.stats_ema
            ema = {n: v if n not in old else decay * old[n] + (1 - decay) * v for n, v in new.items()}
            layer.apply(layer.state.replace(stats_ema=ema))

    def _mean(self, name: str) -> float:
        return float(torch.stack([l.state.stats_ema[name].float().mean() for l in self.layers]).mean())

    # ------------------------------------------------------------------ optimizer
    def _sync_predictor_lr(self) -> None:
        """Predictor groups at ``--dsv-stage2-predictor-lr-scale`` times their base rates in stage 2,
        at the base rates before (recomputed from the stage, so a resumed run agrees)."""
        if self.optimizer is not None:
            scale = self.cfg.dsv_stage2_predictor_lr_scale if self.stage == 2 else 1.0
            set_predictor_lr_scale(self.optimizer, scale)

    # ------------------------------------------------------------------ state and output
    def _store_schedule(self) -> None:
        schedule = {"stage": self.stage, "switch_iteration": self.switch_iteration}
        for layer in self.layers:
            layer.apply(layer.state.replace(schedule=dict(schedule)))

    def summary(self, iteration: int) -> Dict:
        layers = []
        for l in self.layers:
            st = l.state
            layers.append({
                "layer": l.layer_number,
                "sparse": st.sparse,
                "k": None if st.kv_units is None else st.kv_units.tolist(),
                **{n: (st.stats_ema[n].tolist() if n in st.stats_ema else None) for n in STATS},
            })
        return {"iteration": iteration, "stage": self.stage, "switch_iteration": self.switch_iteration, "layers": layers}

    def status_line(self, iteration: int, summary: Dict) -> str:
        return status_line(summary)


def merge_tp_rows(parts: List[torch.Tensor]) -> torch.Tensor:
    """Per-rank ``[L, 1 + 2h]`` rows (loss, h sparsities, h recalls of the rank's heads, in
    tensor-parallel rank order) -> ``[L, 1 + 2 h tp]`` for all heads; loss averaged."""
    h = (parts[0].shape[1] - 1) // 2
    loss = torch.stack([p[:, 0] for p in parts]).mean(0, keepdim=True).T
    return torch.cat([loss] + [p[:, 1 : 1 + h] for p in parts] + [p[:, 1 + h :] for p in parts], dim=1)


__all__ = ["DSVController", "SpeedTable", "merge_tp_rows"]
