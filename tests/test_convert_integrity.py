"""`convert` leaves nothing behind when interrupted (an exception, Ctrl-C, SIGKILL), cleans up after killed
runs, fsyncs before it renames, and writes a manifest of sha256 checksums that `info --checksum` and
`load(..., verify=True)` check. Every checkpoint here is a tiny random one (conftest.tiny_args)."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import llama_ref
from tiny import random_weights, tiny_args
from llama_ref.weights import checksums
from llama_ref.tools import convert as convert_module
from llama_ref.tools.cli import main
from llama_ref.tools.convert import convert, remove_stale_partials, write_checkpoint
from llama_ref.model.transformer import Transformer
from llama_ref.weights import writers
from llama_ref.weights.common import WeightsError

TARGETS = ["meta", "hf", "gguf-f32"]


def tiny_checkpoint(path: Path, to: str = "meta", **kwargs) -> Path:
    args = tiny_args()
    return write_checkpoint(args, random_weights(args, seed=3), path, to, **kwargs)


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([b ^ 0x01]))


def partials(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".partial-" in p.name)


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def output_name(to: str) -> str:
    return "out.gguf" if to.startswith("gguf") else "out"


# ---- interrupted in-process: an exception or Ctrl-C removes the partial output ----------------------------

def _write_some_then(exc, what):
    """A stand-in for a writer (write_meta, write_hf, write_gguf): some bytes on disk, then `exc`."""
    def writer(dst, *args, **kwargs):
        dst = Path(dst)
        if what == "dir":
            dst.mkdir()
            (dst / "config.json").write_text("{}")
            dst = dst / "model.safetensors"
        dst.write_bytes(b"\x00" * 4096)  # part of the output is on disk ...
        raise exc  # ... when the disk fills up, or the user presses Ctrl-C
    return writer


@pytest.mark.parametrize("exc", [OSError(28, "No space left on device"), KeyboardInterrupt()])
@pytest.mark.parametrize("to", TARGETS)
def test_exception_while_writing_leaves_nothing(tmp_path, monkeypatch, to, exc):
    src = tiny_checkpoint(tmp_path / "src")
    out = tmp_path / "o"
    out.mkdir()
    name = {"meta": "write_meta", "hf": "write_hf", "gguf-f32": "write_gguf"}[to]
    monkeypatch.setattr(writers, name, _write_some_then(exc, "file" if to.startswith("gguf") else "dir"))
    with pytest.raises(type(exc)):
        convert(src, out / output_name(to), to)
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("to", TARGETS)
def test_interrupted_after_the_manifest_before_the_rename_leaves_nothing(tmp_path, monkeypatch, to):
    """Ctrl-C while fsyncing: the output and its manifest (a second partial file beside a GGUF) are both
    complete on disk, yet neither appears under its final name and both are removed."""
    src = tiny_checkpoint(tmp_path / "src")
    out = tmp_path / "o"
    out.mkdir()
    seen = []

    def interrupted(path):
        seen.append(sorted(partials(out)))
        raise KeyboardInterrupt

    monkeypatch.setattr(convert_module, "_fsync_tree", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert(src, out / output_name(to), to)
    expected = 2 if to.startswith("gguf") else 1  # the GGUF's manifest is its own partial file
    assert len(seen[0]) == expected
    assert list(out.iterdir()) == []


def test_output_that_appears_meanwhile_is_never_replaced(tmp_path, monkeypatch):
    src = tiny_checkpoint(tmp_path / "src")
    dst = tmp_path / "out"
    real = writers.write_hf

    def racing(path, *args, **kwargs):
        real(path, *args, **kwargs)
        dst.mkdir()  # another program creates DST while we write
        (dst / "theirs.txt").write_text("keep me")

    monkeypatch.setattr(writers, "write_hf", racing)
    with pytest.raises(WeightsError, match="appeared while converting"):
        convert(src, dst, "hf")
    assert (dst / "theirs.txt").read_text() == "keep me" and sorted(os.listdir(dst)) == ["theirs.txt"]
    assert partials(tmp_path) == []


# ---- killed outright: the partial stays, and the next convert to DST removes it ------------------------------

KILL_SCRIPT = """
import os, signal, sys
from pathlib import Path
import llama_ref.tools.convert as c
from llama_ref.weights import writers

