"""Reading a user's text file, with errors that name the file."""

from __future__ import annotations

import sys
from pathlib import Path

from ..errors import InputError


def read_text(path: "str | Path", what: str) -> str:
    """The text of a UTF-8 file ('-' for stdin), or an InputError naming it; `what` says what the file is for."""
    if str(path) == "-":
        # The bytes, decoded here: sys.stdin's own decoding would raise a bare UnicodeDecodeError.
        data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read()
        if isinstance(data, str):
            return data
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InputError(f"standard input: not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise InputError(f"{path}: no such {what} file") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a directory, expected a {what} file") from None
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def check_text(text: str, what: str) -> str:
    """`text` itself, or an InputError when it holds undecodable bytes: Python hands undecodable bytes of
    the command line to a program as lone surrogates ('\\udcff' for the byte 0xff)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = text[e.start]
        byte = f"byte 0x{ord(bad) - 0xDC00:02x}" if 0xDC80 <= ord(bad) <= 0xDCFF else f"character {bad!r}"
        raise InputError(f"{what} is not UTF-8 text ({byte} at character {e.start})") from None
    return text
