"""Granularity by measurement on a trained model: density for a target recall and attention time
at that density, for query groups x key blocks x rankings of key units (issue 13 item 6).

    python benchmarks/granularity.py --ckpt $OUT/quality_procedural/ckpt \\
        --out benchmarks/results/granularity_h200.json

Input: a checkpoint of ``benchmarks/quality.py pretrain-dense``. The model runs once on the first
``--videos`` videos of its fixed validation set at one flow-matching time ``--t`` (fixed noise,
``models/evaluation.fixed_noise``); a pre-hook on every ``DSVCoreAttention`` keeps q, k and v
exactly as core attention receives them (RoPE applied, the model's cube-major token order).

For each layer, query group of ``G`` tokens (a cube of the video, ``--group-cubes``; q and k are
put in that cube's cube-major order, so a group is G contiguous tokens and a key block is a
contiguous run of the same order, as the runtime lays them out) and key block of ``KB`` tokens,
all rows of ``--sample-groups`` evenly spaced query groups are computed exactly against all keys.
Each row's mass per key unit is read in the order of three rankings of its group's units:

* ``oracle``: the group's exact mass per unit (the sum over its rows of their softmax mass);
* ``pooled``: mean-pooled q . mean-pooled k of exact q/k (the rule of ``select_topk`` today);
* ``lse``: log-sum-exp of the scaled scores ``q.k`` over the group's rows and the unit's tokens.

Per head, K (key units per group) is chosen for ``--critical-mass`` of a row's softmax mass by
three rules over the sampled rows (``layers/profiler.RecallCurve``): ``recall`` (the fewest units
whose mean recall reaches the mass: the runtime's ``choose_k`` before its K rounding), ``mean``
(ceil of the mean per-row need) and ``p75`` (the 75th percentile of the per-row need). Density is
K / units. Token-level density (``sampled_attention_stats``, one key per unit, per row) is given
for reference.

On a GPU, for each (G, KB, ranking) and layer, our Triton path is timed forward + backward with
selection as the runtime runs it (the layer's low-rank projection, ``select_topk``, sparse
attention) at that ranking's K per head (``--time-rule``), next to cuDNN dense attention
(``F.scaled_dot_product_attention``) on the same q/k/v: attention time at equal recall. The
selection is always today's mean-pooled one; for the ``lse`` and ``oracle`` rankings the time is
what a selection with that ranking would cost at its K if it were as cheap (no LSE kernel exists).
On a CPU the timing is skipped and the JSON says so.

``--deadline-s`` bounds the timed part of one call: what is not timed by then is listed as
skipped; ``--groups``, ``--kv-blocks``, ``--layers`` and ``--time-rankings`` split the work over
calls.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks.json_out import write_json  # noqa: E402
from megatron_dsv.layers.profiler import RecallCurve  # noqa: E402

RANKINGS = ("oracle", "pooled", "lse")
RULES = ("recall", "mean", "p75")
# Query-group cubes by group size: 2x4x4 is the model's default cube, 4x4x4 the cube of the H200
# decomposition in issue 13; the others keep the cube as round as the token counts allow.
DEFAULT_CUBES = {16: (1, 4, 4), 32: (2, 4, 4), 64: (4, 4, 4), 128: (4, 4, 8)}
_CHUNK_ELEMS = 1 << 26  # fp32 elements of one chunk of exact probabilities (256 MiB)


def parse_cube(text: str) -> Tuple[int, int, int]:
    parts = text.lower().split("x")
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"a cube is written TxHxW with positive integers (e.g. 2x4x4), got {text!r}.")
    return tuple(int(p) for p in parts)


def group_cubes(groups: Sequence[int], spec: str = "") -> Dict[int, Tuple[int, int, int]]:
    """Cube per query-group size: ``spec`` ``"32=2x4x4,64=4x4x4"`` overrides :data:`DEFAULT_CUBES`."""
    cubes = dict(DEFAULT_CUBES)
    for item in (s for s in spec.split(",") if s):
        size, _, cube = item.partition("=")
        cubes[int(size)] = parse_cube(cube)
    out = {}
    for g in groups:
        if g not in cubes:
            raise ValueError(f"no cube for query groups of {g} tokens; give one with --group-cubes {g}=TxHxW.")
        if math.prod(cubes[g]) != g:
            raise ValueError(f"cube {cubes[g]} holds {math.prod(cubes[g])} tokens, not {g}; fix --group-cubes.")
        out[g] = cubes[g]
    return out


def relayout_index(grid: Sequence[int], src_cube: Sequence[int], dst_cube: Sequence[int], device=None) -> torch.Tensor:
    """int64 ``[S]`` with ``x_dst = x_src[idx]``: tokens in ``src_cube``'s cube-major order put in
    ``dst_cube``'s (both over the token grid ``grid``)."""
    from megatron_dsv.ops.layout import check_divisible, cube_major_permutation, inverse_permutation

    check_divisible(grid, dst_cube)
    inv_src = inverse_permutation(cube_major_permutation(grid, src_cube))
    return inv_src[cube_major_permutation(grid, dst_cube)].to(device)


