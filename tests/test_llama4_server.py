"""The chat API of a Llama 4 model: tool calls written into the prompt in Meta's Llama 4 format, and replies read
as Meta's llama4 ChatFormat.decode_assistant_message_from_content reads them (the replies of
tests/data/tokenizers/llama4-cases.json, written by Meta's code: tests/fixtures/make_llama4_tokenizer_cases.py).

The model is the tiny Llama 4 of tests/data/tiny_ckpt/llama4_hf with its vocabulary widened to the official
Llama 4 tokenizer's 202048 ids (its rows repeated), which is fetched from PyPI (skipped without it)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

# The [server] and [test] extras, looked up without importing them: every xdist worker imports every test module,
# and the openai client alone takes ~2 s of CPU to import; the tests that use it import it.
for _module in ("starlette", "uvicorn", "httpx", "openai"):
    if importlib.util.find_spec(_module) is None:
        pytest.skip(f"{_module} is not installed (the [server] and [test] extras)", allow_module_level=True)

import httpx  # noqa: E402

import llama_ref  # noqa: E402
from llama_ref.server import BackgroundServer, create_app  # noqa: E402
from llama_ref.server.app import TOOL_PROMPT, _message_from  # noqa: E402
from llama_ref.text.tokenizer_llama4 import llama4_chat_tokens  # noqa: E402

DATA = Path(__file__).parent / "data"
CASES = json.loads((DATA / "tokenizers" / "llama4-cases.json").read_text(encoding="utf-8"))
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}]


@pytest.fixture(scope="module")
def model(llama4_tokenizer):
    tok = llama4_tokenizer
    small = llama_ref.load(DATA / "tiny_ckpt" / "llama4_hf", weights="float32")
    weights = dict(small.weights)
    for name in ("tok_embeddings.weight", "output.weight"):  # the 128 rows repeated to the tokenizer's size
        weights[name] = np.resize(np.asarray(weights[name]), (tok.vocab_size, small.args.dim))
    m = llama_ref.Transformer(small.args.replace(vocab_size=tok.vocab_size, max_seq_len=512), weights)
    m.tokenizer = tok
    return m


@pytest.fixture(scope="module")
def served(model):
    with BackgroundServer(create_app(model, max_batch=2, name="tiny4")) as url:
        yield url


def test_tool_calls_in_the_history_are_written_in_metas_llama4_format(model, served):
    history = [{"role": "user", "content": "weather in Paris?"},
               {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {
                   "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
               {"role": "tool", "tool_call_id": "c1", "content": "18 C"}]
    ids = httpx.post(served + "/tokenize", json={"messages": history, "tools": TOOLS}).json()["tokens"]
    system = TOOL_PROMPT + json.dumps(TOOLS[0]["function"])
    want = llama4_chat_tokens(model.tokenizer, [
        {"role": "system", "content": system}, {"role": "user", "content": "weather in Paris?"},
        {"role": "assistant", "content": "",
         "tool_calls": [{"tool_name": "get_weather", "arguments": {"city": "Paris"}}]},
        {"role": "tool", "content": "18 C"}])
    assert ids == want
    text = model.tokenizer.decode(ids)
    # The call as Meta's encode_tool_call writes JSON calls, ending the turn with <|eom|>; the result as ipython.
    assert '{"type": "function", "name": "get_weather", "parameters": {"city": "Paris"}}<|eom|>' in text
    assert "<|header_start|>ipython<|header_end|>\n\n18 C<|eom|>" in text


def test_a_chat_with_tools_runs_through_the_server(served):
    import openai

    client = openai.OpenAI(base_url=served + "/v1", api_key="unused", max_retries=0, timeout=120)
    r = client.chat.completions.create(model="tiny4", messages=[{"role": "user", "content": "weather in Rome?"}],
                                       tools=TOOLS, max_tokens=3, temperature=0)
    message = r.choices[0].message
    assert (message.content is not None) != bool(message.tool_calls)


@pytest.mark.parametrize("reply", CASES["replies"], ids=range(len(CASES["replies"])))
def test_replies_become_openai_tool_calls_as_meta_reads_them(reply):
    message, reason = _message_from(reply["text"], True, llama4=True)
    if reply["tool_calls"]:
        call = reply["tool_calls"][0]
        assert reason == "tool_calls" and message["content"] is None
        assert message["tool_calls"][0]["function"] == {"name": call["tool_name"],
                                                        "arguments": json.dumps(call["arguments"])}
    else:
        assert reason is None and message["content"] == reply["text"]


def test_pythonic_calls_are_llama4_only():
    """Meta's Llama 3 reader has the same rule, but llama_ref's Llama 3 parser does not (yet): a Llama 3
    model's pythonic-looking reply stays text, a Llama 4 model's becomes a call."""
    text = '[get_weather(city="Rome")]'
    assert _message_from(text, True, llama4=True)[1] == "tool_calls"
    assert _message_from(text, False, llama4=True) == ({"role": "assistant", "content": text}, None)


def test_a_resumed_conversation_inside_a_running_batch_answers_as_alone():
    """Turn 2 joins a busy batch from turn 1's kept keys, moved to the positions it joins at: the RoPE
    layers' keys are rotated on by the shift, the NoPE layers' are not (they were never rotated), and its
    chunks and temperatures count from its own first token (left padding)."""
    from test_server import assert_resumed_inside_busy_batch

    tiny = llama_ref.load(DATA / "tiny_ckpt" / "llama4_hf")
    assert_resumed_inside_busy_batch(tiny, [5, 17, 90, 42, 7, 63, 88, 3, 11, 77], [31, 64, 9],
                                     [(7 * i + 3) % 128 for i in range(30)])
