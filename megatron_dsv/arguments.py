"""``add_dsv_args(parser)`` for Megatron's ``extra_args_provider``, and ``validate_dsv_args(args)``.

One flag per DSVConfig field, generated from the dataclass so the two can never drift: the flag
is the field name with dashes (``dsv_predictor_rank`` -> ``--dsv-predictor-rank``), the help is
the field's docstring, the default is the field's default. Each flag's ``type`` is the field's
rule from ``megatron_dsv.config``, so a bad value stops the parser with the same fix-it message
DSVConfig gives (``argparse.ArgumentTypeError``), before anything is built.

Checks that span flags (``--dsv-cp-split`` against ``--context-parallel-size``, the speed-table
file, Megatron flags DSV cannot run with) need the whole namespace: call :func:`validate_dsv_args`
right after Megatron's argument parsing, before the model is built.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import json
import os
import textwrap
from typing import Callable, Dict

from megatron_dsv import config as _config
from megatron_dsv.config import DSVConfig, parse_cp_split, rule_of


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


def _flag_type(name: str, rule) -> Callable[[str], object]:
    """argparse ``type`` for one field: the rule's parse, its message carried by
    ArgumentTypeError (argparse replaces a ValueError's message with "invalid ... value")."""

    def parse(text: str):
        try:
            return rule.parse(text, "value")
        except (TypeError, ValueError) as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    parse.__name__ = name
    return parse


def add_dsv_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``--dsv-*`` flags in a "DSV sparse attention" group; returns ``parser``."""
    group = parser.add_argument_group(title="DSV sparse attention (megatron_dsv)")
    docs = field_docs()
    for f in dataclasses.fields(DSVConfig):
        rule = rule_of(f)
        group.add_argument(
            "--" + f.name.replace("_", "-"), dest=f.name, default=f.default,
            type=_flag_type(f.name, rule), metavar=rule.metavar, help=docs.get(f.name, ""),
        )
    return parser


def validate_dsv_args(args) -> DSVConfig:
    """Checks across flags, run after parsing and before the model is built; returns the
    DSVConfig of ``args``. Raises ValueError (FileNotFoundError for a missing speed table) with
    a message naming the flags to change.

    ``args``: Megatron's parsed arguments (any object with the ``dsv_*`` attributes; Megatron
    flags it lacks take their defaults: no context parallelism, no dropout).
    """
    cfg = DSVConfig.from_namespace(args)
    cp = getattr(args, "context_parallel_size", None) or 1
    split = parse_cp_split(cfg.dsv_cp_split)
    if isinstance(split, tuple):
        heads, seqs = split
        if heads * seqs != cp:
            raise ValueError(
                f"--dsv-cp-split {cfg.dsv_cp_split} splits {heads * seqs} ranks but "
                f"--context-parallel-size is {cp}: use HxS with H*S = {cp}, or auto, head or seq."
            )
        num_heads = getattr(args, "num_attention_heads", None)
        if cp > 1 and num_heads:
            from megatron_dsv.cp.plan import fixed_plan

            tp = getattr(args, "tensor_model_parallel_size", None) or 1
            kv = args.num_query_groups if getattr(args, "group_query_attention", False) else num_heads
            fixed_plan(split, cp, num_heads // tp, max(1, kv // tp))
    if cfg.enabled:
        if cp > 1 and cfg.dsv_backend == "cudnn":
            raise ValueError(
                "--dsv-backend cudnn serves one rank's whole sequence; context parallelism's "
                "selective key/value exchange runs the Triton kernels. Use --dsv-backend auto "
                "(cuDNN where a layer runs without CP, Triton under CP) or triton."
            )
        if cp > 1 and cfg.dsv_predictor_input == "hidden":
            raise ValueError(
                "--dsv-predictor-input hidden is not supported with context parallelism (the layer "
                "input is split by tokens, the predictor by heads); use --dsv-predictor-input qk."
            )
        dropout = getattr(args, "attention_dropout", 0.0) or 0.0
        if dropout > 0:
            raise ValueError(
                f"DSV sparse attention has no attention dropout; set --attention-dropout 0 "
                f"(got {dropout}) or --dsv-mode dense."
            )
        if getattr(args, "calculate_per_token_loss", False):
            raise ValueError(
                "--calculate-per-token-loss is not supported with DSV: Megatron would divide the "
                "predictor's auxiliary-loss gradient by the global token count. Drop the flag or "
                "use --dsv-mode dense."
            )
    if cfg.speed_table_file:
        _check_speed_table(cfg.speed_table_file, cfg.dsv_kv_block)
    if cfg.enabled and cfg.dsv_kv_block == 1:
        # issue 15 item 4: single keys are not a training option. H200, S=64k, D=128, 90% sparse,
        # 64-token groups (c21a846): x1.36 over cuDNN dense, the selection alone 98 of 166 ms,
        # against x7.04 with 64-key blocks, which a trained 16k DiT needed at under 2x the density
        # for the same recall (0.153 vs 0.079). DSVConfig keeps 1 for CPU-sized models and tests.
        raise ValueError(
            "--dsv-kv-block 1 (single keys) is not offered for training: on an H200 at 90% sparsity "
            "it ran x1.36 over cuDNN dense attention against x7.04 with 64-key blocks, which need under "
            "2x the density for the same recall. Use --dsv-kv-block 64 (or 32, 16: whole blocks per "
            "sequence). A checkpoint trained with single keys resumes with --dsv-kv-block 64 "
            "--dsv-on-resume reset (weights and predictor load, the DSV schedule restarts)."
        )
    if cfg.dsv_cp_calibration:
        from megatron_dsv.cp.cost_model import Calibration

        if not os.path.isfile(cfg.dsv_cp_calibration):
            raise FileNotFoundError(
                f"--dsv-cp-calibration {cfg.dsv_cp_calibration}: no such file. Write one per cluster with "
                "torchrun ... -m megatron_dsv.tools.calibrate_cp --out FILE, or drop the flag to measure "
                "the links at the first plan."
            )
        try:
            Calibration.load(cfg.dsv_cp_calibration)
        except (ValueError, KeyError, TypeError, AttributeError) as err:  # json.JSONDecodeError is a ValueError
            raise ValueError(
                f"--dsv-cp-calibration {cfg.dsv_cp_calibration} is not a calibration file ({err}); "
                "write it with python -m megatron_dsv.tools.calibrate_cp."
            ) from None
    return cfg


def _check_speed_table(path: str, kv_block: int) -> None:
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"--dsv-speed-table {path}: no such file. Write one with benchmarks/attention.py on "
            "this GPU, or use --dsv-speed-table measure (timed in the run) or assume (sparse at density <= 0.5)."
        )
    from megatron_dsv.runtime.speed_table import SpeedTable

    try:
        SpeedTable.from_json(path, kv_block=kv_block)
    except json.JSONDecodeError as err:
        raise ValueError(
            f"--dsv-speed-table {path} is not valid JSON ({err}); write it with benchmarks/attention.py."
        ) from err


__all__ = ["add_dsv_args", "validate_dsv_args", "field_docs"]
