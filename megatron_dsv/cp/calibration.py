"""Measure the cost model's links on real process groups: bandwidth and latency per link kind.

:func:`measure_links` times, on the group the planner plans for, the two communication patterns
the cost model uses (:mod:`megatron_dsv.cp.cost_model`): an all-to-all (``all_to_all_single``
with split sizes, as the head exchange and the key fetch send) and point-to-point ring steps
(``batch_isend_irecv``, as the dense ring sends), each among peers inside a node (``intra``) and
among peers in other nodes (``inter``), at the message sizes a layer sends
(:func:`layer_message_bytes`). Every timed repetition is the slowest rank's (an all-reduce of the
times), so every rank gets the same :class:`~megatron_dsv.cp.cost_model.Calibration` and plans
alike. A link kind the group has no peers for (``inter`` on one node) is not measured and stays
assumed. A few hundred ms at the default sizes on GPUs.

Run it once per cluster with ``torchrun ... -m megatron_dsv.tools.calibrate_cp --out cal.json``,
or in-process at start-up on the CP group.
"""

from __future__ import annotations

import datetime
import socket
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from megatron_dsv.cp.groups import collective_device
from megatron_dsv.cp.cost_model import AttentionShape, Calibration, fit_link

LATENCY_PROBE_BYTES = 64 * 1024
"""A message small enough that its time is mostly latency (anchors the latency of the fit)."""


