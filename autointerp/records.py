"""Placeholder until issue #5 lands; replace the whole file."""

import typer

from autointerp.errors import UserError

cli_records = typer.Typer(help="(not implemented yet: issue #5)", no_args_is_help=True)


@cli_records.command()
def show() -> None:
    """Not implemented yet."""
    raise UserError("not implemented yet (issue #5)")


def cli_collect() -> None:
    """Not implemented yet (issue #5)."""
    raise UserError("not implemented yet (issue #5)")
