"""Bad input to the ops: a clear error before any kernel runs, naming what to change; non-finite
predictor output and attention inputs handled the same way by both backends (issue 17's probe).

Triton runs under the interpreter at tiny fp32 shapes; cases that need a fresh process (a crash
that used to be a segfault, Triton without its interpreter) run in a subprocess.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from tests.ops.triton_env import CPU_OK, DEVICE  # noqa: F401  (sets TRITON_INTERPRET first)

from megatron_dsv.ops import choose_backend  # noqa: E402
from megatron_dsv.ops.options import KernelOptions  # noqa: E402
from megatron_dsv.ops.selection import check_finite, select_topk  # noqa: E402
from megatron_dsv.ops.sparse_attention import sparse_attention  # noqa: E402
from megatron_dsv.ops.sparse_index import SparseIndex  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BACKENDS = ["reference", pytest.param("triton", marks=CPU_OK)]
SELECT_PATHS = {
    "fused": KernelOptions(),
    "stream": KernelOptions(select_fused_kind="stream"),
    "split": KernelOptions(select_fused_max_units=0),
}


def _qkv(b=1, h=2, s=32, d=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, s, d, generator=gen).to(DEVICE) for _ in range(3)]


def _user_index(edit, k_per_head=(3, 3), s=32, g=16):
    """A user-built copy of a valid selection, with ``edit(kv_idx, kv_count)`` applied."""
    gen = torch.Generator().manual_seed(1)
    lib = select_topk(torch.randn(1, 2, s, 8, generator=gen), torch.randn(1, 2, s, 8, generator=gen), g,
                      list(k_per_head), backend="reference")
    idx, cnt = lib.kv_idx.clone(), lib.kv_count.clone()
    edit(idx, cnt)
    return SparseIndex(idx.to(DEVICE), cnt.to(DEVICE), g, 1, s, s)


def _run_python(code: str, env_drop=(), env_set=None):
    env = {k: v for k, v in os.environ.items() if k not in env_drop}
    env.update(env_set or {})
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_index_entry_far_out_of_range_is_a_python_error_not_a_crash():
    """One entry of 10**6 used to segfault the Triton interpreter (rc 139)."""
    res = _run_python(
        """
        import torch
        from megatron_dsv.ops.selection import select_topk
        from megatron_dsv.ops.sparse_attention import sparse_attention
        from megatron_dsv.ops.sparse_index import SparseIndex
        q, k, v = (torch.randn(1, 2, 32, 16) for _ in range(3))
        lib = select_topk(torch.randn(1, 2, 32, 8), torch.randn(1, 2, 32, 8), 16, 3, backend="reference")
        idx = lib.kv_idx.clone()
        idx[0, 1, 1, 2] = 10**6
        sparse_attention(q, k, v, SparseIndex(idx, lib.kv_count, 16, 1, 32, 32), backend="triton")
        """,
        env_set={"TRITON_INTERPRET": "1"},
    )
    assert res.returncode == 1, f"rc {res.returncode} (negative = killed by a signal)\n{res.stderr[-2000:]}"
    assert "Traceback" in res.stderr and "ValueError" in res.stderr
    assert "(batch 0, head 1, group 1)" in res.stderr and "1000000" in res.stderr
    assert "select_topk" in res.stderr  # the fix


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "name,edit,match,fix",
    [
        # an entry equal to S_kv (one past the last key) returned finite output before
        ("entry==S_kv", lambda i, c: i[0, 0, 1].__setitem__(2, 32), r"\[0, 32\).*\(batch 0, head 0, group 1\) lists key unit 32",
         "Build the index for these keys"),
        ("duplicate", lambda i, c: i[0, 1, 0].__setitem__(1, i[0, 1, 0, 0]),
         r"distinct and ascending: \(batch 0, head 1, group 0\) lists key unit \d+ twice", "torch.unique"),
        ("descending", lambda i, c: i[0, 1, 1].copy_(i[0, 1, 1].flip(0)),
         r"distinct and ascending: \(batch 0, head 1, group 1\) lists key unit \d+ before", "Sort and deduplicate"),
        ("kv_count<valid", lambda i, c: c[0].__setitem__(1, 2),
         r"-1 exactly.*\(batch 0, head 1, group 0\) has 3 valid entries but kv_count\[0, 1\] = 2",
         "Set kv_count to the number of valid entries"),
        ("negative", lambda i, c: i[0, 0, 0].__setitem__(0, -5),
         r"\(batch 0, head 0, group 0\) holds -5 .*only negative value allowed is -1", "select_topk"),
        ("kv_count>Kmax", lambda i, c: c[0].__setitem__(0, 4), r"kv_count\[0, 0\] = 4 must lie in \[1, Kmax=3\]",
         "set each head's K"),
    ],
    ids=["entry==S_kv", "duplicate", "descending", "kv_count<valid", "negative", "kv_count>Kmax"],
)
def test_bad_user_index_raises_before_any_kernel(name, edit, match, fix, backend):
    q, k, v = _qkv()
    index = _user_index(edit)
    with pytest.raises(ValueError, match=match) as err:
        sparse_attention(q, k, v, index, backend=backend)
    assert fix in str(err.value)
    assert not index.verified


def test_user_index_is_checked_once_and_library_index_never(monkeypatch):
    q, k, v = _qkv()
    index = _user_index(lambda i, c: None)
    assert not index.verified
    sparse_attention(q, k, v, index, backend="reference")
    assert index.verified  # checked on first use, not again
    index.kv_idx[0, 0, 0, 0] = 31  # an in-place edit voids the proof
    assert not index.verified
    with pytest.raises(ValueError, match="distinct and ascending"):
        sparse_attention(q, k, v, index, backend="reference")

    def no_host_check(self):
        raise AssertionError("the value check ran on a library-built index")

    monkeypatch.setattr(SparseIndex, "_check_values", no_host_check)
    lib = select_topk(torch.randn(1, 2, 32, 8), torch.randn(1, 2, 32, 8), 16, [2, 5], backend="reference")
    assert lib.verified and lib.to("cpu").verified
    out, _ = sparse_attention(q, k, v, lib, backend="reference")
    assert torch.isfinite(out).all()


def _nan_inputs(s=128, r=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q_lr = torch.randn(2, 2, s, r, generator=gen)
    k_lr = torch.randn(2, 2, s, r, generator=gen)
    k_lr[0, 0, 5] = float("nan")  # one NaN key row
    k_lr[1, 1, 70, 3] = float("inf")
    q_lr[0, 1, 20] = float("nan")  # group 1 of (batch 0, head 1) has a NaN proxy
    k_lr[1, 0, :100] = float("nan")  # (batch 1, head 0): 28 finite units, fewer than K = 60
    return q_lr.to(DEVICE), k_lr.to(DEVICE)


def _check_nan_selection(idx: SparseIndex, g=16):
    kv = idx.kv_idx.cpu()
    # the NaN key unit ranks last: never chosen where enough finite units exist
    assert not (kv[0, 0] == 5).any() and not (kv[1, 1] == 70).any()
    # a NaN proxy: every score non-finite, so the first K units in memory order
    k01 = int(idx.kv_count[0, 1])
    assert kv[0, 1, 20 // g, :k01].tolist() == list(range(k01))
    # fewer finite units than K: all 28 finite ones, then the lowest non-finite positions
    k10 = int(idx.kv_count[1, 0])
    assert kv[1, 0, :, :k10].tolist() == [list(range(k10 - 28)) + list(range(100, 128))] * kv.shape[2]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy under the interpreter warns on NaN
@pytest.mark.parametrize("path", [pytest.param(p, marks=CPU_OK) for p in SELECT_PATHS])
def test_nonfinite_predictor_output_same_selection_on_both_backends(path):
    """Probe: a NaN k_lr row was picked by one backend and never by the other; NaN q_lr gave
    arbitrary keys on the reference and -1 in valid slots on Triton."""
    q_lr, k_lr = _nan_inputs()
    kh = torch.tensor([[7, 33], [60, 3]])
    ref = select_topk(q_lr, k_lr, 16, kh, backend="reference").validate()
    got = select_topk(q_lr, k_lr, 16, kh, backend="triton", options=SELECT_PATHS[path]).validate()
    assert torch.equal(got.kv_idx, ref.kv_idx)
    _check_nan_selection(ref)


def test_nonfinite_predictor_output_reference_token_and_blocks():
    q_lr, k_lr = _nan_inputs()
    _check_nan_selection(select_topk(q_lr, k_lr, 16, torch.tensor([[7, 33], [60, 3]]), backend="reference"))
    # blocks of 4: the NaN row 5 poisons block 1, which is never chosen while finite blocks remain
    blocks = select_topk(q_lr, k_lr, 16, torch.tensor([[7, 9], [3, 3]]), kv_block=4, backend="reference").validate()
    assert not (blocks.kv_idx[0, 0] == 1).any()


@pytest.mark.parametrize(
    "which,where", [("k_lr", "(batch 0, head 0, token 5)"), ("q_lr", "(batch 0, head 1, token 20)")]
)
def test_check_finite_names_tensor_place_and_fix(which, where):
    q_lr, k_lr = _nan_inputs()
    clean = dict(q_lr=torch.nan_to_num(q_lr), k_lr=torch.nan_to_num(k_lr, posinf=0.0))
    clean[which] = {"q_lr": q_lr, "k_lr": k_lr}[which]
    with pytest.raises(ValueError) as err:
        check_finite("layer 3 predictor", **clean)
    msg = str(err.value)
    assert msg.startswith(f"layer 3 predictor: {which} holds") and where in msg
    assert "--dsv-predictor-lr" in msg and "--dsv-mode dense" in msg
    check_finite("layer 3 predictor", q_lr=torch.nan_to_num(q_lr), k_lr=torch.randn(1, 1, 4, 4))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@CPU_OK
@pytest.mark.parametrize("kvb", [1, 16])
@pytest.mark.parametrize("tensor", ["q", "k", "v"])
def test_nonfinite_qkv_propagate_the_same_on_both_backends(tensor, kvb, poisoned):
    """NaN in q, k or v: the same NaN rows (out, LSE, gradients) on both backends, the finite
    rest equal; a NaN at token 0 must not leak through padding (which gathers token 0)."""
    b, h, s, d, g = 1, 2, 64, 64, 16
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(b, h, s, d, generator=gen).to(DEVICE) for _ in range(3))
    x = {"q": q, "k": k, "v": v}[tensor]
    x[0, 0, 0] = float("nan")
    x[0, 1, 37] = float("nan")
    lr = [torch.randn(b, h, s, 16, generator=gen).to(DEVICE) for _ in range(2)]
    index = select_topk(*lr, g, [1, 2] if kvb == 16 else [3, 40], kv_block=kvb, backend="reference")
    assert (index.kv_idx == -1).any()  # padding present
    do = torch.randn(b, h, s, d, generator=gen).to(DEVICE)
    res = {}
    for backend in ("reference", "triton"):
        qq, kk, vv = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
        out, lse = sparse_attention(qq, kk, vv, index, backend=backend, options=poisoned)
        res[backend] = [out, lse, *torch.autograd.grad((out * do).sum(), (qq, kk, vv))]
    for name, a, r in zip(["out", "lse", "dq", "dk", "dv"], res["triton"], res["reference"]):
        assert torch.equal(torch.isnan(a), torch.isnan(r)), name
        fin = ~torch.isnan(r)
        assert torch.allclose(a[fin], r[fin], rtol=1e-4, atol=1e-5), name
    assert torch.isnan(res["reference"][0]).any() and not torch.isnan(res["reference"][0]).all()


@pytest.mark.parametrize(
    "kwargs,exc,match,fix",
    [
        (dict(group_size=0), ValueError, "query group size must be >= 1", "--dsv-query-group"),
        (dict(group_size=-8), ValueError, "query group size must be >= 1", "--dsv-query-group"),
        (dict(group_size=16.0), TypeError, "integer number of queries", "pass e.g. 64"),
        (dict(k_per_head=16.5), ValueError, "whole numbers of key units, got 16.5", "pass an int"),
        (dict(k_per_head=[4, 2.5]), ValueError, "whole numbers of key units, got 2.5", "pass an int"),
        (dict(k_per_head=65), ValueError, r"k_per_head must lie in \[1, 64\]", "Lower the density"),
        (dict(k_per_head=0), ValueError, r"k_per_head must lie in \[1, 64\]", "raise K to 1"),
        (dict(kv_block=0), ValueError, "kv_block must be >= 1", "1 selects single keys"),
        (dict(kv_block=5), ValueError, "not a multiple of kv_block=5", "--dsv-kv-block"),
    ],
)
def test_bad_selection_arguments(kwargs, exc, match, fix):
    args = dict(q_lr=torch.randn(1, 2, 64, 4), k_lr=torch.randn(1, 2, 64, 4), group_size=16, k_per_head=4)
    args.update(kwargs)
    with pytest.raises(exc, match=match) as err:
        select_topk(**args)
    assert fix in str(err.value)


def test_triton_on_cpu_without_interpreter_says_what_to_set():
    """Probe: Triton's own '0 active drivers' error before; now ours, naming the fix."""
    res = _run_python(
        """
        import torch
        from megatron_dsv.ops.selection import select_topk
        from megatron_dsv.ops.sparse_attention import sparse_attention
        q, k, v = (torch.randn(1, 2, 32, 16) for _ in range(3))
        ix = select_topk(torch.randn(1, 2, 32, 8), torch.randn(1, 2, 32, 8), 16, 3)  # auto: reference
        for call in (lambda: select_topk(q, k, 16, 3, backend="triton"),
                     lambda: sparse_attention(q, k, v, ix, backend="triton")):
            try:
                call()
            except ValueError as err:
                print("ERR", err)
        """,
        env_drop=("TRITON_INTERPRET",),
        env_set={"CUDA_VISIBLE_DEVICES": ""},
    )
    assert res.returncode == 0, res.stderr[-2000:]
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("ERR")]
    assert len(lines) == 2, res.stdout
    for ln in lines:
        assert "TRITON_INTERPRET=1" in ln and "backend='reference'" in ln and "backend='auto'" in ln