src, dst, to, when = sys.argv[1:]

def die():
    os.kill(os.getpid(), signal.SIGKILL)

if when == "writing":  # some bytes of the first output file on disk, then SIGKILL
    real_st, real_torch = writers.write_safetensors, writers.write_torch_file
    def st(path, tensors, *a, **k):
        real_st(path, tensors[:2], *a, **k); die()
    def torch_file(path, tensors, *a, **k):
        real_torch(path, tensors[:2], *a, **k); die()
    def gguf(path, *a, **k):
        Path(path).write_bytes(b"GGUF" + bytes(1000)); die()
    writers.write_safetensors, writers.write_torch_file, writers.write_gguf = st, torch_file, gguf
else:  # "before-rename": everything written (the manifest too), killed before the rename
    c._fsync_tree = lambda path: die()
c.convert(src, dst, to)
print("not killed")
"""


@pytest.mark.parametrize("when", ["writing", "before-rename"])
@pytest.mark.parametrize("to", TARGETS)
def test_sigkill_leaves_a_partial_that_the_next_convert_removes(tmp_path, to, when):
    src = tiny_checkpoint(tmp_path / "src")
    out = tmp_path / "o"
    out.mkdir()
    dst = out / output_name(to)
    child = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(src), str(dst), to, when],
                           capture_output=True, text=True, timeout=300)
    assert child.returncode == -signal.SIGKILL, child.stderr
    left = partials(out)
    assert left and not dst.exists()  # killed: nothing under the final name, a hidden partial beside it
    host = socket.gethostname()
    assert all(name.startswith(f".{dst.name}") and f".partial-{host}-" in name for name in left)
    if to.startswith("gguf") and when == "before-rename":
        assert f".{dst.name}.sha256.partial-" in " ".join(left)  # the manifest's partial too

    convert(src, dst, to)  # the next convert to the same destination
    assert partials(out) == []
    assert sorted(os.listdir(out)) == sorted([dst.name] + ([dst.name + ".sha256"] if to.startswith("gguf") else []))
    assert all(r.ok for r in checksums.verify(dst))


def test_partials_of_live_writers_and_other_hosts_are_kept(tmp_path):
    dst = tmp_path / "out"
    host = socket.gethostname()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        gone = dead_pid()
        names = {
            "live": f".out.partial-{host}-{live.pid}",
            "other host": f".out.partial-not-{host}-{gone}",
            "dead": f".out.partial-{host}-{gone}",
            "dead, manifest": f".out.sha256.partial-{host}-{gone}",
            "dead, written before hosts were named": f".out.partial-{gone}",
            "another destination": f".outer.partial-{host}-{gone}",
        }
        for name in names.values():
            (tmp_path / name).mkdir()
        removed = remove_stale_partials(dst)
        assert sorted(p.name for p in removed) == sorted(
            names[k] for k in ("dead", "dead, manifest", "dead, written before hosts were named"))
        assert partials(tmp_path) == sorted(names[k] for k in ("live", "other host", "another destination"))
    finally:
        live.kill()
        live.wait()


# ---- fsync before the rename ---------------------------------------------------------------------------------

@pytest.mark.parametrize("to", ["hf", "gguf-f16"])
def test_every_file_is_fsynced_before_the_rename(tmp_path, monkeypatch, to):
    events = []
    real_file, real_dir, real_rename = convert_module._fsync_file, convert_module._fsync_dir, os.rename

    def fsync_file(path):
        events.append(("fsync", Path(path)))
        real_file(path)

    def fsync_dir(path):
        events.append(("fsync dir", Path(path)))
        real_dir(path)

    def rename(a, b):
        events.append(("rename", Path(a), Path(b)))
        real_rename(a, b)

    monkeypatch.setattr(convert_module, "_fsync_file", fsync_file)
    monkeypatch.setattr(convert_module, "_fsync_dir", fsync_dir)
    monkeypatch.setattr(convert_module.os, "rename", rename)
    dst = tiny_checkpoint(tmp_path / output_name(to), to)
    first_rename = next(i for i, e in enumerate(events) if e[0] == "rename")
    renames = {e[1]: e[2] for e in events if e[0] == "rename"}
    synced_before = {renames.get(e[1], e[1]) for e in events[:first_rename] if e[0] == "fsync"}
    if dst.is_dir():
        tmp = next(a for a, b in renames.items() if b == dst)
        synced_before = {dst / p.relative_to(tmp) if p.is_relative_to(tmp) else p for p in synced_before}
        assert synced_before == set(checksums.checkpoint_files(dst)) | {dst / checksums.MANIFEST}
        assert ("fsync dir", tmp) in events[:first_rename]
    else:
        assert synced_before == {dst, checksums.manifest_path(dst)}
    assert events[-1] == ("fsync dir", tmp_path)  # the renames themselves, last


# ---- the manifest ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("to", TARGETS)
def test_manifest_lists_every_file_and_sha256sum_reads_it(tmp_path, to):
    dst = tiny_checkpoint(tmp_path / output_name(to), to)
    manifest = checksums.manifest_path(dst)
    assert manifest.is_file()
    files = checksums.checkpoint_files(dst)
    root = manifest.parent
    expected = {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
    listed = {name: digest for digest, name in checksums.read_manifest(manifest)}
    assert listed == expected
    if dst.is_dir():
        assert set(listed) == {p.name for p in dst.iterdir()} - {checksums.MANIFEST}
    results = checksums.verify(dst)
    assert [r.status for r in results] == ["OK"] * len(files)
    if shutil.which("sha256sum"):
        done = subprocess.run(["sha256sum", "-c", manifest.name], cwd=root, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr


def test_no_checksums_writes_no_manifest(tmp_path):
    src = tiny_checkpoint(tmp_path / "src", checksums=False)
    assert not (src / checksums.MANIFEST).exists()
    assert main(["convert", str(src), str(tmp_path / "g.gguf"), "--to", "gguf-f32", "-q", "--no-checksums"]) == 0
    assert sorted(os.listdir(tmp_path)) == ["g.gguf", "src"]


def test_a_stale_gguf_manifest_is_refused_not_overwritten(tmp_path):
    (tmp_path / "g.gguf.sha256").write_text("theirs\n")
    with pytest.raises(WeightsError, match=r"g\.gguf\.sha256: already exists"):
        tiny_checkpoint(tmp_path / "g.gguf", "gguf-f32")
    assert (tmp_path / "g.gguf.sha256").read_text() == "theirs\n"


def test_hashing_reads_in_chunks(tmp_path, monkeypatch):
    data = np.random.default_rng(0).integers(0, 256, 1000, dtype=np.uint8).tobytes()
    (tmp_path / "f").write_bytes(data)
    monkeypatch.setattr(checksums, "CHUNK", 7)  # 142 full chunks and a short one
    reads = []
    real_open = open

    class Counting:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def readinto(self, buf):
            reads.append(len(buf))
            return self.f.readinto(buf)

    monkeypatch.setattr(checksums, "open", lambda p, mode: Counting(real_open(p, mode)), raising=False)
    assert checksums.file_digest(tmp_path / "f") == hashlib.sha256(data).hexdigest()
    assert checksums.file_digest(tmp_path / "f", "md5") == hashlib.md5(data).hexdigest()
    assert set(reads) == {7} and len(reads) == 2 * (1000 // 7 + 2)  # each call: 143 reads + the empty one


# ---- info --checksum and load(verify=True) -------------------------------------------------------------------

@pytest.mark.parametrize("to, victim", [("hf", "model.safetensors"), ("meta", "consolidated.00.pth"),
                                        ("gguf-f32", "out.gguf")])
def test_a_flipped_byte_fails_info_checksum_and_load_verify(tmp_path, capsys, to, victim):
    dst = tiny_checkpoint(tmp_path / output_name(to), to)
    assert main(["info", "--checksum", str(dst)]) == 0
    out = capsys.readouterr().out
    assert f"{victim}: OK" in out and "parameters:" in out

    path = (dst / victim) if dst.is_dir() else dst
    flip_byte(path, path.stat().st_size // 2)
    assert main(["info", "--checksum", str(dst)]) == 2
    captured = capsys.readouterr()
    assert f"{victim}: MISMATCH" in captured.out
    assert "parameters:" not in captured.out  # refused before the description
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "error" in lines[0] and str(path) in lines[0] and "mismatch" in lines[0]
    with pytest.raises(WeightsError, match=f"{path.name}: sha256 mismatch"):
        llama_ref.load(dst, verify=True)


def test_verified_load_gives_the_model_that_was_written(tmp_path):
    args = tiny_args()
    weights = random_weights(args, seed=5)
    dst = write_checkpoint(args, weights, tmp_path / "m", "meta")
    ids = [1, 5, 9, 2]
    expected = Transformer(args, weights).forward(ids)
    # sums="blas": Transformer's own products (load's default sums a prompt's products in float64 or apart)
    np.testing.assert_array_equal(llama_ref.load(dst, verify=True, sums="blas").forward(ids), expected)


def test_missing_file_and_malformed_manifest(tmp_path, capsys):
    dst = tiny_checkpoint(tmp_path / "h", "hf")
    (dst / "config.json").rename(tmp_path / "elsewhere.json")
    assert main(["info", "--checksum", str(dst)]) == 2
    captured = capsys.readouterr()
    assert "config.json: MISSING" in captured.out and "config.json: missing" in captured.err
    (tmp_path / "elsewhere.json").rename(dst / "config.json")
    manifest = dst / checksums.MANIFEST
    manifest.write_text(manifest.read_text() + "not a checksum line\n")
    with pytest.raises(WeightsError, match=r"checksums\.sha256, line 3"):
        llama_ref.load(dst, verify=True)
    manifest.write_text(f"{'0' * 64}  ../outside.bin\n")
    with pytest.raises(WeightsError, match="outside the checkpoint"):
        checksums.verify(dst)


@pytest.mark.parametrize("to", TARGETS)
def test_verify_without_a_manifest_is_a_clear_error(tmp_path, capsys, to):
    dst = tiny_checkpoint(tmp_path / output_name(to), to, checksums=False)
    with pytest.raises(WeightsError, match="no checksum manifest to verify against"):
        llama_ref.load(dst, verify=True)
    # info --checksum without a manifest: the sha256 of each file, and exit 0
    assert main(["info", "--checksum", str(dst)]) == 0
    out = capsys.readouterr().out
    assert "no manifest" in out
    for f in checksums.checkpoint_files(dst):
        assert f"{hashlib.sha256(f.read_bytes()).hexdigest()}  {f.name}" in out


def test_meta_checklist_chk_is_checked(tmp_path):
    """Meta's downloads carry checklist.chk, an md5sum list; verify=True checks it too."""
    dst = tiny_checkpoint(tmp_path / "m", "meta", checksums=False)
    names = ["consolidated.00.pth", "params.json"]
    (dst / "checklist.chk").write_text(
        "".join(f"{hashlib.md5((dst / n).read_bytes()).hexdigest()}  {n}\n" for n in names))
    results = checksums.verify(dst)
    assert [(r.path.name, r.algorithm, r.status) for r in results] == [(n, "md5", "OK") for n in names]
    llama_ref.load(dst, verify=True)
    flip_byte(dst / "params.json", 3)
    with pytest.raises(WeightsError, match=r"params\.json: md5 mismatch.*checklist\.chk"):
        llama_ref.load(dst, verify=True)