def layer_message_bytes(shape: AttentionShape, cp_size: int, max_bytes: int = 256 * 2**20) -> List[int]:
    """Per-peer message sizes one layer sends under CP, ascending, capped at ``max_bytes``.

    The head all-to-all's output (``S/N`` tokens of ``H/N`` heads) and q,k,v (plus ``2 H_kv/N``
    key/value heads) at the largest head split, the predictor-key all-gather (``S/N`` tokens, ``H``
    heads at rank ``r``), a dense ring step's K,V chunk (``S/N`` tokens, ``H_kv`` heads), and
    :data:`LATENCY_PROBE_BYTES`.
    """
    if cp_size < 2:
        raise ValueError(f"layer_message_bytes needs a CP size >= 2 (there is nothing to send), got {cp_size}.")
    s = shape.seq_len // cp_size
    tok = shape.batch * shape.head_dim * shape.bytes_per_elem
    h = max(1, shape.num_heads // cp_size)
    kv = max(1, shape.num_kv_heads // cp_size)
    sizes = {
        LATENCY_PROBE_BYTES,
        s * h * tok,
        s * (h + 2 * kv) * tok,
        s * shape.num_heads * shape.batch * shape.predictor_rank * shape.bytes_per_elem,
        2 * s * shape.num_kv_heads * tok,
    }
    return sorted({min(int(x), int(max_bytes)) for x in sizes})


def _node_ids(group, nodes: Optional[Sequence[int]]) -> List[int]:
    n = dist.get_world_size(group)
    if nodes is None:
        hosts: List[Optional[str]] = [None] * n
        dist.all_gather_object(hosts, socket.gethostname(), group=group)
        order: Dict[str, int] = {}
        return [order.setdefault(h, len(order)) for h in hosts]
    nodes = [int(x) for x in nodes]
    if len(nodes) != n:
        raise ValueError(f"nodes needs one node id per rank of the group ({n}), got {len(nodes)}.")
    return nodes


def _ring(members: List[int], me: int):
    """(next, previous) of ``me`` in the ring ``members`` (None when it has no peer there)."""
    if me not in members or len(members) < 2:
        return None
    i = members.index(me)
    return members[(i + 1) % len(members)], members[(i - 1) % len(members)]


def _time(op: Callable[[], None], group, device, warmup: int, repeats: int) -> float:
    """Median over ``repeats`` of the slowest rank's time of ``op`` (ms), the same on every rank."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        op()
    sync()
    times = []
    for _ in range(repeats):
        dist.barrier(group=group)
        sync()
        t0 = time.perf_counter()
        op()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    t = torch.tensor(times, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return statistics.median(t.cpu().tolist())


def measure_links(
    group=None,
    *,
    message_bytes: Sequence[int],
    nodes: Optional[Sequence[int]] = None,
    warmup: int = 2,
    repeats: int = 5,
) -> Calibration:
    """Measure bandwidth and latency of every link kind ``group`` has peers for. Collective.

    Args:
        group: the process group to measure (the CP group); None: the default group.
        message_bytes: bytes each rank sends to one peer per message, at least two distinct sizes
            (e.g. :func:`layer_message_bytes`).
        nodes: node id of each rank of ``group`` (which peers are ``intra``); None: ranks on the
            same host (hostname) share a node.
        warmup, repeats: untimed and timed repetitions per size and link kind.

    Returns:
        A :class:`~megatron_dsv.cp.cost_model.Calibration`, identical on every rank. An
        all-to-all sample counts a rank's bytes to all its peers of the kind (``size x peers``,
        the most any rank has), a ring-step sample the bytes to one peer.
    """
    sizes = sorted({int(b) for b in message_bytes})
    if len(sizes) < 2 or sizes[0] < 1:
        raise ValueError(f"message_bytes needs at least two distinct sizes >= 1 byte, got {list(message_bytes)}.")
    if warmup < 0 or repeats < 1:
        raise ValueError(f"warmup ({warmup}) must be >= 0 and repeats ({repeats}) >= 1.")
    n, me = dist.get_world_size(group), dist.get_rank(group)
    if n < 2:
        raise ValueError("measure_links needs a group of at least 2 ranks.")
    device = collective_device(group)
    node = _node_ids(group, nodes)
    local = [sum(1 for q in range(r) if node[q] == node[r]) for r in range(n)]  # index within its node
    buf = torch.zeros(2 * sizes[-1] * (n - 1), dtype=torch.uint8, device=device)
    samples: Dict[str, List[List[float]]] = {}
    for kind in ("intra", "inter"):
        same = kind == "intra"
        peers = [[q for q in range(n) if q != r and (node[q] == node[r]) == same] for r in range(n)]
        most = max(len(p) for p in peers)
        if most == 0:
            continue
        mine = set(peers[me])
        a2a = samples.setdefault(f"{kind}_a2a", [])
        for size in sizes:
            splits = [size if q in mine else 0 for q in range(n)]
            total = sum(splits)
            send, recv = buf[:total], buf[total:2 * total]

            def all_to_all(send=send, recv=recv, splits=splits):
                dist.all_to_all_single(recv, send, splits, splits, group=group)

            a2a.append([float(size * most), _time(all_to_all, group, device, warmup, repeats)])
        # ring: within each node (intra) or over the ranks with the same index in their node (inter)
        rings = [_ring([q for q in range(n) if (node[q] == node[r] if same else local[q] == local[r])], r)
                 for r in range(n)]
        if all(r is None for r in rings):
            continue
        ring = rings[me]
        p2p = samples.setdefault(f"{kind}_p2p", [])
        for size in sizes:
            send, recv = buf[:size], buf[size:2 * size]

            def step(send=send, recv=recv):
                if ring is None:
                    return
                nxt, prv = ring
                ops = [dist.P2POp(dist.isend, send, group=group, group_peer=nxt),
                       dist.P2POp(dist.irecv, recv, group=group, group_peer=prv)]
                for w in dist.batch_isend_irecv(ops):
                    w.wait()

            p2p.append([float(size), _time(step, group, device, warmup, repeats)])
    stamp = [datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")]
    dist.broadcast_object_list(stamp, group=group, group_src=0)  # one date on every rank
    env = {
        "world_size": n,
        "nodes": len(set(node)),
        "ranks_per_node": [node.count(x) for x in sorted(set(node))],
        "node_of_rank": list(node),
        "backend": str(dist.get_backend(group)),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "message_bytes": sizes,
        "warmup": warmup,
        "repeats": repeats,
        "date_utc": stamp[0],
    }
    return Calibration(links={k: fit_link(v) for k, v in samples.items()}, samples=samples, env=env)


__all__ = ["measure_links", "layer_message_bytes", "LATENCY_PROBE_BYTES"]
