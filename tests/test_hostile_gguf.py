"""Damaged and hostile GGUF files: each is refused with a LlamaRefError naming the file, at once and without
allocating what the file claims; and random damage to a real file's header never gets further than that
(a fuzz test). Every file here starts as a tiny valid GGUF whose bytes are then patched."""

from __future__ import annotations

import re
import struct
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import llama_ref
from llama_ref import LlamaRefError
from llama_ref.text.tokenizer import TokenizerError
from llama_ref.weights.common import WeightsError
from llama_ref.weights.gguf import open_gguf

from tiny import random_weights, tiny_args
from gguf_files import byte_level_tokens, write_llama_gguf

HUGE = 1 << 60
TIME_LIMIT_S = 2.0
MEMORY_LIMIT = 64 << 20  # bytes allocated at peak (numpy reports its buffers to tracemalloc)
TOKENS = [3, 17, 104, 256, 7]  # ids the logits are compared on


def tokenizer_metadata(**changes) -> dict:
    tokens = byte_level_tokens() + ["Ġt"]
    meta = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.merges": ["Ġ t"],
        "tokenizer.ggml.token_type": [1] * len(tokens),
        "tokenizer.ggml.bos_token_id": 0,
        "tokenizer.ggml.eos_token_id": 1,
    }
    meta.update(changes)
    return meta


def write_tiny(path: Path, **changes) -> Path:
    """A complete tiny Llama GGUF (2 layers, a byte-level BPE tokenizer); `changes` replace metadata keys."""
    meta = tokenizer_metadata(**changes)
    args = tiny_args(vocab_size=len(meta["tokenizer.ggml.tokens"]))
    return write_llama_gguf(path, args, random_weights(args), meta)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> bytes:
    """The bytes of the intact file every damaged copy is made from."""
    return write_tiny(tmp_path_factory.mktemp("gguf") / "tiny.gguf").read_bytes()


# ---- where things are in the header -----------------------------------------------------------------------

def after_key(data: bytes, key: str) -> int:
    """The offset of the value type that follows metadata key `key` (keys are u64 length + bytes)."""
    encoded = struct.pack("<Q", len(key)) + key.encode()
    at = data.find(encoded)
    assert at >= 0, key
    return at + len(encoded)


def tensor_info(data: bytes, name: str) -> dict:
    """Offsets of the fields of a tensor's description: n_dims, dims, type, offset."""
    at = after_key(data, name)  # a tensor name is stored like a key
    n_dims = struct.unpack_from("<I", data, at)[0]
    return {"n_dims": at, "dims": at + 4, "type": at + 4 + 8 * n_dims, "offset": at + 4 + 8 * n_dims + 4}


def patched(data: bytes, at: int, fmt: str, value) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, at, value)
    return bytes(out)


def assert_refused(tmp_path: Path, data: bytes, match: str, error=WeightsError) -> LlamaRefError:
    """Loading `data` raises `error` naming the file (and `match`), quickly and without a large allocation."""
    path = tmp_path / "hostile.gguf"
    path.write_bytes(data)
    tracemalloc.start()
    start = time.process_time()  # CPU time of this process: other work on a shared machine does not count
    try:
        with pytest.raises(error, match=re.escape(str(path))) as info:
            llama_ref.load(path)
        elapsed = time.process_time() - start
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert re.search(match, str(info.value)), info.value
    assert elapsed < TIME_LIMIT_S, f"refusing took {elapsed:.1f} s of CPU time"
    assert peak < MEMORY_LIMIT, f"refusing allocated {peak >> 20} MiB"
    return info.value


# ---- the control ------------------------------------------------------------------------------------------

def test_the_intact_file_loads(tmp_path, tiny):
    path = tmp_path / "intact.gguf"
    path.write_bytes(tiny)
    logits = llama_ref.load(path).forward(TOKENS)
    assert logits.shape == (len(TOKENS), 257) and np.isfinite(logits).all()
    reader = open_gguf(path)
    assert reader.alignment == 32 and reader.data_offset % 32 == 0
    assert all(t.data_offset % 32 == 0 for t in reader.tensors)