def test_a_fetched_model_is_checked_against_its_pinned_sha256(tmp_path, monkeypatch):
    """A file in llama_ref.weights.fetch's cache has a published checksum: the sha256 pinned for it."""
    from llama_ref.weights.fetch import MODELS

    monkeypatch.setenv("LLAMA_REF_CACHE", str(tmp_path))
    spec = MODELS[llama_ref.DEFAULT_MODEL]
    cached = tmp_path / Path(spec.member).name
    cached.write_bytes(b"GGUF" + bytes(100))  # not the file the pinned digest describes
    with pytest.raises(WeightsError, match=f"{cached.name}: sha256 mismatch.*pinned for {spec.name}"):
        llama_ref.load(cached, verify=True)
    other = tmp_path / "elsewhere.gguf"
    shutil.copyfile(cached, other)  # the same bytes outside the cache: no checksum known
    with pytest.raises(WeightsError, match="no checksum manifest"):
        checksums.verify(other)


class MadeOnAccess(dict):
    """Weights made at every lookup, as benchmarks/shapes.py's RandomWeights: a new array each time."""

    def __getitem__(self, name):
        return dict.__getitem__(self, name).copy()


def peak_bytes(write) -> int:
    """The most memory Python's allocators held at once while write() ran (tracemalloc)."""
    import tracemalloc

    tracemalloc.start()
    try:
        write()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_gguf_writer_holds_one_tensor_at_a_time(tmp_path):
    """gguf's writer keeps every tensor handed to it until the end: a model converted whole would sit in memory
    (16 GB for an 8B model in F16). The dense writer hands it lazy tensors, looked up and made as each is copied
    to the file."""
    args = tiny_args(dim=256, n_layers=8, n_heads=4, n_kv_heads=2, vocab_size=256)
    weights = MadeOnAccess(random_weights(args, seed=5))
    total_f16 = sum(w.size * 2 for w in weights.values())
    writers.write_gguf(tmp_path / "warm.gguf", tiny_args(), random_weights(tiny_args(), seed=5), "f16")  # imports
    peak = peak_bytes(lambda: writers.write_gguf(tmp_path / "m.gguf", args, weights, "f16"))
    largest = max(w.size * 4 for w in weights.values())  # a float32 tensor: room for one conversion at a time
    assert peak < total_f16 / 4 and peak < 3 * largest, (peak, total_f16, largest)
    from llama_ref.weights.gguf import load_gguf

    back = load_gguf(tmp_path / "m.gguf")[1]  # and the file holds the weights, each under its name
    for name, w in weights.items():
        kept = w if name.endswith("norm.weight") else w.astype(np.float16)  # norms stay float32 in the file
        np.testing.assert_array_equal(np.asarray(back[name], dtype=np.float32), kept.astype(np.float32))


