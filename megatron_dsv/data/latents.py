"""Pre-encoded video latents on disk: a folder of shards with a manifest.

Layout::

    latents/
      manifest.json        {"format": "megatron_dsv.latents/1", "shape": [C, T, H, W],
                            "dtype": "bfloat16", "num_classes": 10,
                            "shards": [{"file": "shard_00000.pt", "count": 256}, ...]}
      shard_00000.pt       torch.save({"latents": [n, C, T, H, W], "labels": int64 [n]})

Write one from any VAE's output with :class:`LatentShardWriter` (``add(latents, label)``) or the
command ``python -m megatron_dsv.data.latents write --out DIR FILES...`` where each file is a
``.pt`` / ``.npy`` latent ``[C, T, H, W]`` (or a batch ``[N, C, T, H, W]``), labels optional
(``--labels labels.json``: file name -> class index, naming every file).

:class:`LatentFolderDataset` checks the manifest and every shard when it is constructed: each
shard's header, shape, dtype and labels are read through a memory map, without reading the latents.
``verify=True`` (``python -m megatron_dsv.data.latents verify DIR``) also reads every byte: the
zip checksums of each shard and finite latents.
"""

from __future__ import annotations

import argparse
import bisect
import json
import numbers
import os
import zipfile
from typing import Any, Dict, List, Optional, Sequence

import torch

FORMAT = "megatron_dsv.latents/1"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_REWRITE = "rewrite the folder with `python -m megatron_dsv.data.latents write`"
_MANIFEST_KEYS = {
    "format": f'"{FORMAT}"',
    "shape": "[C, T, H, W] of every latent",
    "dtype": f"one of {sorted(_DTYPES)}",
    "shards": '[{"file": "shard_00000.pt", "count": N}, ...]',
}


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_label(label: Any, num_classes: int) -> int:
    """``label`` as an int in ``[0, num_classes)`` (``num_classes`` 0: unconditional, label 0)."""
    if not _is_int(label):
        raise ValueError(f"a label must be an integer class index, got {label!r} ({type(label).__name__}).")
    if num_classes == 0 and label != 0:
        raise ValueError(f"label {label} given but num_classes is 0 (unconditional): set num_classes "
                         "(--num-classes) to the number of classes.")
    if num_classes > 0 and not 0 <= label < num_classes:
        raise ValueError(f"label {label} is outside [0, {num_classes}): set num_classes (--num-classes) "
                         f"above the largest label, or fix the label.")
    return int(label)


class LatentShardWriter:
    """Accumulates latents and writes shards of ``shard_size`` plus the manifest on ``close``.

    ``num_classes``: labels are class indices in ``[0, num_classes)``; 0 means unconditional
    (every label 0).
    """

    def __init__(self, out_dir: str, shard_size: int = 256, dtype: str = "bfloat16", num_classes: int = 0):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}.")
        if not _is_int(shard_size) or shard_size < 1:
            raise ValueError(f"shard_size must be an integer >= 1, got {shard_size!r}.")
        if not _is_int(num_classes) or num_classes < 0:
            raise ValueError(f"num_classes must be an integer >= 0 (0: unconditional), got {num_classes!r}.")
        os.makedirs(out_dir, exist_ok=True)
        self.out_dir, self.shard_size, self.dtype, self.num_classes = out_dir, shard_size, dtype, num_classes
        self.shape: Optional[List[int]] = None
        self.shards: List[Dict] = []
        self._lat: List[torch.Tensor] = []
        self._lab: List[int] = []

    def add(self, latents: torch.Tensor, label: int = 0) -> None:
        """One latent ``[C, T, H, W]`` (floating point, finite) and its class index."""
        latents = torch.as_tensor(latents)
        if latents.dim() != 4:
            raise ValueError(f"a latent must be [C, T, H, W], got shape {tuple(latents.shape)}.")
        if not latents.is_floating_point():
            raise ValueError(f"latents must be floating point, got {latents.dtype}.")
        if not torch.isfinite(latents).all():
            raise ValueError("the latent holds NaN or inf values; check the encoder's output.")
        label = check_label(label, self.num_classes)
        if self.shape is None:
            self.shape = list(latents.shape)
        elif list(latents.shape) != self.shape:
            raise ValueError(f"latent shape {tuple(latents.shape)} differs from the first one {tuple(self.shape)}.")
        self._lat.append(latents.to(_DTYPES[self.dtype]).cpu())
        self._lab.append(label)
        if len(self._lat) == self.shard_size:
            self._flush()

    def _flush(self) -> None:
        if not self._lat:
            return
        name = f"shard_{len(self.shards):05d}.pt"
        torch.save({"latents": torch.stack(self._lat), "labels": torch.tensor(self._lab, dtype=torch.int64)},
                   os.path.join(self.out_dir, name))
        self.shards.append({"file": name, "count": len(self._lat)})
        self._lat, self._lab = [], []

    def close(self) -> str:
        """Write the last shard and the manifest; returns the manifest's path."""
        self._flush()
        if self.shape is None:
            raise ValueError("no latents were added.")
        manifest = {"format": FORMAT, "shape": self.shape, "dtype": self.dtype,
                    "num_classes": self.num_classes, "shards": self.shards}
        path = os.path.join(self.out_dir, "manifest.json")
        # the manifest is written last and atomically: a folder with one is complete
        with open(path + ".tmp", "w") as f:
            json.dump(manifest, f, indent=1)
        os.replace(path + ".tmp", path)
        return path


