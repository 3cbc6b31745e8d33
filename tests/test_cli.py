"""The command line's argument handling (the commands themselves are tested with their modules)."""

import pytest

from ossrl.cli import parse_args


@pytest.mark.parametrize("command", [["train", "c.toml"], ["sft", "c.toml"], ["demo"]])
def test_overrides_are_taken_as_words_and_as_set_options_in_any_order(command):
    """`key=value` words and `--set key=value` options both reach the config (words first, then
    options), whichever comes first on the line: argparse alone refuses words after an option."""
    for argv, words, options in (
            (["max_steps=3", "lora.r=4"], ["max_steps=3", "lora.r=4"], []),
            (["--set", "max_steps=3", "--set", "seed=1"], [], ["max_steps=3", "seed=1"]),
            (["max_steps=3", "--set", "seed=1"], ["max_steps=3"], ["seed=1"]),
            (["--set", "seed=1", "max_steps=3", "lora.r=4"], ["max_steps=3", "lora.r=4"], ["seed=1"])):
        args = parse_args(command + argv)
        assert (args.overrides, args.set) == (words, options), argv
        assert args.overrides + args.set == words + options


@pytest.mark.parametrize("extra", [["--bogus"], ["not-an-override"], ["=1"]])
def test_anything_else_after_the_options_is_refused(extra, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["train", "c.toml", "--set", "seed=1", *extra])
    assert exit_info.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err


def test_commands_without_overrides_refuse_key_value_words(capsys):
    with pytest.raises(SystemExit):
        parse_args(["plot", "runs/x", "max_steps=3"])
    assert "unrecognized arguments: max_steps=3" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["train", "a.toml", "b.toml"], ["demo", "foo"], ["sft", "s.toml", "--set", "seed"]])
def test_words_that_are_not_overrides_are_refused_before_anything_runs(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2
    assert "overrides must look like KEY=VALUE" in capsys.readouterr().err
