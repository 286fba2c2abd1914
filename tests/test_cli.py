"""The top-level command line: --version, plain-text --help, unknown commands."""

from __future__ import annotations

import re

import lorakernels
from lorakernels.__main__ import COMMANDS, main


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"lorakernels {lorakernels.__version__}"


def test_help_is_plain_text_and_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: lorakernels")
    assert not re.search(r"``|:data:|:func:|\*\s", out), "RST markup in --help"
    for name in COMMANDS:
        assert re.search(rf"^  {name}\s", out, flags=re.MULTILINE)


def test_bench_help_is_plain_text(capsys):
    try:
        main(["bench", "--help"])
    except SystemExit as exc:  # argparse exits after printing help
        assert exc.code == 0
    out = capsys.readouterr().out
    assert "--wide" in out and "``" not in out


def test_unknown_command_is_an_error_with_usage(capsys):
    assert main(["frobnicate"]) == 2
    err = capsys.readouterr().err
    assert "frobnicate" in err and "usage:" in err
