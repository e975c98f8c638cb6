"""Natural-image videos in latent space: photographs we did not design, filmed by a moving camera.

scikit-image ships a dozen photographs inside its wheel (``skimage.data``: astronaut, chelsea,
coffee, rocket, camera, ...; the ones listed in :data:`IMAGES` load from the package itself,
no download). Each sample is one of them filmed by a virtual camera, a window that pans, zooms,
orbits or drifts over the photograph (bilinear resampling, anti-aliased when the window is larger
than the frame), encoded frame by frame with a fixed linear "VAE" (:class:`LinearVAE`:
non-overlapping ``patch x patch`` RGB pixel patches -> the top ``C`` principal components of the
training photographs' patches, whitened). The encoder is code, not weights: it is recomputed
deterministically from the photographs whenever a dataset is built.

The interface is that of :class:`megatron_dsv.data.procedural.ProceduralVideoDataset`: items
``{"latents": fp32 [C, T, H, W], "label": int64}``, the label is the camera motion
(:data:`MOTIONS`, ``label % 8``), deterministic by ``(seed, index)`` at any (T, H, W); latents
are scaled to the procedural videos' scale (mean 0, std :data:`LATENT_STD` per channel over the
training photographs). ``split="val"`` films only the held-out photographs
(:data:`HELD_OUT_IMAGES`), never seen in training or by the encoder's fit.
"""

from __future__ import annotations

import math
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

MOTIONS = ("pan_right", "pan_left", "pan_down", "pan_up", "zoom_in", "zoom_out", "orbit", "drift")

IMAGES = (
    "astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
    "stereo_motorcycle", "camera", "brick", "grass", "gravel", "moon", "coins",
)
"""``skimage.data`` photographs bundled in the scikit-image wheel (colour first, then grey)."""

HELD_OUT_IMAGES = ("coffee", "camera")
"""Photographs kept for validation (``split="val"``): one colour, one grey."""

LATENT_STD = 0.47
"""Per-channel latent std: the procedural videos' (measured 0.45-0.49 per channel, 64 videos of
8x32x32), so a model sees both sources at one scale."""

MAX_SIDE = 512
"""Photographs are resized (anti-aliased) so their longer side is at most this many pixels;
retina (1411 px) and hubble_deep_field (1000 px) would otherwise dominate load time."""


