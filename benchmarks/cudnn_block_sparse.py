"""cuDNN frontend's block-sparse attention (our ``cudnn`` backend) vs our Triton kernel vs cuDNN dense.

One GPU, one process, the same inputs and the same ``select_topk`` index (64-query groups, 64-key
blocks) for both sparse kernels:
1. first-call cost of the cuDNN block-sparse forward and backward (JIT compilation of the CuTe DSL
   kernels), for the bhsd layout and for the layer's layout (``[S, B, H, D]`` views, ``out_sbhd``),
   measured once with a host clock and kept out of every timing below;
2. correctness at the benchmark shape for both sparse kernels: out and LSE on two heads, dq/dk/dv on
   head 0, relative to the fp32 reference, next to the error of that reference rounded to bf16;
   and the layer's layout against the bhsd layout;
3. ``triton.testing.do_bench`` medians: cuDNN SDPA dense fwd / bwd / fwd+bwd, selection, and each
   sparse kernel's fwd / bwd / fwd+bwd (bhsd) and fwd+bwd in the layer's layout.
Speedup = dense fwd+bwd / (selection + sparse fwd+bwd); TF/s count 4*pairs*D FLOPs forward (x3.5
fwd+bwd) of the computed pairs.

    python benchmarks/cudnn_block_sparse.py --sparsities 0.9,0.95 --out results.json

The kernel table with every peer (cuDNN dense, ours, cuDNN block-sparse, FlexAttention) over S, D
and sparsity is ``benchmarks/attention.py``; this script adds the layer's layout and its cost.
Both share ``benchmarks/sparse_peers.py`` (timer, reference check, first calls, dense SDPA).
"""

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks.sparse_peers import ReferenceCheck, Timer, dense_sdpa, env_info, first_calls, rel  # noqa: E402
from megatron_dsv.ops.selection import select_topk  # noqa: E402
from megatron_dsv.ops.sparse_attention import sparse_attention  # noqa: E402
from megatron_dsv.ops.sparse_attention.cudnn import cudnn_supported, sparse_attention_cudnn  # noqa: E402
from megatron_dsv.ops.sparse_index import k_from_sparsity  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=65536)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--rank", type=int, default=16, help="low-rank dimension of the selection inputs")
    p.add_argument("--sparsities", default="0.9,0.95")
    p.add_argument("--warmup", type=int, default=100, help="do_bench warm-up, ms")
    p.add_argument("--rep", type=int, default=500, help="do_bench repetition time, ms")
    p.add_argument("--out", required=True)
    return p.parse_args()


def bench(fn):
    return Timer("cuda", ARGS.warmup, ARGS.rep)(fn)


def sbhd_views(*ts):
    """[B, H, S, D] views of [S, B, H, D] copies: the layout DSVCoreAttention passes."""
    return tuple(t.permute(2, 0, 1, 3).contiguous().permute(1, 2, 0, 3) for t in ts)


def backends(index):
    return {
        "triton": lambda q, k, v, sbhd=False: sparse_attention(q, k, v, index, backend="triton", out_layout="sbhd" if sbhd else "bhsd"),
        "cudnn": lambda q, k, v, sbhd=False: sparse_attention_cudnn(q, k, v, index, out_sbhd=sbhd),
    }


