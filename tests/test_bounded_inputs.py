"""Hostile inputs (issue 12): each is refused with a clean LlamaRefError, within bounded work, never a hang,
a traceback or a silently wrong number.

- chat templates: bounded in time (nested loops, recursion) and in the size of what they build;
- numeric arguments of generate / stream / chat / score checked in the API (stride, top_k, NaN, inf...);
- a temperature too small to divide by acts as greedy instead of turning the probabilities into NaN;
- the command line: undecodable bytes on argv or stdin, damaged teacher files -> one line, exit status 2.
"""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

import llama_ref.text.template as template
from tiny import tiny_model
from llama_ref.errors import LlamaRefError
from llama_ref.errors import InputError
from llama_ref.generation.sampling import SamplingParams, next_token_distribution, sample, scale_by_temperature
from llama_ref.generation.teacher import MAGIC, TeacherFileError, read_teacher
from llama_ref.text.tokenizer import TokenizerError, render_chat

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
USER = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=2)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    from test_cli import write_tiny_gguf

    return write_tiny_gguf(tmp_path_factory.mktemp("bounded") / "tiny.gguf")


@pytest.fixture
def short_deadline(monkeypatch):
    """Templates get 0.5 s here instead of 5 s, so the tests that run into the bound stay quick."""
    monkeypatch.setattr(template, "TEMPLATE_SECONDS", 0.5)


# ---- chat templates: time ---------------------------------------------------------------------------------

@pytest.mark.parametrize("source", [
    # 10**10 iterations writing nothing: the sandbox bounds each range (10**5), not their product
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "{% for i in range(100000) %}{% for j in range(100000) %}{% if i < 0 %}x{% endif %}{% endfor %}{% endfor %}",
    # a macro that calls itself twice: 2**depth calls before the recursion limit
    "{% macro f(n) %}{% if n > 0 %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(200) }}",
    # the same, through a recursive loop
    "{% for x in [[1, 1]] * 1 recursive %}{{ loop([[1, 1], [1, 1]]) }}{% endfor %}",
])
def test_template_that_runs_too_long_is_stopped(short_deadline, source):
    with pytest.raises(TokenizerError, match=r"chat template stopped: .*(longer than 0.5 s|recursed)"):
        render_chat(source, USER)


def test_template_time_bound_reaches_chat(short_deadline, tiny_gguf):
    import llama_ref

    m = llama_ref.load(tiny_gguf)
    m.tokenizer.chat_template = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    with pytest.raises(TokenizerError, match="longer than 0.5 s"):
        m.chat("hi", max_new_tokens=2)


# ---- chat templates: size ---------------------------------------------------------------------------------

@pytest.mark.parametrize("source, needle", [
    ("{{ 'a' * 10**10 }}", "'\\*'"),
    ("{{ 10**10 * 'a' }}", "'\\*'"),
    ("{% set s = 'a' * 1000000 %}{{ ([s] * 1000) | length }}", "'\\*'"),
    ("{{ 7 ** 100000 }}", "'\\*\\*'"),
    ("{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}", "'~'"),
    ("{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}{% endfor %}", "'\\+'"),
    ("{% set s = 'a' * 100000 %}{{ s.replace('', s) }}", "replace"),
    ("{% set s = 'a' * 100000 %}{{ s | replace('', s) }}", "replace"),
    ("{{ 'a'.center(10000000000) }}", "center"),
    ("{{ 'a' | center(10000000000) }}", "center"),
    ("{{ '%10000000000s' % 'a' }}", "'%'"),
    ("{{ '{:>10000000000}'.format('a') }}", "format"),
    ("{% set s = 'a' * 1000000 %}{{ s.join(range(1000) | map('string')) }}", "join"),
    ("{% set s = 'a' * 1000000 %}{{ range(1000) | map('string') | join(s) }}", "join"),
    ("{{ lipsum(100000000) }}", "lipsum"),
    # a list that holds itself twice, 60 times over: tiny in memory, 2**60 items when printed
    ("{% set ns = namespace(l=[1]) %}{% for i in range(60) %}{% set ns.l = [ns.l, ns.l] %}{% endfor %}{{ ns.l }}",
     "wrote over"),
    ("{% set ns = namespace(l=[1]) %}{% for i in range(60) %}{% set ns.l = [ns.l, ns.l] %}{% endfor %}"
     "{{ ns.l | tojson }}", "tojson"),
    # text written into a block that is then dropped still counts
    ("{% for i in range(100000) %}{% set x %}{% for j in range(1000) %}{{ 'y' * 1000 }}{% endfor %}{% endset %}"
     "{% endfor %}", "wrote over"),
])
def test_template_that_builds_too_much_is_stopped(source, needle):
    with pytest.raises(TokenizerError, match=f"chat template stopped: .*{needle}") as e:
        render_chat(source, USER)
    assert f"{template.TEMPLATE_MAX_CHARS:,}" in str(e.value) or "digits" in str(e.value)


