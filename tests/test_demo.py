"""The demo chains real CLI commands: each must parse with the CLI as it is today."""

from pathlib import Path

import pytest
from typer.testing import CliRunner

from autointerp.cli import app
from autointerp.demo import default_layers, stages


@pytest.mark.parametrize("name,args", stages(Path("runs/x"), layer=2, features=8, threads=1)
                         + stages(Path("runs/y"), layer=[3, 9, 15], features=4, threads=None, model="gemma-3-270m"))
def test_demo_stage_parses(name, args):
    # --help is eager, but click parses every option first: an unknown one fails here.
    result = CliRunner().invoke(app, [*args, "--help"])
    assert result.exit_code == 0, f"{name}: {result.output}"
    assert "Usage" in result.output


def test_unknown_option_is_caught_by_this_check():
    result = CliRunner().invoke(app, ["collect", "x", "--no-such-option", "--help"])
    assert result.exit_code != 0


def test_a_real_model_gets_an_early_a_middle_and_a_late_layer():
    assert default_layers(18) == [3, 9, 14]
    assert default_layers(30) == [5, 15, 24]
    assert default_layers(2) == [0, 1]
