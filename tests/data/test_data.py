import json
import os
import struct
import zipfile

import re

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


@pytest.mark.parametrize("verify", [False, True])
def test_latent_folder_round_trip(tmp_path, verify):
    data = write_folder(tmp_path)
    ds = LatentFolderDataset(str(tmp_path), verify=verify)
    assert len(ds) == 5 and ds.num_classes == 3 and ds.shape == (4, 2, 4, 4)
    for i in (0, 3, 4, 1):
        assert torch.equal(ds[i]["latents"], data[i]) and int(ds[i]["label"]) == i % 3
    manifest = json.load(open(tmp_path / "manifest.json"))
    assert [s["count"] for s in manifest["shards"]] == [2, 2, 1]


def save_pt(path, n=3):
    files = []
    for i in range(n):
        torch.save(torch.randn(4, 2, 4, 4), path / f"v{i}.pt")
        files.append(str(path / f"v{i}.pt"))
    return files


def test_latent_folder_cli(tmp_path, capsys):
    files = save_pt(tmp_path)
    (tmp_path / "labels.json").write_text(json.dumps({"v0.pt": 0, "v1.pt": 4, "v2.pt": 1}))
    latents_main(["write", "--out", str(tmp_path / "out"), "--labels", str(tmp_path / "labels.json"), *files])
    assert "num_classes 5 (the largest label + 1" in capsys.readouterr().out
    ds = LatentFolderDataset(str(tmp_path / "out"))
    assert len(ds) == 3 and ds.num_classes == 5 and [int(ds[i]["label"]) for i in range(3)] == [0, 4, 1]
    latents_main(["verify", str(tmp_path / "out")])
    assert "3 latents of shape (4, 2, 4, 4) (bfloat16) in 1 shards, num_classes 5: all read" in capsys.readouterr().out


def test_missing_manifest_or_shards(tmp_path):
    with pytest.raises(FileNotFoundError, match="no manifest.json: rewrite the folder with `python -m megatron_dsv.data.latents write`"):
        LatentFolderDataset(str(tmp_path))
    write_folder(tmp_path)
    os.remove(tmp_path / "shard_00001.pt")
    with pytest.raises(FileNotFoundError, match=r"missing: \['shard_00001.pt'\]. Copy them or rewrite the folder"):
        LatentFolderDataset(str(tmp_path))


