"""Placeholder until issue #3 lands; replace the whole file."""

import typer

from autointerp.errors import UserError

cli = typer.Typer(help="(not implemented yet: issue #3)", no_args_is_help=True)


@cli.command()
def todo() -> None:
    """Not implemented yet."""
    raise UserError("not implemented yet (issue #3)")