def test_auto_backend_choice_is_visible(caplog):
    choice = choose_backend("auto", "cpu")
    assert choice.name == "reference" and "TRITON_INTERPRET=1" in choice.reason
    assert choose_backend("reference", "cpu").reason.startswith("requested")
    with pytest.raises(ValueError, match="backend must be"):
        choose_backend("cuda", "cpu")
    # logged once per process (log_once): the message of the first auto call on CPU
    from megatron_dsv.ops import _utils

    _utils.log_once.cache_clear()
    with caplog.at_level("INFO", logger="megatron_dsv"):
        for _ in range(3):
            select_topk(torch.randn(1, 1, 16, 4), torch.randn(1, 1, 16, 4), 16, 2)
    logged = [r.getMessage() for r in caplog.records if "selection: reference kernels, auto" in r.getMessage()]
    assert len(logged) == 1, caplog.records


def test_kernel_options_are_checked():
    with pytest.raises(ValueError, match="unknown key 'BLOCK_K'"):
        KernelOptions(tune={"fwd": {"BLOCK_K": 64}})
    with pytest.raises(ValueError, match="select_fused_kind"):
        KernelOptions(select_fused_kind="fast")
    with pytest.raises(TypeError, match=r"KernelOptions.tma must be None \(auto\), True or False"):
        KernelOptions(tma=1)
    with pytest.raises(TypeError, match="KernelOptions"):
        select_topk(torch.randn(1, 1, 16, 4), torch.randn(1, 1, 16, 4), 16, 2, options={"poison_outputs": True})
    opts = KernelOptions(tune={"dq": {"BLOCK_N": 32}})
    assert opts.tiles("dq") == {"BLOCK_N": 32} and opts.tiles("fwd") == {} and hash(opts) == hash(KernelOptions(tune=opts.tune))


@CPU_OK
def test_poisoned_fixture_poisons(poisoned):
    """The fixture the kernel tests rely on: fresh outputs really start as NaN."""
    from megatron_dsv.ops.sparse_attention import triton as sa_triton

    like = torch.zeros(2, device=DEVICE)
    assert torch.isnan(sa_triton._new((3, 4), like, poisoned)).all()
    assert not torch.isnan(sa_triton._new((3, 4), like, KernelOptions()).fill_(0)).any()
