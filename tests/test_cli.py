"""The command line: flags and key=value overrides in any order, and one-line errors (exit 2) for
a bad command line. Nothing here trains: every case stops at parsing or at `config show`."""

import pytest
import yaml

from jaxscale import cli
from jaxscale import config as config_lib

# (subcommand tokens, flags it needs) for every subcommand that takes overrides
WITH_OVERRIDES = [
    (["train"], ["--cpu-devices", "8"]),
    (["config", "show"], []),
    (["inspect"], ["--cpu-devices", "8"]),
    (["plan"], ["--devices", "8"]),
]


@pytest.mark.parametrize("command, flags", WITH_OVERRIDES, ids=lambda c: " ".join(c))
def test_flags_and_overrides_mix_in_any_order(command, flags):
    in_order = cli.parse_args([*command, "--config", "tiny", *flags, "steps=5", "workdir=x"])
    mixed = cli.parse_args([*command, "steps=5", "--config", "tiny", *flags, "workdir=x"])
    last = cli.parse_args([*command, "steps=5", "workdir=x", *flags, "--config", "tiny"])
    for args in (in_order, mixed, last):
        assert args.overrides == ["steps=5", "workdir=x"]
        assert args.config == "tiny" and args.func is in_order.func
    assert _values(mixed) == _values(in_order) == _values(last)


def _values(args):
    """The parsed values, without the parser object and handler that every parse adds."""
    return {k: v for k, v in vars(args).items() if k not in ("parser", "func")}


def test_out_of_order_train_resolves_to_the_same_config():
    mixed = cli.parse_args(["train", "steps=5", "--cpu-devices", "8", "workdir=x"])
    in_order = cli.parse_args(["train", "--cpu-devices", "8", "steps=5", "workdir=x"])
    assert mixed.cpu_devices == in_order.cpu_devices == 8
    cfg = config_lib.load(mixed.config, mixed.overrides)
    assert cfg == config_lib.load(in_order.config, in_order.overrides)
    assert (cfg.steps, cfg.workdir) == (5, "x")


def test_config_show_prints_the_same_config_in_any_order(capsys):
    assert cli.main(["config", "show", "steps=5", "--config", "tiny", "model.d_model=32"]) == 0
    mixed = capsys.readouterr().out
    assert cli.main(["config", "show", "--config", "tiny", "steps=5", "model.d_model=32"]) == 0
    assert capsys.readouterr().out == mixed
    assert config_lib.from_dict(yaml.safe_load(mixed)) == config_lib.load(
        "tiny", ["steps=5", "model.d_model=32"])


def test_no_overrides_is_an_empty_list():
    assert cli.parse_args(["config", "show"]).overrides == []


@pytest.mark.parametrize("argv, line", [
    (["train", "--cpu-device", "8", "steps=5"],
     "unrecognized argument '--cpu-device' (did you mean '--cpu-devices'?)"),
    (["train", "steps=5", "--cpu-devices=8", "--confg=tiny"],
     "unrecognized argument '--confg=tiny' (did you mean '--config'?)"),
    (["config", "show", "--cofig", "tiny"],
     "unrecognized argument '--cofig' (did you mean '--config'?)"),
    (["inspect", "--warn-replicated", "3"],
     "unrecognized argument '--warn-replicated' (did you mean '--warn-replicated-bytes'?)"),
    (["plan", "--devices", "4", "--targt", "h100"],
     "unrecognized argument '--targt' (did you mean '--target'?)"),
    (["prepare", "in", "out", "--worker", "2"],
     "unrecognized argument '--worker' (did you mean '--workers'?)"),
    (["train", "--frobnicate"], "unrecognized argument '--frobnicate'"),
    (["train", "steps5"], "override 'steps5' is not of the form key=value"),
    (["config", "show", "steps=5", "=3"], "override '=3' is not of the form key=value"),
    (["inspect", "--cpu-devices", "8", "steps5"], "override 'steps5' is not of the form key=value"),
    (["plan", "--devices", "4", "=3"], "override '=3' is not of the form key=value"),
    (["plot", "workdir", "extra"], "unrecognized argument 'extra' (see 'jaxscale plot --help')"),
    (["plan", "steps=3"],
     "the following arguments are required: --devices (see 'jaxscale plan --help')"),
    (["train", "--cpu-devices", "x"],
     "argument --cpu-devices: invalid int value: 'x' (see 'jaxscale train --help')"),
    (["config", "show", "steps=5", "--config", "tiny", "model.norm=x"],
     "model.norm='x' is not valid; choose one of: rmsnorm, layernorm"),
])
def test_bad_command_line_is_one_line_and_exit_2(argv, line, capsys):
    code = cli.main(argv)
    captured = capsys.readouterr()
    assert code == cli.EXIT_CONFIG == 2
    assert captured.err == f"jaxscale: error: {line}\n"
    assert captured.out == ""
