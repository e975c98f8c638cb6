"""What the kernel benchmarks share (``attention.py``, ``cudnn_block_sparse.py``): the timer, the
fp32 reference check, first-call (JIT) cost, dense SDPA, and the block-sparse peers of our kernel:
NVIDIA cuDNN frontend's block-sparse attention (on the same :class:`SparseIndex` as ours) and
FlexAttention (a block mask at the same density, its compiled function owned by :class:`FlexPeer`).

Every sparse kernel here is a callable ``fn(q, k, v) -> (out, lse)`` (``lse`` may be ``None``)
over ``[B, H, S, D]`` tensors, so one check and one timer serve all of them.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import math
import statistics
import time
from typing import Callable, Dict, Optional, Tuple

import torch

from megatron_dsv.ops.sparse_attention.cudnn import cudnn_import_error, cudnn_supported
from megatron_dsv.ops.sparse_attention.naive import sparse_attention_reference
from megatron_dsv.ops.sparse_index import SparseIndex

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
"""The ``--dtype`` names of the attention benchmarks."""


def int_list(s: str):
    """``--flag 1,64`` -> ``[1, 64]`` (``''`` -> ``[]``)."""
    return [int(x) for x in s.split(",") if x]


def float_list(s: str):
    """``--flag 0.9,0.95`` -> ``[0.9, 0.95]`` (``''`` -> ``[]``)."""
    return [float(x) for x in s.split(",") if x]

# Relative error (vs the fp32 reference) above which a kernel's check fails: at S=64k, D=128, 90%
# (H200, cudnn_block_sparse_h200_20261130.json) ours and cuDNN's out/dq/dk/dv measured 2.3e-3 to
# 2.9e-3 (LSE 6e-8), the bf16 rounding of the reference itself 1.7e-3; 2e-2 is the bound the
# benchmarks used before, about 7x the largest of those.
CHECK_TOL = 2e-2

SparseFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], Tuple[torch.Tensor, Optional[torch.Tensor]]]


def first_line(err: BaseException) -> str:
    """``Type: first line of the message`` (compiler errors run to pages)."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}"[:300]