def sample_groups(num_groups: int, n: int) -> torch.Tensor:
    """``min(n, num_groups)`` evenly spaced query-group ids (int64, ascending, deterministic)."""
    if n < 1:
        raise ValueError(f"sample at least one query group, got {n}.")
    n = min(n, num_groups)
    return torch.linspace(0, num_groups - 1, n, dtype=torch.float64).round().long().unique()


def _rows_of(groups: torch.Tensor, group_size: int) -> torch.Tensor:
    return (groups.view(-1, 1) * group_size + torch.arange(group_size, device=groups.device)).flatten()


@torch.no_grad()
def granularity_curves(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    group_size: int,
    kv_blocks: Sequence[int],
    groups: torch.Tensor,
    scale: float,
    critical_mass: float,
    chunk_elems: int = _CHUNK_ELEMS,
) -> Dict[int, Dict[str, RecallCurve]]:
    """Recall curves of the sampled groups' rows under the three rankings.

    Args:
        q: ``[B, H, S, D]`` queries in the group cube's cube-major order (G contiguous tokens).
        k: ``[B, H_kv, S, D]`` keys in the same order; ``H % H_kv == 0``.
        kv_blocks: tokens per key unit, each dividing S.
        groups: int64 query-group ids whose rows are all used.

    Returns ``{kv_block: {"pooled": curve, "lse": curve}}``: each a ``RecallCurve`` whose first
    ranking is the named one and whose second (``*_exact``) is the oracle.
    """
    if q.dim() != 4 or k.dim() != 4 or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:] or q.shape[1] % k.shape[1]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must be [B, H, S, D] and [B, H_kv, S, D].")
    b, h, s, d = q.shape
    if s % group_size or any(s % kb for kb in kv_blocks):
        raise ValueError(f"S={s} must be a multiple of group_size={group_size} and of every kv block {list(kv_blocks)}.")
    if groups.numel() == 0 or int(groups.min()) < 0 or int(groups.max()) >= s // group_size:
        raise ValueError(f"groups must name query groups in [0, {s // group_size}).")
    kf = k.float().repeat_interleave(h // k.shape[1], dim=1)
    g = group_size
    per_chunk = max(1, chunk_elems // max(1, b * h * g * s))
    out: Dict[int, Dict[str, RecallCurve]] = {}
    for i in range(0, groups.numel(), per_chunk):
        grp = groups[i : i + per_chunk].to(q.device)
        n = grp.numel()
        q_rows = q[:, :, _rows_of(grp, g)].float()  # [B, H, n*G, D]
        logits = torch.einsum("bhnd,bhsd->bhns", q_rows, kf) * scale
        p = torch.softmax(logits, -1)
        proxy = q_rows.view(b, h, n, g, d).mean(3)  # the group proxy of select_topk, from exact q
        for kb in kv_blocks:
            u = s // kb
            unit_mass = p.view(b, h, n * g, u, kb).sum(-1)
            oracle = unit_mass.view(b, h, n, g, u).sum(3)
            lse = logits.view(b, h, n, g, u, kb).logsumexp(dim=(3, 5))
            pooled = torch.einsum("bhnd,bhud->bhnu", proxy, kf.view(b, h, u, kb, d).mean(3))

            def rows(x):  # a group's score of each unit, repeated for its G rows
                return x.unsqueeze(3).expand(b, h, n, g, u).reshape(b, h, n * g, u)

            part = {name: RecallCurve.from_unit_mass(unit_mass, rows(x), rows(oracle), critical_mass)
                    for name, x in (("pooled", pooled), ("lse", lse))}
            acc = out.setdefault(kb, {})
            for name, c in part.items():
                acc[name] = c if name not in acc else acc[name] + c
    return out


def oracle_curve(curve) -> RecallCurve:
    """The curve whose (first) ranking is ``curve``'s oracle ranking."""
    return RecallCurve(curve.mass_by_rank_exact, curve.mass_by_rank_exact, curve.need_count_exact,
                       curve.need_count_exact, curve.critical_mass)


def choose_units(curve, rule: str) -> torch.Tensor:
    """K per head (int32 ``[H]``) of ``curve``'s first ranking under ``rule`` (see :data:`RULES`)."""
    if rule == "recall":
        return curve.k_for_recall(curve.critical_mass)
    if rule in ("mean", "p75"):
        return curve.units_needed(rule)
    raise ValueError(f"unknown rule {rule!r}; choose from {RULES}.")


def summarize(curves: Dict[str, RecallCurve]) -> Dict[str, Dict[str, Dict]]:
    """``{ranking: {rule: {"k": [H], "density": [H], "mean_density": float, "recall": [H]}}}``:
    the units per head, their fraction of all units, and the mean recall they give."""
    by_rank = {"oracle": oracle_curve(curves["pooled"]), "pooled": curves["pooled"], "lse": curves["lse"]}
    res: Dict[str, Dict[str, Dict]] = {}
    for name, c in by_rank.items():
        res[name] = {}
        for rule in RULES:
            k = choose_units(c, rule)
            dens = k.double() / c.num_units
            res[name][rule] = {"k": k.tolist(), "density": [round(float(x), 6) for x in dens],
                               "mean_density": round(float(dens.mean()), 6),
                               "recall": [round(float(x), 6) for x in c.recall(k)]}
    return res


@torch.no_grad()
def token_density(q: torch.Tensor, k: torch.Tensor, rows: torch.Tensor, scale: float, critical_mass: float) -> List[float]:
    """Per head, the mean over rows (and batch) of the fraction of keys a row needs for the mass
    (``layers/profiler.sampled_attention_stats``): the token-level reference."""
    from megatron_dsv.layers.profiler import sampled_attention_stats

    kx = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    stats = sampled_attention_stats(q[:, :, rows.to(q.device)], kx, scale, critical_mass)
    return [round(float(x), 6) for x in (1 - stats["sparsity"]).mean(0)]


# -------------------------------------------------------------------------------------- capture
@torch.no_grad()
def capture_qkv(model, videos: torch.Tensor, labels: Optional[torch.Tensor], t: float, seed: int, precision: str):
    """Run ``model`` (a VideoDiT) once on ``videos`` at time ``t`` with fixed noise and return,
    per DSV self-attention layer, ``(layer, q, k, v)`` with q ``[B, H, S, D]`` and k/v
    ``[B, H_kv, S, D]`` as its core attention received them (RoPE'd, cube-major)."""
    from megatron_dsv.layers.attention import dsv_attention_layers
    from megatron_dsv.layers.state import StepControl
    from megatron_dsv.models.evaluation import fixed_noise
    from megatron_dsv.models.video_dit import flow_interpolate

    layers = [a for a in dsv_attention_layers(model) if a.is_self_attention]
    if not layers:
        raise ValueError("the model has no DSV self-attention layer to capture.")
    seen: Dict[int, Tuple[torch.Tensor, ...]] = {}
    handles = []

    def hook(module, args, kwargs):
        names = ("query", "key", "value")
        qkv = [args[i] if i < len(args) else kwargs[n] for i, n in enumerate(names)]
        seen[id(module)] = tuple(x.detach().permute(1, 2, 0, 3).contiguous() for x in qkv)  # [s,b,h,d] -> [b,h,s,d]

    for a in layers:
        a.begin_iteration(StepControl(iteration=0, train_predictor=False, collect_stats=False))
        handles.append(a.register_forward_pre_hook(hook, with_kwargs=True))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        x = videos.to(device=device, dtype=torch.float32)
        noise = torch.stack([fixed_noise(j, videos.shape[1:], seed) for j in range(videos.shape[0])]).to(device)
        tt = torch.full((videos.shape[0],), float(t), device=device)
        x_t, _ = flow_interpolate(x, tt, noise)
        ctx = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else torch.autocast(device.type, enabled=False)
        with ctx:
            model(x_t, tt, None if labels is None else labels.to(device))
    finally:
        for hd in handles:
            hd.remove()
        model.train(was_training)
    missing = [a.layer_number for a in layers if id(a) not in seen]
    if missing:
        raise RuntimeError(f"layers {missing} were not called in the forward; nothing to measure there.")
    return [(a, *seen[id(a)]) for a in layers]


# --------------------------------------------------------------------------------------- timing
def sparse_step(layer, q, k, v, group_size: int, kv_block: int, k_per_head: torch.Tensor, backend: str = "triton"):
    """One forward + backward of the runtime's sparse path on copies of q/k/v: the layer's
    low-rank projection and ``select_topk`` (no grad), sparse attention and its backward.
    Returns ``(step, leaves)``: the closure and the tensors whose gradients it writes."""
    from megatron_dsv.ops.selection import select_topk
    from megatron_dsv.ops.sparse_attention import sparse_attention

    qg, kg, vg = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    do = torch.randn_like(qg)
    kh = k_per_head.to(torch.int32)

    def step():
        with torch.no_grad():
            q_lr, k_lr = layer.predictor.project(qg, kg)
            index = select_topk(q_lr, k_lr, group_size, kh, kv_block=kv_block, backend=backend)
        out, _ = sparse_attention(qg, kg, vg, index, layer.softmax_scale, backend=backend)
        out.backward(do)

    return step, [qg, kg, vg]


def time_sparse(layer, q, k, v, group_size: int, kv_block: int, k_per_head: torch.Tensor, warmup: int, rep: int) -> float:
    """Median ms of :func:`sparse_step` with the Triton kernels."""
    from triton.testing import do_bench

    step, leaves = sparse_step(layer, q, k, v, group_size, kv_block, k_per_head)
    return do_bench(step, warmup=warmup, rep=rep, return_mode="median", grad_to_none=leaves)


def time_dense(q, k, v, scale: float, warmup: int, rep: int) -> float:
    """Median ms of cuDNN dense attention (SDPA), forward + backward."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from triton.testing import do_bench

    qg, kg, vg = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    do = torch.randn_like(qg)

    def step():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            F.scaled_dot_product_attention(qg, kg, vg, scale=scale, enable_gqa=kg.shape[1] != qg.shape[1]).backward(do)

    return do_bench(step, warmup=warmup, rep=rep, return_mode="median", grad_to_none=[qg, kg, vg])


# ------------------------------------------------------------------------------------------- run
def run(args) -> Dict:
    from benchmarks import quality
    from megatron_dsv.runtime.megatron import init_megatron

    t_start = time.time()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    precision = args.precision or ("bf16" if cuda else "fp32")
    groups = [int(x) for x in args.groups.split(",") if x]
    kv_blocks = [int(x) for x in args.kv_blocks.split(",") if x]
    cubes = group_cubes(groups, args.group_cubes)
    rankings = [r for r in args.time_rankings.split(",") if r]
    if any(r not in RANKINGS for r in rankings) or args.time_rule not in RULES:
        raise ValueError(f"--time-rankings from {RANKINGS}, --time-rule from {RULES}.")
    if not 0 < args.critical_mass <= 1:
        raise ValueError(f"--critical-mass must be in (0, 1], got {args.critical_mass}.")

    init_megatron(device.type)
    setup, manifest = quality.read_manifest(args.ckpt)
    if args.videos < 1 or args.videos > setup.val_videos:
        raise ValueError(f"--videos must lie in [1, {setup.val_videos}] (the checkpoint's validation videos).")
    model = quality.build_model(setup, "auto", device)
    quality.load_checkpoint(model, args.ckpt)
    videos, labels = quality.validation_videos(setup)
    videos, labels = videos[: args.videos], labels[: args.videos]
    grid = model.grid(tuple(setup.latent_shape[1:]))
    captured = capture_qkv(model, videos, labels, args.t, setup.val_seed, precision)
    wanted = None if not args.layers else {int(x) for x in args.layers.split(",")}
    captured = [c for c in captured if wanted is None or c[0].layer_number in wanted]
    s = captured[0][1].shape[2]
    bad = [f"G={g}" for g in groups if s % g] + [f"KB={kb}" for kb in kv_blocks if s % kb]
    if bad:
        raise ValueError(f"{s} tokens are not whole {', '.join(bad)}: choose sizes that divide the sequence.")

    res: Dict = {
        "benchmark": "granularity", "checkpoint": os.path.abspath(args.ckpt),
        "checkpoint_iteration": manifest.get("iteration"), "setup": dataclasses.asdict(setup),
        "environment": quality.environment(device), "precision": precision, "t": args.t, "videos": args.videos,
        "seq_len": s, "grid": list(grid), "model_cube": list(model.cube), "critical_mass": args.critical_mass,
        "sample_groups": args.sample_groups, "group_cubes": {str(g): list(c) for g, c in cubes.items()},
        "kv_blocks": kv_blocks, "rules": list(RULES), "layers": [],
    }
    for layer, q, k, v in captured:
        rec = {"layer": layer.layer_number, "heads": q.shape[1], "head_dim": q.shape[3], "granularity": {}}
        for g, cube in cubes.items():
            idx = relayout_index(grid, model.cube, cube, q.device)
            qg, kg = q[:, :, idx], k[:, :, idx]
            grp = sample_groups(s // g, args.sample_groups)
            curves = granularity_curves(qg, kg, group_size=g, kv_blocks=kv_blocks, groups=grp,
                                        scale=layer.softmax_scale, critical_mass=args.critical_mass)
            rec["granularity"][str(g)] = {
                "rows": grp.numel() * g,
                "token_density": token_density(qg, kg, _rows_of(grp, g), layer.softmax_scale, args.critical_mass),
                **{str(kb): summarize(curves[kb]) for kb in kv_blocks},
            }
        res["layers"].append(rec)
        print(f"layer {layer.layer_number}: measured ({time.time() - t_start:.0f} s)", flush=True)
    res["stats_wall_s"] = round(time.time() - t_start, 2)
    if args.out:
        write_json(res, args.out)

    res["timing"] = time_all(args, res, captured, cubes, kv_blocks, rankings, grid, model.cube, cuda, t_start)
    res["wall_s"] = round(time.time() - t_start, 2)
    if args.out:
        write_json(res, args.out)
    print_table(res)
    return res


def time_all(args, res, captured, cubes, kv_blocks, rankings, grid, model_cube, cuda, t_start) -> Dict:
    """Attention time at each (G, KB, ranking)'s K per head under ``--time-rule`` (GPU only)."""
    if not cuda:
        return {"skipped": "no GPU: attention times are measured on CUDA devices only"}
    b = min(args.time_batch, captured[0][1].shape[0])
    # The capture keeps fp32 copies for the statistics; attention is timed in the training
    # precision (bf16: cuDNN's SDPA has no fp32 kernel, and fp32 Triton tiles are not what trains).
    dt = torch.bfloat16 if res["precision"] == "bf16" else torch.float32
    captured = [(layer, *(x[:b].to(dt) for x in (q, k, v))) for layer, q, k, v in captured]
    layer0, q0, k0, v0 = captured[0]
    timing: Dict = {"rule": args.time_rule, "batch": b, "warmup_ms": args.warmup, "rep_ms": args.rep,
                    "dense_ms": time_dense(q0, k0, v0, layer0.softmax_scale, args.warmup, args.rep),
                    "sparse_ms": {}, "skipped": []}
    deadline = t_start + args.deadline_s if args.deadline_s else None
    by_layer = {rec["layer"]: rec for rec in res["layers"]}
    done: Dict[Tuple, float] = {}
    for ranking in rankings:  # every granularity gets the first ranking before any gets the second
        for g, cube in cubes.items():
            for kb in kv_blocks:
                key = f"G{g}_KB{kb}_{ranking}"
                for layer, q, k, v in captured:
                    kh = by_layer[layer.layer_number]["granularity"][str(g)][str(kb)][ranking][args.time_rule]["k"]
                    if deadline is not None and time.time() > deadline:
                        timing["skipped"].append(f"{key} layer {layer.layer_number}")
                        continue
                    memo = (g, kb, tuple(kh))
                    if memo not in done:
                        idx = relayout_index(grid, model_cube, cube, q.device)
                        qg, kg, vg = (x[:, :, idx] for x in (q, k, v))
                        done[memo] = time_sparse(layer, qg, kg, vg, g, kb, torch.tensor(kh), args.warmup, args.rep)
                    timing["sparse_ms"].setdefault(key, {})[str(layer.layer_number)] = round(done[memo], 4)
        if args.out:
            write_json({**res, "timing": timing}, args.out)
    return timing


def print_table(res: Dict) -> None:
    """Mean density over layers and heads per granularity and ranking (``recall`` rule), and the
    summed attention time over layers where it was measured."""
    timing = res.get("timing", {})
    rule = timing.get("rule", "recall")
    n = len(res["layers"])
    dense = timing.get("dense_ms")
    print(f"\ncritical mass {res['critical_mass']}, t={res['t']}, {res['seq_len']} tokens, {n} layers; "
          f"density = K/units by the '{rule}' rule (mean over layers and heads)")
    print("| G | KB | token | oracle | pooled | lse | pooled ms | lse ms | oracle ms | dense ms |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for g in res["group_cubes"]:
        for kb in res["kv_blocks"]:
            tok = sum(sum(r["granularity"][g]["token_density"]) / len(r["granularity"][g]["token_density"])
                      for r in res["layers"]) / n
            dens = {rk: sum(r["granularity"][g][str(kb)][rk][rule]["mean_density"] for r in res["layers"]) / n
                    for rk in RANKINGS}
            ms = {}
            for rk in RANKINGS:
                t = timing.get("sparse_ms", {}).get(f"G{g}_KB{kb}_{rk}", {})
                ms[rk] = f"{sum(t.values()):.2f}" if len(t) == n else "-"
            dn = f"{n * dense:.2f}" if dense is not None else "-"
            print(f"| {g} | {kb} | {tok:.3f} | {dens['oracle']:.3f} | {dens['pooled']:.3f} | {dens['lse']:.3f} | "
                  f"{ms['pooled']} | {ms['lse']} | {ms['oracle']} | {dn} |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="folder written by quality.py pretrain-dense (ckpt/)")
    p.add_argument("--out", default=None, help="JSON file")
    p.add_argument("--videos", type=int, default=2, help="validation videos captured (the batch)")
    p.add_argument("--t", type=float, default=0.5, help="flow-matching time of the capture (0.5: the logit-normal median)")
    p.add_argument("--groups", default="32,64", help="query-group sizes in tokens")
    p.add_argument("--group-cubes", default="", help="cube per group size, e.g. 32=2x4x4,64=4x4x4 (defaults: %s)"
                   % ",".join(f"{g}={'x'.join(map(str, c))}" for g, c in DEFAULT_CUBES.items()))
    p.add_argument("--kv-blocks", default="16,32,64", help="key-block sizes in tokens")
    p.add_argument("--layers", default="", help="layer numbers to measure (default all)")
    p.add_argument("--sample-groups", type=int, default=32, help="query groups per layer whose rows are all measured")
    p.add_argument("--critical-mass", type=float, default=0.9)
    p.add_argument("--time-rule", default="recall", help=f"rule whose K is timed, one of {RULES}")
    p.add_argument("--time-rankings", default="pooled,lse,oracle", help="rankings whose K is timed, in order")
    p.add_argument("--time-batch", type=int, default=1, help="videos in the timed attention call")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warm-up, ms")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetition time, ms")
    p.add_argument("--deadline-s", type=float, default=120.0,
                   help="stop timing after this many seconds from the start (0: no limit); the rest is listed as skipped")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=("bf16", "fp32"), default=None, help="capture precision (bf16 on GPU)")
    return run(p.parse_args(argv))


if __name__ == "__main__":
    main()
