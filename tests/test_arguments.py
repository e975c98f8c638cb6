import argparse
import dataclasses
import json
import sys

import pytest

from megatron_dsv import DSVConfig, add_dsv_args
from megatron_dsv.arguments import field_docs, validate_dsv_args
from megatron_dsv.config import rule_of


def parser():
    return add_dsv_args(argparse.ArgumentParser(prog="pretrain"))


def test_every_field_has_a_flag_help_and_rule():
    dests = {a.dest: a for a in parser()._actions}
    for f in dataclasses.fields(DSVConfig):
        assert f.name in dests, f.name
        assert dests[f.name].option_strings == ["--" + f.name.replace("_", "-")]
        assert len(field_docs()[f.name]) > 10
        assert rule_of(f).check(f.default, f.name) == f.default
    assert DSVConfig.from_namespace(parser().parse_args([])) == DSVConfig()


@pytest.mark.parametrize(
    "argv,fix",
    [
        (["--dsv-query-group", "3x3"], "must be three positive ints T x H x W such as 2x4x4; got '3x3'"),
        (["--dsv-query-group", "2x4.5x4"], "must be three positive ints T x H x W"),
        (["--dsv-critical-mass", "1.5"], "must be a number in (0, 1]; got 1.5"),
        (["--dsv-min-sparsity", "-1"], "must be a number in [0, 1]; got -1.0"),
        (["--dsv-min-sparsity", "nan"], "must be a number in [0, 1]; got nan"),
        (["--dsv-predictor-rank", "0"], "must be an integer in [1, 256]; got 0"),
        (["--dsv-predictor-rank", "1.5"], "must be an integer in [1, 256]; got '1.5'"),
        (["--dsv-kv-block", "0"], "must be an integer in [1, 1024]; got 0"),
        (["--dsv-mode", "fast"], "must be one of dense, sparse, auto; got 'fast'"),
        (["--dsv-cp-split", "3y"], "must be auto, head, seq or HxS such as 4x2"),
        (["--dsv-switch-relative-recall", "0"], "must be a number in (0, 1]; got 0.0"),
    ],
)
def test_bad_flags_fail_at_parse_time_with_the_fix(argv, fix, capsys):
    with pytest.raises(SystemExit) as exc:
        parser().parse_args(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {argv[0]}: value {fix}" in err, err
    assert "invalid" not in err  # argparse's own "invalid <type> value" would hide the fix


@pytest.mark.parametrize(
    "name,text,value",
    [("dsv_critical_mass", "1.5", 1.5), ("dsv_predictor_rank", "0", 0), ("dsv_query_group", "3x3", "3x3")],
)
def test_flag_and_python_give_the_same_message(name, text, value, capsys):
    with pytest.raises(SystemExit):
        parser().parse_args(["--" + name.replace("_", "-"), text])
    cli = capsys.readouterr().err.split(": value ", 1)[1].strip()
    with pytest.raises(ValueError) as exc:
        DSVConfig(**{name: value})
    assert str(exc.value) == f"{name} (--{name.replace('_', '-')}) {cli}"


@pytest.mark.parametrize(
    "kw,fix",
    [
        (dict(dsv_min_sparsity="0.5"), r"dsv_min_sparsity \(--dsv-min-sparsity\) must be a number in \[0, 1\]; got '0.5' of type str"),
        (dict(dsv_predictor_rank=True), r"dsv_predictor_rank \(--dsv-predictor-rank\) must be an integer in \[1, 256\]; got True of type bool"),
        (dict(dsv_kv_block=16.0), r"dsv_kv_block \(--dsv-kv-block\) must be an integer in \[1, 1024\]; got 16.0 of type float"),
        (dict(dsv_mode=None), r"dsv_mode \(--dsv-mode\) must be a string, one of dense, sparse, auto; got None"),
        (dict(dsv_speed_table=None), r"dsv_speed_table \(--dsv-speed-table\) must be a string"),
    ],
)
def test_config_types_checked(kw, fix):
    with pytest.raises(TypeError, match=fix):
        DSVConfig(**kw)


def test_config_values_checked_and_normalised():
    with pytest.raises(ValueError, match=r"three positive ints T x H x W such as 2x4x4; got \(2, 4.5, 4\)"):
        DSVConfig(dsv_query_group=(2, 4.5, 4))  # was silently truncated to (2, 4, 4)
    with pytest.raises(ValueError, match=r"--dsv-switch-max-iters \(5\) must be >= --dsv-switch-min-iters \(10\)"):
        DSVConfig(dsv_switch_min_iters=10, dsv_switch_max_iters=5)
    cfg = DSVConfig(dsv_min_sparsity=1, dsv_query_group=[1, 2, 2])
    assert cfg.dsv_min_sparsity == 1.0 and type(cfg.dsv_min_sparsity) is float
    assert cfg.dsv_query_group == (1, 2, 2)


def test_transformer_config_types_checked():
    from megatron_dsv.layers.transformer_config import DSVTransformerConfig

    base = dict(num_layers=1, hidden_size=64, num_attention_heads=4)
    with pytest.raises(TypeError, match=r"dsv_min_sparsity \(--dsv-min-sparsity\) must be a number in \[0, 1\]"):
        DSVTransformerConfig(**base, dsv_min_sparsity="0.5")
    with pytest.raises(TypeError, match=r"dsv_predictor_rank .* got True of type bool"):
        DSVTransformerConfig(**base, dsv_predictor_rank=True)
    assert DSVTransformerConfig(**base, dsv_predictor_rank=8).dsv_config().dsv_predictor_rank == 8


def namespace(argv=(), **megatron):
    args = parser().parse_args(list(argv))
    for k, v in megatron.items():
        setattr(args, k, v)
    return args


@pytest.mark.parametrize("split", ["auto", "head", "seq", "2x2", "4x1", "1x4"])
def test_cp_split_matching_cp_size_passes(split):
    args = namespace(["--dsv-cp-split", split], context_parallel_size=4, num_attention_heads=8)
    assert validate_dsv_args(args).dsv_cp_split == split


@pytest.mark.parametrize(
    "split,cp,fix",
    [
        ("3x5", 4, r"--dsv-cp-split 3x5 splits 15 ranks but --context-parallel-size is 4: use HxS with H\*S = 4"),
        ("2x2", 1, r"--dsv-cp-split 2x2 splits 4 ranks but --context-parallel-size is 1: use HxS with H\*S = 1"),
    ],
)
def test_cp_split_against_cp_size(split, cp, fix):
    with pytest.raises(ValueError, match=fix):
        validate_dsv_args(namespace(["--dsv-cp-split", split], context_parallel_size=cp))


def test_cp_split_against_heads():
    args = namespace(["--dsv-cp-split", "4x1"], context_parallel_size=4, num_attention_heads=4,
                     tensor_model_parallel_size=2)
    with pytest.raises(ValueError, match="only 2 heads per tensor-parallel rank; use at most 2"):
        validate_dsv_args(args)


@pytest.mark.parametrize(
    "argv,megatron,exc,fix",
    [
        ([], dict(calculate_per_token_loss=True), ValueError, "--calculate-per-token-loss is not supported with DSV.*Drop the flag"),
        ([], dict(attention_dropout=0.1), ValueError, r"set --attention-dropout 0 \(got 0.1\)"),
        (["--dsv-predictor-input", "hidden", "--dsv-predictor-fit", "gradient"], dict(context_parallel_size=2), ValueError, "use --dsv-predictor-input qk"),
        (["--dsv-backend", "cudnn"], dict(context_parallel_size=2), ValueError, "Use --dsv-backend auto"),
    ],
)
def test_flags_dsv_cannot_run_with(argv, megatron, exc, fix):
    with pytest.raises(exc, match=fix):
        validate_dsv_args(namespace(argv, **megatron))
    assert validate_dsv_args(namespace(argv + ["--dsv-mode", "dense"], **megatron)).dsv_mode == "dense"


def test_speed_table_checked_before_the_model(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(FileNotFoundError, match="nope.json: no such file. Write one with benchmarks/attention.py"):
        validate_dsv_args(namespace(["--dsv-speed-table", str(missing)]))
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{rows")
    with pytest.raises(ValueError, match="garbage.json is not valid JSON .*benchmarks/attention.py"):
        validate_dsv_args(namespace(["--dsv-speed-table", str(garbage)]))
    table = tmp_path / "speed.json"
    rows = [{"kind": "dsv_kvb64", "kv_block": 64, "S": 16384, "D": 128, "sparsity": 0.9, "speedup_fwd_bwd": 4.0}]
    table.write_text(json.dumps({"rows": rows}))
    with pytest.raises(ValueError, match="no DSV rows .* for kv_block=32; write one with benchmarks/attention.py"):
        validate_dsv_args(namespace(["--dsv-speed-table", str(table), "--dsv-kv-block", "32"]))
    assert validate_dsv_args(namespace(["--dsv-speed-table", str(table)])).dsv_kv_block == 64
    # the two rules are no files: measure (the default) and assume
    assert validate_dsv_args(namespace([])).dsv_speed_table == "measure"
    assert validate_dsv_args(namespace(["--dsv-speed-table", "assume", "--dsv-speed-margin", "0.1"])).dsv_speed_margin == 0.1
    with pytest.raises(SystemExit):  # argparse: the rule's message, before anything is built
        namespace(["--dsv-speed-table", ""])


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
    # Megatron's default --attention-dropout is 0.1, which DSV layers would refuse at build time
    with pytest.raises(ValueError, match="set --attention-dropout 0"):
        validate_dsv_args(args)
    args.attention_dropout = 0.0
    assert validate_dsv_args(args) == DSVConfig.from_namespace(args)
    cfg = core_transformer_config_from_args(args, DSVTransformerConfig)
    assert isinstance(cfg, DSVTransformerConfig)
    assert (cfg.dsv_mode, cfg.dsv_predictor_rank, cfg.dsv_query_group, cfg.dsv_kv_block) == ("sparse", 8, (4, 4, 4), 16)
    assert (cfg.dsv_critical_mass, cfg.dsv_min_sparsity, cfg.group_size) == (0.95, 0.7, 64)
    spec = import_module(args.spec)
    from megatron_dsv.specs import dsv_gpt_layer_spec

    assert spec is dsv_gpt_layer_spec


def test_cp_calibration_file_is_checked_before_the_model_is_built(tmp_path):
    with pytest.raises(FileNotFoundError, match="calibrate_cp --out FILE"):
        validate_dsv_args(namespace(["--dsv-cp-calibration", str(tmp_path / "missing.json")], context_parallel_size=2))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="is not a calibration file.*calibrate_cp"):
        validate_dsv_args(namespace(["--dsv-cp-calibration", str(bad)], context_parallel_size=2))


def test_single_keys_are_not_a_training_option():
    """Issue 15 item 4: --dsv-kv-block 1 is refused outside dense mode, with the measurement and the
    resume path for a checkpoint trained with single keys; dense mode and key blocks pass."""
    with pytest.raises(ValueError, match=r"--dsv-kv-block 1 \(single keys\) is not offered for training.*x1.36"
                                         r".*--dsv-kv-block 64 --dsv-on-resume reset"):
        validate_dsv_args(namespace(["--dsv-kv-block", "1"]))
    assert validate_dsv_args(namespace(["--dsv-kv-block", "1", "--dsv-mode", "dense"])).dsv_kv_block == 1
    assert validate_dsv_args(namespace(["--dsv-kv-block", "16"])).dsv_kv_block == 16
