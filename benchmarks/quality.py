"""Quality parity of DSV against dense training: a paired protocol with seeds and controls.

One phase per device call (each fits 10 minutes on one H200 at the sizes in the README):

    # (a) a dense model trained to a point, saved in bf16 as files <= 16 MiB (they come back via $OUT)
    python benchmarks/quality.py pretrain-dense --size quality --data procedural --iters 3000 \\
        --out $OUT/quality_procedural
    # (b) from that checkpoint, arms trained for the same iterations on the same data order
    python benchmarks/quality.py arms --ckpt $OUT/quality_procedural/ckpt --iters 400 \\
        --arms dense,dsv,control,aa --seeds 0,1,2 --out $OUT/quality_procedural_arms.json

``pretrain-dense --fit-predictor`` (round 3) trains the same dense trajectory while the DSV
controller runs in ``auto`` with every layer held dense (``FIT_HOLD_FIELDS``): the closed-form predictor
fits and the statistics EMA, recall curves and stage accumulate, and the checkpoint carries them
(``dsv_state.pt``). The ``dsv`` arm then starts from them (``arms --dsv-start checkpoint``, the
default for such a checkpoint) in stage 2, so a layer eligible at its first decision (the end of
the arm's iteration 0) runs sparse from iteration 1 instead of after a stage-1 wait. Rounds 1-2
fitted the predictor from scratch in each ``dsv`` arm (``--dsv-start scratch``) with 2x4x4 query
groups (``--query-group 2x4x4``; the JSONs record the setup).

Arms (each seed ``s`` fixes the data order and the flow-matching t/noise draws):

* ``dense``: the checkpoint trained on, dense attention.
* ``dsv``: the same with DSV (``--dsv-mode auto``): from scratch, stage 1 dense while the
  predictors fit, the switch, stage 2 with the layers the controller sends sparse at the K it
  chooses per head; from a fitted checkpoint, stage 2 from the start with its predictors and statistics.
* ``control``: a positive control the protocol must detect: the ``dsv`` arm's schedule replayed
  (same layers sparse at the same iterations with the same K per head) but each query group
  attends to K *random* key blocks per head (:func:`random_block_selection`, benchmark-only).
  Needs the ``dsv`` arm of its seed, from this run or ``--replay`` (an earlier arms JSON).
* ``aa``: an A/A dense repeat with another seed (``s + AA_SEED_OFFSET`` for data order and noise;
  ``--aa-vary`` for one of them or a plain repeat): the run-to-run noise floor of the final loss.

Per arm it records the fixed validation set's loss (``megatron_dsv.models.evaluation``: held-out
videos x 8 logit-normal t quantiles x fixed noise) during and after training, as trained and with
every DSV layer forced dense; the step time (CUDA-synchronised, median per stage); and the
controller's per-layer summary (chosen density, recall at K, exact-q/k recall, relative recall).
``benchmarks/quality_report.py`` turns the JSON into the README table and a PNG.

A plain training loop (AdamW, warm-up + cosine, grad clip 1.0, bf16 autocast on GPU) with the
DSVController, as ``examples/quickstart_video_dit.py``; no Megatron ``pretrain()``, so it runs on
a CPU too (``--size tiny``, the smoke test in tests/test_quality_benchmark.py).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks.json_out import write_json  # noqa: E402

FORMAT = "megatron_dsv.quality_ckpt/1"
MAX_FILE_BYTES = 16 * 2**20  # what comes back through a device call's $OUT, per file
PRETRAIN_DATA_SEED = 10_000  # the checkpoint's videos; arms use seeds 0, 1, 2, ... (other videos)
AA_SEED_OFFSET = 1_000
ARMS = ("dense", "dsv", "control", "aa")
DSV_STATE_FILE = "dsv_state.pt"  # --fit-predictor: every DSV layer's predictor (fp32) and LayerState

# The checkpoint run of --fit-predictor holds every layer dense with --dsv-min-sparsity 1.0: the
# controller checks it first in a stage-2 decision (before the recall hysteresis and the speed
# probe, which would draw synthetic tensors), and K >= 1 key unit makes 1 - density < 1, so no layer
# can go sparse. It is not a result-changing field (the runtime lets a resumed run retune it), so
# the arms' own value replaces it when they load the state. The switch at the end of iteration 0
# puts the checkpoint in stage 2, where the arms start; stage 2 profiles (and refits) as often as
# stage 1, so the statistics EMA follows the model to the checkpoint's last iterations. These four
# knobs come from the hold; --dsv may not set them for --fit-predictor.
FIT_HOLD_FIELDS = ("dsv_min_sparsity", "dsv_switch_min_iters", "dsv_switch_max_iters", "dsv_profile_interval_stage2")


@dataclass(frozen=True)
class Setup:
    """What the checkpoint and every arm share (saved in the checkpoint's manifest)."""

    size: str
    num_layers: int
    hidden_size: int
    num_heads: int
    ffn_hidden_size: int
    latent_shape: Tuple[int, int, int, int]
    patch: Tuple[int, int, int]
    query_group: Tuple[int, int, int]
    kv_block: int
    data: str
    num_classes: int
    val_videos: int
    t_quantiles: int
    val_seed: int


SIZES = {
    # 8 layers, 6 heads of 64 (the head dim of the H100/H200 runs), 16k tokens per video;
    # 21.8M parameters = 43.7 MB in bf16: three files of 14-15 MB through $OUT (measured).
    # Query groups of 4x4x4, the library default since round 3; rounds 1-2 ran 2x4x4
    # (pretrain-dense --query-group 2x4x4 repeats them; the manifest and JSONs record it).
    "quality": dict(num_layers=8, hidden_size=384, num_heads=6, ffn_hidden_size=1536, latent_shape=(4, 16, 64, 64),
                    patch=(1, 2, 2), query_group=(4, 4, 4), kv_block=64, val_videos=8),
    # CPU smoke test: 128 tokens, 16 key blocks of 8
    "tiny": dict(num_layers=2, hidden_size=128, num_heads=4, ffn_hidden_size=512, latent_shape=(4, 4, 8, 16),
                 patch=(1, 2, 2), query_group=(2, 2, 4), kv_block=8, val_videos=2),
}

DSV_DEFAULTS = {
    # library defaults except the schedule, which scales with the arm length (set in run_arms)
    "quality": dict(),
    # A tiny model trained 40 steps on CPU needs density ~0.7 for recall 0.75 (measured), more
    # than the speed table's default 0.5; the smoke test targets recall 0.5 so that its layers do
    # go sparse and every path (switch, sparse arms, control, forced-dense evaluation) runs.
    "tiny": dict(dsv_critical_mass=0.5, dsv_min_sparsity=0.3, dsv_recall_floor=0.35, dsv_min_keys=8,
                 dsv_k_multiple=8, dsv_profile_stride=8, dsv_profile_interval_stage1=2,
                 dsv_profile_interval_stage2=4, dsv_min_dwell=4),
}


# ----------------------------------------------------------------------------------------- model
def build_model(setup: Setup, mode: str, device, dsv_overrides: Optional[Dict] = None, seed: int = 0):
    from megatron_dsv.layers.transformer_config import DSVTransformerConfig
    from megatron_dsv.models.video_dit import VideoDiT

    kw = dict(DSV_DEFAULTS.get(setup.size, {}))
    kw.update(dsv_overrides or {})
    cfg = DSVTransformerConfig(
        num_layers=setup.num_layers, hidden_size=setup.hidden_size, num_attention_heads=setup.num_heads,
        ffn_hidden_size=setup.ffn_hidden_size, use_cpu_initialization=True, hidden_dropout=0.0,
        attention_dropout=0.0, bias_dropout_fusion=False, gradient_accumulation_fusion=False,
        normalization="RMSNorm", qk_layernorm=True, dsv_mode=mode, dsv_query_group=tuple(setup.query_group),
        dsv_kv_block=setup.kv_block, **kw,
    )
    torch.manual_seed(seed)  # the predictors' initialisation (every other weight is loaded)
    return VideoDiT(cfg, in_channels=setup.latent_shape[0], patch=tuple(setup.patch),
                    num_classes=setup.num_classes).to(device)


def dsv_overrides(items: Sequence[str]) -> Dict:
    """``--dsv KEY=VALUE`` items as DSV config fields (``dsv_`` prefixed); the mode is the arm's."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--dsv {item!r} is not KEY=VALUE (e.g. --dsv critical_mass=0.9).")
        key = key if key.startswith("dsv_") else "dsv_" + key
        if key == "dsv_mode":
            raise ValueError("--dsv mode=... is not an override: each arm sets its mode (dense arms dense, DSV auto).")
        out[key] = _parse_value(value)
    return out


def fit_overrides(setup: Setup, user: Dict) -> Dict:
    """The DSV config of the ``--fit-predictor`` checkpoint run: the size's defaults and ``user``'s
    values (what the arms will run with), then the hold (``FIT_HOLD_FIELDS``)."""
    from megatron_dsv.config import DSVConfig

    clash = sorted(set(user) & set(FIT_HOLD_FIELDS))
    if clash:
        raise ValueError(f"pretrain-dense --fit-predictor sets {clash} itself (they hold every layer dense, see "
                         "FIT_HOLD_FIELDS); drop them from --dsv (the arms take their own values).")
    kw = dict(DSV_DEFAULTS.get(setup.size, {}))
    kw.update(user)
    if kw.get("dsv_predictor_fit", "closed_form") != "closed_form":
        raise ValueError("--fit-predictor fits the closed-form predictor, which takes no gradient and so leaves the "
                         "dense trajectory unchanged; a gradient-fitted predictor would enter the gradient clipping "
                         "norm. Drop --dsv predictor_fit=gradient.")
    every = kw.get("dsv_profile_interval_stage1", DSVConfig().dsv_profile_interval_stage1)
    kw.update(dsv_min_sparsity=1.0, dsv_switch_min_iters=0, dsv_switch_max_iters=0, dsv_profile_interval_stage2=every)
    return kw


def _dsv_layers(model) -> Dict[str, torch.nn.Module]:
    """The model's DSV attention layers with a predictor, by module name."""
    from megatron_dsv.layers.attention import dsv_attention_layers

    layers = {id(a) for a in dsv_attention_layers(model) if a.predictor is not None}
    return {name: m for name, m in model.named_modules() if id(m) in layers}


def _save_dsv_state(model, path: str) -> Dict:
    """``DSV_STATE_FILE``: per DSV layer its predictor weights in fp32 (the closed-form refit warm-
    starts from them; bf16 would move its ranking) and its LayerState (``get_extra_state``)."""
    layers = _dsv_layers(model)
    if not layers:
        raise ValueError("the model has no DSV layer with a predictor: --fit-predictor builds it with dsv_mode=auto.")
    state = {name: {"predictor": {k: v.detach().to("cpu", torch.float32).clone()
                                  for k, v in m.predictor.state_dict().items()},
                    "state": m.get_extra_state()} for name, m in layers.items()}
    torch.save(state, os.path.join(path, DSV_STATE_FILE))
    size = os.path.getsize(os.path.join(path, DSV_STATE_FILE))
    if size > MAX_FILE_BYTES:
        raise RuntimeError(f"{DSV_STATE_FILE} is {size} bytes, over the {MAX_FILE_BYTES} a device call returns.")
    first = next(iter(state.values()))["state"]
    return {"file": DSV_STATE_FILE, "bytes": size, "layers": len(state), "config": first["config"],
            "schedule": {k: first["schedule"].get(k) for k in ("stage", "switch_iteration")}}


def save_checkpoint(model, setup: Setup, path: str, info: Dict, dsv_state: bool = False) -> Dict:
    """Model tensors in bf16 (no predictor, no DSV state), packed greedily into files of at most
    ``MAX_FILE_BYTES``, and ``manifest.json``. A tensor too large for one file is refused. With
    ``dsv_state`` (``--fit-predictor``), also ``DSV_STATE_FILE`` (manifest key ``dsv``)."""
    os.makedirs(path, exist_ok=True)
    tensors = {k: v.detach().to("cpu", torch.bfloat16).contiguous() for k, v in model.state_dict().items()
               if isinstance(v, torch.Tensor) and "predictor" not in k and not k.endswith("_extra_state")}
    budget = MAX_FILE_BYTES - 2**20  # torch.save's zip headers and pickled names: far below 1 MiB here
    shards: List[Dict[str, torch.Tensor]] = [{}]
    used = 0
    for name, t in tensors.items():
        size = t.numel() * t.element_size()
        if size > budget:
            raise ValueError(f"{name} holds {size / 2**20:.1f} MiB in bf16, more than one {budget / 2**20:.0f} MiB "
                             "file; use a smaller --size (hidden size) for a checkpoint that returns via $OUT.")
        if used + size > budget:
            shards.append({})
            used = 0
        shards[-1][name] = t
        used += size
    files = []
    for i, shard in enumerate(shards):
        name = f"shard_{i:03d}.pt"
        torch.save(shard, os.path.join(path, name))
        size = os.path.getsize(os.path.join(path, name))
        if size > MAX_FILE_BYTES:
            raise RuntimeError(f"{name} is {size} bytes, over the {MAX_FILE_BYTES} a device call returns.")
        files.append({"file": name, "bytes": size, "tensors": len(shard)})
    manifest = {"format": FORMAT, "setup": dataclasses.asdict(setup), "files": files, **info}
    if dsv_state:
        manifest["dsv"] = _save_dsv_state(model, path)
    with open(os.path.join(path, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    return manifest


def read_manifest(path: str) -> Tuple[Setup, Dict]:
    with open(os.path.join(path, "manifest.json")) as f:
        manifest = json.load(f)
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}/manifest.json is not a {FORMAT} checkpoint (format {manifest.get('format')!r}); "
                         "write one with `benchmarks/quality.py pretrain-dense`.")
    s = manifest["setup"]
    for key in ("latent_shape", "patch", "query_group"):
        s[key] = tuple(s[key])
    return Setup(**s), manifest


def load_checkpoint(model, path: str) -> None:
    """Load the checkpoint's tensors (fp32 master weights from bf16); the model's predictors and
    DSV state are the only entries it may lack, and it must hold nothing the model does not."""
    _, manifest = read_manifest(path)
    state = {}
    for entry in manifest["files"]:
        state.update(torch.load(os.path.join(path, entry["file"]), map_location="cpu", weights_only=True))
    own = model.state_dict()
    state = {k: v.to(own[k].dtype) if k in own else v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if "predictor" not in k and not k.endswith("_extra_state")]
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not fit the model: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}; build the arms from the manifest's setup.")