def test_template_errors_of_python_arithmetic_are_one_clean_error():
    for source, needle in [("{{ 1 / 0 }}", "ZeroDivisionError"), ("{{ 10.0 ** 1000 }}", "OverflowError"),
                           ("{{ (10 ** 4000) | string | int * 10 ** 400 }}", "digits")]:
        with pytest.raises(LlamaRefError, match=f"chat template (failed|stopped).*{needle}"):
            render_chat(source, USER)


def test_real_templates_render_as_before():
    messages = [{"role": "user", "content": "x" * 100_000}, {"role": "assistant", "content": "é" * 1000},
                {"role": "user", "content": "<|im_end|>"}]
    expected = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    assert render_chat(CHATML, messages) == expected + "<|im_start|>assistant\n"
    # the idioms chat templates use: loop variables, namespaces, filters, string methods, tojson
    source = ("{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}"
              "{{ loop.index }}:{{ m.role | upper }}:{{ m.content[:3] | trim }}|{% endfor %}{{ ns.n }}|"
              "{{ messages[0] | tojson | length }}|{{ ' a b '.strip().split(' ') | join(',') }}|"
              "{{ '%d-%s' % (3, 'z') }}|"
              "{{ '{}+{}'.format(1, 2) }}|{{ 'ab' * 3 }}|{{ 2 ** 10 }}|{{ 'q'.center(5) }}")
    out = render_chat(source, messages)
    assert out == (f"1:USER:xxx|2:ASSISTANT:ééé|3:USER:<|i|3|{len(json.dumps(messages[0]))}|a,b|3-z|1+2|ababab|1024|"
                   "  q  ")


# ---- numeric arguments of the API -----------------------------------------------------------------------

@pytest.mark.parametrize("stride", [0, -1, -100, 1.5, True, "2", 16, 100])
def test_score_stride_is_checked(stride):
    m = tiny_model(seed=4, max_seq_len=16)
    ids = list(range(1, 41))
    with pytest.raises(InputError, match="stride"):
        m.score(ids, stride=stride)


def test_score_stride_up_to_window_minus_one_scores_every_token_once():
    m = tiny_model(seed=4, max_seq_len=16)
    ids = [int(i) for i in np.random.default_rng(1).integers(0, 64, 40)]
    for stride in (5, 15, 15.0):  # window - 1 is the largest: each window keeps one token of context
        s = m.score(ids, stride=stride)
        assert s.n_tokens == 39 and np.isfinite(s.nll) and s.nll > 0


@pytest.mark.parametrize("kwargs, name", [
    (dict(top_k=1.7), "top_k"), (dict(top_k=True), "top_k"), (dict(top_k="3"), "top_k"),
    (dict(temperature=float("nan")), "temperature"), (dict(temperature=float("inf")), "temperature"),
    (dict(temperature=True), "temperature"), (dict(temperature="0.5"), "temperature"),
    (dict(top_p=float("nan")), "top_p"), (dict(min_p=float("nan")), "min_p"),
    (dict(repetition_penalty=float("nan")), "repetition_penalty"),
    (dict(repetition_penalty=float("inf")), "repetition_penalty"),
    (dict(max_new_tokens=-1), "max_new_tokens"), (dict(max_new_tokens=2.5), "max_new_tokens"),
    (dict(max_new_tokens=True), "max_new_tokens"), (dict(top_logprobs=-1), "top_logprobs"),
    (dict(top_logprobs=1.5), "top_logprobs"), (dict(seed=-1), "seed"), (dict(seed=1.5), "seed"),
    (dict(seed=[1, -2]), "seed"),
])
def test_bad_numbers_are_refused_naming_the_argument(model, kwargs, name):
    prompts = [[1, 2, 3], [4, 5]] if kwargs.get("seed") == [1, -2] else [1, 2, 3]
    with pytest.raises(InputError, match=name):
        model.generate(prompts, **kwargs)
    if not isinstance(kwargs.get("seed"), list):
        with pytest.raises(InputError, match=name):
            model.stream([1, 2, 3], **kwargs)


