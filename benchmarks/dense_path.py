"""Dense path of DSVCoreAttention vs raw cuDNN SDPA, same inputs, one run (GPU).

    python benchmarks/dense_path.py --out benchmarks/results/dense_path.json

Times forward and forward+backward of (a) ``F.scaled_dot_product_attention`` under
``sdpa_kernel(CUDNN_ATTENTION)`` on ``[B, H, S, D]`` and (b) ``DSVCoreAttention`` in dense mode
(``--dsv-mode dense``) on Megatron's ``[s, b, h, d]`` layout, including its permutes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def git_commit() -> str:
    """The launcher's ``DSV_COMMIT`` (the device copy of the tree may carry stale git metadata),
    else ``git rev-parse HEAD``."""
    commit = os.environ.get("DSV_COMMIT")
    if not commit:
        try:
            commit = subprocess.check_output(["git", "rev-parse", "HEAD"], text=True, stderr=subprocess.DEVNULL).strip()
        except Exception:
            commit = "unknown"
    return commit


def env_info():
    import triton

    commit = git_commit()
    return {
        "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
        "cuda": torch.version.cuda, "commit": commit,
    }


def main():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from triton.testing import do_bench

    from megatron.core.transformer.enums import AttnMaskType

    from megatron_dsv.layers.attention import DSVCoreAttention
    from megatron_dsv.layers.transformer_config import DSVTransformerConfig
    from megatron_dsv.runtime.megatron import init_megatron

    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None)
    p.add_argument("--shapes", default="16x32768x128,16x65536x128,16x32768x64")
    args = p.parse_args()
    init_megatron("cuda")
    rows = []
    for shape in args.shapes.split(","):
        h, s, d = (int(x) for x in shape.split("x"))
        cfg = DSVTransformerConfig(
            num_layers=1, num_attention_heads=h, hidden_size=h * d, kv_channels=d, ffn_hidden_size=4 * h * d,
            hidden_dropout=0.0, attention_dropout=0.0, bf16=True, params_dtype=torch.bfloat16, dsv_mode="dense",
        )
        core = DSVCoreAttention(config=cfg, layer_number=1, attn_mask_type=AttnMaskType.no_mask, attention_type="self").cuda()
        q, k, v = (torch.randn(s, 1, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        qb, kb, vb = (t.detach().permute(1, 2, 0, 3).contiguous().requires_grad_(True) for t in (q, k, v))

        def cudnn_fwd():
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return F.scaled_dot_product_attention(qb, kb, vb)

        def ours_fwd():
            return core(q, k, v, None)

        with torch.no_grad():
            same = torch.equal(ours_fwd().view(s, 1, h, d).permute(1, 2, 0, 3), cudnn_fwd())
        go_b = torch.randn(1, h, s, d, device="cuda", dtype=torch.bfloat16)
        go_s = go_b.permute(2, 0, 1, 3).reshape(s, 1, h * d).contiguous()
        res = {"H": h, "S": s, "D": d, "same_output": same}
        for name, fwd, go in (("cudnn_sdpa", cudnn_fwd, go_b), ("dsv_dense", ours_fwd, go_s)):
            with torch.no_grad():
                res[f"{name}_fwd_ms"] = do_bench(fwd, warmup=50, rep=300, return_mode="median")
            res[f"{name}_fwdbwd_ms"] = do_bench(lambda: fwd().backward(go), warmup=50, rep=300, return_mode="median", grad_to_none=[q, k, v, qb, kb, vb])
        flops = 4 * s * s * d * h
        res["cudnn_fwd_tflops"] = flops / res["cudnn_sdpa_fwd_ms"] / 1e9
        res["dsv_dense_over_cudnn_fwd"] = res["dsv_dense_fwd_ms"] / res["cudnn_sdpa_fwd_ms"]
        res["dsv_dense_over_cudnn_fwdbwd"] = res["dsv_dense_fwdbwd_ms"] / res["cudnn_sdpa_fwdbwd_ms"]
        rows.append(res)
        print(json.dumps(res))
    out = {"env": env_info(), "results": rows}
    print("\n| H | S | D | cuDNN fwd ms | DSV dense fwd ms | cuDNN fwd+bwd ms | DSV dense fwd+bwd ms | ratio fwd+bwd |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['H']} | {r['S']} | {r['D']} | {r['cudnn_sdpa_fwd_ms']:.2f} | {r['dsv_dense_fwd_ms']:.2f} | "
              f"{r['cudnn_sdpa_fwdbwd_ms']:.2f} | {r['dsv_dense_fwdbwd_ms']:.2f} | {r['dsv_dense_over_cudnn_fwdbwd']:.3f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
