"""The DSV stage machine: when to go sparse, which layers, how many keys per head.

Every profiling iteration (``--dsv-profile-interval-stage1`` / ``-stage2``) each layer reports, for
sampled query rows, the recall curve of its real selection: key units ranked per query group by the
predictor (and by the same rule on exact q/k), the rows' exact attention mass read in that order.
From its EMA the controller chooses, per head, the fewest key units whose recall reaches
``--dsv-critical-mass`` (K for a target recall, not K from token-level sparsity, which overstates
what query groups x key blocks can skip by about 2x), and reads the predictor's recall relative to
exact q/k at that K.

Stage 1 (``--dsv-mode auto``): every layer runs dense while the predictor learns (closed-form refit
of the sampled rows' score moments on every profiling iteration, or by gradient). The switch to
stage 2 fires when the mean relative recall reaches ``--dsv-switch-relative-recall`` and has
plateaued (last 3 measurements within ``--dsv-switch-plateau``), never before
``--dsv-switch-min-iters``, or at ``--dsv-switch-max-iters``.

Stage 2: a layer runs sparse at its K when the density K/units leaves at least
``--dsv-min-sparsity`` of the key units out, its recall holds (below), and sparse is faster at
that K: by default measured (``--dsv-speed-table measure``: :mod:`megatron_dsv.runtime.speed_probe`
times the sparse and dense paths of the layer's shape at its K, once per shape and K, and a
layer goes sparse only when sparse beats dense by ``--dsv-speed-margin``); ``assume`` takes
sparse to be faster at density <= 0.5, a path reads a speed table; a layer under context
parallelism is never probed (the CP autotuner times its real path) and keeps the ``assume`` rule.
Its recall holds (hysteresis, ``megatron_dsv.layers.decision``): a sparse layer
whose recall falls below ``--dsv-recall-floor`` goes dense at once and its K is cleared; it
returns after ``--dsv-min-dwell`` iterations when its recall reaches the floor plus
``--dsv-recall-margin`` (relative recall is no gate there: it names the cause of a fall). K
follows the curve at every profiling iteration. Every change and its reason is logged.

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

import functools
import logging
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist

from megatron_dsv.config import DSVConfig
from megatron_dsv.cp.groups import collective_device
from megatron_dsv.layers.attention import DSVCoreAttention, dsv_attention_layers
from megatron_dsv.layers.decision import hysteresis_decision
from megatron_dsv.layers.profiler import RecallCurve
from megatron_dsv.layers.state import STATS, StepControl
from megatron_dsv.runtime.lr import check_predictor_groups, set_predictor_lr_scale
from megatron_dsv.runtime.speed_probe import ProbeResult, ProbeShape, SpeedProbe
from megatron_dsv.runtime.speed_table import SpeedTable
from megatron_dsv.runtime.writers import StatsWriter, print_rank_0, status_line

logger = logging.getLogger("megatron_dsv")

CURVE = ("mass_by_rank", "mass_by_rank_exact", "need_count", "need_count_exact")
"""The recall-curve fields kept (as EMAs, ``[H, units]``) beside the per-head statistics."""

PLATEAU_POINTS = 3
"""Profiling measurements of the relative recall that must agree within ``--dsv-switch-plateau``."""


class DSVController:
    """Runs the two-stage schedule over every DSV layer of ``model`` (a module or list of chunks).

    Args:
        model: module(s) containing DSVCoreAttention layers; at least one must have a predictor
            (a model built without the DSV spec, or with ``--dsv-mode dense``, is refused).
        stats_group: process group over which statistics are averaged (Megatron's data-parallel
            group with context parallel); None = this process alone.
        speed_table: :class:`SpeedTable` to decide by instead of ``--dsv-speed-table`` (no probing).
        optimizer: a torch optimizer whose predictor parameter groups (their own groups, see
            ``megatron_dsv.runtime.lr.predictor_param_groups``) follow the stage's learning rate.
            Megatron runs leave it out: ``megatron_dsv.runtime.megatron`` drives Megatron's groups.
        tb_writer / wandb_writer: Megatron's TensorBoard / W&B writers, if configured.
        log: where decisions and status lines go (default: printed on rank 0).
        speed_probe: :class:`SpeedProbe` to decide by (tests inject a timer); default: one built
            from ``--dsv-speed-table measure`` and ``--dsv-speed-margin``. Not with ``speed_table``.
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
        speed_probe: Optional[SpeedProbe] = None,
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
        self.log = log or print_rank_0
        if speed_table is not None and speed_probe is not None:
            raise ValueError("DSVController takes a speed_table or a speed_probe, not both.")
        path = self.cfg.speed_table_file
        if speed_table is None:
            speed_table = SpeedTable.from_json(path, kv_block=self.cfg.dsv_kv_block) if path else SpeedTable(
                source="--dsv-speed-table assume" if self.cfg.dsv_speed_table == "assume" else
                "--dsv-speed-table measure does not probe layers under context parallelism")
            if speed_probe is None and self.cfg.dsv_speed_table == "measure":
                speed_probe = SpeedProbe(margin=self.cfg.dsv_speed_margin, k_multiple=self.cfg.multiple_units(),
                                         log=self.log)
        self.speed_table = speed_table
        # measured sparse vs dense times per shape and K; not checkpointed (measured again after a restart)
        self.speed_probe = speed_probe
        self._probed: Dict[int, ProbeResult] = {}  # layer number -> its last probe verdict, for the stats log
        self.writer = StatsWriter(tb_writer, wandb_writer, self.cfg.dsv_stats_log)
        sched = self.layers[0].state.schedule
        initial = {"auto": 1, "sparse": 2}.get(self.cfg.dsv_mode, 0)
        self.stage: int = sched.get("stage", initial)
        self.switch_iteration: Optional[int] = sched.get("switch_iteration")
        self.relative_history: List[float] = list(sched.get("relative_recall_history", []))
        self.nonfinite_fallbacks = 0  # layers x profiling iterations dropped for NaN/Inf (logged each)
        self.cp_policy = None  # the CP planner's per-layer plans (--dsv-cp-split auto)
        self.cp_autotuner = None  # --dsv-cp-autotune on: measured choices, cached per layer signature
        self._cp_autotuned: Dict = {}  # layer number -> AutotuneResult of this iteration's re-plans
        self.optimizer = optimizer
        if optimizer is not None:
            check_predictor_groups(optimizer, [p for l in self.layers for p in l.predictor.parameters()])
            self._sync_predictor_lr()

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
        # read before any decision below changes a layer's mode: the forward just run is what moved them
        exchange = self._exchange_bytes() if measured is not None else None
        events = []
        if measured is not None:
            events += self._nonfinite_fallback(iteration, measured)
            self._update_ema(measured)
            self._refit()
            if self.stage == 1:
                rel = self._mean_relative_recall()
                if rel is not None:
                    self.relative_history = (self.relative_history + [rel])[-PLATEAU_POINTS:]
        if self.stage == 1 and self._switch_due(iteration):
            events += self._switch(iteration)
        elif self.stage == 2 and measured is not None and self.cfg.dsv_mode == "auto":
            events += self._redecide(iteration)
        events += self._replan(iteration)
        self._store_schedule()
        summary = self.summary(iteration)
        if exchange is not None:
            for entry, ex in zip(summary["layers"], exchange):
                entry["cp_exchange"] = ex
        for entry in summary["layers"]:  # the measured table of a layer re-planned now, for the stats log
            tuned = self._cp_autotuned.pop(entry["layer"], None)
            if tuned is not None:
                entry["cp_autotune"] = tuned.to_dict()
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
        if iteration >= cfg.dsv_switch_max_iters:
            return True
        hist = self.relative_history
        if iteration < cfg.dsv_switch_min_iters or len(hist) < PLATEAU_POINTS:
            return False
        return hist[-1] >= cfg.dsv_switch_relative_recall and max(hist) - min(hist) <= cfg.dsv_switch_plateau

    def _switch(self, iteration: int) -> List[str]:
        self.stage, self.switch_iteration = 2, iteration
        hist = self.relative_history
        why = (
            f"relative recall {hist[-1]:.3f} (target {self.cfg.dsv_switch_relative_recall}), last "
            f"{len(hist)} within {max(hist) - min(hist):.3f} (plateau {self.cfg.dsv_switch_plateau})"
            if hist else "no statistics yet"
        )
        if iteration >= self.cfg.dsv_switch_max_iters:
            why += f"; reached --dsv-switch-max-iters {self.cfg.dsv_switch_max_iters}"
        events = [f"DSV stage switch at iteration {iteration}: {why}"]
        events += self._redecide(iteration, switching=True)
        self._sync_predictor_lr()
        return events

    def _redecide(self, iteration: int, switching: bool = False) -> List[str]:
        events = []
        for layer in self.layers:
            state = layer.state
            if not state.stats_ema:
                continue
            sparse, k, reason = self._decide(layer, iteration)
            changed = sparse != state.sparse
            if changed or switching:
                events.append(f"DSV layer {layer.layer_number}: {'sparse' if sparse else 'dense'} ({reason})")
            layer.apply(state.replace(
                sparse=sparse, kv_units=k if sparse else None, reason=reason,
                changed_at=iteration if changed else state.changed_at,
            ))
        return events

    def choose_k(self, layer: DSVCoreAttention) -> Optional[Dict]:
        """K per head for the target recall from the layer's recall-curve EMA, and what it gives:
        ``{"k": int32 [H], "recall", "recall_exact", "relative_recall": fp32 [H], "density": float,
        "curve": RecallCurve}``; None before the layer has a curve. ``density``: the fraction of
        the (query group, key unit) pairs the dense path computes that K selects: ``K / units``
        bidirectional, the share of the allowed pairs under a causal mask."""
        ema = layer.state.stats_ema
        if any(n not in ema for n in CURVE):
            return None
        cfg = self.cfg
        curve = RecallCurve(*(ema[n].double() for n in CURVE), critical_mass=cfg.dsv_critical_mass)
        units = curve.num_units
        k = curve.k_for_recall(cfg.dsv_critical_mass).long()
        m = cfg.multiple_units()
        k = ((k + m - 1) // m * m).clamp(min=cfg.min_units(units), max=units).to(torch.int32)
        recall, exact = curve.recall(k), curve.recall_exact(k)
        relative = recall / exact.clamp(min=torch.finfo(torch.float32).tiny)
        mask = layer.causal_mask()
        if mask is None:
            density = float(k.double().mean()) / units
        else:
            # the share of the pairs the dense masked path computes: the gate and the speed table
            # compare against that path (at K = 125 of 256 causal units, 0.49 of the units but 74%
            # of the allowed pairs; the H200 causal GPT run went sparse at that and lost 5%)
            density = mask.selected_fraction(k, units * cfg.dsv_kv_block, cfg.group_size, cfg.dsv_kv_block)
        return {"k": k, "recall": recall, "recall_exact": exact, "relative_recall": relative,
                "density": density, "curve": curve}

    def _decide(self, layer: DSVCoreAttention, iteration: int):
        cfg = self.cfg
        c = self.choose_k(layer)
        s_len = layer.last_seq_len
        if c is None or s_len is None:
            return False, None, "no recall curve measured yet"
        k, density = c["k"], c["density"]
        recall, relative = float(c["recall"].mean()), float(c["relative_recall"].mean())
        in_use = layer.state.kv_units
        if layer.state.sparse and in_use is not None and in_use.numel() == k.numel():
            # the recall the layer gets now, at the K it runs with (chosen on an older curve)
            recall = float(c["curve"].recall(in_use.clamp(max=c["curve"].num_units)).mean())
        stats = f"K/head {k.tolist()} (density {density:.3f}) for recall {cfg.dsv_critical_mass}"
        if 1 - density < cfg.dsv_min_sparsity:
            return False, k, f"{stats}: sparsity {1 - density:.3f} < --dsv-min-sparsity {cfg.dsv_min_sparsity}"
        probe = self.speed_probe is not None and layer.cp_groups is None
        if not probe and not self.speed_table.sparse_faster(s_len, layer.head_dim, density):
            return False, k, f"{stats}: speed table: dense is faster at S={s_len}, density {density:.3f}"
        first = layer.state.changed_at is None  # never changed: no dwell to serve
        since = cfg.dsv_min_dwell if first else iteration - layer.state.changed_at
        d = hysteresis_decision(
            layer.state.sparse, recall, relative, since, floor=cfg.dsv_recall_floor,
            margin=cfg.dsv_recall_margin, min_dwell=cfg.dsv_min_dwell,
            min_relative_recall=cfg.dsv_switch_relative_recall,
        )
        reason = d.reason.replace(f" after {since} iterations", "") if first else d.reason
        if d.sparse and probe:
            # timed only where the recall would let the layer go (or stay) sparse: a probe per
            # (shape, K) costs warm-up + repetitions of both paths
            timed = self._probe(layer, k)
            if not timed.sparse_faster(self.speed_probe.margin):
                return False, k, f"{stats}: measured {timed.describe(self.speed_probe.margin)}"
            return True, k, f"{stats}; {reason}; measured {timed.describe(self.speed_probe.margin)}"
        return d.sparse, k, f"{stats}; {reason}"

    def _probe(self, layer: DSVCoreAttention, k: torch.Tensor) -> ProbeResult:
        """The layer's sparse path at K per head ``k`` (all heads) vs its dense path, timed on
        synthetic tensors of its last forward's shape (cached per shape and K; collective over the
        tensor-parallel and statistics groups, whose slowest rank's times every rank takes)."""
        cfg = self.cfg
        param = next(layer.predictor.parameters())
        causal = layer.causal_mask()
        shape = ProbeShape(
            batch=layer.last_batch, seq_len=layer.last_seq_len, num_heads=layer.num_heads,
            num_kv_heads=layer.num_kv_heads, head_dim=layer.head_dim, dtype=layer.last_dtype,
            device=str(param.device), group_size=cfg.group_size, kv_block=cfg.dsv_kv_block,
            predictor_rank=cfg.dsv_predictor_rank, backend=cfg.dsv_backend,
            selection_backend=layer.selection_backend(), mask=causal,
            hidden_size=layer.config.hidden_size if cfg.dsv_predictor_input == "hidden" else None,
            scale=layer.softmax_scale,
        )
        result = self.speed_probe.measure(
            shape, k, head_offset=layer.head_slice().start, dense=layer.dense_attention,
            dense_name=layer.dense_backend, groups=(layer.pg_collection.tp, self.stats_group),
            what=f"layer {layer.layer_number}",
        )
        self._probed[layer.layer_number] = result
        return result

    def _nonfinite_fallback(self, iteration: int, measured) -> List[str]:
        """A layer whose profiled q, keys or predictor projections held NaN/Inf runs dense (K
        cleared) and its statistics of this iteration are dropped; counted and logged. The
        selection kernels rank non-finite scores last on every backend, so iterations between
        profiling ones compute a defined (if poor) selection, never garbage."""
        events = []
        for layer, new in zip(self.layers, measured):
            n = int(float(new["nonfinite"]))
            if n == 0:
                continue
            self.nonfinite_fallbacks += 1
            reason = (
                f"{n} non-finite values (NaN/Inf) in the profiled q, keys or predictor projections at "
                f"iteration {iteration} (fallback #{self.nonfinite_fallbacks}): dense until they are finite; "
                "check the model's loss scale and learning rate"
            )
            state = layer.state
            layer.apply(state.replace(sparse=False, kv_units=None, reason=reason,
                                      changed_at=iteration if state.sparse else state.changed_at))
            events.append(f"DSV layer {layer.layer_number}: dense ({reason})")
        return events

    def _mean_relative_recall(self) -> Optional[float]:
        chosen = [self.choose_k(l) for l in self.layers]
        if any(c is None for c in chosen):
            return None
        return float(torch.stack([c["relative_recall"].mean() for c in chosen]).mean())

    def _refit(self) -> None:
        """Closed-form fit of every predictor to this iteration's score moments (summed over the
        statistics group, so every rank writes the same weights)."""
        if self.cfg.dsv_predictor_fit != "closed_form":
            return
        for layer in self.layers:
            layer.refit_predictor(self.stats_group)

    def _replan(self, iteration: int) -> List[str]:
        """``--dsv-cp-split auto``: re-plan each layer's head x sequence split and head assignment
        from its measured sparsity (bounded cadence, see ``ReplanPolicy``). The cost model is built
        at the first plan from the links measured on the CP group (or ``--dsv-cp-calibration``);
        a layer whose last sparse forward ran the selective exchange is planned with the key union
        it fetched. With ``--dsv-cp-autotune on`` the candidates the model ranks near the best
        are timed on the real attention path (``cp.autotune``, cached per layer signature) and the
        fastest measured is kept. Every input is synchronised over the CP group (the statistics EMA, the slowest
        rank's link times, the largest union per key/value head), so every rank computes the same
        plans (checked)."""
        layers = [l for l in self.layers if l.cp_groups is not None]
        if not layers or self.cfg.dsv_cp_split != "auto" or any(l.last_seq_len is None for l in layers):
            return []
        from megatron_dsv.cp.planner import check_plans_agree, synced_union_densities

        cfg = self.cfg
        group = layers[0].cp_groups.cp_group
        if self.cp_policy is None:
            self.cp_policy = self._cp_policy(layers, group)
        sparsity = [
            (1.0 - l.kv_count(l.last_seq_len).double() / (l.last_seq_len // cfg.dsv_kv_block)).tolist() if l.sparse else None
            for l in layers
        ]
        sparse = [l.sparse for l in layers]
        union = None
        # the union is a collective: gathered only when a layer is re-planned now (due() is a pure
        # function of synchronised inputs, so every rank of the CP group takes this branch alike)
        if self.cp_policy.due(iteration, sparsity, sparse):
            union = synced_union_densities(
                [l.cp_exchange if l.sparse else None for l in layers], [l.num_kv_heads for l in layers], group,
            )
        changed = self.cp_policy.maybe_replan(iteration, sparsity, sparse=sparse, union_density=union)
        if not changed:
            return []
        check_plans_agree(self.cp_policy.plans, group=group)
        events = []
        for i in changed:
            plan = self.cp_policy.plans[i]
            layers[i].apply(layers[i].state.replace(cp_plan=plan))
            u = union[i] if union is not None and sparse[i] else None
            tuned = self._cp_autotuned.get(layers[i].layer_number)
            measured = "" if tuned is None else "".join(
                f", measured {c.measured_ms:.2f} ms" for c in tuned.table if c.plan.key() == plan.key())
            events.append(
                f"DSV layer {layers[i].layer_number}: CP plan {plan.head_size}x{plan.seq_size} "
                f"(head-parallel x sequence-parallel), heads per rank {[len(h) for h in plan.slots]}, "
                f"predicted {plan.predicted_ms:.2f} ms{measured}"
                + ("" if u is None else f" with the measured key union {[round(x, 4) for x in u]}")
            )
        return events

    def _exchange_bytes(self) -> List[Optional[Dict]]:
        """Per layer, the bytes its last forward's selective key/value exchange moved, summed
        over the CP group, next to what an all-gather of the remote keys/values would have
        received: ``{"fetched_bytes", "allgather_bytes", "ratio", "ranks"}`` (forward; the
        backward sends the key/value gradients of the same blocks back), None for a layer
        without CP or without an exchange on any rank (dense, or a head-only split). Collective
        over the CP group when a layer has one (called on profiling iterations, which every rank
        of the group runs alike)."""
        layers = [l for l in self.layers if l.cp_groups is not None]
        if not layers:
            return [None] * len(self.layers)
        counts = torch.zeros(len(layers), 3, dtype=torch.float64)
        for i, l in enumerate(layers):
            ex = l.cp_exchange if l.sparse else None
            if ex is not None:
                counts[i] = torch.tensor([ex.fetched_bytes, ex.allgather_bytes, 1.0], dtype=torch.float64)
        group = layers[0].cp_groups.cp_group
        if dist.get_world_size(group) > 1:
            on = counts.to(collective_device(group))
            dist.all_reduce(on, group=group)
            counts = on.cpu()
        by_layer = {id(l): c.tolist() for l, c in zip(layers, counts)}
        out: List[Optional[Dict]] = []
        for l in self.layers:
            c = by_layer.get(id(l))
            if c is None or c[2] == 0:
                out.append(None)
                continue
            out.append({"fetched_bytes": int(c[0]), "allgather_bytes": int(c[1]),
                        "ratio": c[0] / max(1.0, c[1]), "ranks": int(c[2])})
        return out

    def _cp_policy(self, layers: List[DSVCoreAttention], group):
        """The planner of ``--dsv-cp-split auto``, its cost model on calibrated links (logged once)."""
        from megatron_dsv.cp.cost_model import CostModel, Links
        from megatron_dsv.cp.planner import ReplanPolicy

        cfg = self.cfg
        shapes = [self._cp_shape(l) for l in layers]
        cp_size = layers[0].cp_size
        calibration, origin = self._cp_calibration(shapes, cp_size, group)
        # link kinds the calibration lacks keep these (logged as assumed where a plan can use them)
        fallback = Links.assumed(intra_node_gbps=cfg.dsv_cp_intra_node_gbps, inter_node_gbps=cfg.dsv_cp_inter_node_gbps)
        cost = CostModel.from_benchmark(cfg.speed_table_file, links=fallback, calibration=calibration)
        self.log(self._cp_calibration_line(cost, calibration, origin, cp_size))
        choose = None
        if cfg.dsv_cp_autotune == "on":
            self.cp_autotuner = self._cp_autotuner(layers[0])
            choose = functools.partial(self._cp_autotune_choice, layers, shapes)
        return ReplanPolicy(
            cost, shapes, cp_size=cp_size, gpus_per_node=cfg.dsv_cp_gpus_per_node,
            granule=cfg.group_size, threshold=cfg.dsv_cp_replan_threshold,
            min_interval=cfg.dsv_cp_replan_interval, choose=choose,
        )

    def _cp_autotune_choice(self, layers: List[DSVCoreAttention], shapes, i: int, comparison):
        """``--dsv-cp-autotune on``: the autotuner's pick for layer ``i`` among the planner's
        ``comparison`` (recorded per layer for the log)."""
        layer = layers[i]
        kv = layer.kv_count(layer.last_seq_len) if layer.sparse else None
        result = self.cp_autotuner.choose(layer.cp_groups, shapes[i], kv, comparison,
                                          what=f"layer {layer.layer_number}")
        self._cp_autotuned[layer.layer_number] = result
        return result.best

    def _cp_autotuner(self, layer: DSVCoreAttention):
        """``--dsv-cp-autotune on``: times the planner's candidates on the layers' own dtype,
        device and kernels (one cache for the run, so a signature is measured once)."""
        from megatron_dsv.cp.autotune import Autotuner

        cfg = self.cfg
        return Autotuner(
            dtype=layer.config.params_dtype, device=next(layer.parameters()).device, group_size=cfg.group_size,
            kv_block=cfg.dsv_kv_block, k_multiple=cfg.multiple_units(), backend=cfg.dsv_backend, log=self.log,
        )

    def _cp_shape(self, layer: DSVCoreAttention):
        """The layer as the planner sees it: its last forward's length and batch, its heads on this
        tensor-parallel rank, the element size of its activations, the predictor's rank and its
        causal mask (the per-rank work of a sequence split counts the pairs it allows)."""
        from megatron_dsv.cp.cost_model import AttentionShape

        return AttentionShape(
            layer.last_seq_len, layer.num_heads, layer.head_dim, layer.num_kv_heads, batch=layer.last_batch,
            bytes_per_elem=torch.empty((), dtype=layer.config.params_dtype).element_size(),
            predictor_rank=self.cfg.dsv_predictor_rank, mask=layer.planning_mask,
        )

    def _cp_calibration(self, shapes, cp_size: int, group):
        """``(Calibration, where it came from)``: ``--dsv-cp-calibration``'s file, or the links of
        ``group`` measured now at the message sizes the layers send (collective; every rank gets
        the slowest rank's times)."""
        from megatron_dsv.cp.calibration import layer_message_bytes, measure_links
        from megatron_dsv.cp.cost_model import Calibration

        cfg = self.cfg
        path = cfg.dsv_cp_calibration
        if path:
            try:
                return Calibration.load(path), f"from {path}"
            except (OSError, ValueError, KeyError) as e:
                raise ValueError(
                    f"--dsv-cp-calibration {path}: not a readable calibration ({e}). Write one with `torchrun "
                    "--nproc-per-node N -m megatron_dsv.tools.calibrate_cp --out cal.json`, or leave the flag empty "
                    "to measure the links at start-up."
                ) from e
        sizes = sorted({b for shape in dict.fromkeys(shapes) for b in layer_message_bytes(shape, cp_size)})
        calibration = measure_links(group, message_bytes=sizes)
        node, gpn = calibration.env["node_of_rank"], cfg.dsv_cp_gpus_per_node
        assumed = [r // gpn for r in range(cp_size)]
        if node != assumed:
            per = calibration.env["ranks_per_node"]
            fits = len(set(per)) == 1 and node == [r // per[0] for r in range(cp_size)]
            fix = (f"set --dsv-cp-gpus-per-node {per[0]} (the CP group's ranks per node)" if fits else
                   "launch so that each node's CP ranks are consecutive (the planner places CP rank r on node "
                   "r // --dsv-cp-gpus-per-node)")
            raise ValueError(
                f"the CP group's ranks run on nodes {node} (by host name), but --dsv-cp-gpus-per-node {gpn} "
                f"places them on nodes {assumed}: {fix}."
            )
        return calibration, "measured on the CP group"

    def _cp_calibration_line(self, cost, calibration, origin: str, cp_size: int) -> str:
        """One line: where the links came from and every link kind's numbers, measured, assumed
        (a fallback flag, where a plan can use the kind) or unused."""
        from megatron_dsv.cp.cost_model import LINK_KINDS

        gpn = self.cfg.dsv_cp_gpus_per_node
        used = {"intra": min(gpn, cp_size) > 1, "inter": cp_size > gpn}
        env = calibration.env
        where = ", ".join(str(x) for x in (
            f"{env.get('world_size', '?')} ranks", f"{env.get('nodes', '?')} node(s)", env.get("backend", "?"),
            env.get("device", "?"), env.get("date_utc", "?"),
        ))
        parts = []
        for kind in LINK_KINDS:
            link, cls = getattr(cost.links, kind), kind.split("_")[0]
            if link.measured:
                parts.append(f"{kind} {link.gbps:.4g} GB/s + {link.latency_ms:.4g} ms")
            elif used[cls]:
                parts.append(f"{kind} assumed {link.gbps:.4g} GB/s + {link.latency_ms:.4g} ms "
                             f"(--dsv-cp-{cls}-node-gbps: not in the calibration)")
            else:
                parts.append(f"{kind} unused")
        sizes = env.get("message_bytes")
        return (f"DSV CP calibration {origin} ({where}"
                + (f"; per-peer messages {sizes} bytes" if sizes else "") + "): " + "; ".join(parts))

    def _gather(self) -> Optional[List[Dict[str, torch.Tensor]]]:
        """Per layer ``{"loss": [], "sparsity": [H], "recall": [H], <CURVE>: [H, units]}`` for all
        heads, averaged over microbatches and the statistics group; None without measurements."""
        pending = [layer.pop_stats() for layer in self.layers]
        if not pending[0]:
            return None
        flats, shapes = [], []
        for pend in pending:
            n = float(len(pend))
            h, units = pend[0].curve.mass_by_rank.shape
            parts = [torch.stack([p.loss.double().reshape(()) for p in pend]).mean().reshape(1)]
            parts += [torch.stack([p.nonfinite.double().reshape(()) for p in pend]).sum().reshape(1)]
            parts += [torch.stack([p[s].double() for p in pend]).mean(0) for s in ("sparsity", "recall")]
            parts += [sum(getattr(p.curve, f) for p in pend).double().flatten() / n for f in CURVE]
            flats.append(torch.cat(parts))
            shapes.append((h, units))
        local = torch.cat(flats)
        tp = self.layers[0].pg_collection.tp
        ranks = [local]
        if tp is not None and tp.size() > 1:
            ranks = [torch.empty_like(local) for _ in range(tp.size())]
            dist.all_gather(ranks, local.contiguous(), group=tp)
        per_rank = [_split(r, shapes) for r in ranks]
        merged = torch.cat([_merge_heads([pr[i] for pr in per_rank], *shapes[i]) for i in range(len(shapes))])
        if self.stats_group is not None and dist.get_world_size(self.stats_group) > 1:
            dist.all_reduce(merged, group=self.stats_group)
            merged = merged / dist.get_world_size(self.stats_group)
        merged = merged.cpu()
        out, offset = [], 0
        for h, units in shapes:
            h_all = h * len(ranks)
            size = 2 + 2 * h_all + 4 * h_all * units
            out.append(_unpack(merged[offset : offset + size], h_all, units))
            offset += size
        return out

    def _update_ema(self, measured: List[Dict[str, torch.Tensor]]) -> None:
        """EMA of every statistic (float32, the precision checkpoints keep, so a resumed run
        continues bit for bit); a curve of another length (a new sequence length) restarts."""
        decay = self.cfg.dsv_stats_ema
        for layer, new in zip(self.layers, measured):
            new = dict(new)
            if float(new.pop("nonfinite")) > 0:  # see _nonfinite_fallback: these statistics are void
                continue
            old = layer.state.stats_ema
            ema = {}
            for n, v in new.items():
                v = v.float()
                keep = n in old and old[n].shape == v.shape
                ema[n] = (decay * old[n] + (1 - decay) * v).float() if keep else v
            layer.apply(layer.state.replace(stats_ema=ema))

    def _mean(self, name: str) -> float:
        return float(torch.stack([l.state.stats_ema[name].float().mean() for l in self.layers]).mean())

    def _sync_predictor_lr(self) -> None:
        """Predictor groups at ``--dsv-stage2-predictor-lr-scale`` times their base rates in stage 2,
        at the base rates before (recomputed from the stage, so a resumed run agrees)."""
        if self.optimizer is not None:
            scale = self.cfg.dsv_stage2_predictor_lr_scale if self.stage == 2 else 1.0
            set_predictor_lr_scale(self.optimizer, scale)

    def _store_schedule(self) -> None:
        schedule = {"stage": self.stage, "switch_iteration": self.switch_iteration,
                    "relative_recall_history": list(self.relative_history)}
        for layer in self.layers:
            layer.apply(layer.state.replace(schedule=dict(schedule)))

    def summary(self, iteration: int) -> Dict:
        layers = []
        for l in self.layers:
            st = l.state
            c = self.choose_k(l)
            layers.append({
                "layer": l.layer_number,
                "sparse": st.sparse,
                "cp_plan": None if st.cp_plan is None else f"{st.cp_plan.head_size}x{st.cp_plan.seq_size}",
                "k": None if st.kv_units is None else st.kv_units.tolist(),
                **{n: (st.stats_ema[n].tolist() if n in st.stats_ema else None) for n in STATS},
                "k_for_recall": None if c is None else c["k"].tolist(),
                "density": None if c is None else c["density"],
                "recall_at_k": None if c is None else c["recall"].tolist(),
                "recall_exact_at_k": None if c is None else c["recall_exact"].tolist(),
                "relative_recall": None if c is None else c["relative_recall"].tolist(),
                "speed_probe": None if l.layer_number not in self._probed else self._probed[l.layer_number].to_dict(),
            })
        return {"iteration": iteration, "stage": self.stage, "switch_iteration": self.switch_iteration, "layers": layers}


def _split(flat: torch.Tensor, shapes) -> List[torch.Tensor]:
    sizes = [2 + 2 * h + 4 * h * u for h, u in shapes]
    return list(flat.split(sizes))


def _unpack(flat: torch.Tensor, h: int, units: int) -> Dict[str, torch.Tensor]:
    out = {"loss": flat[0], "nonfinite": flat[1], "sparsity": flat[2 : 2 + h], "recall": flat[2 + h : 2 + 2 * h]}
    for i, name in enumerate(CURVE):
        start = 2 + 2 * h + i * h * units
        out[name] = flat[start : start + h * units].view(h, units)
    return out


def _merge_heads(parts: List[torch.Tensor], h: int, units: int) -> torch.Tensor:
    """One layer's packed statistics from each tensor-parallel rank (its ``h`` heads, in rank
    order) -> the packing for all heads; the loss averaged over ranks."""
    if len(parts) == 1:
        return parts[0]
    un = [_unpack(p, h, units) for p in parts]
    merged = [torch.stack([u["loss"] for u in un]).mean().reshape(1)]
    merged += [torch.stack([u["nonfinite"] for u in un]).sum().reshape(1)]
    merged += [torch.cat([u[s] for u in un]) for s in ("sparsity", "recall")]
    merged += [torch.cat([u[n] for u in un]).flatten() for n in CURVE]
    return torch.cat(merged)


__all__ = ["CURVE", "DSVController", "SpeedTable"]