# ---- counts that claim more than the file holds -----------------------------------------------------------

def test_huge_string_array_count(tmp_path, tiny):
    at = after_key(tiny, "tokenizer.ggml.tokens") + 4 + 4  # value type ARRAY, item type STRING, then count
    assert_refused(tmp_path, patched(tiny, at, "<Q", HUGE),
                   "tokenizer.ggml.tokens, an array of 1152921504606846976 strings: ")


def test_string_array_items(tmp_path, tiny):
    """A string array's items are read by one loop over the bytes (gguf._strings): a length past the end of the
    file, or bytes that are not UTF-8, in an item after the first get the messages a single string gets."""
    first = after_key(tiny, "tokenizer.ggml.tokens") + 4 + 4 + 8  # item 0's length
    second = first + 8 + struct.unpack_from("<Q", tiny, first)[0]
    assert struct.unpack_from("<Q", tiny, second)[0] >= 1
    assert_refused(tmp_path, patched(tiny, second, "<Q", HUGE),
                   "item 1 of tokenizer.ggml.tokens: 1152921504606846976 bytes needed")
    assert_refused(tmp_path, patched(tiny, second + 8, "<B", 0xFF),
                   "item 1 of tokenizer.ggml.tokens is not valid UTF-8")


def test_huge_number_array_count(tmp_path, tiny):
    at = after_key(tiny, "tokenizer.ggml.token_type") + 4 + 4
    assert_refused(tmp_path, patched(tiny, at, "<Q", HUGE),
                   "the value of tokenizer.ggml.token_type: 4611686018427387904 bytes needed")


def test_huge_string_length(tmp_path, tiny):
    at = after_key(tiny, "general.architecture") + 4  # value type STRING, then its length
    assert_refused(tmp_path, patched(tiny, at, "<Q", HUGE),
                   "the value of general.architecture: 1152921504606846976 bytes needed")


def test_huge_key_length(tmp_path, tiny):
    at = after_key(tiny, "general.architecture") - len("general.architecture") - 8
    assert_refused(tmp_path, patched(tiny, at, "<Q", HUGE), "metadata key 0: 1152921504606846976 bytes needed")


@pytest.mark.parametrize("at", [8, 16], ids=["tensor count", "metadata key count"])
def test_huge_counts_in_the_header(tmp_path, tiny, at):
    assert_refused(tmp_path, patched(tiny, at, "<Q", HUGE),
                   r"metadata keys and \d+ tensor descriptions: \d+ bytes needed")


# ---- tensor descriptions ----------------------------------------------------------------------------------

def test_more_than_four_dimensions(tmp_path, tiny):
    at = tensor_info(tiny, "blk.0.attn_q.weight")["n_dims"]
    assert_refused(tmp_path, patched(tiny, at, "<I", 5), "tensor blk.0.attn_q.weight claims 5 dimensions")
    assert_refused(tmp_path, patched(tiny, at, "<I", 1 << 31), "claims 2147483648 dimensions")


def test_huge_dimensions_are_refused_before_allocating(tmp_path, tiny):
    at = tensor_info(tiny, "token_embd.weight")["dims"] + 8  # the slow axis: 2^40 rows of 32 values
    assert_refused(tmp_path, patched(tiny, at, "<Q", 1 << 40),
                   "tensor token_embd.weight: 140737488355328 bytes at offset 0 run past the end")
    # And a product that wraps around 2^64, which a fixed-width multiplication would make small.
    data = patched(patched(tiny, at, "<Q", 1 << 62), at - 8, "<Q", 1 << 6)
    assert_refused(tmp_path, data, "tensor token_embd.weight: .* run past the end")


def test_zero_dimension(tmp_path, tiny):
    at = tensor_info(tiny, "output_norm.weight")["dims"]
    assert_refused(tmp_path, patched(tiny, at, "<Q", 0), "tensor output_norm.weight has shape")