def load_image(name: str) -> Tensor:
    """``skimage.data.<name>()`` as fp32 RGB ``[3, H, W]`` in [0, 1], longer side <= ``MAX_SIDE``."""
    if name not in IMAGES:
        raise ValueError(f"unknown photograph {name!r}; choose from {IMAGES} (bundled in scikit-image, no download).")
    try:
        from skimage import data as skdata
    except ImportError:
        raise ImportError(
            "the natural-image videos need scikit-image (its bundled sample photographs): "
            "pip install scikit-image, or use the procedural videos."
        ) from None
    arr = getattr(skdata, name)()
    if isinstance(arr, tuple):  # stereo_motorcycle: (left, right, disparity); the left view
        arr = arr[0]
    img = torch.from_numpy(arr.copy()).float() / 255.0
    img = img[..., None].expand(*img.shape, 3) if img.dim() == 2 else img[..., :3]
    img = img.permute(2, 0, 1).contiguous()
    scale = MAX_SIDE / max(img.shape[1:])
    if scale < 1:
        size = (round(img.shape[1] * scale), round(img.shape[2] * scale))
        img = F.interpolate(img[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0]
    return img.clamp(0, 1)


class LinearVAE:
    """A fixed linear "VAE": ``patch x patch`` RGB pixel patches -> ``channels`` whitened principal
    components (one latent voxel per patch, spatial stride ``patch``).

    ``mean [3*p*p]``, ``basis [channels, 3*p*p]`` (rows: principal directions, sign fixed so each
    row's largest-magnitude entry is positive), ``scale [channels]`` (std of each component on the
    fit photographs). :meth:`encode` = ``(patch - mean) @ basis.T / scale * LATENT_STD``.
    """

    def __init__(self, mean: Tensor, basis: Tensor, scale: Tensor, patch: int):
        self.mean, self.basis, self.scale, self.patch = mean, basis, scale, patch

    @property
    def channels(self) -> int:
        return self.basis.shape[0]

    @classmethod
    def fit(cls, images: Sequence[Tensor], channels: int, patch: int = 4) -> "LinearVAE":
        """PCA (fp64) of every non-overlapping patch of ``images`` (``[3, H, W]`` each)."""
        dim = 3 * patch * patch
        if not 1 <= channels <= dim:
            raise ValueError(f"channels must lie in [1, {dim}] for {patch}x{patch} RGB patches, got {channels}.")
        rows = [_patches(img[None], patch)[0].double() for img in images]
        x = torch.cat(rows)  # [N, dim]
        mean = x.mean(0)
        cov = (x - mean).T @ (x - mean) / (x.shape[0] - 1)
        evals, evecs = torch.linalg.eigh(cov)  # ascending
        order = torch.argsort(evals, descending=True)[:channels]
        basis = evecs[:, order].T.contiguous()
        sign = torch.sign(basis.gather(1, basis.abs().argmax(1, keepdim=True)))
        basis = basis * sign
        scale = evals[order].clamp(min=1e-12).sqrt()
        return cls(mean.float(), basis.float(), scale.float(), patch)

    def encode(self, frames: Tensor) -> Tensor:
        """RGB frames ``[N, 3, H*p, W*p]`` -> latents ``[N, C, H, W]``."""
        n, _, hp, wp = frames.shape
        if hp % self.patch or wp % self.patch:
            raise ValueError(f"frames {hp}x{wp} are not a multiple of the VAE patch {self.patch}.")
        z = (_patches(frames, self.patch) - self.mean) @ self.basis.T / self.scale * LATENT_STD
        return z.view(n, hp // self.patch, wp // self.patch, -1).permute(0, 3, 1, 2).contiguous()

    def decode(self, latents: Tensor) -> Tensor:
        """Latents ``[N, C, H, W]`` -> the frames' projection on the kept components ``[N, 3, H*p, W*p]``."""
        n, c, h, w = latents.shape
        p = self.patch
        x = latents.permute(0, 2, 3, 1).reshape(n, h * w, c) / LATENT_STD * self.scale @ self.basis + self.mean
        x = x.view(n, h, w, 3, p, p).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(n, 3, h * p, w * p)


def _patches(frames: Tensor, p: int) -> Tensor:
    """``[N, 3, H, W]`` -> non-overlapping patches ``[N, (H//p)*(W//p), 3*p*p]`` (row-major),
    a ragged border cropped."""
    n, c, h, w = frames.shape
    x = frames[:, :, : h // p * p, : w // p * p].reshape(n, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(n, (h // p) * (w // p), c * p * p)


def camera_path(motion: str, frames: int, g: torch.Generator) -> Tuple[Tensor, Tensor, Tensor]:
    """Window centre ``(cy, cx)`` and height ``size`` per frame, ``[T]`` each, as fractions of the
    photograph's height/width (``size`` of its height), before clamping inside the photograph."""
    s = torch.linspace(0, 1, frames, dtype=torch.float64) if frames > 1 else torch.zeros(1, dtype=torch.float64)
    u = torch.rand(6, generator=g, dtype=torch.float64)
    size0 = 0.45 + 0.3 * float(u[0])
    travel = 0.15 + 0.2 * float(u[1])
    cy0, cx0 = 0.35 + 0.3 * float(u[2]), 0.35 + 0.3 * float(u[3])
    cy, cx, size = torch.full_like(s, cy0), torch.full_like(s, cx0), torch.full_like(s, size0)
    if motion == "pan_right":
        cx = cx0 - travel / 2 + travel * s
    elif motion == "pan_left":
        cx = cx0 + travel / 2 - travel * s
    elif motion == "pan_down":
        cy = cy0 - travel / 2 + travel * s
    elif motion == "pan_up":
        cy = cy0 + travel / 2 - travel * s
    elif motion == "zoom_in":
        size = size0 * (1 - 0.45 * s)
    elif motion == "zoom_out":
        size = size0 * (0.55 + 0.45 * s)
    elif motion == "orbit":
        phase = 2 * math.pi * float(u[4])
        cy = cy0 + 0.5 * travel * torch.sin(phase + 2 * math.pi * s)
        cx = cx0 + 0.5 * travel * torch.cos(phase + 2 * math.pi * s)
    elif motion == "drift":
        angle = 2 * math.pi * float(u[5])
        cy, cx = cy0 + travel * math.sin(angle) * (s - 0.5), cx0 + travel * math.cos(angle) * (s - 0.5)
        size = size0 * (1 - 0.2 * s)
    else:
        raise ValueError(f"unknown camera motion {motion!r}; choose from {MOTIONS}.")
    return cy, cx, size


def film(image: Tensor, motion: str, frame_hw: Sequence[int], frames: int, g: torch.Generator) -> Tensor:
    """Film ``image [3, Hi, Wi]`` with a ``motion`` camera: RGB frames ``[T, 3, fh, fw]``.

    The window keeps the frame's aspect ratio and stays inside the photograph (its centre is
    clamped; a window taller or wider than the photograph is shrunk to fit). The photograph is
    first resized (anti-aliased) so the largest window is at most 1.25 frame pixels per
    photograph pixel, so a small frame does not alias a large window."""
    fh, fw = (int(v) for v in frame_hw)
    cy, cx, size = camera_path(motion, frames, g)
    hi, wi = image.shape[1:]
    win_h = size * hi
    win_h = torch.minimum(win_h, torch.full_like(win_h, min(hi, wi * fh / fw)))  # fits both ways
    ratio = float(win_h.max()) / fh
    if ratio > 1.25:
        size_px = (max(1, round(hi / ratio * 1.25)), max(1, round(wi / ratio * 1.25)))
        image = F.interpolate(image[None], size=size_px, mode="bilinear", antialias=True, align_corners=False)[0]
        win_h = win_h * size_px[0] / hi
        hi, wi = size_px
    win_w = win_h * fw / fh
    cy_px = torch.maximum(torch.minimum(cy * hi, hi - win_h / 2), win_h / 2)
    cx_px = torch.maximum(torch.minimum(cx * wi, wi - win_w / 2), win_w / 2)
    # normalised sampling grid (align_corners=False: pixel centres at (i + 0.5) / size)
    ys = (torch.arange(fh, dtype=torch.float64) + 0.5) / fh - 0.5  # [-0.5, 0.5) of the window
    xs = (torch.arange(fw, dtype=torch.float64) + 0.5) / fw - 0.5
    gy = (cy_px[:, None] + ys[None] * win_h[:, None]) / hi * 2 - 1  # [T, fh]
    gx = (cx_px[:, None] + xs[None] * win_w[:, None]) / wi * 2 - 1  # [T, fw]
    grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), dim=-1).float()  # [T, fh, fw, 2]
    src = image[None].expand(frames, *image.shape)
    return F.grid_sample(src, grid, mode="bilinear", padding_mode="border", align_corners=False)


class NaturalVideoDataset(torch.utils.data.Dataset):
    """``len`` samples of ``{"latents": fp32 [C, T, H, W], "label": int64}``: scikit-image's
    photographs filmed by a moving camera and encoded by :class:`LinearVAE`.

    Args:
        num_samples: dataset length (videos are drawn per index; any length).
        thw: latent (T, H, W); frames are ``H*patch x W*patch`` pixels.
        channels: latent channels C (principal components kept, 4-16 is the useful range).
        num_classes: labels; the camera motion is ``MOTIONS[label % 8]``.
        seed: the draw of photograph, motion and path per index.
        split: ``"train"`` (every photograph but :data:`HELD_OUT_IMAGES`), ``"val"`` (those) or
            ``"all"``; the encoder is always fit on the training photographs.
        patch: pixels per latent voxel along H and W (the VAE's stride).
    """

    def __init__(self, num_samples: int, thw: Sequence[int], channels: int = 4, num_classes: int = 8,
                 seed: int = 0, split: str = "train", patch: int = 4):
        t, h, w = (int(v) for v in thw)
        if min(t, h, w) < 1 or channels < 1 or num_samples < 1 or num_classes < 1 or patch < 1:
            raise ValueError(
                f"need positive sizes, got samples={num_samples}, thw={thw}, channels={channels}, "
                f"classes={num_classes}, patch={patch}."
            )
        if split not in ("train", "val", "all"):
            raise ValueError(f"split must be 'train', 'val' or 'all', got {split!r}.")
        self.num_samples, self.thw, self.channels = num_samples, (t, h, w), channels
        self.num_classes, self.seed, self.split, self.patch = num_classes, seed, split, patch
        train_names = [n for n in IMAGES if n not in HELD_OUT_IMAGES]
        names = {"train": train_names, "val": list(HELD_OUT_IMAGES), "all": list(IMAGES)}[split]
        loaded = {n: load_image(n) for n in set(train_names) | set(names)}
        self.vae = LinearVAE.fit([loaded[n] for n in train_names], channels, patch)
        self.image_names: List[str] = names
        self.images: List[Tensor] = [loaded[n] for n in names]

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> Dict[str, Tensor]:
        if not 0 <= index < self.num_samples:
            raise IndexError(index)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        label = int(torch.randint(self.num_classes, (1,), generator=g))
        image = self.images[int(torch.randint(len(self.images), (1,), generator=g))]
        t, h, w = self.thw
        frames = film(image, MOTIONS[label % len(MOTIONS)], (h * self.patch, w * self.patch), t, g)
        latents = self.vae.encode(frames).transpose(0, 1).contiguous()  # [C, T, H, W]
        return {"latents": latents, "label": torch.tensor(label)}

    def describe(self, index: int) -> Dict[str, object]:
        """Which photograph and motion item ``index`` films (for plots and debugging)."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        label = int(torch.randint(self.num_classes, (1,), generator=g))
        name = self.image_names[int(torch.randint(len(self.images), (1,), generator=g))]
        return {"image": name, "motion": MOTIONS[label % len(MOTIONS)], "label": label}


__all__ = ["HELD_OUT_IMAGES", "IMAGES", "LATENT_STD", "LinearVAE", "MOTIONS", "NaturalVideoDataset", "film", "load_image"]
