"""Placeholder until issue #8 lands; replace the whole file."""

import typer

from autointerp.errors import UserError


def cli() -> None:
    """Not implemented yet (issue #8)."""
    raise UserError("not implemented yet (issue #8)")