def test_unknown_tensor_type(tmp_path, tiny):
    at = tensor_info(tiny, "output_norm.weight")["type"]
    assert_refused(tmp_path, patched(tiny, at, "<I", 1000), "tensor output_norm.weight has unknown ggml type 1000")


def test_misaligned_offset(tmp_path, tiny):
    at = tensor_info(tiny, "blk.1.ffn_up.weight")["offset"]
    offset = struct.unpack_from("<Q", tiny, at)[0]
    assert_refused(tmp_path, patched(tiny, at, "<Q", offset + 4),
                   f"tensor blk.1.ffn_up.weight: offset {offset + 4} is not a multiple of the alignment 32")


def test_overlapping_tensors(tmp_path, tiny):
    # Two tensors of one shape: point the second at the first's bytes. Aligned and inside the file, so only
    # the overlap check stands between this file and a model whose blk.1 attention reuses blk.0's weights.
    source = struct.unpack_from("<Q", tiny, tensor_info(tiny, "blk.0.attn_q.weight")["offset"])[0]
    data = patched(tiny, tensor_info(tiny, "blk.1.attn_q.weight")["offset"], "<Q", source)
    assert_refused(tmp_path, data, "tensors blk.0.attn_q.weight and blk.1.attn_q.weight overlap")


def test_a_changed_type_leaves_a_gap(tmp_path, tiny):
    # F32 -> F16: one bit. The tensor now ends halfway through its bytes, and the values differ; what gives
    # it away is where the next tensor starts.
    data = patched(tiny, tensor_info(tiny, "blk.0.attn_v.weight")["type"], "<I", 1)
    assert_refused(tmp_path, data, "tensor blk.0.attn_output.weight starts at offset .*, 1024 bytes after the end")


def test_bytes_after_the_last_tensor(tmp_path, tiny):
    last = "blk.1.ffn_up.weight"
    data = patched(tiny, tensor_info(tiny, last)["type"], "<I", 1)  # the last tensor shrinks to half
    assert_refused(tmp_path, data, f"6144 bytes at the end of the file follow the last tensor, {last}")
    assert_refused(tmp_path, tiny + bytes(64), "64 bytes at the end of the file follow the last tensor")


def test_a_tensor_name_without_a_layer(tmp_path, tiny):
    at = after_key(tiny, "blk.0.attn_q.weight") - len("blk.0.attn_q.weight")
    data = tiny[:at + 5] + b"_" + tiny[at + 6:]  # "blk.0_attn_q.weight"
    assert_refused(tmp_path, data, "unexpected tensor blk.0_attn_q.weight")


def test_offset_past_the_end(tmp_path, tiny):
    at = tensor_info(tiny, "output_norm.weight")["offset"]
    assert_refused(tmp_path, patched(tiny, at, "<Q", 1 << 40), "tensor output_norm.weight: .* run past the end")
    assert_refused(tmp_path, patched(tiny, at, "<Q", (1 << 64) - 32), "run past the end")


def test_truncated_data_section(tmp_path, tiny):
    assert_refused(tmp_path, tiny[:-200], "run past the end of the data section")


def test_truncated_header(tmp_path, tiny):
    cut = after_key(tiny, "tokenizer.ggml.tokens") + 1000  # inside the token strings
    assert_refused(tmp_path, tiny[:cut], "tokenizer.ggml.tokens.* bytes needed")
    assert_refused(tmp_path, tiny[:20], "too short for a GGUF header")


def test_duplicate_tensor_name(tmp_path, tiny):
    at = after_key(tiny, "blk.1.attn_q.weight") - len("blk.1.attn_q.weight")
    data = tiny[:at] + b"blk.0" + tiny[at + 5:]
    assert_refused(tmp_path, data, "tensor blk.0.attn_q.weight appears twice")


