"""The Megatron-LM patches (patches/): they apply to a copy of the installed megatron-core (which
ships megatron/core and megatron/training byte-identical to the pinned commit), the patched modules
import and call megatron_dsv, the per-iteration hook fires once per iteration inside the patched
``train_step``, the FLOPs report counts DSV's pairs, apply is idempotent and revert is exact."""

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_dsv import hooks
from megatron_dsv.flops import (
    AttentionWork,
    megatron_dense_core_flops,
    replace_core_attention_flops,
    sparse_fraction,
)

REPO = Path(__file__).resolve().parents[1]
MANIFEST = json.loads((REPO / "patches" / "manifest.json").read_text())
TARGETS = sorted(MANIFEST["files"])

pytestmark = pytest.mark.skipif(shutil.which("patch") is None, reason="GNU patch is not installed")


def _apply_module():
    spec = importlib.util.spec_from_file_location("dsv_patches_apply", REPO / "patches" / "apply.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


APPLY = _apply_module()


def run_cli(*argv):
    return subprocess.run(
        [sys.executable, str(REPO / "patches" / "apply.py"), *argv], capture_output=True, text=True
    )


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def installed_megatron() -> Path:
    import megatron.core

    return Path(megatron.core.__file__).resolve().parents[1]


@pytest.fixture
def checkout(tmp_path, installed_megatron) -> Path:
    """A copy of the installed megatron/core and megatron/training (what a clone holds)."""
    root = tmp_path / "megatron-lm"
    ignore = shutil.ignore_patterns("__pycache__")
    for sub in ("core", "training"):
        shutil.copytree(installed_megatron / sub, root / "megatron" / sub, ignore=ignore)
    if (installed_megatron / "__init__.py").exists():
        shutil.copyfile(installed_megatron / "__init__.py", root / "megatron" / "__init__.py")
    return root


def test_installed_wheel_is_the_pinned_upstream(installed_megatron):
    """The targets in the wheel are the pinned commit's blobs (else the patches target nothing)."""
    for rel in TARGETS:
        assert APPLY.blob_sha1(installed_megatron.parent / rel) == MANIFEST["files"][rel]["upstream"], rel


def test_apply_check_twice_revert(checkout, installed_megatron):
    before = {p: digest(p) for p in checkout.rglob("*") if p.is_file()}
    assert run_cli("check", "--megatron", str(checkout)).returncode == 1  # not applied yet

    r = run_cli("apply", "--megatron", str(checkout))
    assert r.returncode == 0, r.stderr
    for rel in TARGETS:
        assert f"patched {rel}" in r.stdout
        assert APPLY.blob_sha1(checkout / rel) == MANIFEST["files"][rel]["patched"]
    changed = {p for p in before if digest(p) != before[p]}
    assert changed == {checkout / rel for rel in TARGETS}  # nothing else touched
    text = (checkout / "megatron/training/training.py").read_text()
    assert "dsv_hooks.fire(dsv_hooks.ITERATION_START, iteration)" in text
    assert "dsv_hooks.install_dsv_hooks(model, optimizer, args)" in text

    r = run_cli("check", "--megatron", str(checkout))
    assert r.returncode == 0 and "ok: the megatron_dsv patches are applied" in r.stdout, r.stdout

    snapshot = {rel: (checkout / rel).read_bytes() for rel in TARGETS}
    r = run_cli("apply", "--megatron", str(checkout))
    assert r.returncode == 0 and "already applied" in r.stdout
    assert all((checkout / rel).read_bytes() == snapshot[rel] for rel in TARGETS)

    r = run_cli("revert", "--megatron", str(checkout))
    assert r.returncode == 0, r.stderr
    for p, h in before.items():
        assert digest(p) == h, p
    for rel in TARGETS:
        assert (checkout / rel).read_bytes() == (installed_megatron.parent / rel).read_bytes()
    assert "not applied" in run_cli("revert", "--megatron", str(checkout)).stdout


def test_mismatched_checkout_is_refused(checkout):
    target = checkout / "megatron/training/training.py"
    target.write_text(target.read_text() + "\n# a local edit\n")
    untouched = checkout / "megatron/training/arguments.py"
    before = untouched.read_bytes()
    r = run_cli("apply", "--megatron", str(checkout))
    assert r.returncode == 2
    assert MANIFEST["megatron_lm"]["commit"] in r.stderr and "megatron/training/training.py" in r.stderr
    assert untouched.read_bytes() == before  # refused before writing anything
    assert run_cli("check", "--megatron", str(checkout)).returncode == 2
    r = run_cli("apply", "--megatron", str(checkout.parent))  # not a Megatron root
    assert r.returncode == 2 and "megatron/core" in r.stderr


PATCHED_SCRIPT = r'''
import sys, types
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(sys.argv[1])
import megatron.training.training as T
import megatron.training.arguments as A
import megatron.training.argument_utils as U
from megatron_dsv import hooks
from megatron_dsv.flops import AttentionWork

for mod in (T, A, U):  # the patched copy shadows the installed package
    assert Path(mod.__file__).resolve().is_relative_to(ROOT), mod.__file__
    assert mod.dsv_hooks is hooks

# (a) stock parse_args accepts --dsv-*, also next to an extra_args_provider that adds them
from megatron_dsv import add_dsv_args
sys.argv = ["pretrain_gpt.py", "--dsv-mode", "sparse", "--dsv-kv-block", "4"]
args = A.parse_args()
assert args.dsv_mode == "sparse" and args.dsv_kv_block == 4
assert A.parse_args(extra_args_provider=add_dsv_args).dsv_kv_block == 4
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron_dsv.layers.transformer_config import DSVTransformerConfig
assert hooks.transformer_config_class(args, TransformerConfig) is DSVTransformerConfig
assert hooks.transformer_config_class(SimpleNamespace(), TransformerConfig) is TransformerConfig

# (b) the callback point: drive the patched train_step with stubs, 3 iterations
events = []
class Args(SimpleNamespace):
    def __getattr__(self, name):
        return None
targs = Args(empty_unused_memory_level=0, seq_length=8, micro_batch_size=1, data_parallel_size=1,
             gtp_weight_remat_size=1, barrier_with_L1_time=False)
class Timer:
    def start(self, **kw): pass
    def stop(self): pass
class Rerun:
    def __init__(self): self.runs = 0
    def should_run_forward_backward(self, it):
        self.runs += 1
        return self.runs % 2 == 1
    def should_checkpoint_and_exit(self): return False, False, 0
rerun = Rerun()
class Chunk:
    force_all_reduce = False
    def zero_grad_buffer(self): pass
class Opt:
    def zero_grad(self): pass
    def step(self):
        events.append("optimizer.step")
        return True, 0.0, 0
class Sched:
    def step(self, increment): events.append("lr.step")
def fwd_bwd(**kw):
    events.append("forward_backward")
    return []
pg = SimpleNamespace(mp="mp", pp="pp", dp_cp="dp_cp")
stubs = dict(
    get_args=lambda: targs, get_timers=lambda: (lambda *a, **k: Timer()),
    get_rerun_state_machine=lambda: rerun, get_num_microbatches=lambda: 1,
    get_attr_wrapped_model=lambda m, name: pg, is_pp_last_stage=lambda g: False,
    logical_and_across_model_parallel_group=lambda x, group: x,
    reduce_max_stat_across_model_parallel_group=lambda x, group: x,
    get_moe_router_tracer=lambda: None, has_nvidia_modelopt=False,
)
for k, v in stubs.items():
    setattr(T, k, v)
runtime = hooks.DSVRuntime()  # what install_dsv_hooks stores on Megatron's args
targs.dsv_runtime = runtime
import megatron.training.global_vars as global_vars
global_vars.set_args(targs)  # hooks.fire finds the run's runtime through Megatron's get_args
start = runtime.register(hooks.ITERATION_START, lambda it: events.append(f"start {it}"))
end = runtime.register(hooks.ITERATION_END, lambda it: events.append(f"end {it}"))
for it in range(3):
    T.train_step(None, None, [Chunk()], Opt(), Sched(), None, fwd_bwd, iteration=it)
expected = []
for it in range(3):
    expected += [f"start {it}", "forward_backward", "optimizer.step", "lr.step", f"end {it}"]
assert events == expected, events
runtime.unregister(hooks.ITERATION_START, start); runtime.unregister(hooks.ITERATION_END, end)

# (c) FLOPs: 4 layers, 2 of them DSV (one sparse, one dense) -> hand computation
fargs = SimpleNamespace(
    num_layers=4, hidden_size=64, num_attention_heads=4, kv_channels=16, ffn_hidden_size=256,
    seq_length=128, padded_vocab_size=1000, group_query_attention=False, num_query_groups=None,
    num_experts=None, mtp_num_layers=None, moe_ffn_hidden_size=None, moe_latent_size=None,
    moe_shared_expert_intermediate_size=None, swiglu=False, multi_latent_attention=False,
    attention_output_gate=False, experimental_attention_variant=None, hybrid_layer_pattern=None,
)
B = 2
base = T.num_floating_point_operations(fargs, B)
fargs.dsv_runtime = runtime
provider = runtime.register(hooks.CORE_ATTENTION_WORK, lambda seq: [
    AttentionWork.sparse(seq, 16, [2, 3, 4, 5], kv_block=8),  # K*block = 16, 24, 32, 40 keys
    AttentionWork.dense(seq, 4, 16),
])
dsv = T.num_floating_point_operations(fargs, B)
runtime.unregister(hooks.CORE_ATTENTION_WORK, provider)
# Megatron, per layer: 3*2*(4*16)/2*2 * S^2 * B = 384 * 128^2 * 2 = 12582912 (causal: half the pairs)
megatron_layer = 384 * 128 * 128 * 2
# DSV: 12 * head_dim * pairs * B; sparse pairs 128*(16+24+32+40), dense 4*128*128
sparse = 12 * 16 * 128 * (16 + 24 + 32 + 40) * 2
dense = 12 * 16 * 4 * 128 * 128 * 2
assert dsv - base == sparse + dense - 2 * megatron_layer, (base, dsv)
assert T.num_floating_point_operations(fargs, B) == base  # nothing registered: unchanged
print("PATCHED-OK", base, dsv)
'''


def test_patched_modules_import_fire_hooks_and_count_flops(checkout, tmp_path):
    assert run_cli("apply", "--megatron", str(checkout)).returncode == 0
    script = tmp_path / "drive_patched.py"
    script.write_text(PATCHED_SCRIPT)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(checkout), str(REPO), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, str(script), str(checkout)], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and "PATCHED-OK" in r.stdout, r.stdout[-3000:] + r.stderr[-6000:]


