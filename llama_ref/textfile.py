"""Reading a user's text file, with errors that name the file."""

from __future__ import annotations

import sys
from pathlib import Path

from .model import InputError


def read_text(path: "str | Path", what: str) -> str:
    """The text of a UTF-8 file ('-' for stdin), or an InputError naming it; `what` says what the file is for."""
    if str(path) == "-":
        return sys.stdin.read()
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise InputError(f"{path}: no such {what} file") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a directory, expected a {what} file") from None
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