def test_hf_writer_holds_one_tensor_at_a_time(tmp_path):
    """A safetensors header needs every shape before the first byte; the HF writer takes them from the config and
    makes each tensor (bf16, wq / wk back in HF's row order) only as it copies it to the file, as the GGUF writer
    above: writing an 8B model held all of it (15 GB) before."""
    args = tiny_args(dim=256, n_layers=8, n_heads=4, n_kv_heads=2, vocab_size=256)
    weights = MadeOnAccess(random_weights(args, seed=6))
    total_bf16 = sum(w.size * 2 for w in weights.values())
    writers.write_hf(tmp_path / "warm", tiny_args(), random_weights(tiny_args(), seed=6), "bf16")  # imports
    peak = peak_bytes(lambda: writers.write_hf(tmp_path / "hf", args, weights, "bf16"))
    # a float32 tensor: room for one conversion at a time (the lookup's copy, rounding's uint32 temporaries, bf16)
    largest = max(w.size * 4 for w in weights.values())
    assert peak < total_bf16 / 4 and peak < 4 * largest, (peak, total_bf16, largest)
    from llama_ref.weights.bf16 import float32_to_bf16_bits
    from llama_ref.weights.hf import load_hf

    back = load_hf(tmp_path / "hf", keep="float32")[1]  # every weight under its name, in Meta's row order again
    for name, w in weights.items():
        want = (float32_to_bf16_bits(w).astype(np.uint32) << 16).view(np.float32)
        np.testing.assert_array_equal(np.asarray(back[name], dtype=np.float32), want)
