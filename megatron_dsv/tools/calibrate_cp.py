"""Measure this cluster's links for the context-parallel planner and write a calibration JSON.

    torchrun --nproc-per-node 8 [--nnodes 2 ...] -m megatron_dsv.tools.calibrate_cp --out cal.json \\
        --seq-len 131072 --heads 16 --head-dim 128

Times all-to-all and point-to-point ring steps over all launched ranks (NCCL on GPUs, else gloo)
at the message sizes one layer of that shape sends, inside a node and across nodes where there
are peers (:func:`megatron_dsv.cp.calibration.measure_links`), and writes the fitted bandwidth and
latency per link kind with the raw samples (rank 0 writes). Launch it with the ranks of one CP
group (``--nproc-per-node`` = the GPUs of a node, ``--nnodes`` = the nodes one CP group spans).
Use the file with ``python -m megatron_dsv.tools.simulate_cp --calibration cal.json`` or
``CostModel.from_benchmark(calibration="cal.json")``.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from megatron_dsv.cp.calibration import layer_message_bytes, measure_links
from megatron_dsv.cp.cost_model import AttentionShape, Calibration


def main(argv: Optional[Sequence[str]] = None) -> Calibration:
    """Measure over the default process group (initialised here from torchrun's environment when
    it is not yet); rank 0 writes ``--out``. Returns the calibration (the same on every rank)."""
    p = argparse.ArgumentParser(prog="python -m megatron_dsv.tools.calibrate_cp", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="calibration JSON to write")
    p.add_argument("--seq-len", type=int, default=131072, help="tokens per sample of the layer whose messages are timed")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=None, help="key/value heads (GQA); default: --heads")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--max-mib", type=float, default=256.0, help="largest message per peer (MiB)")
    p.add_argument("--message-bytes", type=int, nargs="+", default=None,
                   help="explicit per-peer message sizes (bytes) instead of the layer's")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)

    owns_group = not dist.is_initialized()
    if owns_group:
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            p.error("run under torchrun (RANK and WORLD_SIZE unset), e.g. "
                    "`torchrun --nproc-per-node 2 -m megatron_dsv.tools.calibrate_cp --out cal.json`.")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    try:
        world = dist.get_world_size()
        if args.message_bytes:
            sizes = args.message_bytes
        else:
            shape = AttentionShape(args.seq_len, args.heads, args.head_dim, args.kv_heads, args.batch)
            sizes = layer_message_bytes(shape, world, max_bytes=int(args.max_mib * 2**20))
        cal = measure_links(None, message_bytes=sizes, warmup=args.warmup, repeats=args.repeats)
        if dist.get_rank() == 0:
            cal.save(args.out)
            e = cal.env
            print(f"# {e['world_size']} ranks on {e['nodes']} node(s), {e['backend']}, {e['device']}; "
                  f"per-peer messages {e['message_bytes']} bytes")
            for kind, link in cal.links.items():
                print(f"{kind}: {link.gbps:.4g} GB/s per GPU per direction, latency {link.latency_ms:.4g} ms")
            print(f"wrote {args.out}")
        return cal
    finally:
        if owns_group:
            dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