EXAMPLE_ON_PATCHED_SCRIPT = r"""
import sys
from pathlib import Path

ROOT, REPO = Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve()
sys.path.insert(0, str(REPO / "examples"))
import torch
from tests.megatron_shim import init_megatron_state

init_megatron_state()
import megatron.core.datasets.utils as D
import megatron.training.argument_utils as U
import megatron.training.arguments as A
import megatron.training.training as T
from megatron.core.enums import ModelType
from megatron.core.process_groups_config import ProcessGroupCollection

from megatron_dsv import hooks
from megatron_dsv.layers.attention import dsv_attention_layers
from megatron_dsv.layers.transformer_config import DSVTransformerConfig
from megatron_dsv.runtime import megatron as dsv_runtime

for mod in (T, A, U):  # the patched copy shadows the installed package
    assert Path(mod.__file__).resolve().is_relative_to(ROOT), mod.__file__
    assert mod.dsv_hooks is hooks
import pretrain_video_dit as p

# (a) the patched parse_args takes the example's flags (its provider adds --dsv-*, the patch does not again)
argv = ["--dit-config", "tiny", "--latent-shape", "4x4x8x16", "--micro-batch-size", "2", "--global-batch-size", "2",
        "--train-iters", "4", "--lr", "1e-3", "--dsv-query-group", "2x2x4", "--use-cpu-initialization",
        "--dit-num-classes", "3", "--dsv-predictor-rank", "8", "--dsv-mode", "auto",
        "--dsv-switch-min-iters", "0", "--dsv-switch-max-iters", "2", "--dsv-profile-interval-stage1", "1"]
defaults, extra = p._pre_parse(argv)
sys.argv = ["pretrain_video_dit.py"] + argv + extra
args = A.parse_and_validate_args(extra_args_provider=p.add_video_args, args_defaults=defaults)
p.validate_dsv_args(args)
assert (args.dsv_mode, args.dsv_switch_max_iters, args.dsv_predictor_rank) == ("auto", 2, 8)
assert (args.transformer_impl, args.apply_rope_fusion, args.seq_length) == ("local", False, 128)

# (b) the example's install() sees the patched clone: it wraps nothing (the dataset-helper no-op only)
points = (T.train_step, T.setup_model_and_optimizer, T.get_megatron_optimizer_config)
compile_helpers = D.compile_helpers
dsv_runtime.install()
assert (T.train_step, T.setup_model_and_optimizer, T.get_megatron_optimizer_config) == points
assert not getattr(T.train_step, "__dsv_wrapped__", False) and D.compile_helpers is not compile_helpers
_, overrides = T.get_megatron_optimizer_config(args)  # patch 04: predictor groups
assert [v for v in overrides.values() if v.get(hooks.PREDICTOR_GROUP_KEY)], overrides

# (c) the example's model, built through the patched config path, under the patched train_step
args.curr_iteration = 0
model = p.model_provider()
assert type(model.config) is DSVTransformerConfig and len(dsv_attention_layers(model)) == 2
model.model_type = ModelType.encoder_or_decoder  # what Megatron's get_model sets
model.pg_collection = ProcessGroupCollection.use_mpu_process_groups()
model.zero_grad_buffer, model.force_all_reduce = model.zero_grad, False  # Megatron's DDP has these
runtime = T.dsv_hooks.install_dsv_hooks([model], None, args)  # the call patch 03 makes
assert args.dsv_runtime is runtime and runtime.controller is not None
# Megatron allocates these two on the CUDA device; over one rank they return their input
T.logical_and_across_model_parallel_group = lambda x, group: x
T.reduce_max_stat_across_model_parallel_group = lambda x, group: x
train, _, _ = p.datasets_provider([10, 2, 0])
batch = torch.utils.data.default_collate([train[0], train[1]])
sgd = torch.optim.SGD(model.parameters(), lr=1e-3)
class Opt:
    def zero_grad(self): sgd.zero_grad()
    def step(self):
        sgd.step()
        return True, 0.0, 0
class Sched:
    def step(self, increment): pass
def forward_backward(forward_step_func, data_iterator, model, **kw):
    # Megatron's forward_backward_no_pipelining allocates on the CUDA device: one microbatch here
    out, loss_func = forward_step_func(data_iterator, model[0])
    loss, count, report = loss_func(out)
    (loss / count).backward()
    return [report]
stages, losses = [], []
for it in range(4):
    args.curr_iteration = it
    loss = T.train_step(p.forward_step, iter([batch]), [model], Opt(), Sched(), model.config, forward_backward, iteration=it)[0]
    stages.append(runtime.controller.stage)
    losses.append(float(loss["flow loss"]))
assert stages == [1, 1, 2, 2], stages  # the switch at --dsv-switch-max-iters 2, through the patch's events
assert all(0 < l < 10 for l in losses), losses
torch.distributed.destroy_process_group()  # else gloo's threads may abort the exit (SIGABRT)
print("EXAMPLE-PATCHED-OK", losses)
"""