def test_sampling_params_refuse_non_finite_and_non_integer_values():
    for kwargs, name in [(dict(top_k=1.7), "top_k"), (dict(top_k=True), "top_k"),
                         (dict(temperature=float("inf")), "temperature"), (dict(top_p=float("nan")), "top_p")]:
        with pytest.raises(InputError, match=name):
            SamplingParams(**kwargs)


def test_integral_values_are_taken_as_integers(model):
    a = model.generate([1, 2, 3], max_new_tokens=4.0, top_k=2.0, temperature=1.0, seed=3.0)
    b = model.generate([1, 2, 3], max_new_tokens=4, top_k=2, temperature=1.0, seed=3)
    assert a.ids == b.ids and len(a.ids) == 4
    # a huge max_new_tokens allocates nothing: generation ends at the context window
    g = model.generate([1, 2, 3], max_new_tokens=10**18, stop_ids=[])
    assert len(g.ids) == model.args.max_seq_len - 3 and g.finish_reason == "length"
    assert len(model.generate([1, 2], max_new_tokens=1, top_logprobs=10**9).top_logprobs[0]) == model.args.vocab_size


# ---- a temperature too small to divide by ------------------------------------------------------------------

@pytest.mark.parametrize("temperature", [1e-300, 1e-307, 1e-308, 5e-324])
def test_tiny_temperature_acts_as_greedy(temperature):
    rng = np.random.default_rng(0)
    for _ in range(20):
        logits = rng.standard_normal(50) * 3  # (V,)
        params = SamplingParams(temperature=temperature)
        p = next_token_distribution(logits, params)
        assert np.all(np.isfinite(p)) and p.sum() == 1.0
        assert int(np.argmax(p)) == int(np.argmax(logits)) and p.max() == 1.0
        assert sample(logits, params, np.random.default_rng(1)) == int(np.argmax(logits))


def test_scale_by_temperature_says_when_it_overflows():
    z = np.array([3.0, 1.0, -np.inf])
    assert scale_by_temperature(z, 1e-308) is None  # a gap of 2 / 1e-308 overflows float64 (max 1.8e308)
    scaled = scale_by_temperature(z, 1e-300)  # 2e300: finite, and exp of it underflows to exactly 0
    assert scaled is not None and scaled.tolist() == [0.0, -2.0 / 1e-300, -np.inf]
    assert scale_by_temperature(z, 0.5).tolist() == [0.0, -4.0, -np.inf]
    # float32 logits are scaled in float64, as every step of the sampler: in float32 1e-300 is 0, and 0 / 0 was NaN
    assert scale_by_temperature(z.astype(np.float32), 1e-308) is None
    assert scale_by_temperature(z.astype(np.float32), 1e-300).tolist() == [0.0, -2.0 / 1e-300, -np.inf]


def test_tiny_temperature_generation_equals_greedy(model):
    greedy = model.generate([1, 2, 3], max_new_tokens=8)
    for t in (1e-308, 5e-324):
        assert model.generate([1, 2, 3], max_new_tokens=8, temperature=t, seed=0).ids == greedy.ids


def test_invalid_unicode_text_is_a_tokenizer_error(tiny_gguf):
    import llama_ref

    m = llama_ref.load(tiny_gguf)
    with pytest.raises(TokenizerError, match="not valid Unicode"):
        m.generate("ab\udcff", max_new_tokens=1)
    with pytest.raises(TokenizerError, match="not valid Unicode"):
        m.chat("ab\udcff", max_new_tokens=1)


