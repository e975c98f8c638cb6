"""Pre-encoded video latents on disk: a folder of shards with a manifest.

Layout::

    latents/
      manifest.json        {"format": "megatron_dsv.latents/1", "shape": [C, T, H, W],
                            "dtype": "bfloat16", "num_classes": 10,
                            "shards": [{"file": "shard_00000.pt", "count": 256}, ...]}
      shard_00000.pt       torch.save({"latents": [n, C, T, H, W], "labels": int64 [n]})

Write one from any VAE's output with :class:`LatentShardWriter` (``add(latents, label)``) or the
command ``python -m megatron_dsv.data.latents write --out DIR FILES...`` where each file is a
``.pt`` / ``.npy`` latent ``[C, T, H, W]`` (or a batch ``[N, C, T, H, W]``), labels optional.
Loading checks the manifest and every shard up front, with errors that say what to fix.
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
from typing import Dict, List, Optional, Sequence

import torch

FORMAT = "megatron_dsv.latents/1"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class LatentShardWriter:
    """Accumulates latents and writes shards of ``shard_size`` plus the manifest on ``close``."""

    def __init__(self, out_dir: str, shard_size: int = 256, dtype: str = "bfloat16", num_classes: int = 0):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}.")
        os.makedirs(out_dir, exist_ok=True)
        self.out_dir, self.shard_size, self.dtype, self.num_classes = out_dir, shard_size, dtype, num_classes
        self.shape: Optional[List[int]] = None
        self.shards: List[Dict] = []
        self._lat: List[torch.Tensor] = []
        self._lab: List[int] = []

    def add(self, latents: torch.Tensor, label: int = 0) -> None:
        latents = torch.as_tensor(latents)
        if latents.dim() != 4:
            raise ValueError(f"a latent must be [C, T, H, W], got shape {tuple(latents.shape)}.")
        if self.shape is None:
            self.shape = list(latents.shape)
        elif list(latents.shape) != self.shape:
            raise ValueError(f"latent shape {tuple(latents.shape)} differs from the first one {tuple(self.shape)}.")
        self._lat.append(latents.to(_DTYPES[self.dtype]).cpu())
        self._lab.append(int(label))
        if len(self._lat) == self.shard_size:
            self._flush()

    def _flush(self) -> None:
        if not self._lat:
            return
        name = f"shard_{len(self.shards):05d}.pt"
        torch.save({"latents": torch.stack(self._lat), "labels": torch.tensor(self._lab)}, os.path.join(self.out_dir, name))
        self.shards.append({"file": name, "count": len(self._lat)})
        self._lat, self._lab = [], []

    def close(self) -> str:
        self._flush()
        if self.shape is None:
            raise ValueError("no latents were added.")
        manifest = {"format": FORMAT, "shape": self.shape, "dtype": self.dtype,
                    "num_classes": self.num_classes, "shards": self.shards}
        path = os.path.join(self.out_dir, "manifest.json")
        with open(path, "w") as f:
            json.dump(manifest, f, indent=1)
        return path


class LatentFolderDataset(torch.utils.data.Dataset):
    """``{"latents": fp32 [C, T, H, W], "label": int64}`` from a folder written by the writer.

    Shards are loaded lazily, one at a time (the most recent stays cached).
    """

    def __init__(self, folder: str):
        path = os.path.join(folder, "manifest.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{folder} has no manifest.json: write latents with megatron_dsv.data.latents "
                "(LatentShardWriter or `python -m megatron_dsv.data.latents write`)."
            )
        try:
            with open(path) as f:
                manifest = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON ({err}); rewrite it with the latents writer.") from err
        if manifest.get("format") != FORMAT:
            raise ValueError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}.")
        self.folder, self.shape = folder, tuple(manifest["shape"])
        self.num_classes = manifest.get("num_classes", 0)
        self.shards = manifest["shards"]
        if not self.shards:
            raise ValueError(f"{path} lists no shards.")
        missing = [s["file"] for s in self.shards if not os.path.isfile(os.path.join(folder, s["file"]))]
        if missing:
            raise FileNotFoundError(f"{folder}: shards listed in manifest.json are missing: {missing[:5]}"
                                    f"{' ...' if len(missing) > 5 else ''}. Copy them or rewrite the folder.")
        self.offsets = [0]
        for s in self.shards:
            self.offsets.append(self.offsets[-1] + int(s["count"]))
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
                raise ValueError(f"shard {path} cannot be read ({type(err).__name__}: {err}); it is corrupt, "
                                 "rewrite it with the latents writer.") from err
            if tuple(lat.shape) != (int(info["count"]),) + self.shape or lab.shape[0] != lat.shape[0]:
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
    if path.endswith(".npy"):
        import numpy as np

        return torch.from_numpy(np.load(path))
    obj = torch.load(path, map_location="cpu", weights_only=True)
    return obj["latents"] if isinstance(obj, dict) else obj


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write", help="write a latent folder from .pt/.npy latents")
    w.add_argument("files", nargs="+")
    w.add_argument("--out", required=True)
    w.add_argument("--labels", help="JSON file mapping file name -> class index")
    w.add_argument("--num-classes", type=int, default=0)
    w.add_argument("--shard-size", type=int, default=256)
    w.add_argument("--dtype", default="bfloat16", choices=sorted(_DTYPES))
    args = p.parse_args(argv)
    labels = json.load(open(args.labels)) if args.labels else {}
    writer = LatentShardWriter(args.out, args.shard_size, args.dtype, args.num_classes)
    for path in args.files:
        lat = _load_any(path)
        label = int(labels.get(os.path.basename(path), 0))
        for x in lat if lat.dim() == 5 else [lat]:
            writer.add(x, label)
    print(writer.close())


if __name__ == "__main__":
    main()
