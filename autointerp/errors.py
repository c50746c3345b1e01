"""The one exception type the CLI turns into a one-line error (no traceback)."""


class UserError(Exception):
    """Bad input or an unavailable resource: the message is shown to the user as is."""