def test_example_runs_on_the_patched_modules(checkout, tmp_path):
    """The video DiT example on a patched copy: the patched ``parse_args`` takes its flags, its
    ``install()`` wraps nothing (the patches drive DSV), its model is built through the patched
    config path, and the patched ``train_step`` switches its stage. pretrain() needs CUDA; the
    pieces around it that need the GPU are replaced (forward_backward, two reductions)."""
    assert run_cli("apply", "--megatron", str(checkout)).returncode == 0
    script = tmp_path / "example_on_patched.py"
    script.write_text(EXAMPLE_ON_PATCHED_SCRIPT)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(checkout), str(REPO), os.environ.get("PYTHONPATH", "")]),
               WORLD_SIZE="1", RANK="0", LOCAL_RANK="0", TRITON_INTERPRET="1")
    for var in ("MASTER_PORT", "MASTER_ADDR"):  # the parent's gloo store may hold its port
        env.pop(var, None)
    r = subprocess.run([sys.executable, str(script), str(checkout), str(REPO)], capture_output=True, text=True,
                       env=env, cwd=REPO, timeout=300)
    assert r.returncode == 0 and "EXAMPLE-PATCHED-OK" in r.stdout, r.stdout[-3000:] + r.stderr[-6000:]


# ---------------------------------------------------------------- megatron_dsv side, in process
def test_flops_hand_computation():
    s, d = 1024, 64
    dense = AttentionWork.dense(s, 2, d)
    assert dense.pairs() == 2 * s * s
    assert dense.flops(3) == 12 * d * 2 * s * s * 3
    sparse = AttentionWork.sparse(s, d, [10, 300], kv_block=4)  # 40 keys, capped at 1024
    assert sparse.keys_per_query == (40, 1024)
    assert sparse.pairs() == s * (40 + 1024)
    meg = 3 * megatron_dense_core_flops(s, 2, d, 5)  # 3 layers of Megatron's count, 5 sequences
    assert megatron_dense_core_flops(s, 2, d, 1) == 6 * 2 * d * s * s
    got = replace_core_attention_flops(meg, 3, [sparse], 5)
    assert got == 2 * 6 * 2 * d * s * s * 5 + 12 * d * s * (40 + 1024) * 5
    assert replace_core_attention_flops(meg, 3, [], 5) == meg
    assert sparse_fraction([sparse]) == pytest.approx((40 + 1024) / (2 * 1024))
    with pytest.raises(ValueError, match="attention layers"):
        replace_core_attention_flops(meg, 0, [sparse], 5)


