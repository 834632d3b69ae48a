"""User-facing errors: the CLI prints their message (no traceback) and exits with code 2."""


class PFEError(Exception):
    """Bad input a user can fix: the message names the file, key or path and what to do."""


class ConfigError(PFEError, ValueError):
    """A config or study file that cannot be used; the message names the file and the dotted key."""


class DataError(PFEError):
    """A missing, malformed or unreadable dataset."""


class NotYetAvailable(PFEError):
    """A command whose capability another issue fills in."""
