"""Bad input gives a clear error of the right class, naming the argument or the file, never a deep traceback:
tokens, positions, model files (missing, corrupt, truncated, inconsistent), model names, and the CLI."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import llama_ref
from llama_ref.model import presets
from llama_ref.model.config import ConfigError
from llama_ref.weights.fetch import FetchError
from llama_ref.generation.generate import generate_ids
from llama_ref.errors import InputError
from llama_ref.model.cache import KVCache
from llama_ref.model.transformer import Transformer
from llama_ref.weights.common import WeightsError

from cli_run import run_cli
from tiny import random_weights, tiny_args, tiny_model
from gguf_files import byte_level_tokens, write_llama_gguf


@pytest.fixture(scope="module")
def model():
    return tiny_model()  # vocab 64, context 64


# ---- tokens and positions -----------------------------------------------------------------------------

@pytest.mark.parametrize("tokens, message", [
    ([], "tokens is empty"),
    (np.zeros((1, 0), np.int64), "tokens is empty"),
    ([64], r"token id 64 is outside the vocabulary \(0 \.\. 63\)"),
    ([3, -1], r"token id -1 is outside the vocabulary"),
    ([[1, 2], [3, 99]], "token id 99 is outside the vocabulary"),
    ([1.5, 2.0], "tokens must be integer ids, got dtype float64"),
    (["a", "b"], "tokens must be integer ids"),
    (np.zeros((1, 1, 2), np.int64), r"tokens must have shape \(T,\) or \(B, T\), got \(1, 1, 2\)"),
    (np.int64(3), r"tokens must have shape \(T,\) or \(B, T\), got \(\)"),
])
def test_bad_tokens(model, tokens, message):
    with pytest.raises(InputError, match=message):
        model.forward(tokens, 0)


def test_integral_float_tokens_are_accepted(model):
    # Whole numbers in a float array are ids, not an error: the same logits as the int array.
    np.testing.assert_array_equal(model.forward(np.array([1.0, 2.0]), 0), model.forward([1, 2], 0))


@pytest.mark.parametrize("start_pos, message", [
    (-1, "start_pos must be a non-negative integer, got -1"),
    (1.5, "start_pos must be a non-negative integer, got 1.5"),
    ("0", "start_pos must be a non-negative integer, got '0'"),
])
def test_bad_start_pos(model, start_pos, message):
    with pytest.raises(InputError, match=message):
        model.forward([1, 2], start_pos)


def test_start_pos_without_a_cache():
    fresh = tiny_model()
    with pytest.raises(InputError, match="start_pos > 0 needs a cache"):
        fresh.forward([1], 5)


def test_start_pos_past_the_cached_positions_is_a_gap():
    # Three positions cached; decoding at position 10 would attend to seven positions never computed.
    m = tiny_model()
    m.forward([1, 2, 3], 0)
    with pytest.raises(InputError, match=r"start_pos 10 would leave a gap: the cache holds positions 0 \.\. 2"):
        m.forward([4], 10)
    cache = KVCache(m.args)
    with pytest.raises(InputError, match="start_pos 1 would leave a gap"):
        m.forward([4], 1, cache=cache)
    # Continuing exactly where the cache ends, or rewinding into it, is fine.
    assert m.forward([4], 3).shape == (1, 64)
    assert m.forward([5], 1).shape == (1, 64)


def test_longer_than_the_context(model):
    with pytest.raises(InputError, match=r"positions 0\.\.64 exceed the context window of 64 tokens"):
        model.forward(np.ones(65, np.int64), 0)
    model.forward(np.ones(60, np.int64), 0)
    with pytest.raises(InputError, match=r"positions 60\.\.64 exceed the context window of 64"):
        model.forward(np.ones(5, np.int64), 60)
    with pytest.raises(InputError, match="exceeds the context window of 64"):
        KVCache(model.args).reserve(65)


def test_generation_rejects_empty_and_overlong_prompts(model):
    with pytest.raises(InputError, match="the prompt is empty"):
        next(generate_ids(model, []))
    with pytest.raises(InputError, match="the prompt has 65 tokens but the context window is 64"):
        next(generate_ids(model, [1] * 65))
    # A prompt that fills the window exactly is accepted but leaves no room: nothing is generated.
    assert list(generate_ids(model, [1] * 64)) == []


def test_bad_backend_and_dtype():
    args = tiny_args()
    weights = random_weights(args)
    with pytest.raises(InputError, match="backend must be 'numpy' or 'numba', got 'cuda'"):
        Transformer(args, weights, backend="cuda")
    with pytest.raises(InputError, match="dtype must be float32 or float64 for computation, got float16"):
        Transformer(args, weights, dtype=np.float16)


# ---- model files --------------------------------------------------------------------------------------

def write_tiny_gguf(path: Path, **damage) -> Path:
    """A small but complete Llama GGUF (tiny random weights, a byte-level BPE tokenizer, tied embeddings).
    `damage`: write_llama_gguf's architecture=, drop= (a Meta tensor left out), reshape= (a wrong shape)."""
    tokens = byte_level_tokens() + ["Ġt"]
    args = tiny_args(vocab_size=len(tokens), tie_word_embeddings=True)
    return write_llama_gguf(path, args, random_weights(args), {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.merges": ["Ġ t"],
        "tokenizer.ggml.token_type": [1] * len(tokens),
        "tokenizer.ggml.bos_token_id": 0,
        "tokenizer.ggml.eos_token_id": 1,
    }, **damage)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_tiny_gguf(path)
    return path