def check(index, q, k, v, do):
    """Errors of both kernels vs the fp32 reference (out/LSE on 2 heads, grads on head 0), next to
    the reference's own bf16 rounding, and each kernel's layer layout against its bhsd layout."""
    ref = ReferenceCheck(q, k, v, do, index)
    res = {"bf16_rounding_of_reference": ref.rounding}
    qs, ks, vs, dos = sbhd_views(q, k, v, do)
    for name, fn in backends(index).items():
        try:
            out, lse, dq, dk, dv = ref.run(fn, q, k, v)
            r = ref.errors(out, lse, dq, dk, dv)
            # the layer's layout (sbhd views in, sbhd out) against bhsd: same kernels, other strides
            qsg, ksg, vsg = (t.detach().clone().requires_grad_(True) for t in (qs, ks, vs))
            outs, lses = fn(qsg, ksg, vsg, True)
            dqs, dks, dvs = torch.autograd.grad(outs, (qsg, ksg, vsg), dos)
            r["sbhd_vs_bhsd"] = {"out": rel(outs, out), "lse": rel(lses, lse), "dq": rel(dqs, dq), "dk": rel(dks, dk),
                                 "dv": rel(dvs, dv), "out_is_sbhd_memory": outs.permute(2, 0, 1, 3).is_contiguous()}
            del out, lse, dq, dk, dv, outs, lses, dqs, dks, dvs
        except Exception as err:  # record and go on: the other kernel's numbers still count
            r = {"error": f"{type(err).__name__}: {err}"[:2000]}
        res[name] = r
        torch.cuda.empty_cache()
    return res


def time_kernel(fn, q, k, v, do, qs, ks, vs, dos):
    qg, kg, vg = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    qsg, ksg, vsg = (t.detach().clone().requires_grad_(True) for t in (qs, ks, vs))

    def fwd():
        with torch.no_grad():
            fn(q, k, v)

    def fwd_bwd():
        torch.autograd.grad(fn(qg, kg, vg)[0], (qg, kg, vg), do)

    def fwd_bwd_layer():
        torch.autograd.grad(fn(qsg, ksg, vsg, True)[0], (qsg, ksg, vsg), dos)

    out = fn(qg, kg, vg)[0]

    def bwd():
        torch.autograd.grad(out, (qg, kg, vg), do, retain_graph=True)

    r = {"fwd_ms": bench(fwd), "bwd_ms": bench(bwd), "fwd_bwd_ms": bench(fwd_bwd), "fwd_bwd_layer_layout_ms": bench(fwd_bwd_layer)}
    del out
    r["peak_mem_gib"] = Timer("cuda").peak_mem_gib(fwd_bwd)
    return r