def read_manifest(folder: str) -> Dict:
    """The manifest of a latent folder, its keys and values checked (not the shards)."""
    path = os.path.join(folder, "manifest.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{folder} has no manifest.json: {_REWRITE} (or LatentShardWriter).")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); {_REWRITE}.") from err
    if not isinstance(manifest, dict):
        raise ValueError(f"{path} holds a {type(manifest).__name__}, not an object; {_REWRITE}.")
    for key, form in _MANIFEST_KEYS.items():
        if key not in manifest:
            raise ValueError(f"{path} has no {key!r} key (expected {key!r}: {form}); {_REWRITE}.")
    if manifest["format"] != FORMAT:
        raise ValueError(f"{path}: format {manifest['format']!r}, expected {FORMAT!r}; {_REWRITE}.")
    shape = manifest["shape"]
    if not (isinstance(shape, list) and len(shape) == 4 and all(_is_int(s) and s >= 1 for s in shape)):
        raise ValueError(f"{path}: 'shape' must be four positive ints [C, T, H, W], got {shape!r}; {_REWRITE}.")
    if manifest["dtype"] not in _DTYPES:
        raise ValueError(f"{path}: 'dtype' must be one of {sorted(_DTYPES)}, got {manifest['dtype']!r}; {_REWRITE}.")
    num_classes = manifest.setdefault("num_classes", 0)
    if not _is_int(num_classes) or num_classes < 0:
        raise ValueError(f"{path}: 'num_classes' must be an integer >= 0 (0: unconditional), got {num_classes!r}.")
    shards = manifest["shards"]
    if not isinstance(shards, list) or not shards:
        raise ValueError(f"{path} lists no shards; {_REWRITE}.")
    for i, s in enumerate(shards):
        ok = isinstance(s, dict) and isinstance(s.get("file"), str) and _is_int(s.get("count")) and s["count"] >= 1
        if not ok:
            raise ValueError(f"{path}: shard entry {i} is {s!r}; each must be "
                             f'{{"file": "shard_00000.pt", "count": N >= 1}}; {_REWRITE}.')
    names = [s["file"] for s in shards]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"{path} lists shards more than once: {dup[:5]}; {_REWRITE}.")
    return manifest


