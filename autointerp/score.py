"""Placeholder until issue #7 lands; replace the whole file."""

import typer

from autointerp.errors import UserError


def cli() -> None:
    """Not implemented yet (issue #7)."""
    raise UserError("not implemented yet (issue #7)")