def test_registry():
    calls = []
    runtime = hooks.DSVRuntime()
    fn = runtime.register(hooks.ITERATION_START, calls.append)
    try:
        assert runtime.fire(hooks.ITERATION_START, 7) == [None] and calls == [7]
        assert fn in runtime.registered(hooks.ITERATION_START)
    finally:
        assert runtime.unregister(hooks.ITERATION_START, fn)
    assert not runtime.unregister(hooks.ITERATION_START, fn)
    runtime.fire(hooks.ITERATION_START, 8)
    assert calls == [7]
    with pytest.raises(ValueError, match="unknown megatron_dsv hook event"):
        runtime.register("iteration_middle", fn)
    assert hooks.DSVRuntime() is not runtime  # no registry shared between runs


def test_install_dsv_hooks_drives_the_controller(megatron_state):
    from megatron.core.transformer.transformer_block import TransformerBlock

    from megatron_dsv.specs import dsv_gpt_layer_spec
    from tests.megatron_shim import tiny_config

    cfg = tiny_config(hidden_size=64, num_attention_heads=4, ffn_hidden_size=128, dsv_mode="auto",
                      dsv_switch_min_iters=0, dsv_switch_max_iters=2, dsv_profile_interval_stage1=1,
                      dsv_stage2_predictor_lr_scale=0.1, dsv_min_sparsity=0.0, dsv_recall_floor=0.0)
    model = TransformerBlock(cfg, dsv_gpt_layer_spec)
    marked = {"params": [], hooks.PREDICTOR_GROUP_KEY: True, "lr": 1e-3, "max_lr": 1e-3, "min_lr": 1e-5}
    other = {"params": [], "lr": 1e-3, "max_lr": 1e-3, "min_lr": 1e-5}
    opt = type("Opt", (), {"param_groups": [other, marked]})()
    args = type("Args", (), {"lr": 1e-3, "min_lr": 1e-5, "seq_length": 64})()
    logs = []
    h = hooks.install_dsv_hooks([model], opt, args, stats_group=None, tb_writer=None, wandb_writer=None,
                                log=logs.append)
    try:
        assert h is not None and len(h.controller.layers) == 2 and "DSV hooks installed" in logs[0]
        assert hooks.core_attention_flops(1.0, 2, 1, args) == 2 * 12 * 16 * 4 * 64 * 64  # dense, S*S
        x = torch.randn(64, 1, 64)  # [s, b, h]: 4x4x4 video in cube-major order, 2x2x2 groups
        assert args.dsv_runtime is h
        for it in range(3):
            h.fire(hooks.ITERATION_START, it)
            model(x, attention_mask=None).sum().backward()
            h.fire(hooks.ITERATION_END, it)
        assert h.controller.stage == 2 and h.controller.switch_iteration == 2
        assert marked["max_lr"] == pytest.approx(1e-4) and marked["lr"] == pytest.approx(1e-4)
        assert marked["min_lr"] == pytest.approx(1e-6) and other["max_lr"] == 1e-3
        h.controller.layers[0].set_sparse(True, [8, 8, 8, 8])  # K per head, as the switch sets it
        assert [w.pairs() for w in h.attention_work(64)] == [64 * 8 * 4, 4 * 64 * 64]
        assert hooks.core_attention_flops(1.0, 2, 1, args) == 12 * 16 * (64 * 8 * 4 + 4 * 64 * 64)
        again = hooks.install_dsv_hooks([model], opt, args, stats_group=None, tb_writer=None,
                                        wandb_writer=None, log=logs.append)  # replaces, not adds
        assert len(again.registered(hooks.ITERATION_END)) == 1 and again is not h
        assert args.dsv_runtime is again
    finally:
        args.dsv_runtime = None
    assert hooks.core_attention_flops(1.0, 2, 1, args) == 1.0  # no runtime: Megatron's own count