def check_shard(path: str, count: int, shape: Sequence[int], dtype: str, num_classes: int,
                verify: bool = False) -> None:
    """Check one shard against its manifest entry; raises ValueError saying what is wrong.

    Without ``verify`` the latents are memory-mapped, not read: the zip directory, the pickled
    header, the tensors' shapes and dtypes and the labels. ``verify`` reads everything: the zip
    checksums and finite latents.
    """
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=not verify)
    except Exception as err:
        raise ValueError(f"cannot be read ({type(err).__name__}: {str(err).splitlines()[0]}); it is "
                         "truncated or not a shard") from err
    if not (isinstance(data, dict) and isinstance(data.get("latents"), torch.Tensor)
            and isinstance(data.get("labels"), torch.Tensor)):
        raise ValueError('is not a shard (expected {"latents": tensor, "labels": tensor})')
    lat, lab = data["latents"], data["labels"]
    want = (count, *shape)
    if tuple(lat.shape) != want or lat.dtype != _DTYPES[dtype]:
        raise ValueError(f"holds latents {tuple(lat.shape)} {lat.dtype}; the manifest promises {want} {dtype}")
    if tuple(lab.shape) != (count,) or lab.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"holds labels {tuple(lab.shape)} {lab.dtype}; the manifest promises {count} int64 labels")
    hi = max(num_classes, 1)
    bad = ((lab < 0) | (lab >= hi)).nonzero().flatten()
    if bad.numel():
        j = int(bad[0])
        raise ValueError(
            f"label {int(lab[j])} of sample {j} is outside [0, {hi}) (manifest num_classes {num_classes}); set "
            f'"num_classes" in manifest.json above the largest label ({int(lab.max())}) if the labels are right'
        )
    if verify:
        with zipfile.ZipFile(path) as z:
            broken = z.testzip()
        if broken is not None:
            raise ValueError(f"entry {broken} fails its checksum; the file is corrupt")
        nonfinite = (~torch.isfinite(lat.float().flatten(1))).any(dim=1).nonzero().flatten()
        if nonfinite.numel():
            raise ValueError(f"latents of samples {nonfinite[:5].tolist()} hold NaN or inf")


class LatentFolderDataset(torch.utils.data.Dataset):
    """``{"latents": fp32 [C, T, H, W], "label": int64}`` from a folder written by the writer.

    The manifest and every shard are checked at construction (see :func:`check_shard`; ``verify``
    reads all data). Shards are loaded lazily, one at a time (the most recent stays cached).
    """

    def __init__(self, folder: str, verify: bool = False):
        manifest = read_manifest(folder)
        self.folder, self.shape = folder, tuple(manifest["shape"])
        self.dtype, self.num_classes = manifest["dtype"], manifest["num_classes"]
        self.shards = manifest["shards"]
        missing = [s["file"] for s in self.shards if not os.path.isfile(os.path.join(folder, s["file"]))]
        if missing:
            raise FileNotFoundError(f"{folder}: shards listed in manifest.json are missing: {missing[:5]}"
                                    f"{' ...' if len(missing) > 5 else ''}. Copy them or {_REWRITE}.")
        problems = []
        for s in self.shards:
            path = os.path.join(folder, s["file"])
            try:
                check_shard(path, s["count"], self.shape, self.dtype, self.num_classes, verify)
            except ValueError as err:
                problems.append(f"{path} {err}")
        if problems:
            more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
            raise ValueError(f"{folder}: {len(problems)} of {len(self.shards)} shards are bad: "
                             + "; ".join(problems[:5]) + more + f". Restore them from the source or {_REWRITE}.")
        self.offsets = [0]
        for s in self.shards:
            self.offsets.append(self.offsets[-1] + s["count"])
        self._cache = (None, None)

    def __len__(self) -> int:
        return self.offsets[-1]

    def _shard(self, i: int) -> Dict[str, torch.Tensor]:
        if self._cache[0] != i:
            info = self.shards[i]
            path = os.path.join(self.folder, info["file"])
            try:
                data = torch.load(path, map_location="cpu", weights_only=True)
                lat, lab = data["latents"], data["labels"]
            except Exception as err:
                raise ValueError(f"shard {path} cannot be read ({type(err).__name__}: {err}); it changed after "
                                 f"the dataset was opened and is corrupt: {_REWRITE}.") from err
            if tuple(lat.shape) != (info["count"],) + self.shape or lab.shape[0] != lat.shape[0]:
                raise ValueError(f"shard {path} holds latents {tuple(lat.shape)} and {lab.shape[0]} labels; the "
                                 f"manifest promises {info['count']} of shape {self.shape}.")
            self._cache = (i, {"latents": lat, "labels": lab})
        return self._cache[1]

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        i = bisect.bisect_right(self.offsets, index) - 1
        shard = self._shard(i)
        j = index - self.offsets[i]
        return {"latents": shard["latents"][j].float(), "label": shard["labels"][j].long()}


def _load_any(path: str) -> torch.Tensor:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file.")
    what = "a .npy array" if path.endswith(".npy") else "a .pt tensor or a {'latents': tensor} dict"
    try:
        if path.endswith(".npy"):
            import numpy as np

            obj = torch.from_numpy(np.load(path))
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"{path} cannot be read as {what} ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''}).") from err
    if isinstance(obj, dict):
        obj = obj.get("latents")
    if not isinstance(obj, torch.Tensor) or obj.dim() not in (4, 5):
        got = tuple(obj.shape) if isinstance(obj, torch.Tensor) else type(obj).__name__
        raise ValueError(f"{path} must hold {what} of shape [C, T, H, W] or [N, C, T, H, W]; got {got}.")
    return obj


