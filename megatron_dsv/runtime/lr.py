"""The predictor's optimizer groups and learning rate: one implementation for every optimizer.

The predictor trains at the model's learning rate (or ``--dsv-predictor-lr``) in stage 1 and at
``--dsv-stage2-predictor-lr-scale`` times that in stage 2. Its parameters sit in optimizer groups
of their own, marked :data:`PREDICTOR_GROUP_KEY`:

* Megatron builds them from :func:`predictor_param_overrides` (its ``config_overrides``); its
  scheduler recomputes each group's ``lr`` from ``max_lr``/``min_lr`` at every step, so the scale
  is applied to those;
* a plain torch optimizer gets them from :func:`predictor_param_groups`; only ``lr`` exists there.

:func:`set_predictor_lr_scale` handles both: the unscaled rates are kept in the group
(``dsv_base_*``, saved with the optimizer's state), so it is idempotent and a resumed run agrees.

Megatron's optimizer clips parameters tagged with a registered ``grad_norm_group`` by their own
norm and leaves them out of the model's norm (its mechanism for MTP heads). Without this the
predictor's gradients enter the model's ``--clip-grad`` norm, which shrinks the model's updates in
stage 1 and makes a DSV run diverge from its dense baseline before any layer goes sparse.
:func:`separate_predictor_grad_norm` does that, once, explicitly (the runtime calls it).
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Tuple

import torch

PREDICTOR_GROUP_KEY = "dsv_predictor"
"""Marker key of the optimizer parameter groups that hold only DSV predictor parameters."""

GRAD_NORM_GROUP = "dsv_predictor"
"""Megatron ``grad_norm_group`` of the predictor parameters."""

_BASE_KEYS = (("lr", "dsv_base_lr"), ("max_lr", "dsv_base_max_lr"), ("min_lr", "dsv_base_min_lr"))


def is_predictor_param(name: str, param: Optional[torch.nn.Parameter] = None) -> bool:
    """True for DSV predictor parameters (by their module path)."""
    return ".predictor.weight_" in name or name.startswith("predictor.weight_")


def predictor_param_groups(model: torch.nn.Module, lr: float, predictor_lr: Optional[float] = None, **kw) -> List[Dict]:
    """Torch optimizer parameter groups: the model's, and the predictors' (marked) apart."""
    pred, rest = [], []
    for name, p in model.named_parameters():
        (pred if is_predictor_param(name, p) else rest).append(p)
    groups = [{"params": rest, "lr": lr, **kw}]
    if pred:
        groups.append({"params": pred, "lr": predictor_lr or lr, PREDICTOR_GROUP_KEY: True, **kw})
    return groups


def predictor_groups(optimizer) -> List[Dict]:
    """The optimizer's parameter groups marked :data:`PREDICTOR_GROUP_KEY` (Megatron's overrides and
    :func:`predictor_param_groups` mark them; :func:`check_predictor_groups` marks a plain torch
    group that holds only predictor parameters)."""
    return [g for g in getattr(optimizer, "param_groups", []) if g.get(PREDICTOR_GROUP_KEY)]


def check_predictor_groups(optimizer, predictor_params: Iterable[torch.nn.Parameter]) -> None:
    """Refuse an optimizer whose groups mix predictor and model parameters (scaling such a group
    would slow the model) or that has predictor parameters in no marked group."""
    pred = {id(p) for p in predictor_params}
    for g in getattr(optimizer, "param_groups", []):
        ids = {id(p) for p in g["params"]}
        if ids & pred and not ids <= pred:
            raise ValueError(
                "an optimizer parameter group mixes predictor and model parameters; give the "
                "predictors their own group (megatron_dsv.runtime.lr.predictor_param_groups)."
            )
        if ids and ids <= pred and not g.get(PREDICTOR_GROUP_KEY):
            g[PREDICTOR_GROUP_KEY] = True


def set_predictor_lr_scale(optimizer, scale: float) -> int:
    """Predictor groups at ``scale`` times their base rates (``lr``, and Megatron's ``max_lr`` /
    ``min_lr``); the current ``lr`` follows so the next step already uses it. Idempotent. Returns
    the number of groups changed."""
    changed = 0
    for group in predictor_groups(optimizer):
        for key, base_key in _BASE_KEYS:
            if key in group and base_key not in group:
                group[base_key] = float(group[key])
        targets = {key: group[base_key] * scale for key, base_key in _BASE_KEYS if base_key in group}
        if all(_value(group.get(k)) == v for k, v in targets.items()):
            continue
        for key, value in targets.items():
            if hasattr(group[key], "fill_"):  # Megatron may keep lr as a tensor
                group[key].fill_(value)
            else:
                group[key] = value
        changed += 1
    return changed


def _value(x):
    return float(x) if x is not None else None


def predictor_base_lr(config, args=None) -> Tuple[Optional[float], Optional[float]]:
    """``(max_lr, min_lr)`` of the predictor groups: ``--dsv-predictor-lr`` when set (the minimum
    keeps ``--min-lr``'s ratio to ``--lr``), else the model's ``--lr`` / ``--min-lr``."""
    lr = getattr(config, "lr", None)
    min_lr = getattr(config, "min_lr", None)
    own = getattr(args, "dsv_predictor_lr", 0.0) or 0.0
    if own and lr:
        return own, (min_lr or 0.0) * own / lr
    return lr, min_lr


def predictor_param_overrides(config, args=None) -> Dict:
    """Megatron optimizer ``config_overrides`` entry that puts DSV predictor parameters in their
    own parameter groups (marked :data:`PREDICTOR_GROUP_KEY`) at the predictor's base rates.
    Matches nothing in a model without DSV predictors."""
    from megatron.core.optimizer.optimizer_config import ParamKey, ParamWithNamePredicate

    key = ParamKey(
        with_name_predicate=ParamWithNamePredicate(
            name="dsv_predictor", fn=lambda param, name: is_predictor_param(name, param)
        )
    )
    override = {PREDICTOR_GROUP_KEY: True}
    max_lr, min_lr = predictor_base_lr(config, args)
    if max_lr is not None:
        override["max_lr"] = max_lr
    if min_lr is not None:
        override["min_lr"] = min_lr
    return {key: override}


def register_grad_norm_group() -> bool:
    """Add :data:`GRAD_NORM_GROUP` to Megatron's separate grad-norm groups (idempotent); False
    when this megatron-core has none (the predictor then shares the model's norm)."""
    try:
        from megatron.core.optimizer import optimizer as mopt
    except ImportError:  # pragma: no cover - ops-only use without Megatron
        return False
    groups = getattr(mopt, "SEPARATE_GRAD_NORM_GROUPS", None)
    if groups is None:
        return False
    if GRAD_NORM_GROUP not in groups:
        mopt.SEPARATE_GRAD_NORM_GROUPS = tuple(groups) + (GRAD_NORM_GROUP,)
    return True


def separate_predictor_grad_norm(model) -> int:
    """Clip the predictors of ``model`` (a module or list of chunks) by their own gradient norm in
    Megatron's optimizer, outside the model's. Call before the first optimizer step. Returns the
    number of parameters tagged (0 when this megatron-core has no separate groups)."""
    if not register_grad_norm_group():
        return 0
    chunks = model if isinstance(model, (list, tuple)) else [model]
    n = 0
    for chunk in chunks:
        for name, p in chunk.named_parameters():
            if is_predictor_param(name, p):
                p.grad_norm_group = GRAD_NORM_GROUP
                n += 1
    return n


__all__ = [
    "GRAD_NORM_GROUP",
    "PREDICTOR_GROUP_KEY",
    "check_predictor_groups",
    "is_predictor_param",
    "predictor_base_lr",
    "predictor_param_groups",
    "predictor_param_overrides",
    "predictor_groups",
    "register_grad_norm_group",
    "separate_predictor_grad_norm",
    "set_predictor_lr_scale",
]