# ---- damaged teacher files --------------------------------------------------------------------------------

def _teacher_file(path, header: bytes, records: bytes = b""):
    path.write_bytes(MAGIC + struct.pack("<I", len(header)) + header + records)
    return path


@pytest.mark.parametrize("header, needle", [
    (b"[1, 2]", "not an object"),
    (b'"text"', "not an object"),
    (b'{"dtype": "float16"}', "top_k"),
    (b'{"top_k": 3}', "dtype"),
    (b'{"top_k": "3", "dtype": "float16"}', "top_k"),
    (b'{"top_k": -3, "dtype": "float16"}', "top_k"),
    (b'{"top_k": true, "dtype": "float16"}', "top_k"),
    (b'{"top_k": 3, "dtype": "int8"}', "dtype"),
    (b"\xff\xfe", "not UTF-8 JSON"),
    (b"{nope", "not UTF-8 JSON"),
    (b"[" * 100_000, "not UTF-8 JSON"),
])
def test_damaged_teacher_headers_are_teacher_file_errors(tmp_path, header, needle):
    path = _teacher_file(tmp_path / "t.bin", header)
    with pytest.raises(TeacherFileError, match=needle):
        read_teacher(path)


def test_teacher_record_with_huge_sizes_is_dropped_not_allocated(tmp_path):
    body = struct.pack("<II", 0, 2**31)  # claims 2**31 positions
    record = struct.pack("<I", len(body)) + body + struct.pack("<I", 0)
    path = _teacher_file(tmp_path / "t.bin", b'{"top_k": 1000000, "dtype": "float32"}', record)
    header, records = read_teacher(path)
    assert header["top_k"] == 1000000 and records == []


# ---- the command line: one line on stderr, exit status 2 ----------------------------------------------------

def assert_one_line_error(done, needle: str) -> None:
    """done: a run of the `cli` fixture with bytes for stdin (and so bytes out), as a shell passes $'\\xff'."""
    err = done.stderr.decode("utf-8", "replace")
    assert done.returncode == 2, (done.stdout, err)
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llama-ref: error:") and needle in lines[0], err


@pytest.mark.parametrize("argv, stdin, needle", [
    (["generate", "-q", "-m", "{tiny}", b"ab\xff"], b"", "prompt is not UTF-8 text (byte 0xff"),
    (["generate", "-q", "-m", "{tiny}", "-"], b"ab\xffcd", "standard input: not UTF-8"),
    (["generate", "-q", "-m", "{tiny}", "--chat", "--system", b"\xfe", "hi"], b"", "--system is not UTF-8"),
    (["generate", "-q", "-m", "{tiny}", "--stop", b"\xfe", "hi"], b"", "--stop is not UTF-8"),
    (["chat", "-q", "-m", "{tiny}", "-n", "1"], b"\xff\n", "line 1: not UTF-8"),
    (["score", "-q", "-m", "{tiny}", "-"], b"\xff", "standard input: not UTF-8"),
    (["tokenize", "{tiny}", b"\xff"], b"", "not UTF-8"),
    (["generate", "-q", "-m", "{tiny}", "--temp", "nan", "hi"], b"", "temperature"),
    (["generate", "-q", "-m", "{tiny}", "--seed", "-1", "hi"], b"", "seed"),
])
def test_cli_invalid_utf8_and_bad_numbers_exit_2(cli, tiny_gguf, argv, stdin, needle):
    argv = [a.format(tiny=tiny_gguf) if isinstance(a, str) else a for a in argv]
    assert_one_line_error(cli(*argv, stdin=stdin), needle)


def test_cli_damaged_teacher_output_exits_2(cli, tiny_gguf, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("hello world\n")
    for header, needle in [(b"[1]", "not an object"), (b'{"top_k": 3, "dtype": "int8"}', "dtype"),
                           (b"\xff", "not UTF-8 JSON")]:
        out = _teacher_file(tmp_path / "out.bin", header)
        assert_one_line_error(cli("teacher", "-q", "-m", tiny_gguf, prompts, "-o", out, stdin=b""), needle)
