import argparse
import sys

import pytest

from megatron_dsv import DSVConfig, add_dsv_args
from megatron_dsv.arguments import field_docs


def test_every_field_has_a_flag_and_help():
    import dataclasses

    parser = add_dsv_args(argparse.ArgumentParser())
    dests = {a.dest: a for a in parser._actions}
    for f in dataclasses.fields(DSVConfig):
        assert f.name in dests, f.name
        assert dests[f.name].option_strings == ["--" + f.name.replace("_", "-")]
        assert len(field_docs()[f.name]) > 10
    assert DSVConfig.from_namespace(parser.parse_args([])) == DSVConfig()


@pytest.mark.parametrize(
    "argv,msg",
    [
        (["--dsv-predictor-rank", "0"], "--dsv-predictor-rank must be an integer"),
        (["--dsv-critical-mass", "1.5"], "--dsv-critical-mass must be in"),
        (["--dsv-min-sparsity", "-0.1"], "--dsv-min-sparsity must be in"),
        (["--dsv-switch-min-iters", "10", "--dsv-switch-max-iters", "5"], "must be >="),
        (["--dsv-stage2-predictor-lr-scale", "0"], "lr-scale"),
    ],
)
def test_bad_values_say_what_to_change(argv, msg):
    args = add_dsv_args(argparse.ArgumentParser()).parse_args(argv)
    with pytest.raises(ValueError, match=msg):
        DSVConfig.from_namespace(args)


def test_bad_choices_and_cube_rejected_by_parser(capsys):
    parser = add_dsv_args(argparse.ArgumentParser())
    for argv in (["--dsv-mode", "fast"], ["--dsv-query-group", "2x4"]):
        with pytest.raises(SystemExit):
            parser.parse_args(argv)
    assert "invalid" in capsys.readouterr().err
    with pytest.raises(ValueError, match="three positive ints"):
        DSVConfig(dsv_query_group="2x0x4")


def test_megatron_parse_args_and_config(monkeypatch):
    from megatron.core.transformer.spec_utils import import_module
    from megatron.training.arguments import core_transformer_config_from_args, parse_args, validate_args

    from megatron_dsv.layers.transformer_config import DSVTransformerConfig

    argv = [
        "pretrain", "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
        "--seq-length", "128", "--max-position-embeddings", "128", "--micro-batch-size", "1",
        "--transformer-impl", "local", "--tokenizer-type", "NullTokenizer", "--vocab-size", "128",
        "--spec", "megatron_dsv.specs", "dsv_gpt_layer_spec",
        "--dsv-mode", "sparse", "--dsv-predictor-rank", "8", "--dsv-query-group", "4x4x4",
        "--dsv-kv-block", "16", "--dsv-critical-mass", "0.95", "--dsv-min-sparsity", "0.7",
    ]
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    args = validate_args(parse_args(extra_args_provider=add_dsv_args))
    cfg = core_transformer_config_from_args(args, DSVTransformerConfig)
    assert isinstance(cfg, DSVTransformerConfig)
    assert (cfg.dsv_mode, cfg.dsv_predictor_rank, cfg.dsv_query_group, cfg.dsv_kv_block) == ("sparse", 8, (4, 4, 4), 16)
    assert (cfg.dsv_critical_mass, cfg.dsv_min_sparsity, cfg.group_size) == (0.95, 0.7, 64)
    spec = import_module(args.spec)
    from megatron_dsv.specs import dsv_gpt_layer_spec

    assert spec is dsv_gpt_layer_spec
