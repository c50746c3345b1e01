"""The demo chains real CLI commands: each must parse with the CLI as it is today."""

from pathlib import Path

import pytest
from typer.testing import CliRunner

from autointerp.cli import app
from autointerp.demo import stages


@pytest.mark.parametrize("name,args", stages(Path("runs/x"), layer=2, features=8, threads=1))
def test_demo_stage_parses(name, args):
    # --help is eager, but click parses every option first: an unknown one fails here.
    result = CliRunner().invoke(app, [*args, "--help"])
    assert result.exit_code == 0, f"{name}: {result.output}"
    assert "Usage" in result.output


def test_unknown_option_is_caught_by_this_check():
    result = CliRunner().invoke(app, ["collect", "x", "--no-such-option", "--help"])
    assert result.exit_code != 0
