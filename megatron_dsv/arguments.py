"""``add_dsv_args(parser)`` for Megatron's ``extra_args_provider``.

One flag per DSVConfig field, generated from the dataclass so the two can never drift: the flag
is the field name with dashes (``dsv_predictor_rank`` -> ``--dsv-predictor-rank``), the help is
the field's docstring, the default is the field's default. Values are validated by DSVConfig
when the config is built (``DSVConfig.from_namespace(args)``), which :func:`add_dsv_args` also
does at parse time through :func:`validate_dsv_args`.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import textwrap
from typing import Dict

from megatron_dsv import config as _config
from megatron_dsv.config import BACKENDS, DENSE_BACKENDS, MODES, PREDICTOR_INPUTS, DSVConfig, parse_cube

_CHOICES = {
    "dsv_mode": MODES,
    "dsv_predictor_input": PREDICTOR_INPUTS,
    "dsv_backend": BACKENDS,
    "dsv_dense_backend": DENSE_BACKENDS,
}


@functools.lru_cache(maxsize=1)
def field_docs() -> Dict[str, str]:
    """Attribute docstrings of DSVConfig (the string literal after each field)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(_config)))
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "DSVConfig")
    docs, body = {}, cls.body
    for node, nxt in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(nxt, ast.Expr)
            and isinstance(getattr(nxt, "value", None), ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def add_dsv_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``--dsv-*`` flags in a "DSV sparse attention" group; returns ``parser``."""
    group = parser.add_argument_group(title="DSV sparse attention (megatron_dsv)")
    docs = field_docs()
    for f in dataclasses.fields(DSVConfig):
        flag = "--" + f.name.replace("_", "-")
        kw = dict(dest=f.name, default=f.default, help=docs.get(f.name, ""))
        if f.name == "dsv_query_group":
            kw.update(type=parse_cube, metavar="TxHxW")
            kw["default"] = f.default
        elif f.name in _CHOICES:
            kw.update(type=str, choices=_CHOICES[f.name])
        elif isinstance(f.default, bool):
            kw.update(type=_str2bool)
        else:
            kw.update(type=type(f.default))
        group.add_argument(flag, **kw)
    return parser


def validate_dsv_args(args) -> DSVConfig:
    """Build (and so validate) the DSVConfig of parsed ``args``; raises with a fix-it message."""
    return DSVConfig.from_namespace(args)


def _str2bool(v: str) -> bool:
    if v.lower() in ("1", "true", "yes", "on"):
        return True
    if v.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {v!r}")
