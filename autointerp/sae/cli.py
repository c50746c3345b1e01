"""Placeholder until issue #4 lands; replace the whole file."""

import typer

from autointerp.errors import UserError

cli = typer.Typer(help="(not implemented yet: issue #4)", no_args_is_help=True)


@cli.command()
def train() -> None:
    """Not implemented yet."""
    raise UserError("not implemented yet (issue #4)")