def _read_labels(path: str, files: Sequence[str]) -> List[int]:
    """Labels of ``files`` from a JSON object mapping file name (or the path as given) -> class."""
    try:
        with open(path) as f:
            table = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"--labels {path}: no such file.") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"--labels {path} is not valid JSON ({err}).") from err
    if not isinstance(table, dict):
        raise ValueError(f'--labels {path} must be a JSON object {{"file name": class index}}, got a '
                         f"{type(table).__name__}.")
    keys = [p if p in table else os.path.basename(p) for p in files]
    missing = [k for k in keys if k not in table]
    if len(missing) == len(files):
        raise ValueError(f"--labels {path} names none of the {len(files)} input files (its keys are e.g. "
                         f"{sorted(table)[:3]}; the files are e.g. {missing[:3]}): key it by file name.")
    if missing:
        raise ValueError(f"--labels {path} has no label for {len(missing)} input files: {missing[:5]}"
                         f"{' ...' if len(missing) > 5 else ''}; add them.")
    labels = [table[k] for k in keys]
    for k, v in zip(keys, labels):
        if not _is_int(v) or v < 0:
            raise ValueError(f"--labels {path}: the label of {k} is {v!r}; labels are class indices >= 0.")
    return labels


def _write(args: argparse.Namespace) -> str:
    labels = _read_labels(args.labels, args.files) if args.labels else [0] * len(args.files)
    num_classes = args.num_classes
    if num_classes is None:
        num_classes = max(labels) + 1 if args.labels else 0
        if args.labels:
            print(f"num_classes {num_classes} (the largest label + 1; --num-classes sets it)")
    if args.labels and num_classes == 0:
        raise ValueError("--labels needs --num-classes > 0 (0 means unconditional).")
    if not args.labels and num_classes > 0:
        raise ValueError(f"--num-classes {num_classes} without --labels would give every file label 0: "
                         "pass --labels labels.json, or drop --num-classes for unconditional latents.")
    for path, label in zip(args.files, labels):
        try:
            check_label(label, num_classes)
        except ValueError as err:
            raise ValueError(f"--labels {args.labels}, {os.path.basename(path)}: {err}") from err
    writer = LatentShardWriter(args.out, args.shard_size, args.dtype, num_classes)
    for path, label in zip(args.files, labels):
        lat = _load_any(path)
        for i, x in enumerate(lat if lat.dim() == 5 else [lat]):
            try:
                writer.add(x, label)
            except ValueError as err:
                where = f"{path}[{i}]" if lat.dim() == 5 else path
                raise ValueError(f"{where}: {err}") from err
    return writer.close()


def _int_at_least(lo: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = lo - 1
        if value < lo:
            raise argparse.ArgumentTypeError(f"must be an integer >= {lo}, got {text!r}")
        return value

    return parse


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="python -m megatron_dsv.data.latents", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write", help="write a latent folder from .pt/.npy latents")
    w.add_argument("files", nargs="+")
    w.add_argument("--out", required=True)
    w.add_argument("--labels", help="JSON file mapping each file name -> class index")
    w.add_argument("--num-classes", type=_int_at_least(0), default=None,
                   help="classes (0: unconditional); default: the largest label + 1 with --labels, else 0")
    w.add_argument("--shard-size", type=_int_at_least(1), default=256)
    w.add_argument("--dtype", default="bfloat16", choices=sorted(_DTYPES))
    v = sub.add_parser("verify", help="check a latent folder, reading every byte")
    v.add_argument("folder")
    args = p.parse_args(argv)
    try:
        if args.cmd == "write":
            print(_write(args))
        else:
            ds = LatentFolderDataset(args.folder, verify=True)
            print(f"{args.folder}: {len(ds)} latents of shape {ds.shape} ({ds.dtype}) in {len(ds.shards)} "
                  f"shards, num_classes {ds.num_classes}: all read and checked.")
    except (ValueError, OSError) as err:
        p.exit(2, f"{p.prog} {args.cmd}: error: {err}\n")


if __name__ == "__main__":
    main()
