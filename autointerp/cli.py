"""The `autointerp` command line: one subcommand per pipeline stage.

Each stage module exposes `cli`: a typer.Typer (a command group, e.g. `lm train`) or a
plain function (a single command). Errors the user can fix are UserError and print as
one line; anything else is a bug and prints one line too unless AUTOINTERP_DEBUG=1.
"""

from __future__ import annotations

import importlib
import os
import sys

# Before torch loads: busy-waiting OpenMP threads made torch 4-6x slower on a shared
# 2-core machine (measured on collect and SAE training); passive waiting costs little.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import click
import typer
from rich.console import Console

from autointerp import __version__
from autointerp.errors import UserError

# (subcommand, module): the order is the pipeline's.
STAGES = [
    ("lm", "autointerp.lm"),
    ("activations", "autointerp.activations"),
    ("sae", "autointerp.sae.cli"),
    ("collect", "autointerp.records"),
    ("records", "autointerp.records"),
    ("lineage", "autointerp.lineage"),
    ("serve", "autointerp.serve"),
    ("label", "autointerp.explain"),
    ("score", "autointerp.score"),
    ("compare", "autointerp.compare"),
    ("annotate", "autointerp.annotate"),
    ("report", "autointerp.report"),
    ("demo", "autointerp.demo"),
]

app = typer.Typer(
    name="autointerp",
    help="Label the features of sparse autoencoders across training checkpoints.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
err = Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        print(f"autointerp {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """Label the features of sparse autoencoders across training checkpoints."""


def _register() -> None:
    for name, module_name in STAGES:
        module = importlib.import_module(module_name)
        # A module serving two subcommands names them cli_<name>; otherwise `cli`.
        entry = getattr(module, f"cli_{name}", None) or getattr(module, "cli")
        if isinstance(entry, typer.Typer):
            app.add_typer(entry, name=name)
        else:
            app.command(name)(entry)


_register()


def main() -> None:
    try:
        app(standalone_mode=False)
    except UserError as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except click.exceptions.Abort:
        err.print("[yellow]interrupted[/]")
        sys.exit(130)
    except click.exceptions.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err.print("[yellow]interrupted: finished work is saved; run the same command again to resume[/]")
        sys.exit(130)
    except Exception as exc:  # a bug: one line for users, the traceback on request
        if os.environ.get("AUTOINTERP_DEBUG"):
            raise
        err.print(f"[bold red]internal error:[/] {type(exc).__name__}: {exc} "
                  "(set AUTOINTERP_DEBUG=1 for the traceback)", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
