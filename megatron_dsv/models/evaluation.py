"""A fixed validation set for flow-matching video DiTs: the same videos, t and noise at every
evaluation point, so two evaluations (two iterations, two runs, two arms) differ only by the model.

The set is ``N`` held-out videos x ``Q`` timesteps: the Q quantiles ``sigmoid(Phi^-1((q + 0.5) / Q))``
of the logit-normal distribution training draws t from (``flow_matching_loss``: ``t =
sigmoid(randn)``), so the mean over the set is a stratified estimate of the training objective
on held-out data, and each quantile is one t bucket of equal probability. The noise of item
``j = video * Q + q`` comes from its own CPU generator seeded by ``(seed, j)``: the same on any
device and for any batch size.

:func:`evaluate_fixed` runs a model over the set (eval mode, no gradient, nothing profiled or
trained) as it is, or with every DSV layer forced dense for the evaluation only, so "the model is
worse" and "its sparse inference is worse" are told apart. :class:`FixedValidationDataset` yields
the same items (videos with their t and noise) for a data loader, e.g. Megatron's validation.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor

from megatron_dsv.layers.attention import dsv_attention_layers
from megatron_dsv.models.video_dit import flow_interpolate


def logit_normal_quantiles(n: int) -> Tensor:
    """The ``n`` bucket midpoints ``sigmoid(Phi^-1((q + 0.5) / n))``, fp64 ``[n]``, increasing."""
    if n < 1:
        raise ValueError(f"need at least one t quantile, got {n}.")
    p = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    return torch.sigmoid(torch.special.ndtri(p))


def fixed_noise(item: int, shape: Sequence[int], seed: int) -> Tensor:
    """Standard-normal noise of set item ``item`` (fp32, CPU): its own generator, so the draw
    does not depend on the device, the batch or any other item."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + item) % (2**62))
    return torch.randn(tuple(shape), generator=g)


class FixedValidationDataset(torch.utils.data.Dataset):
    """``num_videos x t_quantiles`` items ``{"latents", "label", "t", "noise", "t_bucket"}``;
    item ``j`` is video ``j // Q`` of ``videos`` at quantile ``j % Q`` (consecutive items cover
    every t of a video), with :func:`fixed_noise` ``(j)``.

    ``length`` (default ``num_videos * Q``) may exceed the set: item ``i`` is then item
    ``i % (num_videos * Q)``, so a sampler that walks on from where the last evaluation stopped
    sees the same set again when each evaluation consumes a multiple of the set.
    """

    def __init__(self, videos: torch.utils.data.Dataset, num_videos: int, t_quantiles: int = 8, seed: int = 0,
                 length: Optional[int] = None):
        if num_videos < 1 or num_videos > len(videos):
            raise ValueError(f"num_videos must lie in [1, {len(videos)}] (the videos given), got {num_videos}.")
        self.videos, self.num_videos, self.seed = videos, num_videos, seed
        self.t = logit_normal_quantiles(t_quantiles).float()
        self.size = num_videos * t_quantiles
        self.length = self.size if length is None else int(length)
        if self.length < 1:
            raise ValueError(f"length must be >= 1, got {length}.")

    @property
    def t_quantiles(self) -> int:
        return self.t.numel()

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Dict[str, Tensor]:
        if not 0 <= index < self.length:
            raise IndexError(index)
        j = index % self.size
        video, q = divmod(j, self.t_quantiles)
        item = dict(self.videos[video])
        item["t"] = self.t[q].clone()
        item["t_bucket"] = torch.tensor(q)
        item["noise"] = fixed_noise(j, item["latents"].shape, self.seed)
        return item


@torch.no_grad()
def evaluate_fixed(model: torch.nn.Module, videos: Tensor, *, labels: Optional[Tensor] = None, t_quantiles: int = 8,
                   seed: int = 0, batch_size: int = 8, force_dense: bool = False) -> Dict:
    """Flow-matching loss of ``model`` (a ``VideoDiT``) on the fixed set built from ``videos``.

    Args:
        videos: held-out latents ``[N, C, T, H, W]`` (any device; moved to the model's).
        labels: their classes ``[N]`` (models with class conditioning), or None.
        t_quantiles: Q logit-normal t quantiles (8: the t buckets reported).
        seed: the noise draws (:func:`fixed_noise`); keep it fixed across evaluations.
        batch_size: items per forward (does not change the result beyond float rounding).
        force_dense: run every DSV layer dense for this evaluation (their states are restored
            afterwards, also on error); False runs the model as trained (its sparse layers).

    Returns ``{"loss": float, "loss_by_t": [Q] floats, "t": [Q] floats, "num_videos": N,
    "seed": seed, "force_dense": bool, "sparse_layers": [layer numbers that ran sparse]}``;
    ``loss`` is the mean over all N x Q items (each the MSE over its video), ``loss_by_t[q]``
    the mean over the N videos at quantile q.
    """
    if videos.dim() != 5:
        raise ValueError(f"videos must be [N, C, T, H, W], got shape {tuple(videos.shape)}.")
    if labels is not None and labels.shape != (videos.shape[0],):
        raise ValueError(f"labels must be [N={videos.shape[0]}], got shape {tuple(labels.shape)}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    layers = [a for a in dsv_attention_layers(model) if a.predictor is not None]
    saved = [a.state for a in layers]
    was_training = model.training
    device = next(model.parameters()).device
    t_all = logit_normal_quantiles(t_quantiles).float()
    n = videos.shape[0]
    per_item = torch.empty(n * t_quantiles, dtype=torch.float64)
    model.eval()
    try:
        if force_dense:
            for a in layers:
                a.set_sparse(False)
        sparse_layers = [a.layer_number for a in layers if a.sparse]
        for start in range(0, n * t_quantiles, batch_size):
            items = range(start, min(start + batch_size, n * t_quantiles))
            idx = torch.tensor([j // t_quantiles for j in items])
            x = videos[idx].to(device=device, dtype=torch.float32)
            t = t_all[torch.tensor([j % t_quantiles for j in items])].to(device)
            noise = torch.stack([fixed_noise(j, videos.shape[1:], seed) for j in items]).to(device)
            y = None if labels is None else labels[idx].to(device)
            x_t, velocity = flow_interpolate(x, t, noise)
            v = model(x_t, t, y)
            per_item[start : start + len(items)] = (v.float() - velocity).pow(2).flatten(1).mean(1).double().cpu()
    finally:
        for a, state in zip(layers, saved):
            a.apply(state)
        model.train(was_training)
    by_t = per_item.view(n, t_quantiles).mean(0)
    return {
        "loss": float(per_item.mean()), "loss_by_t": by_t.tolist(), "t": t_all.tolist(), "num_videos": n,
        "seed": seed, "force_dense": force_dense, "sparse_layers": sparse_layers,
    }


def stack_videos(dataset: torch.utils.data.Dataset, count: int) -> tuple:
    """The first ``count`` items of a video dataset as ``(latents [N, C, T, H, W], labels [N])``."""
    items: List[Dict[str, Tensor]] = [dataset[i] for i in range(count)]
    return torch.stack([x["latents"] for x in items]), torch.stack([torch.as_tensor(x["label"]) for x in items])


__all__ = ["FixedValidationDataset", "evaluate_fixed", "fixed_noise", "logit_normal_quantiles", "stack_videos"]