@pytest.mark.parametrize("fit", ["closed_form", "gradient"])
def test_install_dsv_hooks_warns_of_missing_groups_only_for_trained_predictors(megatron_state, fit):
    """Closed-form predictors take no gradient, so Megatron's optimizer holds no predictor group
    and none is expected (the H200 runs printed the patch-04 warning for that); a gradient-trained
    predictor without a marked group still gets the warning."""
    from megatron.core.transformer.transformer_block import TransformerBlock

    from megatron_dsv.specs import dsv_gpt_layer_spec
    from tests.megatron_shim import tiny_config

    cfg = tiny_config(hidden_size=64, num_attention_heads=4, ffn_hidden_size=128, dsv_mode="auto",
                      dsv_predictor_fit=fit)
    model = TransformerBlock(cfg, dsv_gpt_layer_spec)
    opt = type("Opt", (), {"param_groups": [{"params": [], "lr": 1e-3, "max_lr": 1e-3, "min_lr": 1e-5}]})()
    args = type("Args", (), {"lr": 1e-3, "min_lr": 1e-5, "seq_length": 64})()
    logs = []
    try:
        hooks.install_dsv_hooks([model], opt, args, stats_group=None, tb_writer=None, wandb_writer=None,
                                log=logs.append)
    finally:
        args.dsv_runtime = None
    assert "DSV hooks installed" in logs[0]
    if fit == "closed_form":
        assert "fitted in closed form" in logs[0] and len(logs) == 1
    else:
        assert "0 predictor optimizer groups" in logs[0] and "patch 04 not applied" in logs[1]