def main():
    info = env_info("cuda")
    print(f"# {info}", flush=True)
    b, h, s, d, r = ARGS.batch, ARGS.heads, ARGS.seqlen, ARGS.head_dim, ARGS.rank
    result = {"env": info, "args": vars(ARGS), "rows": []}

    def save():
        with open(ARGS.out, "w") as f:
            json.dump(result, f, indent=1)

    torch.manual_seed(0)
    q, k, v, do = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    q_lr, k_lr = (torch.randn(b, h, s, r, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    qs, ks, vs, dos = sbhd_views(q, k, v, do)
    sparsities = [float(x) for x in ARGS.sparsities.split(",") if x]
    n_blocks = s // 64
    first_k = int(k_from_sparsity(torch.tensor(sparsities[0]), n_blocks))
    index = select_topk(q_lr, k_lr, 64, first_k, kv_block=64, backend="triton")
    result["cudnn_supported"] = cudnn_supported(q, k, index)
    print(f"cudnn_supported: {result['cudnn_supported']}", flush=True)

    # 1. first calls, before anything else runs either kernel in this process
    result["first_call"] = {}
    for name, fn in backends(index).items():
        for sbhd in (False, True):
            key = f"{name}_{'sbhd' if sbhd else 'bhsd'}"
            try:
                args = (qs, ks, vs, dos) if sbhd else (q, k, v, do)
                result["first_call"][key] = first_calls(lambda q_, k_, v_: fn(q_, k_, v_, sbhd), *args, Timer("cuda"))
            except Exception as err:
                result["first_call"][key] = {"error": f"{type(err).__name__}: {err}"[:2000]}
            print(f"first call {key}: {result['first_call'][key]}", flush=True)
    save()

    # 2. correctness at the benchmark shape (first sparsity)
    result["check"] = check(index, q, k, v, do)
    result["check"].update(S=s, D=d, sparsity=sparsities[0], K_blocks=first_k)
    print(f"check: {json.dumps(result['check'])}", flush=True)
    save()
    del index
    torch.cuda.empty_cache()

    # 3. timings
    dense = {"kind": "cudnn_sdpa_dense", "S": s, "D": d}
    dense.update(time_kernel(lambda q_, k_, v_, sbhd=False: (dense_sdpa(q_, k_, v_), None), q, k, v, do, qs, ks, vs, dos))
    dense_flops = 4.0 * b * h * s * s * d
    dense.update(fwd_tflops=dense_flops / dense["fwd_ms"] / 1e9, fwd_bwd_tflops=3.5 * dense_flops / dense["fwd_bwd_ms"] / 1e9)
    result["rows"].append(dense)
    print(f"dense: {dense}", flush=True)
    save()
    for sp in sparsities:
        kh = int(k_from_sparsity(torch.tensor(sp), n_blocks))
        index = select_topk(q_lr, k_lr, 64, kh, kv_block=64, backend="triton")
        t_sel = bench(lambda: select_topk(q_lr, k_lr, 64, kh, kv_block=64, backend="triton"))
        flops = 4.0 * index.computed_pairs() * d
        for name, fn in backends(index).items():
            row = {"kind": f"{name}_block_sparse", "S": s, "D": d, "sparsity": 1.0 - kh / n_blocks, "K_blocks": kh,
                   "select_ms": t_sel}
            try:
                row.update(time_kernel(fn, q, k, v, do, qs, ks, vs, dos))
                total = t_sel + row["fwd_bwd_ms"]
                row.update(
                    total_ms=total, speedup_fwd_bwd=dense["fwd_bwd_ms"] / total,
                    speedup_fwd_bwd_layer_layout=dense["fwd_bwd_ms"] / (t_sel + row["fwd_bwd_layer_layout_ms"]),
                    fwd_tflops=flops / row["fwd_ms"] / 1e9, fwd_bwd_tflops=3.5 * flops / row["fwd_bwd_ms"] / 1e9,
                )
            except Exception as err:
                row["error"] = f"{type(err).__name__}: {err}"[:2000]
            result["rows"].append(row)
            print(f"{row}", flush=True)
            save()
        del index
        torch.cuda.empty_cache()
    # what the sbhd output costs when the kernel cannot write it (B > 1): one [S, B, H, D] copy
    out = torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16)
    result["sbhd_copy_ms"] = bench(lambda: out.permute(2, 0, 1, 3).contiguous())
    save()
    print_table(result)


def print_table(result):
    rows = result["rows"]
    dense = rows[0]
    print(f"\n{result['env']['gpu']}, torch {result['env']['torch']}, triton {result['env']['triton']}, "
          f"cudnn-frontend {result['env']['nvidia-cudnn-frontend']}, commit {result['env']['git_commit'][:12]}")
    print(f"cuDNN dense: fwd {dense['fwd_ms']:.2f} ms, bwd {dense['bwd_ms']:.2f}, fwd+bwd {dense['fwd_bwd_ms']:.2f} "
          f"({dense['fwd_bwd_tflops']:.0f} TF/s)")
    print("| kernel | sparsity | select ms | fwd ms | bwd ms | fwd+bwd ms | layer layout fwd+bwd ms | speedup | fwd+bwd TF/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows[1:]:
        if "error" in r:
            print(f"| {r['kind']} | {r['sparsity']:.3f} | error: {r['error'][:80]} |")
            continue
        print(f"| {r['kind']} | {r['sparsity']:.3f} | {r['select_ms']:.2f} | {r['fwd_ms']:.2f} | {r['bwd_ms']:.2f} | "
              f"{r['fwd_bwd_ms']:.2f} | {r['fwd_bwd_layer_layout_ms']:.2f} | x{r['speedup_fwd_bwd']:.2f} | {r['fwd_bwd_tflops']:.0f} |")
    print(f"sbhd copy of out: {result['sbhd_copy_ms']:.3f} ms")


if __name__ == "__main__":
    ARGS = parse_args()
    main()
