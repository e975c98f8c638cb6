import json
import os

import pytest
import torch

from megatron_dsv.data.latents import LatentFolderDataset, LatentShardWriter, main as latents_main
from megatron_dsv.data.procedural import ProceduralVideoDataset


def test_procedural_is_deterministic_and_structured():
    a = ProceduralVideoDataset(10, (4, 16, 16), channels=4, num_classes=8, seed=3)
    b = ProceduralVideoDataset(10, (4, 16, 16), channels=4, num_classes=8, seed=3)
    x, y = a[7], b[7]
    assert torch.equal(x["latents"], y["latents"]) and x["label"] == y["label"]
    assert x["latents"].shape == (4, 4, 16, 16) and x["latents"].dtype == torch.float32
    assert not torch.equal(a[6]["latents"], x["latents"])
    assert not torch.equal(ProceduralVideoDataset(10, (4, 16, 16), seed=4)[7]["latents"], x["latents"])
    labels = {int(a[i]["label"]) for i in range(10)}
    assert labels <= set(range(8)) and len(labels) > 1
    # moving objects: consecutive frames differ, but far less than unrelated videos
    v = x["latents"]
    assert 0 < (v[:, 1] - v[:, 0]).abs().mean() < (v[:, 0] - a[3]["latents"][:, 0]).abs().mean()
    assert ProceduralVideoDataset(2, (3, 5, 7))[1]["latents"].shape == (4, 3, 5, 7)  # any (T, H, W)
    with pytest.raises(IndexError):
        a[10]


def write_folder(path, n=5, shard=2):
    w = LatentShardWriter(str(path), shard_size=shard, dtype="float32", num_classes=3)
    data = [torch.randn(4, 2, 4, 4) for _ in range(n)]
    for i, x in enumerate(data):
        w.add(x, i % 3)
    w.close()
    return data


def test_latent_folder_round_trip(tmp_path):
    data = write_folder(tmp_path)
    ds = LatentFolderDataset(str(tmp_path))
    assert len(ds) == 5 and ds.num_classes == 3
    for i in (0, 3, 4, 1):
        assert torch.equal(ds[i]["latents"], data[i]) and int(ds[i]["label"]) == i % 3
    manifest = json.load(open(tmp_path / "manifest.json"))
    assert [s["count"] for s in manifest["shards"]] == [2, 2, 1]


def test_latent_folder_cli(tmp_path):
    files = []
    for i in range(3):
        torch.save(torch.randn(4, 2, 4, 4), tmp_path / f"v{i}.pt")
        files.append(str(tmp_path / f"v{i}.pt"))
    (tmp_path / "labels.json").write_text(json.dumps({"v1.pt": 2}))
    latents_main(["write", "--out", str(tmp_path / "out"), "--labels", str(tmp_path / "labels.json"), *files])
    ds = LatentFolderDataset(str(tmp_path / "out"))
    assert len(ds) == 3 and int(ds[1]["label"]) == 2


def test_latent_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        LatentFolderDataset(str(tmp_path))
    write_folder(tmp_path)
    os.remove(tmp_path / "shard_00001.pt")
    with pytest.raises(FileNotFoundError, match="missing: \\['shard_00001.pt'\\]"):
        LatentFolderDataset(str(tmp_path))
    write_folder(tmp_path)
    (tmp_path / "shard_00002.pt").write_bytes(b"not a torch file")
    ds = LatentFolderDataset(str(tmp_path))
    assert ds[0]["latents"].shape == (4, 2, 4, 4)
    with pytest.raises(ValueError, match="corrupt"):
        ds[4]
    write_folder(tmp_path)
    torch.save({"latents": torch.randn(2, 4, 2, 4, 5), "labels": torch.zeros(2)}, tmp_path / "shard_00000.pt")
    with pytest.raises(ValueError, match="manifest promises"):
        LatentFolderDataset(str(tmp_path))[0]
    (tmp_path / "manifest.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        LatentFolderDataset(str(tmp_path))
    w = LatentShardWriter(str(tmp_path / "w"))
    w.add(torch.randn(4, 2, 4, 4))
    with pytest.raises(ValueError, match="differs from the first"):
        w.add(torch.randn(4, 2, 4, 8))