def test_duplicate_key(tmp_path, tiny):
    at = after_key(tiny, "tokenizer.ggml.eos_token_id") - len("eos_token_id")
    data = tiny[:at] + b"bos" + tiny[at + 3:]
    assert_refused(tmp_path, data, "metadata key tokenizer.ggml.bos_token_id appears twice")


def test_unknown_value_type_and_nested_arrays(tmp_path, tiny):
    at = after_key(tiny, "tokenizer.ggml.bos_token_id")
    assert_refused(tmp_path, patched(tiny, at, "<I", 99), "tokenizer.ggml.bos_token_id has unknown value type 99")
    at = after_key(tiny, "tokenizer.ggml.token_type") + 4  # the item type
    assert_refused(tmp_path, patched(tiny, at, "<I", 9), "tokenizer.ggml.token_type is an array of unsupported")


def test_invalid_utf8_and_bool(tmp_path, tiny):
    at = after_key(tiny, "tokenizer.ggml.model") + 4 + 8  # the value's first byte
    assert_refused(tmp_path, patched(tiny, at, "<B", 0xFF), "the value of tokenizer.ggml.model is not valid UTF-8")
    data = write_tiny(tmp_path / "bool.gguf", **{"tokenizer.ggml.add_bos_token": False}).read_bytes()
    at = after_key(data, "tokenizer.ggml.add_bos_token") + 4
    assert_refused(tmp_path, patched(data, at, "<B", 2), "tokenizer.ggml.add_bos_token holds a bool that is neither")


@pytest.mark.parametrize("version, match", [(1, "damaged GGUF file: GGUF version 1 is not supported"),
                                            (3 << 24, "a big-endian file")])
def test_unsupported_versions(tmp_path, tiny, version, match):
    assert_refused(tmp_path, patched(tiny, 4, "<I", version), match)


@pytest.mark.parametrize("alignment", [48, 0, -32, 32.0, "32"])
def test_bad_alignment_value(tmp_path, alignment):
    data = write_tiny(tmp_path / "aligned.gguf", **{"general.alignment": alignment}).read_bytes()
    assert_refused(tmp_path, data, "general.alignment is .*, not a power of two")


def test_alignment_the_offsets_do_not_follow(tmp_path):
    # A valid power of two that the writer (aligning to 32) did not use: some offset is not a multiple of it.
    data = write_tiny(tmp_path / "aligned.gguf", **{"general.alignment": 4096}).read_bytes()
    assert_refused(tmp_path, data, "is not a multiple of the alignment 4096")


# ---- the embedded tokenizer -------------------------------------------------------------------------------

@pytest.mark.parametrize("key, length", [("tokenizer.ggml.token_type", 100), ("tokenizer.ggml.token_type", 300),
                                         ("tokenizer.ggml.scores", 5)])
def test_per_token_arrays_of_the_wrong_length(tmp_path, key, length):
    values = [1] * length if key.endswith("token_type") else [0.0] * length
    data = write_tiny(tmp_path / "vocab.gguf", **{key: values}).read_bytes()
    what = "token types" if key.endswith("token_type") else "scores"
    assert_refused(tmp_path, data, re.escape(f"257 tokens but {length} {what} ({key})"), TokenizerError)


def test_vocabulary_arrays_of_the_wrong_kind(tmp_path):
    data = write_tiny(tmp_path / "vocab.gguf", **{"tokenizer.ggml.merges": [1, 2]}).read_bytes()
    assert_refused(tmp_path, data, "tokenizer.ggml.merges must be an array of strings", TokenizerError)
    data = write_tiny(tmp_path / "vocab.gguf", **{"tokenizer.ggml.token_type": "normal"}).read_bytes()
    assert_refused(tmp_path, data, "tokenizer.ggml.token_type must be an array of integers", TokenizerError)


@pytest.mark.parametrize("key, value", [("tokenizer.ggml.bos_token_id", 257),
                                        ("tokenizer.ggml.eos_token_id", 4294967295),
                                        ("tokenizer.ggml.padding_token_id", 1000)])