def check_dsv_state(manifest: Dict, setup: Setup, overrides: Dict) -> None:
    """Refuse, before any arm trains, a fitted checkpoint whose DSV config differs from the arms'
    in a result-changing field (``DSVConfig.result_fields``: the layers' ``set_extra_state`` would
    refuse it in the dsv arm, after the dense arm had run)."""
    from megatron_dsv.config import DSVConfig

    cfg = DSVConfig(dsv_mode="auto", dsv_query_group=tuple(setup.query_group), dsv_kv_block=setup.kv_block,
                    **overrides)
    saved = manifest["dsv"]["config"]
    diff = {k: (saved.get(k), v) for k, v in cfg.result_fields().items() if _as_json(saved.get(k)) != _as_json(v)}
    if diff:
        lines = ", ".join(f"{k}: checkpoint {a!r} vs arms {b!r}" for k, (a, b) in sorted(diff.items()))
        raise ValueError(f"the checkpoint's fitted DSV state was measured with another DSV config ({lines}); pass the "
                         "same --dsv values to pretrain-dense --fit-predictor and arms, or run the arms with "
                         "--dsv-start scratch (the predictor fitted afresh in each dsv arm).")


def _as_json(v):
    """A config value as the manifest's JSON holds it (tuples become lists)."""
    return list(v) if isinstance(v, (tuple, list)) else v


