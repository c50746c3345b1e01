"""Placeholder until issue #6 lands; replace the whole file."""

import typer

from autointerp.errors import UserError


def cli() -> None:
    """Not implemented yet (issue #6)."""
    raise UserError("not implemented yet (issue #6)")
