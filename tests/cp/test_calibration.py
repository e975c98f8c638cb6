"""Link calibration on real process groups (gloo, 2 ranks) and its CLI; message sizes by hand."""

import json
import math
import os

import pytest

from megatron_dsv.cp.calibration import LATENCY_PROBE_BYTES, layer_message_bytes, measure_links
from megatron_dsv.cp.cost_model import AttentionShape, Calibration, CostModel
from tests.cp.distributed import run_ranks

SIZES = [4096, 65536, 262144]


def test_layer_message_bytes_by_hand():
    shape = AttentionShape(65536, 16, 128, num_kv_heads=4)
    tok = 128 * 2
    s = 65536 // 2
    want = {LATENCY_PROBE_BYTES, s * 8 * tok, s * (8 + 2 * 2) * tok, s * 16 * 16 * 2, 2 * s * 4 * tok}
    assert layer_message_bytes(shape, 2, max_bytes=2**40) == sorted(want)
    assert max(layer_message_bytes(shape, 2, max_bytes=2**20)) == 2**20
    with pytest.raises(ValueError, match="CP size >= 2"):
        layer_message_bytes(shape, 1)


def _check(cal, kinds):
    assert sorted(cal.links) == sorted(kinds)
    for kind, link in cal.links.items():
        assert link.measured and math.isfinite(link.gbps) and link.gbps > 0
        assert math.isfinite(link.latency_ms) and link.latency_ms >= 0
        assert [b for b, _ in cal.samples[kind]] == [float(x) for x in SIZES]  # 2 ranks: one peer per kind
        assert all(math.isfinite(t) and t > 0 for _, t in cal.samples[kind])


def _measure(rank, world, out_dir):
    import torch.distributed as dist

    one_node = measure_links(None, message_bytes=SIZES, warmup=1, repeats=3)
    _check(one_node, ["intra_a2a", "intra_p2p"])
    two_nodes = measure_links(None, message_bytes=SIZES, nodes=[0, 1], warmup=1, repeats=3)
    _check(two_nodes, ["inter_a2a", "inter_p2p"])
    assert two_nodes.env["nodes"] == 2 and two_nodes.env["ranks_per_node"] == [1, 1]
    # the same calibration on every rank (plans made from it agree)
    mine = json.dumps(one_node.to_dict(), sort_keys=True)
    everyone = [None] * world
    dist.all_gather_object(everyone, mine)
    assert everyone[0] == everyone[1]
    # JSON round trip
    back = Calibration.from_dict(json.loads(mine))
    assert back.links == one_node.links and back.samples == one_node.samples and back.env == one_node.env
    cost = CostModel.from_benchmark(calibration=back)
    assert cost.links.measured == ("intra_a2a", "intra_p2p")
    # the CLI, in the already initialised group: rank 0 writes the file
    from megatron_dsv.tools.calibrate_cp import main

    path = os.path.join(out_dir, "cal.json")
    cal = main(["--out", path, "--message-bytes", *map(str, SIZES), "--warmup", "1", "--repeats", "3"])
    _check(cal, ["intra_a2a", "intra_p2p"])
    dist.barrier()
    if rank == 1:
        assert Calibration.load(path).to_dict() == cal.to_dict()
    with pytest.raises(ValueError, match="two distinct sizes"):
        measure_links(None, message_bytes=[4096])


def test_measure_links_on_two_gloo_ranks(tmp_path):
    run_ranks(_measure, 2, str(tmp_path))
    # the file the CLI wrote feeds the simulator
    from megatron_dsv.tools.simulate_cp import main

    res = main(["--gpus", "2", "--gpus-per-node", "2", "--seq-len", "8192", "--heads", "4", "--head-dim", "64",
                "--layers", "2", "--calibration", str(tmp_path / "cal.json")])
    assert res["cost_model"]["links"]["measured"] == ["intra_a2a", "intra_p2p"]
    assert res["calibration"]["env"]["backend"] == "gloo"