def load_dsv_state(model, path: str) -> Dict:
    """Load ``DSV_STATE_FILE`` into the DSV layers of ``model`` (an arm's, built with the arms' DSV
    config): predictor weights, then each layer's LayerState through ``set_extra_state``, which
    refuses another result-changing config. Returns the manifest's ``dsv`` entry."""
    _, manifest = read_manifest(path)
    if "dsv" not in manifest:
        raise ValueError(f"{path} holds no DSV state; write the checkpoint with pretrain-dense --fit-predictor, or "
                         "run the arms with --dsv-start scratch.")
    saved = torch.load(os.path.join(path, manifest["dsv"]["file"]), map_location="cpu", weights_only=True)
    layers = _dsv_layers(model)
    if sorted(saved) != sorted(layers):
        raise ValueError(f"{path}: the DSV state covers layers {sorted(saved)[:3]}..., the model has "
                         f"{sorted(layers)[:3]}...; build the arms from the manifest's setup.")
    for name, m in layers.items():
        m.predictor.load_state_dict(saved[name]["predictor"], strict=True)
        m.set_extra_state(saved[name]["state"])
    return manifest["dsv"]


# ------------------------------------------------------------------------------------------ data
def make_dataset(setup: Setup, num_samples: int, seed: int, split: str = "train"):
    c, t, h, w = setup.latent_shape
    if setup.data == "natural":
        from megatron_dsv.data.natural import NaturalVideoDataset

        return NaturalVideoDataset(num_samples, (t, h, w), c, setup.num_classes, seed=seed, split=split)
    if setup.data == "procedural":
        from megatron_dsv.data.procedural import ProceduralVideoDataset

        # held-out procedural videos are another seed's draws (the generator has no finite pool)
        return ProceduralVideoDataset(num_samples, (t, h, w), c, setup.num_classes,
                                      seed=seed if split == "train" else seed + 7_919)
    raise ValueError(f"unknown data source {setup.data!r}; choose procedural or natural.")