def test_special_token_ids_outside_the_vocabulary(tmp_path, key, value):
    data = write_tiny(tmp_path / "vocab.gguf", **{key: value}).read_bytes()
    assert_refused(tmp_path, data, re.escape(f"{key} = {value} is not a token id of this vocabulary (0 .. 256)"),
                   TokenizerError)


# ---- fuzz: random damage to the header --------------------------------------------------------------------

class Original:
    """The intact file's bytes, where its data section starts, its config and its logits."""

    def __init__(self, path: Path):
        model = llama_ref.load(path)
        self.data, self.header_size = path.read_bytes(), open_gguf(path).data_offset
        self.args, self.logits = model.args, model.forward(TOKENS)

    def __repr__(self) -> str:  # hypothesis prints its arguments: not 60 kB of bytes
        return f"<the intact tiny GGUF, {len(self.data)} bytes>"


@pytest.fixture(scope="module")
def original(tmp_path_factory, tiny) -> Original:
    path = tmp_path_factory.mktemp("original") / "original.gguf"
    path.write_bytes(tiny)
    return Original(path)


def damage(header_size: int, file_size: int):
    """Edits confined to the header (tensor bytes changed are other weights, not damage), and truncation."""
    at = st.integers(0, header_size - 1)
    edit = st.one_of(
        st.tuples(st.just("flip"), at, st.integers(0, 7)),
        st.tuples(st.just("byte"), at, st.integers(0, 255)),
        # Whole u32/u64 fields overwritten with edge values: counts, lengths, dims, offsets.
        st.tuples(st.just("u64"), at, st.sampled_from([0, 1, 31, 32, 33, 4096, 1 << 31, 1 << 32, 1 << 40,
                                                      HUGE, (1 << 63) + 1, (1 << 64) - 1])),
        st.tuples(st.just("u32"), at, st.sampled_from([0, 1, 4, 5, 8, 9, 13, 30, 255, 1 << 31, (1 << 32) - 1])),
    )
    return st.tuples(st.lists(edit, min_size=1, max_size=4),
                     st.one_of(st.none(), st.integers(0, file_size - 1)))


def apply(data: bytes, edits, truncate) -> bytes:
    out = bytearray(data)
    for kind, at, value in edits:
        if kind == "flip":
            out[at] ^= 1 << value
        elif kind == "byte":
            out[at] = value
        else:
            raw = struct.pack("<Q" if kind == "u64" else "<I", value)
            out[at:at + len(raw)] = raw[:len(out) - at]
    return bytes(out[:truncate] if truncate is not None else out)


@pytest.mark.slow
@settings(max_examples=150, deadline=5000, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(data=st.data())
def test_damaged_header_is_refused_or_harmless(original, data):
    """A damaged file is refused with a LlamaRefError naming it, or loads a model whose logits are the
    original's bit for bit (the damage hit nothing the model uses: a merge, a token type, padding). Never
    another exception, a long walk (the deadline) or a large allocation. Where the damage changed a
    hyperparameter to another value the config accepts, the logits differ, but must still be finite."""
    edits, truncate = data.draw(damage(original.header_size, len(original.data)))
    model = logits = None
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fuzzed.gguf"
        path.write_bytes(apply(original.data, edits, truncate))
        tracemalloc.start()
        try:
            model = llama_ref.load(path)
            if model.args.max_seq_len >= len(TOKENS):  # a context length damaged to less refuses forward()
                logits = model.forward(TOKENS)
        except LlamaRefError as e:
            model = None
            assert str(path) in str(e)
        finally:
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
    assert peak < MEMORY_LIMIT, f"{peak >> 20} MiB allocated"
    if logits is not None:
        assert np.isfinite(logits).all(), f"NaN/inf logits; config {model.args}"
    if model is not None and model.args == original.args:
        np.testing.assert_array_equal(logits, original.logits)
