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
computes the same numbers and takes the same decisions. The state lives in each layer's
``_extra_state`` and is saved and restored with Megatron's checkpoints.

Call :meth:`DSVController.on_iteration_start` before an iteration's first forward and
:meth:`DSVController.on_iteration_end` after the optimizer step.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist

from megatron_dsv.config import DSVConfig
from megatron_dsv.layers.attention import DSVCoreAttention, dsv_attention_layers
from megatron_dsv.ops._utils import log_once

logger = logging.getLogger("megatron_dsv")

STATS = ("loss", "sparsity", "recall")


@dataclass
class SpeedTable:
    """Where sparse attention beats dense, from the kernel benchmark.

    ``rows``: dicts with ``S``, ``D``, ``density`` (fraction of pairs computed) and ``speedup``
    (dense time / sparse time, selection included). Without rows, sparse is taken to be faster
    at ``density <= default_max_density``.
    """

    rows: List[Dict] = field(default_factory=list)
    default_max_density: float = 0.5

    @classmethod
    def from_json(cls, path: str, kv_block: Optional[int] = None) -> "SpeedTable":
        """Read ``benchmarks/attention.py`` output: rows (under ``rows``) with ``kind`` starting
        with ``dsv``, ``S``, ``D``, ``sparsity`` (or ``density``), ``speedup_fwd_bwd`` (vs cuDNN
        dense, selection included) and ``kv_block``; only rows of ``kv_block`` when given."""
        with open(path) as f:
            data = json.load(f)
        raw = data.get("rows", data.get("results", [])) if isinstance(data, dict) else data
        rows = []
        for r in raw:
            if not str(r.get("kind", "dsv")).startswith("dsv"):
                continue
            if kv_block is not None and r.get("kv_block", kv_block) != kv_block:
                continue
            speed = r.get("speedup_fwd_bwd", r.get("speedup"))
            dens = r.get("density", None if r.get("sparsity") is None else 1 - r["sparsity"])
            if speed is None or dens is None or "S" not in r or "D" not in r:
                continue
            rows.append({"S": int(r["S"]), "D": int(r["D"]), "density": float(dens), "speedup": float(speed)})
        if not rows:
            raise ValueError(
                f"{path} holds no DSV rows with S, D, sparsity and speedup_fwd_bwd"
                + (f" for kv_block={kv_block}" if kv_block is not None else "")
                + "; write one with benchmarks/attention.py."
            )
        return cls(rows)

    def sparse_faster(self, seq_len: int, head_dim: int, density: float) -> bool:
        if not self.rows:
            log_once(
                logging.WARNING,
                f"DSV: no --dsv-speed-table; assuming sparse attention is faster at density <= "
                f"{self.default_max_density}. Run benchmarks/attention.py on your GPU for a table.",
            )
            return density <= self.default_max_density
        d_best = min({r["D"] for r in self.rows}, key=lambda d: abs(d - head_dim))
        rows = [r for r in self.rows if r["D"] == d_best]
        s_best = min({r["S"] for r in rows}, key=lambda s: abs(math.log(s / seq_len)))
        pts = sorted((r["density"], r["speedup"]) for r in rows if r["S"] == s_best)
        if density <= pts[0][0]:
            return pts[0][1] > 1.0
        if density >= pts[-1][0]:
            return pts[-1][1] > 1.0 and density <= pts[-1][0] * 1.05
        for (d0, v0), (d1, v1) in zip(pts, pts[1:]):
            if d0 <= density <= d1:
                return v0 + (v1 - v0) * (density - d0) / (d1 - d0) > 1.0
        return False


