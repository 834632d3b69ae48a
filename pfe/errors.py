"""User-facing errors: the CLI prints their message (no traceback) and exits with code 2."""


class PFEError(Exception):
    """Bad input a user can fix: the message names the file, key or path and what to do."""


class ConfigError(PFEError, ValueError):
    """A config or study file that cannot be used; the message names the file and the dotted key."""


class DataError(PFEError):
    """A missing, malformed or unreadable dataset."""


def user_message(err: BaseException) -> str:
    """The error's text for a person. A DataLoader worker re-raises an error with its worker's traceback
    in the message ("Caught DataError in DataLoader worker process 0. Original Traceback ..."): only the
    original message, the traceback's last line, is kept."""
    text = str(err)
    if "in DataLoader worker process" in text and "Original Traceback" in text:
        last = text.rstrip().splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return text
