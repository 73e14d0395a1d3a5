"""A chat conversation saved to a file and read back: `llama-ref chat`'s /save and /load.

The file is JSON: {"format": "llama_ref.chat", "version": 1, "system": str or null, "messages": [{"role":
"user" | "assistant", "content": str}, ...]}, user and assistant messages alternating, starting with the user
and ending with the assistant's answer (complete turns). A plain list of such messages, OpenAI style, with an
optional system message first, is read too. Anything else is a ConversationError naming the file and what is
wrong with it, in one line.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Optional

from ..errors import LlamaRefError

FORMAT, VERSION = "llama_ref.chat", 1
MAX_BYTES = 64 << 20  # a conversation file larger than this is refused before it is read


class ConversationError(LlamaRefError, ValueError):
    """A conversation file that cannot be read or written."""


def save_conversation(path: "str | Path", system: Optional[str], messages: list[dict]) -> Path:
    """Write the conversation to `path` (replaced whole: written under a temporary name, then renamed)."""
    path = Path(path).expanduser()
    data = {"format": FORMAT, "version": VERSION, "system": system,
            "messages": [{"role": m["role"], "content": m["content"]} for m in messages]}
    text = json.dumps(data, ensure_ascii=False, indent=1) + "\n"
    folder = path.parent
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".partial")
    except OSError as e:
        raise ConversationError(f"{path}: cannot write there ({e.strerror or e})") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise ConversationError(f"{path}: cannot write it ({e.strerror or e})") from None
        raise
    return path


def load_conversation(path: "str | Path") -> tuple[Optional[str], list[dict]]:
    """(system prompt or None, messages) from a file written by save_conversation (or a message list)."""
    path = Path(path).expanduser()
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_BYTES + 1)
    except FileNotFoundError:
        raise ConversationError(f"{path}: no such conversation file") from None
    except IsADirectoryError:
        raise ConversationError(f"{path}: is a directory, expected a conversation file (JSON)") from None
    except OSError as e:
        raise ConversationError(f"{path}: cannot read it ({e.strerror or e})") from None
    if len(raw) > MAX_BYTES:
        raise ConversationError(f"{path}: larger than {MAX_BYTES >> 20} MiB, not a saved conversation")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConversationError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConversationError(f"{path}: not JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    except RecursionError:
        raise ConversationError(f"{path}: JSON nested too deeply to be a conversation") from None
    return _conversation(path, data)


def _conversation(path: Path, data) -> tuple[Optional[str], list[dict]]:
    def bad(what: str) -> ConversationError:
        return ConversationError(f"{path}: {what}")

    system = None
    if isinstance(data, list):  # OpenAI style: the messages, a system message first if any
        messages = data
        if messages and isinstance(messages[0], dict) and messages[0].get("role") == "system":
            system, messages = _text(messages[0].get("content"), bad, "message 1 (system): content"), messages[1:]
    elif isinstance(data, dict):
        unknown = sorted(set(data) - {"format", "version", "system", "messages"})
        if unknown:
            raise bad(f"unknown key {unknown[0]!r} (a conversation has system and messages)")
        if data.get("format", FORMAT) != FORMAT or data.get("version", VERSION) != VERSION:
            raise bad(f"format {data.get('format')!r} version {data.get('version')!r}; "
                      f"this llama_ref reads {FORMAT!r} version {VERSION}")
        if "messages" not in data:
            raise bad("no 'messages' list")
        messages = data["messages"]
        if data.get("system") is not None:
            system = _text(data["system"], bad, "system")
    else:
        raise bad(f"a conversation is a JSON object with 'system' and 'messages', got a {type(data).__name__}")
    if not isinstance(messages, list):
        raise bad(f"'messages' must be a list, got a {type(messages).__name__}")
    out = []
    offset = 2 if system is not None and isinstance(data, list) else 1
    for n, m in enumerate(messages):
        where = f"message {n + offset}"
        want = "user" if n % 2 == 0 else "assistant"
        if not isinstance(m, dict):
            raise bad(f"{where} must be an object with role and content, got a {type(m).__name__}")
        extra = sorted(set(m) - {"role", "content"})
        if extra:
            raise bad(f"{where}: unknown key {extra[0]!r} (a message has role and content)")
        if m.get("role") != want:
            raise bad(f"{where}: role {m.get('role')!r} where {want!r} belongs (user and assistant messages "
                      f"alternate, starting with the user)")
        out.append({"role": want, "content": _text(m.get("content"), bad, f"{where}: content")})
    if len(out) % 2:
        raise bad("the last message is the user's: a saved conversation ends with the assistant's answer")
    return system, out


def _text(value, bad, what: str) -> str:
    if not isinstance(value, str):
        raise bad(f"{what} must be a string, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:  # JSON can spell lone surrogates ("\ud800"), which are no text
        raise bad(f"{what} is not UTF-8 text (character {e.start})") from None
    return value