class DSVController:
    """Runs the two-stage schedule over every DSV layer of ``model`` (a module or list of chunks).

    Args:
        model: module(s) containing DSVCoreAttention layers.
        stats_group: process group over which statistics are averaged (Megatron's data-parallel
            group with context parallel); None = this process alone.
        speed_table: :class:`SpeedTable`; default from ``--dsv-speed-table``.
        optimizer: optimizer whose predictor parameter groups get the stage-2 LR scale; see
            :meth:`attach_optimizer`.
        tb_writer / wandb_writer: Megatron's TensorBoard / W&B writers, if configured.
        log: where the compact status lines go (default: the ``megatron_dsv`` logger).
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
        self.cfg: DSVConfig = self.layers[0].dsv if self.layers else DSVConfig(dsv_mode="dense")
        self.stats_group = stats_group
        if speed_table is None:
            speed_table = (
                SpeedTable.from_json(self.cfg.dsv_speed_table, kv_block=self.cfg.dsv_kv_block)
                if self.cfg.dsv_speed_table else SpeedTable()
            )
        self.speed_table = speed_table
        self.tb_writer, self.wandb_writer = tb_writer, wandb_writer
        self.log = log or logger.info
        sched = self.layers[0].schedule_state if self.layers else {}
        initial = {"auto": 1, "sparse": 2}.get(self.cfg.dsv_mode, 0)
        self.stage: int = sched.get("stage", initial)
        self.switch_iteration: Optional[int] = sched.get("switch_iteration")
        self.cp_policy = None  # the CP planner's per-layer plans (--dsv-cp-split auto)
        self.optimizer = None
        if optimizer is not None:
            self.attach_optimizer(optimizer)

    # ------------------------------------------------------------------ schedule
    def profile_due(self, iteration: int) -> bool:
        every = self.cfg.dsv_profile_interval_stage1 if self.stage == 1 else self.cfg.dsv_profile_interval_stage2
        return iteration % every == 0

    def on_iteration_start(self, iteration: int) -> None:
        """Set sampling offsets and what each layer measures/trains this iteration."""
        due = self.profile_due(iteration)
        for layer in self.layers:
            layer.set_iteration(iteration)
            layer.collect_stats = due
            layer.train_predictor = self.stage == 1 or due
            layer.pending_stats = []

    def on_iteration_end(self, iteration: int) -> Dict:
        """Aggregate this iteration's statistics, update decisions, log. Returns a summary."""
        if not self.layers:
            return {}
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
            self.log(self.status_line(iteration, summary))
        if measured is not None:
            self._write(iteration, summary)
        summary["events"] = events
        return summary

    def _switch_due(self, iteration: int) -> bool:
        cfg = self.cfg
        if iteration < cfg.dsv_switch_min_iters or not all(l.stats_ema for l in self.layers):
            return iteration >= cfg.dsv_switch_max_iters
        loss, recall = self._mean("loss"), self._mean("recall")
        good = loss < cfg.dsv_switch_loss_threshold and recall >= cfg.dsv_switch_recall_target
        return good or iteration >= cfg.dsv_switch_max_iters

    def _switch(self, iteration: int) -> List[str]:
        self.stage, self.switch_iteration = 2, iteration
        why = (
            f"predictor loss {self._mean('loss'):.4f} (threshold {self.cfg.dsv_switch_loss_threshold}), "
            f"recall {self._mean('recall'):.3f} (target {self.cfg.dsv_switch_recall_target})"
            if all(l.stats_ema for l in self.layers) else "no statistics yet"
        )
        if iteration >= self.cfg.dsv_switch_max_iters:
            why += f"; reached --dsv-switch-max-iters {self.cfg.dsv_switch_max_iters}"
        events = [f"DSV stage switch at iteration {iteration}: {why}"]
        events += self._redecide(switching=True)
        self._scale_predictor_lr()
        return events

    def _redecide(self, switching: bool = False) -> List[str]:
        events = []
        for layer in self.layers:
            if not layer.stats_ema:
                continue
            sparse, k, reason = self._decide(layer)
            if sparse != layer.sparse or switching:
                events.append(f"DSV layer {layer.layer_number}: {'sparse' if sparse else 'dense'} ({reason})")
            layer.set_sparse(sparse, k if sparse else None)
            layer.decision = reason
        return events

    def _decide(self, layer: DSVCoreAttention):
        cfg = self.cfg
        ema = layer.stats_ema
        s_len = getattr(layer, "last_seq_len", None)
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
        from megatron_dsv.cp.planner import AttentionShape, CostModel, DEFAULT_BENCHMARK, ReplanPolicy, check_plans_agree

        cfg = self.cfg
        if self.cp_policy is None:
            table = cfg.dsv_speed_table or DEFAULT_BENCHMARK
            try:
                cost = CostModel.from_benchmark(
                    table, intra_node_gbps=cfg.dsv_cp_intra_node_gbps, inter_node_gbps=cfg.dsv_cp_inter_node_gbps
                )
            except FileNotFoundError:
                raise FileNotFoundError(
                    f"--dsv-cp-split auto needs kernel timings for its cost model: {table} is missing. "
                    "Pass --dsv-speed-table with a benchmarks/attention.py JSON, or a fixed "
                    "--dsv-cp-split (head, seq or HxS)."
                ) from None
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
            l.stats_ema["sparsity"][l.head_slice()].tolist() if l.sparse and "sparsity" in l.stats_ema else None
            for l in layers
        ]
        changed = self.cp_policy.maybe_replan(iteration, sparsity, sparse=[l.sparse for l in layers])
        if not changed:
            return []
        check_plans_agree(self.cp_policy.plans, group=layers[0].cp_groups.cp_group)
        events = []
        for i in changed:
            plan = self.cp_policy.plans[i]
            layers[i].cp_plan = plan
            events.append(
                f"DSV layer {layers[i].layer_number}: CP plan {plan.head_size}x{plan.seq_size} "
                f"(head-parallel x sequence-parallel), heads per rank {[len(h) for h in plan.slots]}, "
                f"predicted {plan.predicted_ms:.2f} ms"
            )
        return events

    # ------------------------------------------------------------------ statistics
    def _gather(self) -> Optional[torch.Tensor]:
        """[L, 1 + 2H] (loss, sparsity per head, recall per head) over all ranks, or None."""
        if not self.layers[0].pending_stats:
            for layer in self.layers:
                layer.pending_stats = []
            return None
        rows = []
        for layer in self.layers:
            pend, layer.pending_stats = layer.pending_stats, []
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
            old = layer.stats_ema
            layer.stats_ema = {
                n: v if n not in old else decay * old[n] + (1 - decay) * v for n, v in new.items()
            }
            layer.last_measured = new

    def _mean(self, name: str) -> float:
        return float(torch.stack([l.stats_ema[name].float().mean() for l in self.layers]).mean())

    # ------------------------------------------------------------------ optimizer
    def attach_optimizer(self, optimizer) -> None:
        """Remember a torch optimizer's predictor parameter groups for the stage-2 LR scale.

        Put the predictors in a group of their own (mixed groups are rejected: scaling them
        would slow the model). Megatron runs do not pass an optimizer here: Megatron's scheduler
        recomputes each group's lr from ``max_lr``/``min_lr`` every step, so
        :class:`megatron_dsv.hooks.DSVHooks` sets those from the stage instead.
        """
        pred = {id(p) for l in self.layers for p in l.predictor.parameters()}
        groups = []
        for g in optimizer.param_groups:
            ids = {id(p) for p in g["params"]}
            if ids & pred and not ids <= pred:
                raise ValueError(
                    "an optimizer parameter group mixes predictor and model parameters; give the "
                    "predictors their own group (see is_predictor_param)."
                )
            if ids and ids <= pred:
                groups.append(g)
        self.optimizer, self._pred_groups = optimizer, groups
        if self.stage == 2 and self.switch_iteration is not None:  # resumed after the switch
            self._scale_predictor_lr()

    def _scale_predictor_lr(self) -> None:
        if self.optimizer is None:
            return
        scale = self.cfg.dsv_stage2_predictor_lr_scale
        for g in self._pred_groups:
            if g.get("dsv_stage2_scaled"):  # restored with the optimizer's state on resume
                continue
            g["lr"] *= scale
            g["dsv_stage2_scaled"] = True

    # ------------------------------------------------------------------ state and output
    def _store_schedule(self) -> None:
        state = {"stage": self.stage, "switch_iteration": self.switch_iteration}
        for layer in self.layers:
            layer.schedule_state = dict(state)

    def summary(self, iteration: int) -> Dict:
        layers = []
        for l in self.layers:
            ema = l.stats_ema
            layers.append({
                "layer": l.layer_number,
                "sparse": l.sparse,
                "k": None if l.kv_units_global is None else l.kv_units_global.tolist(),
                **{n: (ema[n].tolist() if n in ema else None) for n in STATS},
            })
        return {"iteration": iteration, "stage": self.stage, "switch_iteration": self.switch_iteration, "layers": layers}

    def status_line(self, iteration: int, summary: Dict) -> str:
        n_sparse = sum(l["sparse"] for l in summary["layers"])
        if not all(l.stats_ema for l in self.layers):
            return f"DSV it {iteration} stage {self.stage} | sparse layers {n_sparse}/{len(self.layers)}"
        return (
            f"DSV it {iteration} stage {self.stage} | predictor loss {self._mean('loss'):.4f} | "
            f"recall {self._mean('recall'):.3f} | sparsity {self._mean('sparsity'):.3f} | "
            f"sparse layers {n_sparse}/{len(self.layers)}"
        )

    def _write(self, iteration: int, summary: Dict) -> None:
        if dist.is_initialized() and dist.get_rank() != 0:
            return
        scalars = {"dsv/stage": self.stage, "dsv/sparse_layers": sum(l["sparse"] for l in summary["layers"])}
        for l in summary["layers"]:
            if l["loss"] is None:
                continue
            n = l["layer"]
            scalars[f"dsv/predictor_loss/layer{n}"] = l["loss"]
            for stat in ("sparsity", "recall"):
                scalars[f"dsv/{stat}/layer{n}"] = sum(l[stat]) / len(l[stat])
                for h, v in enumerate(l[stat]):
                    scalars[f"dsv/{stat}_heads/layer{n}/head{h}"] = v
        if self.tb_writer is not None:
            for k, v in scalars.items():
                self.tb_writer.add_scalar(k, v, iteration)
        if self.wandb_writer is not None:
            self.wandb_writer.log(scalars, iteration)
        if self.cfg.dsv_stats_log:
            os.makedirs(os.path.dirname(os.path.abspath(self.cfg.dsv_stats_log)), exist_ok=True)
            with open(self.cfg.dsv_stats_log, "a") as f:
                f.write(json.dumps(summary) + "\n")


def merge_tp_rows(parts: List[torch.Tensor]) -> torch.Tensor:
    """Per-rank ``[L, 1 + 2h]`` rows (loss, h sparsities, h recalls of the rank's heads, in
    tensor-parallel rank order) -> ``[L, 1 + 2 h tp]`` for all heads; loss averaged."""
    h = (parts[0].shape[1] - 1) // 2
    loss = torch.stack([p[:, 0] for p in parts]).mean(0, keepdim=True).T
    return torch.cat([loss] + [p[:, 1 : 1 + h] for p in parts] + [p[:, 1 + h :] for p in parts], dim=1)


def is_predictor_param(name: str, param: torch.nn.Parameter) -> bool:
    """True for DSV predictor parameters (for optimizer parameter groups)."""
    return ".predictor.weight_" in name or name.startswith("predictor.weight_")


__all__ = ["DSVController", "SpeedTable", "is_predictor_param", "merge_tp_rows"]