def test_predictor_lr_flag_sets_the_predictor_groups_base():
    from types import SimpleNamespace

    from megatron_dsv.runtime.lr import predictor_base_lr

    cfg = SimpleNamespace(lr=3e-4, min_lr=3e-5)
    assert predictor_base_lr(cfg, SimpleNamespace(dsv_predictor_lr=0.0)) == (3e-4, 3e-5)
    assert predictor_base_lr(cfg, None) == (3e-4, 3e-5)
    max_lr, min_lr = predictor_base_lr(cfg, SimpleNamespace(dsv_predictor_lr=3e-3))
    assert max_lr == 3e-3 and abs(min_lr - 3e-4) < 1e-12


def _tiny_gpt(spec, **dsv):
    from megatron.core.models.gpt import GPTModel

    from tests.megatron_shim import tiny_config

    cfg = tiny_config(hidden_size=64, num_attention_heads=4, ffn_hidden_size=128, **dsv)
    return GPTModel(config=cfg, transformer_layer_spec=spec, vocab_size=64, max_sequence_length=64,
                    position_embedding_type="learned_absolute")


@pytest.mark.parametrize("mode", ["auto", "dense", "sparse"])
def test_gpt_with_the_dsv_spec_is_refused_when_built(megatron_state, mode):
    """pretrain_gpt.py --spec megatron_dsv.specs dsv_gpt_layer_spec: a causal LM with bidirectional
    DSV layers sees the tokens it predicts; refused where the model is built (patch 03 and our
    runtime wrapper both call install_dsv_hooks there), before any iteration, in every mode."""
    from types import SimpleNamespace

    from megatron_dsv.specs import dsv_gpt_layer_spec

    model = _tiny_gpt(dsv_gpt_layer_spec, dsv_mode=mode)
    args = SimpleNamespace(dsv_runtime="stale")
    with pytest.raises(ValueError, match="causal language model") as e:
        hooks.install_dsv_hooks([model], None, args, log=lambda msg: None)
    msg = str(e.value)
    assert "examples/pretrain_video_dit.py" in msg and "dsv_gpt_causal_layer_spec" in msg and "no_mask" in msg
    assert args.dsv_runtime == "stale"  # refused before anything was installed
    wrapped = type("Float16Module", (torch.nn.Module,), {})()  # Megatron wraps chunks; found inside too
    wrapped.module = model
    with pytest.raises(ValueError, match="causal language model"):
        hooks.install_dsv_hooks(wrapped, None, args, log=lambda msg: None)