def edit_manifest(path, **changes):
    m = json.loads((path / "manifest.json").read_text())
    for k, v in changes.items():
        if v is None:
            del m[k]
        else:
            m[k] = v
    (path / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("key", ["format", "shape", "dtype", "shards"])
def test_manifest_key_missing(tmp_path, key):
    write_folder(tmp_path)
    edit_manifest(tmp_path, **{key: None})
    with pytest.raises(ValueError, match=f"manifest.json has no '{key}' key .*; rewrite the folder with"):
        LatentFolderDataset(str(tmp_path))


@pytest.mark.parametrize(
    "changes,fix",
    [
        (dict(shape=[4, 2, 4]), r"'shape' must be four positive ints \[C, T, H, W\], got \[4, 2, 4\]"),
        (dict(dtype="int8"), r"'dtype' must be one of \['bfloat16', 'float16', 'float32'\], got 'int8'"),
        (dict(num_classes=-1), r"'num_classes' must be an integer >= 0"),
        (dict(shards=[{"file": "shard_00000.pt", "count": 0}]), r"shard entry 0 is .*count.: N >= 1"),
        (dict(shards=[]), "lists no shards"),
    ],
)
def test_manifest_values_checked(tmp_path, changes, fix):
    write_folder(tmp_path)
    edit_manifest(tmp_path, **changes)
    with pytest.raises(ValueError, match=fix):
        LatentFolderDataset(str(tmp_path))
    (tmp_path / "manifest.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON .*; rewrite the folder with"):
        LatentFolderDataset(str(tmp_path))


def truncate(path):
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


def garbage(path):
    path.write_bytes(b"not a torch file")


def wrong_shape(path):
    torch.save({"latents": torch.randn(2, 4, 2, 4, 5), "labels": torch.zeros(2, dtype=torch.long)}, path)


def wrong_dtype(path):
    torch.save({"latents": torch.randn(2, 4, 2, 4, 4).half(), "labels": torch.zeros(2, dtype=torch.long)}, path)


def float_labels(path):
    torch.save({"latents": torch.randn(2, 4, 2, 4, 4), "labels": torch.zeros(2)}, path)


def labels_out_of_range(path):
    torch.save({"latents": torch.randn(2, 4, 2, 4, 4), "labels": torch.tensor([1, 3])}, path)


def not_a_dict(path):
    torch.save(torch.randn(2, 4, 2, 4, 4), path)


@pytest.mark.parametrize(
    "damage,fix",
    [
        (truncate, r"cannot be read \(RuntimeError: .*\); it is truncated or not a shard"),
        (garbage, r"cannot be read .*; it is truncated or not a shard"),
        (wrong_shape, r"holds latents \(2, 4, 2, 4, 5\) torch.float32; the manifest promises \(2, 4, 2, 4, 4\) float32"),
        (wrong_dtype, r"holds latents \(2, 4, 2, 4, 4\) torch.float16; the manifest promises .* float32"),
        (float_labels, r"holds labels \(2,\) torch.float32; the manifest promises 2 int64 labels"),
        (labels_out_of_range, r"label 3 of sample 1 is outside \[0, 3\) .*set \"num_classes\" in manifest.json above"),
        (not_a_dict, r"is not a shard \(expected \{\"latents\": tensor, \"labels\": tensor\}\)"),
    ],
)
def test_bad_shard_fails_at_construction(tmp_path, damage, fix):
    write_folder(tmp_path)
    damage(tmp_path / "shard_00001.pt")
    with pytest.raises(ValueError) as exc:
        LatentFolderDataset(str(tmp_path))
    msg = str(exc.value)
    assert f"1 of 3 shards are bad: {tmp_path / 'shard_00001.pt'} " in msg
    assert re.search(fix, msg), msg
    assert msg.endswith("Restore them from the source or rewrite the folder with `python -m megatron_dsv.data.latents write`.")


def test_several_bad_shards_listed(tmp_path):
    write_folder(tmp_path, n=8)
    for i in (0, 2, 3):
        garbage(tmp_path / f"shard_{i:05d}.pt")
    with pytest.raises(ValueError, match="3 of 4 shards are bad: .*shard_00000.pt .*shard_00002.pt .*shard_00003.pt"):
        LatentFolderDataset(str(tmp_path))


def flip_data_byte(path):
    """Damage the latents' bytes but not the zip directory or the header."""
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if i.filename.endswith("/data/0"))
    raw = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26 : info.header_offset + 30])
    raw[info.header_offset + 30 + name_len + extra_len + 17] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_verify_reads_everything(tmp_path, capsys):
    write_folder(tmp_path)
    flip_data_byte(tmp_path / "shard_00002.pt")
    assert len(LatentFolderDataset(str(tmp_path))) == 5  # the header check cannot see this
    with pytest.raises(ValueError, match=r"shard_00002.pt entry .*/data/0 fails its checksum; the file is corrupt"):
        LatentFolderDataset(str(tmp_path), verify=True)
    with pytest.raises(SystemExit) as exc:
        latents_main(["verify", str(tmp_path)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "latents verify: error: " in err and "fails its checksum" in err
    write_folder(tmp_path)
    bad = torch.randn(2, 4, 2, 4, 4)
    bad[1, 0, 0, 0, 0] = float("nan")
    torch.save({"latents": bad, "labels": torch.zeros(2, dtype=torch.long)}, tmp_path / "shard_00000.pt")
    assert len(LatentFolderDataset(str(tmp_path))) == 5
    with pytest.raises(ValueError, match=r"shard_00000.pt latents of samples \[1\] hold NaN or inf"):
        LatentFolderDataset(str(tmp_path), verify=True)


def test_writer_checks_its_inputs(tmp_path):
    w = LatentShardWriter(str(tmp_path / "w"), num_classes=3)
    w.add(torch.randn(4, 2, 4, 4), 2)
    with pytest.raises(ValueError, match=r"differs from the first one \(4, 2, 4, 4\)"):
        w.add(torch.randn(4, 2, 4, 8))
    with pytest.raises(ValueError, match=r"label 3 is outside \[0, 3\): set num_classes \(--num-classes\) above"):
        w.add(torch.randn(4, 2, 4, 4), 3)
    with pytest.raises(ValueError, match="label -1 is outside"):
        w.add(torch.randn(4, 2, 4, 4), -1)
    with pytest.raises(ValueError, match=r"a label must be an integer class index, got True \(bool\)"):
        w.add(torch.randn(4, 2, 4, 4), True)
    with pytest.raises(ValueError, match="NaN or inf values; check the encoder's output"):
        w.add(torch.full((4, 2, 4, 4), float("nan")))
    with pytest.raises(ValueError, match=r"must be \[C, T, H, W\], got shape \(2, 4, 4\)"):
        w.add(torch.randn(2, 4, 4))
    with pytest.raises(ValueError, match=r"label 1 given but num_classes is 0 \(unconditional\): set num_classes"):
        LatentShardWriter(str(tmp_path / "u")).add(torch.randn(4, 2, 4, 4), 1)
    with pytest.raises(ValueError, match="shard_size must be an integer >= 1, got 0"):
        LatentShardWriter(str(tmp_path / "u"), shard_size=0)


def run_cli(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        latents_main(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


def test_cli_errors_say_what_to_fix(tmp_path, capsys):
    files = save_pt(tmp_path)
    out = ["write", "--out", str(tmp_path / "out")]
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"a.pt": 1, "b.pt": 2}))
    err = run_cli(out + ["--labels", str(labels), *files], capsys)
    assert "error: --labels" in err and "names none of the 3 input files" in err and "key it by file name" in err
    labels.write_text(json.dumps({"v0.pt": 1, "v1.pt": 2}))
    err = run_cli(out + ["--labels", str(labels), *files], capsys)
    assert "has no label for 1 input files: ['v2.pt']; add them." in err
    labels.write_text(json.dumps({"v0.pt": 1, "v1.pt": 5, "v2.pt": 0}))
    err = run_cli(out + ["--labels", str(labels), "--num-classes", "3", *files], capsys)
    assert "v1.pt: label 5 is outside [0, 3): set num_classes (--num-classes) above the largest label" in err
    labels.write_text(json.dumps({"v0.pt": 1, "v1.pt": "cat", "v2.pt": 0}))
    assert "the label of v1.pt is 'cat'; labels are class indices >= 0" in run_cli(out + ["--labels", str(labels), *files], capsys)
    labels.write_text("[1, 2]")
    assert 'must be a JSON object {"file name": class index}' in run_cli(out + ["--labels", str(labels), *files], capsys)
    assert "--labels nope.json: no such file" in run_cli(out + ["--labels", "nope.json", *files], capsys)
    err = run_cli(out + ["--num-classes", "4", *files], capsys)
    assert "--num-classes 4 without --labels would give every file label 0: pass --labels" in err
    assert f"{tmp_path / 'v9.pt'}: no such file" in run_cli(out + [str(tmp_path / "v9.pt")], capsys)
    (tmp_path / "junk.pt").write_bytes(b"junk")
    err = run_cli(out + [str(tmp_path / "junk.pt")], capsys)
    assert "junk.pt cannot be read as a .pt tensor or a {'latents': tensor} dict" in err
    torch.save(torch.randn(2, 4), tmp_path / "flat.pt")
    assert "must hold a .pt tensor or a {'latents': tensor} dict of shape [C, T, H, W] or [N, C, T, H, W]; got (2, 4)" in run_cli(
        out + [str(tmp_path / "flat.pt")], capsys)
    torch.save(torch.randn(2, 4, 2, 4, 8), tmp_path / "batch.pt")
    err = run_cli(out + [files[0], str(tmp_path / "batch.pt")], capsys)
    assert "batch.pt[0]: latent shape (4, 2, 4, 8) differs from the first one (4, 2, 4, 4)" in err
    assert "--shard-size: must be an integer >= 1, got '0'" in run_cli(out + ["--shard-size", "0", *files], capsys)
    assert "Traceback" not in err