def test_the_tiny_gguf_itself_loads(tiny_gguf):
    # The control for every damaged copy below: intact, it loads and runs.
    m = llama_ref.load(tiny_gguf)
    assert m.args.vocab_size == 257 and m.args.tie_word_embeddings
    assert m.forward(m.tokenizer.encode(" the"), 0).shape == (3, 257)


def test_missing_model_file(tmp_path):
    missing = tmp_path / "nowhere" / "model.gguf"
    with pytest.raises(WeightsError, match="no such file or directory") as e:
        llama_ref.load(missing)
    assert str(missing) in str(e.value)


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04" + bytes(range(256)) * 8)
    with pytest.raises(WeightsError, match=r"not a GGUF file \(magic b'PK\\x03\\x04'\)") as e:
        llama_ref.load(path)
    assert str(path) in str(e.value)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.gguf"
    path.write_bytes(b"")
    with pytest.raises(WeightsError, match="not a GGUF file") as e:
        llama_ref.load(path)
    assert str(path) in str(e.value)


def test_corrupt_gguf_header(tmp_path, tiny_gguf):
    # The right magic followed by garbage: the version and counts make no sense.
    path = tmp_path / "corrupt.gguf"
    data = bytearray(tiny_gguf.read_bytes())
    data[4:24] = b"\xff" * 20
    path.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="damaged GGUF file") as e:
        llama_ref.load(path)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("fraction", [0.0001, 0.05, 0.3, 0.6, 0.999])
def test_truncated_gguf(tmp_path, tiny_gguf, fraction):
    # Cut inside the header, the metadata (the tokenizer's arrays) and the tensor data.
    data = tiny_gguf.read_bytes()
    path = tmp_path / "truncated.gguf"
    path.write_bytes(data[: max(4, int(len(data) * fraction))])
    with pytest.raises(WeightsError, match="damaged GGUF file|truncated") as e:
        llama_ref.load(path)
    assert str(path) in str(e.value)


def test_truncated_copy_of_the_default_model(tmp_path, default_model_path):
    # The first 10 MB: the metadata and tokenizer whole, the tensor data cut short.
    path = tmp_path / "smollm2-truncated.gguf"
    with open(default_model_path, "rb") as src, open(path, "wb") as dst:
        dst.write(src.read(10 << 20))
    with pytest.raises(WeightsError, match="damaged GGUF file|truncated") as e:
        llama_ref.load(path)
    assert str(path) in str(e.value)


def test_gguf_with_a_missing_tensor(tmp_path):
    path = tmp_path / "missing-tensor.gguf"
    write_tiny_gguf(path, drop="layers.1.feed_forward.w2.weight")
    with pytest.raises(WeightsError, match="tensor layers.1.feed_forward.w2.weight is missing") as e:
        llama_ref.load(path)
    assert str(path) in str(e.value)