def package_version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def env_info(device: str) -> Dict:
    """GPU (or ``cpu``), versions of torch, triton, CUDA and the cuDNN frontend packages, commit, date."""
    import triton

    from benchmarks.dense_path import git_commit

    on_cuda = device == "cuda"
    return {
        "gpu": torch.cuda.get_device_name() if on_cuda else "cpu",
        "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
        "cudnn_backend_torch": torch.backends.cudnn.version() if on_cuda else None,
        "nvidia-cudnn-frontend": package_version("nvidia-cudnn-frontend"),
        "nvidia-cutlass-dsl": package_version("nvidia-cutlass-dsl"),
        "apache-tvm-ffi": package_version("apache-tvm-ffi"),
        "git_commit": git_commit(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


class Timer:
    """Median milliseconds of a callable: ``triton.testing.do_bench`` on CUDA; on the CPU (the
    smoke path under the Triton interpreter) one warm-up call and the median of ``cpu_reps`` host
    clock runs, numbers that check the wiring and mean nothing about speed."""

    def __init__(self, device: str, warmup_ms: float = 25, rep_ms: float = 100, cpu_reps: int = 2):
        self.device, self.warmup_ms, self.rep_ms, self.cpu_reps = device, warmup_ms, rep_ms, cpu_reps

    def __call__(self, fn: Callable[[], object]) -> float:
        if self.device == "cuda":
            from triton.testing import do_bench

            return do_bench(fn, warmup=self.warmup_ms, rep=self.rep_ms, return_mode="median")
        fn()
        times = []
        for _ in range(self.cpu_reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    def peak_mem_gib(self, fn: Callable[[], object]) -> Optional[float]:
        """Peak GiB allocated by ``fn`` above what was allocated before it; ``None`` on the CPU."""
        if self.device != "cuda":
            return None
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**30

    def sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def sub_index(ix: SparseIndex, hs: slice) -> SparseIndex:
    """The heads ``hs`` of an index, its causal mask and query offset kept."""
    return SparseIndex(ix.kv_idx[:, hs].contiguous(), ix.kv_count[:, hs].contiguous(), ix.group_size, ix.kv_block,
                       ix.seq_len_q, ix.seq_len_kv, ix.mask, ix.q_offset)


def dense_kind(device: str) -> str:
    """Row kind of the dense baseline: cuDNN SDPA on CUDA (the kind ``cp/cost_model.py`` reads),
    PyTorch's math SDPA on the CPU smoke path."""
    return "cudnn_dense" if device == "cuda" else "sdpa_math_dense"


def dense_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Dense attention: cuDNN SDPA on CUDA (no fallback to another backend), math SDPA on the CPU."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION if q.is_cuda else SDPBackend.MATH):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)


def fwd_bwd_fns(attn: Callable, q, k, v, do):
    """fwd, setup_bwd, bwd-only (graph built by setup_bwd) and fwd+bwd callables for ``attn(q, k, v) -> out``."""
    qg, kg, vg = (t.detach().clone().requires_grad_(True) for t in (q, k, v))

    def fwd():
        with torch.no_grad():
            attn(q, k, v)

    def fwd_bwd():
        out = attn(qg, kg, vg)
        torch.autograd.grad(out, (qg, kg, vg), do)

    state = {}

    def setup_bwd():
        state["out"] = attn(qg, kg, vg)

    def bwd():
        torch.autograd.grad(state["out"], (qg, kg, vg), do, retain_graph=True)

    return fwd, setup_bwd, bwd, fwd_bwd


def time_attention(timer: Timer, attn: Callable, q, k, v, do, row: Dict) -> Dict:
    """fwd, bwd, fwd+bwd medians and peak memory of ``attn(q, k, v) -> out``, written into ``row``
    as each is measured (a kernel whose backward fails keeps its forward time in the row)."""
    fwd, setup_bwd, bwd, fwd_bwd = fwd_bwd_fns(attn, q, k, v, do)
    row["fwd_ms"] = timer(fwd)
    setup_bwd()
    row["bwd_ms"] = timer(bwd)
    row["fwd_bwd_ms"] = timer(fwd_bwd)
    row["peak_mem_gib"] = timer.peak_mem_gib(fwd_bwd)
    return row


def first_calls(fn: SparseFn, q, k, v, do, timer: Timer) -> Dict[str, float]:
    """Host-clock seconds of the first forward and first backward of ``fn`` (JIT compilation
    included), then of the second ones: run before anything else calls ``fn`` at this shape."""
    res = {}
    for which in ("first", "second"):
        qg, kg, vg = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
        timer.sync()
        t0 = time.perf_counter()
        out, _ = fn(qg, kg, vg)
        timer.sync()
        t1 = time.perf_counter()
        torch.autograd.grad(out, (qg, kg, vg), do)
        timer.sync()
        res[f"{which}_fwd_s"], res[f"{which}_bwd_s"] = t1 - t0, time.perf_counter() - t1
    return res


class ReferenceCheck:
    """The fp32 reference of one index, computed once: out and LSE on the first ``heads`` heads,
    dq/dk/dv on head 0 (heads are independent, so head 0's gradients of the whole problem equal
    those of the one-head problem). :meth:`check` compares any kernel over that index with it."""

    def __init__(self, q, k, v, do, index: SparseIndex, heads: int = 2, scale: Optional[float] = None):
        self.index, self.do = index, do
        self.scale = q.shape[-1] ** -0.5 if scale is None else scale
        self.hs, self.h0 = slice(0, heads), slice(0, 1)
        with torch.no_grad():
            self.out, self.lse = sparse_attention_reference(
                q[:, self.hs].float(), k[:, self.hs].float(), v[:, self.hs].float(), sub_index(index, self.hs), self.scale)
        q0, k0, v0 = (t[:, self.h0].float().detach().requires_grad_(True) for t in (q, k, v))
        ro, _ = sparse_attention_reference(q0, k0, v0, sub_index(index, self.h0), self.scale)
        self.grads = torch.autograd.grad(ro, (q0, k0, v0), do[:, self.h0].float())
        self.rounding = {"out": rel(self.out.to(q.dtype), self.out),
                         **{n: rel(g.to(q.dtype), g) for n, g in zip(("dq", "dk", "dv"), self.grads)}}

    def errors(self, out, lse, dq, dk, dv) -> Dict:
        """Relative errors against the reference, whether every output is finite, and ``ok``
        (finite and every error below :data:`CHECK_TOL`); ``lse`` may be ``None``."""
        res = {"out": rel(out[:, self.hs], self.out)}
        if lse is not None:
            res["lse"] = rel(lse[:, self.hs], self.lse)
        res.update(dq=rel(dq[:, self.h0], self.grads[0]), dk=rel(dk[:, self.h0], self.grads[1]),
                   dv=rel(dv[:, self.h0], self.grads[2]))
        res["all_finite"] = all(bool(torch.isfinite(t).all()) for t in (out, dq, dk, dv) + ((lse,) if lse is not None else ()))
        res["ok"] = res["all_finite"] and all(math.isfinite(x) and x < CHECK_TOL for n, x in res.items() if n != "all_finite")
        return res

    def run(self, fn: SparseFn, q, k, v):
        """``fn``'s (out, lse, dq, dk, dv) with the reference's upstream gradient."""
        qg, kg, vg = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
        out, lse = fn(qg, kg, vg)
        return (out, lse, *torch.autograd.grad(out, (qg, kg, vg), self.do))

    def check(self, fn: SparseFn, q, k, v, against: Optional[Tuple] = None) -> Dict:
        """:meth:`errors` of ``fn``; with ``against`` (another kernel's :meth:`run` on the same
        index), also the relative difference to it under ``vs_ours``."""
        got = self.run(fn, q, k, v)
        res = self.errors(*got)
        if against is not None:
            res["vs_ours"] = {n: rel(a, b) for n, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, against)
                              if a is not None and b is not None}
        return res


def cudnn_status(q: torch.Tensor, k: torch.Tensor, index: SparseIndex) -> Tuple[str, str]:
    """``("ok", what runs)``, ``("not_importable", why)`` or ``("unsupported", why)`` for cuDNN's
    block-sparse attention on these inputs; the case rule is :func:`cudnn_supported`'s."""
    missing = cudnn_import_error()
    if missing is not None:
        return "not_importable", missing
    ok, why = cudnn_supported(q, k, index)
    return ("ok" if ok else "unsupported"), why


def cudnn_fn(index: SparseIndex) -> SparseFn:
    from megatron_dsv.ops.sparse_attention.cudnn import sparse_attention_cudnn

    return lambda q, k, v: sparse_attention_cudnn(q, k, v, index)


def random_block_index(b: int, h: int, s: int, block: int, k_blocks: int, device, seed: int = 0) -> SparseIndex:
    """A :class:`SparseIndex` with ``block``-token query groups and key blocks, every group
    attending to ``k_blocks`` distinct random key blocks (ascending); the same for a given seed."""
    nb = s // block
    if s % block or not 1 <= k_blocks <= nb:
        raise ValueError(f"S={s} must be a multiple of block={block} and 1 <= k_blocks={k_blocks} <= {nb}.")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    idx = torch.rand(b, h, nb, nb, generator=gen).argsort(dim=-1)[..., :k_blocks].sort(dim=-1).values.to(torch.int32)
    return SparseIndex(idx.to(device), torch.full((b, h), k_blocks, dtype=torch.int32, device=device), block, block, s, s)


def flex_block_mask(index: SparseIndex):
    """FlexAttention's ``BlockMask`` of an index whose query groups and key blocks have the same
    size: every listed block full (no ``mask_mod``), each head's count broadcast over its groups."""
    from torch.nn.attention.flex_attention import BlockMask

    if index.group_size != index.kv_block or index.mask is not None:
        raise ValueError(
            f"FlexAttention's block mask here needs equal query groups and key blocks and no causal mask; "
            f"got groups of {index.group_size}, key blocks of {index.kv_block}, mask {index.mask}."
        )
    b, h, nq, kmax = index.kv_idx.shape
    nkv = index.num_kv_units
    # BlockMask rebuilds the transposed (key-major) lists from a dense [.., nq, nkv] table, so the
    # index rows are padded to nkv columns; entries past the count are never read.
    idx = torch.zeros(b, h, nq, nkv, dtype=torch.int32, device=index.kv_idx.device)
    idx[..., :kmax] = index.kv_idx.clamp(min=0)
    full_num = index.kv_count.unsqueeze(-1).expand(b, h, nq).contiguous().to(torch.int32)
    partial_num = torch.zeros_like(full_num)
    return BlockMask.from_kv_blocks(partial_num, idx.clone(), full_num, idx, BLOCK_SIZE=index.kv_block)


class FlexPeer:
    """FlexAttention over block masks, compiled once (``torch.compile(flex_attention)``) and owned
    by this object, not by the module.

    ``torch.compile`` specialises on every (S, D, block) (``dynamic=False``); the benchmark grid has
    12 of them, over dynamo's default limit of 8 recompiles per function, past which it would run
    flex eagerly (a dense S x S score matrix) without saying so. Each call therefore raises the
    limit and makes hitting it an error. Blocks under 128 pass forward tiles of 64x64: torch 2.11's
    SM90 bf16 default forward tiles (template_heuristics/triton.py, read, not measured) are 128x64
    at D=128 and 128x128 at D=64, which a 64-token block refuses. Its SM90 backward tiles
    (64, 128, 128, 64) at D=64..128 take no such option (configs whose tiles do not divide the block
    are dropped before options apply), so 64x64 is expected to fail to compile its backward there:
    that is recorded as a row, as TARGETS.md saw it.
    """

    def __init__(self, recompile_limit: int = 64):
        self._compiled = None
        self.recompile_limit = recompile_limit

    def _fn(self):
        if self._compiled is None:
            import torch._functorch.config
            from torch.nn.attention.flex_attention import flex_attention

            # Process-wide, on purpose: AOT autograd lets a compiled backward free ("donate") saved
            # activations, and then refuses ``backward(retain_graph=True)``, the way the timing
            # repeats one backward. The refusal is checked when the backward runs, against the
            # global setting (a graph compiled under a patch still fails: every Flex row of
            # 283790d did), so the benchmark process turns donation off before the first compile.
            torch._functorch.config.donated_buffer = False
            self._compiled = torch.compile(flex_attention, dynamic=False)
        return self._compiled

    def _limits(self):
        import torch._dynamo

        return torch._dynamo.config.patch(recompile_limit=self.recompile_limit, fail_on_recompile_limit_hit=True)

    def attention(self, index: SparseIndex) -> SparseFn:
        """``fn(q, k, v) -> (out, lse)`` over ``index`` (natural-log LSE, as FlexAttention returns)."""
        mask = flex_block_mask(index)
        opts = {"fwd_BLOCK_M": 64, "fwd_BLOCK_N": 64} if index.kv_block < 128 else None
        fn = self._fn()

        def attn(q, k, v):
            with self._limits():
                return fn(q, k, v, block_mask=mask, return_lse=True, kernel_options=opts)

        return attn


__all__ = [
    "CHECK_TOL", "FlexPeer", "ReferenceCheck", "Timer", "cudnn_fn", "cudnn_status", "dense_kind", "dense_sdpa",
    "env_info", "first_calls", "first_line", "flex_block_mask", "fwd_bwd_fns", "random_block_index", "rel",
    "sub_index", "time_attention",
]