def validation_videos(setup: Setup):
    from megatron_dsv.models.evaluation import stack_videos

    return stack_videos(make_dataset(setup, setup.val_videos, setup.val_seed, split="val"), setup.val_videos)


def load_batches(dataset, iters: int, batch: int, workers: int) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """The data order of a seed: iteration ``i`` takes items ``i*batch .. (i+1)*batch - 1``
    (generated before training, so step times exclude data generation)."""
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, range(iters * batch)), batch_size=batch,
                                         shuffle=False, num_workers=workers)
    return [(b["latents"], b["label"]) for b in loader]


# ------------------------------------------------------------------------------------- training
def lr_at(it: int, iters: int, lr: float, warmup: int) -> float:
    """Linear warm-up, then cosine to 10% of ``lr`` at the last iteration."""
    if it < warmup:
        return lr * (it + 1) / warmup
    frac = (it - warmup) / max(1, iters - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


class _RandomScores(torch.nn.Module):
    """Stands in for a layer's predictor in the positive control: low-rank "projections" that make
    selection keep K uniformly random key blocks per query group and head (the K the layer's state
    says), independently across groups. Each query group and each key block gets one random unit
    vector in ``rank`` dimensions (the same for all its tokens, so selection's mean pooling returns
    it): with raw Gaussian tokens a block's pooled norm would decide how many groups pick it
    (measured: 0 to 3x the uniform frequency at rank 8). Benchmark-only: the library never builds one."""

    def __init__(self, generator: torch.Generator, group_size: int, kv_block: int, rank: int = 64):
        super().__init__()
        self.generator, self.group_size, self.kv_block, self.rank = generator, group_size, kv_block, rank

    def _units(self, b: int, h: int, s: int, per: int, device) -> torch.Tensor:
        if s % per:
            raise ValueError(f"{s} tokens are not whole units of {per}.")
        v = torch.randn((b, h, s // per, self.rank), generator=self.generator, device=device, dtype=torch.float32)
        return torch.nn.functional.normalize(v, dim=-1).repeat_interleave(per, dim=2)

    def project(self, q: torch.Tensor, k: torch.Tensor, heads=None):
        b, h = q.shape[:2]
        q_lr = self._units(b, h, q.shape[2], self.group_size, q.device)
        k_lr = self._units(b, h, k.shape[2], self.kv_block, q.device)
        return q_lr.to(q.dtype), k_lr.to(q.dtype)


@contextlib.contextmanager
def random_block_selection(model, generator: torch.Generator):
    """Every DSV layer of ``model`` selects random key blocks (at its K) while inside; the
    predictors are put back on exit. Requires ``--dsv-predictor-input qk`` (the default)."""
    from megatron_dsv.layers.attention import dsv_attention_layers

    layers = [a for a in dsv_attention_layers(model) if a.predictor is not None]
    if any(a.dsv.dsv_predictor_input != "qk" for a in layers):
        raise ValueError("the random-block control replaces q/k projections; use dsv_predictor_input=qk.")
    saved = [a.predictor for a in layers]
    try:
        for a in layers:
            a.predictor = _RandomScores(generator, a.dsv.group_size, a.dsv.dsv_kv_block)
        yield layers
    finally:
        for a, p in zip(layers, saved):
            a.predictor = p


@contextlib.contextmanager
def _own_draws(layers, seed: int, device):
    """The control's evaluations draw their random blocks from a generator of their own, seeded
    the same at every evaluation: evaluating neither changes the training draws nor depends on
    when it happens. A no-op for layers with real predictors."""
    saved = [(a.predictor, a.predictor.generator) for a in layers if isinstance(a.predictor, _RandomScores)]
    try:
        for scores, _ in saved:
            scores.generator = torch.Generator(device=device).manual_seed(seed)
        yield
    finally:
        for scores, gen in saved:
            scores.generator = gen


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _autocast(device, precision: str):
    if precision == "bf16":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def evaluate(model, setup: Setup, val, device, precision: str, force_dense: bool) -> Dict:
    """The fixed validation set's loss (``megatron_dsv.models.evaluation.evaluate_fixed``)."""
    from megatron_dsv.models.evaluation import evaluate_fixed

    videos, labels = val
    with _autocast(device, precision):
        return evaluate_fixed(model, videos, labels=labels, t_quantiles=setup.t_quantiles, seed=setup.val_seed,
                              batch_size=8, force_dense=force_dense)


def _layer_state(layers) -> List[Tuple[bool, Optional[List[int]]]]:
    return [(a.sparse, None if a.kv_units_global is None else a.kv_units_global.tolist()) for a in layers]


def train(model, setup: Setup, batches, *, arm: str, noise_seed: int, iters: int, lr: float, warmup: int,
          device, precision: str, eval_every: int, val, replay: Optional[List[Dict]] = None,
          deadline: Optional[float] = None, stop_after: Optional[int] = None, fit: bool = False, log=print) -> Dict:
    """Train ``model`` on ``batches`` (``iters`` of them; the learning-rate schedule spans
    ``iters``); returns the arm's record (see the module docstring). With ``deadline``
    (``time.time()``), training stops at the first evaluation point past it; with ``stop_after``,
    after that many iterations (the schedule still spans ``iters``: a deadline-cut run repeated).
    The DSV controller runs for ``arm="dsv"``, and with ``fit`` (``--fit-predictor``: the model's
    config holds every layer dense, see ``fit_overrides``)."""
    from megatron_dsv.layers.attention import dsv_attention_layers
    from megatron_dsv.layers.state import StepControl
    from megatron_dsv.models.video_dit import flow_matching_loss
    from megatron_dsv.runtime.controller import DSVController
    from megatron_dsv.runtime.lr import PREDICTOR_GROUP_KEY, predictor_param_groups

    layers = [a for a in dsv_attention_layers(model) if a.predictor is not None]
    groups = predictor_param_groups(model, lr, weight_decay=0.0)
    gradient_fit = any(p.requires_grad for g in groups if g.get(PREDICTOR_GROUP_KEY) for p in g["params"])
    opt = torch.optim.AdamW([g for g in groups if gradient_fit or not g.get(PREDICTOR_GROUP_KEY)], betas=(0.9, 0.99))
    events: List[str] = []
    ctl = None
    if arm == "dsv" or fit:
        ctl = DSVController(model, optimizer=opt if gradient_fit else None, log=events.append)
    g = torch.Generator(device=device).manual_seed(noise_seed)
    control_gen = torch.Generator(device=device).manual_seed(noise_seed + 17)
    rec: Dict = {"train_loss": [], "step_ms": [], "stage": [], "val_curve": [], "schedule": []}
    replay_at = {r["iteration"]: r["layers"] for r in (replay or [])}
    selection = random_block_selection(model, control_gen) if arm == "control" else contextlib.nullcontext()
    with selection:
        for it in range(iters):
            if arm == "control":
                if it in replay_at:
                    for a, (sparse, k) in zip(layers, replay_at[it]):
                        a.apply(a.state.replace(sparse=sparse, kv_units=None if k is None else torch.tensor(k)))
                for a in layers:  # the control measures and fits nothing
                    a.begin_iteration(StepControl(iteration=it, train_predictor=False, collect_stats=False))
            stage = 0 if ctl is None else ctl.stage
            if ctl is not None:
                ctl.on_iteration_start(it)
                state = _layer_state(layers)
                if not rec["schedule"] or rec["schedule"][-1]["layers"] != state:
                    rec["schedule"].append({"iteration": it, "layers": state})
            for group in opt.param_groups:
                if not group.get(PREDICTOR_GROUP_KEY):
                    group["lr"] = lr_at(it, iters, lr, warmup)
            x, y = (t.to(device, non_blocking=True) for t in batches[it])
            _sync(device)
            t0 = time.perf_counter()
            with _autocast(device, precision):
                loss = flow_matching_loss(model, x, y, generator=g)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for grp in opt.param_groups for p in grp["params"]], 1.0)
            opt.step()
            if ctl is not None:
                summary = ctl.on_iteration_end(it)
            _sync(device)
            rec["step_ms"].append(round((time.perf_counter() - t0) * 1e3, 3))
            rec["stage"].append(stage)
            rec["train_loss"].append(round(loss.item(), 6))
            late = (deadline is not None and time.time() > deadline) or (stop_after is not None and it + 1 >= stop_after)
            if (eval_every and (it + 1) % eval_every == 0) or it == iters - 1 or late:
                with _own_draws(layers, setup.val_seed, device):
                    point = {"iteration": it + 1, **_val_point(evaluate(model, setup, val, device, precision, False))}
                if layers and any(a.sparse for a in layers):
                    point["dense"] = _val_point(evaluate(model, setup, val, device, precision, True))
                rec["val_curve"].append(point)
                log(f"  {arm} it {it + 1}: train {loss.item():.4f} val {point['loss']:.5f}"
                    + (f" (forced dense {point['dense']['loss']:.5f})" if "dense" in point else ""))
                if late:
                    break
    rec["iterations"] = len(rec["step_ms"])
    rec["final"] = rec["val_curve"][-1]
    if ctl is not None:
        rec["layers"] = summary["layers"]
        rec["switch_iteration"] = ctl.switch_iteration
        rec["events"] = events
    elif arm == "control":
        rec["layers"] = [{"layer": a.layer_number, "sparse": a.sparse,
                          "k": None if a.kv_units_global is None else a.kv_units_global.tolist()} for a in layers]
    rec["step_time"] = step_summary(rec["step_ms"], rec["stage"])
    return rec


def _val_point(res: Dict) -> Dict:
    return {"loss": res["loss"], "loss_by_t": res["loss_by_t"], "sparse_layers": res["sparse_layers"]}


def step_summary(ms: Sequence[float], stage: Sequence[int], skip: int = 5) -> Dict:
    """Median and mean step time after the first ``skip`` steps (compilation, warm-up), overall
    and per DSV stage (0: no controller)."""
    def stats(vals):
        if not vals:
            return None
        s = sorted(vals)
        return {"median_ms": s[len(s) // 2], "mean_ms": sum(s) / len(s), "steps": len(s)}

    kept = list(zip(ms, stage))[skip:]
    out = {"all": stats([m for m, _ in kept])}
    for st in sorted({s for _, s in kept}):
        out[f"stage{st}"] = stats([m for m, s in kept if s == st])
    return out


# ---------------------------------------------------------------------------------------- phases
def environment(device) -> Dict:
    from benchmarks.dense_path import git_commit

    env = {"torch": torch.__version__, "device": str(device), "commit": git_commit()}
    if torch.device(device).type == "cuda":
        import triton

        env.update(gpu=torch.cuda.get_device_name(), triton=triton.__version__, cuda=torch.version.cuda)
    return env


def pretrain_model(args) -> Tuple[torch.nn.Module, Setup, Dict]:
    """The checkpoint run: ``(model, setup, record)``. With ``--fit-predictor`` the model is built
    with ``dsv_mode=auto`` and the hold (``fit_overrides``); its weights and trajectory are a plain
    dense run's (the predictors draw from a generator of their own and take no gradient)."""
    from megatron_dsv.runtime.megatron import init_megatron

    init_megatron(torch.device(args.device).type)
    preset = dict(SIZES[args.size])
    if args.latent_shape:
        preset["latent_shape"] = tuple(int(v) for v in args.latent_shape.split("x"))
    if args.query_group:
        preset["query_group"] = tuple(int(v) for v in args.query_group.split("x"))
    if args.val_videos:
        preset["val_videos"] = args.val_videos
    setup = Setup(size=args.size, data=args.data, num_classes=8, t_quantiles=8, val_seed=args.val_seed, **preset)
    user = dsv_overrides(args.dsv)
    if user and not args.fit_predictor:
        raise ValueError("--dsv sets the DSV config of the --fit-predictor run; a plain dense checkpoint has none.")
    overrides = fit_overrides(setup, user) if args.fit_predictor else None
    model = build_model(setup, "auto" if args.fit_predictor else "dense", args.device, overrides)
    n_params = sum(p.numel() for n, p in model.named_parameters() if ".predictor." not in n)
    print(f"pretrain-dense: {args.size} ({n_params / 1e6:.2f}M parameters), data {args.data}, latent "
          f"{setup.latent_shape}, query groups {'x'.join(map(str, setup.query_group))}, {args.iters} iterations of "
          f"batch {args.batch}" + (", predictor fitted with every layer held dense" if args.fit_predictor else ""),
          flush=True)
    t_start = time.time()
    n_batches = min(args.iters, args.stop_after or args.iters)
    batches = load_batches(make_dataset(setup, n_batches * args.batch, PRETRAIN_DATA_SEED), n_batches, args.batch,
                           args.workers)
    deadline = t_start + 60 * args.max_minutes if args.max_minutes else None
    rec = train(model, setup, batches, arm="dense", noise_seed=PRETRAIN_DATA_SEED, iters=args.iters, lr=args.lr,
                warmup=args.warmup, device=args.device, precision=args.precision, eval_every=args.eval_every,
                val=validation_videos(setup), deadline=deadline, stop_after=args.stop_after, fit=args.fit_predictor)
    rec.update(parameters=n_params, fit_predictor=args.fit_predictor, wall_s=time.time() - t_start)
    if overrides is not None:
        rec["dsv_config"] = overrides
    return model, setup, rec


def pretrain_dense(args) -> Dict:
    model, setup, rec = pretrain_model(args)
    info = {"iteration": rec["iterations"], "planned_iterations": args.iters, "batch": args.batch, "lr": args.lr,
            "data_seed": PRETRAIN_DATA_SEED, "final": rec["final"], "environment": environment(args.device)}
    manifest = save_checkpoint(model, setup, os.path.join(args.out, "ckpt"), info, dsv_state=args.fit_predictor)
    rec.update(phase="pretrain-dense", setup=dataclasses.asdict(setup), checkpoint=manifest["files"], **info)
    if "dsv" in manifest:
        rec["checkpoint_dsv"] = manifest["dsv"]
    write_json(rec, os.path.join(args.out, "pretrain.json"))
    extra = f" + DSV state {manifest['dsv']['bytes'] / 2**10:.1f} KiB" if "dsv" in manifest else ""
    print(f"saved {len(manifest['files'])} files ({sum(e['bytes'] for e in manifest['files']) / 2**20:.1f} MiB){extra} "
          f"under {args.out}/ckpt; fixed-validation loss {rec['final']['loss']:.5f} at iteration "
          f"{rec['iterations']} of {args.iters}", flush=True)
    return rec


def run_arms(args) -> Dict:
    from megatron_dsv.runtime.megatron import init_megatron

    init_megatron(torch.device(args.device).type)
    setup, manifest = read_manifest(args.ckpt)
    arms = [a for a in args.arms.split(",") if a]
    bad = [a for a in arms if a not in ARMS]
    if bad:
        raise ValueError(f"unknown arms {bad}; choose from {ARMS}.")
    seeds = [int(s) for s in args.seeds.split(",") if s != ""]
    if not seeds:
        raise ValueError("--seeds names no seed.")
    replay = {}
    if args.replay:
        with open(args.replay) as f:
            for r in json.load(f)["runs"]:
                if r["arm"] == "dsv":
                    replay[r["seed"]] = r["schedule"]
    if "control" in arms and "dsv" not in arms and not all(s in replay for s in seeds):
        raise ValueError("the control replays the dsv arm's schedule of its seed: run --arms dsv,control, or "
                         "pass --replay with an arms JSON that holds the dsv arm of every seed.")
    if "control" in arms and "dsv" in arms and arms.index("control") < arms.index("dsv"):
        arms.remove("control")
        arms.insert(arms.index("dsv") + 1, "control")
    overrides = dict(DSV_DEFAULTS.get(setup.size, {}))
    # the switch schedule of an arm fitted from scratch (a fitted checkpoint starts in stage 2)
    overrides.setdefault("dsv_switch_min_iters", max(1, args.iters // 10))
    overrides.setdefault("dsv_switch_max_iters", max(2, args.iters // 3))
    overrides.update(dsv_overrides(args.dsv))
    dsv_start = args.dsv_start or ("checkpoint" if "dsv" in manifest else "scratch")
    if dsv_start == "checkpoint":
        if "dsv" not in manifest:
            raise ValueError(f"--dsv-start checkpoint: {args.ckpt} holds no DSV state; write it with pretrain-dense "
                             "--fit-predictor, or use --dsv-start scratch.")
        if "dsv" in arms:
            check_dsv_state(manifest, setup, overrides)
    val = validation_videos(setup)
    out = {"phase": "arms", "setup": dataclasses.asdict(setup), "checkpoint": {
        "iteration": manifest["iteration"], "final": manifest.get("final"), "dsv": manifest.get("dsv")},
        "iters": args.iters, "batch": args.batch, "lr": args.lr, "warmup": args.warmup, "precision": args.precision,
        "dsv_config": overrides, "dsv_start": dsv_start, "environment": environment(args.device), "runs": []}
    t_start = time.time()
    seed_s = 0.0
    for n_done, seed in enumerate(seeds):
        left = t_start + 60 * args.max_minutes - time.time() if args.max_minutes else None
        if left is not None and n_done and seed_s > left:
            out["seeds_skipped"] = seeds[n_done:]
            print(f"seeds {seeds[n_done:]} skipped: a seed took {seed_s:.0f} s, {left:.0f} s of --max-minutes left",
                  flush=True)
            write_json(out, args.out)
            break
        t_seed = time.time()
        cache: Dict[int, list] = {}
        for arm in arms:
            other = seed + AA_SEED_OFFSET
            data_seed = other if arm == "aa" and args.aa_vary in ("data", "both") else seed
            noise_seed = other if arm == "aa" and args.aa_vary in ("noise", "both") else seed
            if data_seed not in cache:
                cache[data_seed] = load_batches(make_dataset(setup, args.iters * args.batch, data_seed), args.iters,
                                                args.batch, args.workers)
            mode = "dense" if arm in ("dense", "aa") else "auto"
            model = build_model(setup, mode, args.device, overrides, seed=seed)
            load_checkpoint(model, args.ckpt)
            if arm == "dsv" and dsv_start == "checkpoint":
                load_dsv_state(model, args.ckpt)
            t0 = time.time()
            print(f"arm {arm} seed {seed} (data seed {data_seed}, noise seed {noise_seed})", flush=True)
            rec = train(model, setup, cache[data_seed], arm=arm, noise_seed=noise_seed, iters=args.iters, lr=args.lr,
                        warmup=args.warmup, device=args.device, precision=args.precision,
                        eval_every=args.eval_every, val=val, replay=replay.get(seed))
            if arm == "dsv":
                replay[seed] = rec["schedule"]
            rec.update(arm=arm, seed=seed, data_seed=data_seed, noise_seed=noise_seed, wall_s=time.time() - t0)
            if arm == "aa":
                rec["aa_vary"] = args.aa_vary
            if arm == "dsv":
                rec["dsv_start"] = dsv_start
            out["runs"].append(rec)
            out["wall_s"] = time.time() - t_start
            write_json(out, args.out)  # after every arm: a call cut short keeps what finished
            del model
            if torch.device(args.device).type == "cuda":
                torch.cuda.empty_cache()
        seed_s = max(seed_s, time.time() - t_seed)
    return out


def _parse_value(v: str):
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="phase", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--iters", type=int, required=True)
    common.add_argument("--batch", type=int, default=2)
    common.add_argument("--lr", type=float, default=3e-4)
    common.add_argument("--warmup", type=int, default=20)
    common.add_argument("--eval-every", type=int, default=0, help="fixed-validation points during training (0: end)")
    common.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    common.add_argument("--precision", choices=("bf16", "fp32"), default=None,
                        help="bf16 autocast (default on GPU) or fp32 (default on CPU)")
    common.add_argument("--workers", type=int, default=None, help="data-generation processes (default 8 on GPU, 0 on CPU)")
    a = sub.add_parser("pretrain-dense", parents=[common], help="train the dense checkpoint")
    a.add_argument("--size", choices=sorted(SIZES), default="quality")
    a.add_argument("--data", choices=("procedural", "natural"), default="procedural")
    a.add_argument("--latent-shape", default=None, help="C x T x H x W (default: the size's)")
    a.add_argument("--val-videos", type=int, default=None, help="held-out videos of the fixed validation set")
    a.add_argument("--query-group", default=None,
                   help="T x H x W query-group cube (default: the size's; 2x4x4 repeats rounds 1-2 of --size quality)")
    a.add_argument("--val-seed", type=int, default=0)
    a.add_argument("--fit-predictor", action="store_true",
                   help="run the DSV controller with every layer held dense (the dense trajectory unchanged) so the "
                        "checkpoint carries fitted predictors and statistics for the dsv arms (%s)" % DSV_STATE_FILE)
    a.add_argument("--dsv", action="append", default=[], metavar="KEY=VALUE",
                   help="with --fit-predictor: DSV config override; the result-changing ones must match the arms'")
    a.add_argument("--max-minutes", type=float, default=0.0,
                   help="stop at the first evaluation point after this long and save what was reached")
    a.add_argument("--stop-after", type=int, default=None,
                   help="stop after this many iterations, the schedule still spanning --iters (repeats a run "
                        "that --max-minutes cut at that iteration)")
    a.add_argument("--out", required=True, help="folder: ckpt/ and pretrain.json")
    b = sub.add_parser("arms", parents=[common], help="the paired arms from a checkpoint")
    b.add_argument("--ckpt", required=True)
    b.add_argument("--arms", default=",".join(ARMS))
    b.add_argument("--seeds", default="0,1,2")
    b.add_argument("--replay", default=None, help="arms JSON whose dsv runs the control replays")
    b.add_argument("--aa-vary", choices=("both", "data", "noise", "none"), default="both",
                   help="what the A/A repeat draws from seed + %d: data order and noise (default: the unpaired "
                        "run-to-run spread), one of them, or nothing (a plain repeat: GPU nondeterminism only)"
                        % AA_SEED_OFFSET)
    b.add_argument("--dsv", action="append", default=[], metavar="KEY=VALUE",
                   help="DSV config override, e.g. --dsv critical_mass=0.9 (repeatable)")
    b.add_argument("--dsv-start", choices=("checkpoint", "scratch"), default=None,
                   help="the dsv arm's predictor and statistics: the checkpoint's (pretrain-dense --fit-predictor; "
                        "the default when it has them) or fitted from scratch in the arm (rounds 1-2)")
    b.add_argument("--max-minutes", type=float, default=0.0,
                   help="start no further seed once the slowest seed so far would not fit in this budget")
    b.add_argument("--out", required=True, help="arms JSON")
    args = p.parse_args(argv)
    cuda = torch.device(args.device).type == "cuda"
    if args.precision is None:
        args.precision = "bf16" if cuda else "fp32"
    if args.workers is None:
        args.workers = 8 if cuda else 0
    if args.iters < 1 or args.batch < 1:
        raise SystemExit("--iters and --batch must be >= 1.")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.phase == "pretrain-dense":
        os.makedirs(args.out, exist_ok=True)
        return pretrain_dense(args)
    return run_arms(args)


if __name__ == "__main__":
    main()