def test_gguf_with_a_wrongly_shaped_tensor(tmp_path):
    path = tmp_path / "bad-shape.gguf"
    write_tiny_gguf(path, reshape="layers.0.attention.wk.weight")
    with pytest.raises(WeightsError, match=r"tensor layers.0.attention.wk.weight has shape \(16, 31\), "
                                           r"the config implies \(16, 32\)") as e:
        llama_ref.load(path)
    assert str(path) in str(e.value)


def test_gguf_of_another_architecture(tmp_path):
    path = tmp_path / "gpt2.gguf"
    write_tiny_gguf(path, architecture="gpt2")
    with pytest.raises(ConfigError, match="general.architecture is 'gpt2', expected 'llama'") as e:
        llama_ref.load(path)
    assert str(path) in str(e.value)


def test_a_directory_without_a_checkpoint(tmp_path):
    with pytest.raises(WeightsError, match="checkpoint") as e:
        llama_ref.load(tmp_path)
    assert str(tmp_path) in str(e.value)


# ---- names -------------------------------------------------------------------------------------------

def test_unknown_model_name():
    with pytest.raises(WeightsError, match="llama-9-7b: no such file or directory, and not a known model name "
                                           r"\(.*smollm2-135m-instruct"):
        llama_ref.load("llama-9-7b")
    with pytest.raises(FetchError, match="unknown model name 'llama-9-7b'; known: .*smollm2-135m-instruct"):
        llama_ref.fetch("llama-9-7b")
    with pytest.raises(ConfigError, match="unknown preset 'llama-9-7b'"):
        presets.get("llama-9-7b")
    # A fetchable name that is only a tokenizer is refused by load before anything is downloaded.
    with pytest.raises(WeightsError, match="llama3-tokenizer: this name is a tokenizer file, not a model"):
        llama_ref.load("llama3-tokenizer")


def test_errors_are_value_errors_for_callers():
    # One except clause catches every bad-input error of the library's core (FetchError is a download
    # failure, a RuntimeError).
    for cls in (ConfigError, InputError, WeightsError, llama_ref.TokenizerError):
        assert issubclass(cls, ValueError)


# ---- the command line ---------------------------------------------------------------------------------

NO_BAR = {"TQDM_DISABLE": "1"}  # no loading progress bar: it is for terminals, and would interleave with the error line


def _cli(*argv: str) -> subprocess.CompletedProcess:
    """`llama-ref ARGS` as a user runs it: the installed console script where there is one, a child process."""
    exe = shutil.which("llama-ref")
    return run_cli(*argv, timeout=120, env=NO_BAR, launcher=[exe] if exe else None)


def _one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llama-ref: error: "), result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def test_cli_empty_prompt(cli):
    assert "the prompt is empty" in _one_line_error(cli("generate", "", env=NO_BAR))


def test_cli_missing_model_file(cli, tmp_path):
    missing = tmp_path / "missing.gguf"
    assert str(missing) in _one_line_error(cli("generate", "--model", str(missing), "Hello", env=NO_BAR))


def test_cli_truncated_model_file(tmp_path, tiny_gguf):
    # A child process in the fast tier too: the console script runs, and an error exits with status 2.
    path = tmp_path / "cut.gguf"
    path.write_bytes(tiny_gguf.read_bytes()[:5000])
    line = _one_line_error(_cli("generate", "--model", str(path), "Hello"))
    assert str(path) in line and ("damaged" in line or "truncated" in line)


def test_cli_prompt_longer_than_the_context(cli, tmp_path, tiny_gguf):
    # 70 tokens of " t" against the tiny model's 64-token window.
    # -q: the model loads before the prompt is refused, and an in-process run cannot take TQDM_DISABLE (tqdm reads
    # it once, on import) to keep its loading bar off stderr.
    line = _one_line_error(cli("generate", "-q", "--model", str(tiny_gguf), " t" * 70, env=NO_BAR))
    assert re.search("70 tokens.*context window is 64", line), line
