"""One step of the dense context-parallel ring on one GPU: attention of a query chunk over one
key/value chunk, forward returning the log-sum-exp and backward against the *merged* out/LSE.

    python benchmarks/cp_chunk.py --out benchmarks/results/cp_chunk_h100.json

Variants, same inputs, one run: (a) public cuDNN SDPA forward+backward (the dense baseline, no
LSE out, cannot serve a ring), (b) our Triton kernels with an all-blocks index
(``sparse_attention_fwd``/``sparse_attention_bwd``: what the ring uses), (c) PyTorch's cuDNN op
with ``compute_log_sumexp`` and its backward fed the merged out/LSE, (d) the same with the flash
op. Correctness first: each variant's two-chunk ring (merge + per-chunk backward) against SDPA on
the concatenated keys.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks.dense_path import env_info  # noqa: E402


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# The private ops' backward takes the forward's auxiliary outputs (cumulative lengths, RNG
# state); they are kept per (query, key chunk) call, keyed by the chunk's data pointer.
_AUX = {}


def cudnn_fwd(q, k, v, scale):
    """The ring's own GPU step (``megatron_dsv.cp.seq_parallel._CudnnChunk``)."""
    from megatron_dsv.cp.seq_parallel import _CudnnChunk

    out, lse, aux = _CudnnChunk.forward(q, k, v, scale)
    _AUX[("cudnn", k.data_ptr())] = aux
    return out, lse


def cudnn_bwd(q, k, v, out, lse, do, scale):
    from megatron_dsv.cp.seq_parallel import _CudnnChunk

    return _CudnnChunk.backward(q, k, v, out, lse, do, scale, _AUX[("cudnn", k.data_ptr())])


def flash_fwd(q, k, v, scale):
    res = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)
    _AUX[("flash", k.data_ptr())] = res
    return res[0], res[1].float()


def flash_bwd(q, k, v, out, lse, do, scale):
    o0, lse0, cq, ck, mq, mk, rng, unused, _ = _AUX[("flash", k.data_ptr())]
    return torch.ops.aten._scaled_dot_product_flash_attention_backward(
        do, q, k, v, out, lse.to(lse0.dtype).reshape(lse0.shape).contiguous(), cq, ck, mq, mk, 0.0, False, rng, unused,
        scale=scale,
    )


def main():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from triton.testing import do_bench

    from megatron_dsv.cp.seq_parallel import _merge, full_index
    from megatron_dsv.ops.sparse_attention import sparse_attention_bwd, sparse_attention_fwd

    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None)
    p.add_argument("--shapes", default="16x16384x128,16x32768x128,16x16384x64")
    p.add_argument("--kv-block", type=int, default=64)
    p.add_argument("--group", type=int, default=64)
    args = p.parse_args()
    rows = []

    for shape in args.shapes.split(","):
        h, s, d = (int(x) for x in shape.split("x"))
        scale = d**-0.5
        torch.manual_seed(0)
        q = torch.randn(1, h, s, d, device="cuda", dtype=torch.bfloat16)
        ks = [torch.randn(1, h, s, d, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
        vs = [torch.randn(1, h, s, d, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
        do = torch.randn_like(q)
        index = full_index(1, h, s, s, args.group, args.kv_block, q.device)

        def triton_fwd(q_, k_, v_, sc):
            return sparse_attention_fwd(q_, k_, v_, index, sc, backend="triton")

        def triton_bwd(q_, k_, v_, o_, l_, do_, sc):
            return sparse_attention_bwd(q_, k_, v_, o_, l_, do_, index, sc, backend="triton")

        # reference: SDPA over the concatenated keys, grads by autograd (fp32 math on bf16 inputs)
        qr, kr, vr = (t.detach().float().requires_grad_(True) for t in (q, torch.cat(ks, 2), torch.cat(vs, 2)))
        with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
            ref = F.scaled_dot_product_attention(qr, kr, vr, scale=scale)
        ref_grads = torch.autograd.grad(ref, (qr, kr, vr), do.float())
        base = rel(ref.to(torch.bfloat16), ref)

        variants = {"triton": (triton_fwd, triton_bwd), "cudnn_op": (cudnn_fwd, cudnn_bwd), "flash_op": (flash_fwd, flash_bwd)}
        row = {"H": h, "S_chunk": s, "D": d, "bf16_rounding_rel_err": base}
        for name, (fwd, bwd) in variants.items():
            try:
                out = lse = None
                for k_, v_ in zip(ks, vs):
                    o, l = fwd(q, k_, v_, scale)
                    out, lse = _merge(out, lse, o, l)
                out = out.to(q.dtype)
                grads = [bwd(q, k_, v_, out, lse, do, scale) for k_, v_ in zip(ks, vs)]
                dq = sum(g[0].float() for g in grads)
                dk = torch.cat([g[1].float() for g in grads], 2)
                dv = torch.cat([g[2].float() for g in grads], 2)
                errs = {"out": rel(out, ref), "dq": rel(dq, ref_grads[0]), "dk": rel(dk, ref_grads[1]), "dv": rel(dv, ref_grads[2])}
                ok = all(e < 2 * base + 2e-2 for e in errs.values())
                o1, l1 = fwd(q, ks[0], vs[0], scale)
                t_f = do_bench(lambda: fwd(q, ks[0], vs[0], scale), warmup=10, rep=30)
                t_b = do_bench(lambda: bwd(q, ks[0], vs[0], o1.to(q.dtype), l1, do, scale), warmup=10, rep=30)
                row[name] = {"errors": errs, "correct": ok, "fwd_ms": t_f, "bwd_ms": t_b, "fwd_bwd_ms": t_f + t_b}
            except Exception as exc:  # report and go on: the private ops may not exist or differ
                row[name] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        qd, kd, vd = (t.detach().clone().requires_grad_(True) for t in (q, ks[0], vs[0]))

        def sdpa_fb():
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                o = F.scaled_dot_product_attention(qd, kd, vd, scale=scale)
            o.backward(do)

        def sdpa_f():
            with torch.no_grad(), sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                F.scaled_dot_product_attention(qd, kd, vd, scale=scale)

        t_f = do_bench(sdpa_f, warmup=10, rep=30)
        t_fb = do_bench(sdpa_fb, warmup=10, rep=30)
        flops = 4 * h * s * s * d
        row["cudnn_sdpa"] = {"fwd_ms": t_f, "fwd_bwd_ms": t_fb, "fwd_tflops": flops / t_f / 1e9, "fwd_bwd_tflops": 3.5 * flops / t_fb / 1e9}
        for name in variants:
            if "fwd_bwd_ms" in row[name]:
                row[name]["vs_cudnn_sdpa_fwd_bwd"] = row[name]["fwd_bwd_ms"] / t_fb
        rows.append(row)
        print(json.dumps(row, indent=1), flush=True)
    result = {"env": env_info(), "args": vars(args), "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