def test_gpt_refusal_spares_causal_and_plain_models(megatron_state):
    """The rule, not a blanket ban: a GPT whose DSV layers are causal (the causal spec) is let
    through in every mode, with a stage controller where it has predictors; a GPT without DSV
    layers runs with DSV off."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from megatron_dsv.specs import dsv_gpt_causal_layer_spec

    logs = []
    runtime = hooks.install_dsv_hooks([_tiny_gpt(dsv_gpt_causal_layer_spec, dsv_mode="dense")], None, None, log=logs.append)
    assert runtime is not None and runtime.controller is None  # no predictor: nothing to schedule
    for mode in ("auto", "sparse"):
        runtime = hooks.install_dsv_hooks([_tiny_gpt(dsv_gpt_causal_layer_spec, dsv_mode=mode)], None, None, log=logs.append)
        assert runtime is not None and runtime.controller is not None
    assert hooks.install_dsv_hooks([_tiny_gpt(get_gpt_layer_local_spec())], None, None, log=logs.append) is None
    assert "DSV is off for this run" in logs[-1]


def test_causal_gpt_is_refused_only_with_cudnn(megatron_state):
    """Causal DSV layers run sparse on the Triton kernels (and the reference); cuDNN's block-sparse
    attention has no token mask, so --dsv-backend cudnn is refused before any iteration."""
    from megatron_dsv.specs import dsv_gpt_causal_layer_spec

    for backend in ("auto", "triton", "reference"):
        model = _tiny_gpt(dsv_gpt_causal_layer_spec, dsv_mode="sparse", dsv_backend=backend)
        assert hooks.install_dsv_hooks([model], None, None, log=lambda msg: None) is not None
    model = _tiny_gpt(dsv_gpt_causal_layer_spec, dsv_mode="sparse", dsv_backend="cudnn")
    with pytest.raises(ValueError, match="no token-wise mask. Use --dsv-backend auto or triton"):
        hooks.install_dsv_hooks([model], None, None, log=lambda msg: None)


def test_a_dsv_run_checkpoint_loads_with_megatrons_default_torch_load(megatron_state, tmp_path):
    """Megatron pickles ``args`` (with ``args.dsv_runtime``) into every checkpoint and reads it with
    torch.load's default weights_only=True (``--ckpt-format torch``: checkpointing.py's
    _load_base_checkpoint; it exits with code 0 on a failed load). The runtime pickles as None
    through a registered safe global, and the layers' DSV state (stage, statistics) comes back."""
    import argparse

    from megatron_dsv.specs import dsv_gpt_causal_layer_spec

    model = _tiny_gpt(dsv_gpt_causal_layer_spec, dsv_mode="auto", dsv_profile_interval_stage1=1,
                      dsv_switch_min_iters=100, dsv_switch_max_iters=100)
    args = argparse.Namespace(lr=1e-3, min_lr=1e-4, seq_length=64, consumed_train_samples=2)
    runtime = hooks.install_dsv_hooks([model], None, args, stats_group=None, tb_writer=None, wandb_writer=None,
                                      log=lambda msg: None)
    tokens = torch.randint(0, 64, (1, 64))
    pos = torch.arange(64).unsqueeze(0)
    for it in range(2):
        runtime.fire(hooks.ITERATION_START, it)
        model(tokens, pos, attention_mask=None).float().sum().backward()
        runtime.fire(hooks.ITERATION_END, it)
    assert args.dsv_runtime is runtime
    torch.save({"args": args, "iteration": 2, "model": model.state_dict_for_save_checkpoint()}, tmp_path / "ckpt.pt")
    args.dsv_runtime = None

    state = torch.load(tmp_path / "ckpt.pt", map_location="cpu")  # what Megatron calls: no weights_only
    assert state["args"].dsv_runtime is None and state["args"].consumed_train_samples == 2
    fresh = _tiny_gpt(dsv_gpt_causal_layer_spec, dsv_mode="auto", dsv_profile_interval_stage1=1,
                      dsv_switch_min_iters=100, dsv_switch_max_iters=100)
    fresh.load_state_dict(state["model"], strict=True)
    saved, loaded = runtime.controller.layers, hooks.install_dsv_hooks(
        [fresh], None, argparse.Namespace(), stats_group=None, tb_writer=None, wandb_writer=None,
        log=lambda msg: None).controller.layers
    assert len(loaded) == len(saved) == 2
    for a, b in zip(saved, loaded):
        assert a.state.stats_ema and set(a.state.stats_ema) == set(b.state.stats_ema)
        for name, value in a.state.stats_ema.items():
            torch.testing.assert_close(b.state.stats_ema[name], value.float().cpu(), rtol=0, atol=0)
        assert b.state.schedule == a.state.schedule and b.state.schedule.get("stage") == 1
    for (name, p), q in zip(model.named_parameters(), fresh.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=0, msg=name)
