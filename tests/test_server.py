"""llama_ref.server: the real server (uvicorn on a free 127.0.0.1 port), driven by the official openai client
and by raw HTTP (httpx) for the bad inputs.

Answers are checked against the library called directly (model.chat / model.generate). A tiny random model
written to a GGUF with a byte-level tokenizer and a ChatML template keeps most tests fast; the default model
is used once, for greedy completions. Tests that need requests to be decoded together, or a client to leave
mid-request, hold the server's model thread on a gate (Batcher.call) so the order of events is fixed, never
timed. No Llama Guard weights exist here: the shield plumbing is tested with a stand-in guard (below,
KeywordGuard, which says so), and LlamaGuard's real prompt with the tiny and default models' tokenizers.
"""

from __future__ import annotations

import importlib.util
import json
import re
import socket
import subprocess
import sys
import threading
import time

import pytest

# The [server] and [test] extras, looked up without importing them: every xdist worker imports every test module,
# and the openai client alone takes ~2 s of CPU to import; the tests that use it import it.
for _module in ("starlette", "uvicorn", "httpx", "openai"):
    if importlib.util.find_spec(_module) is None:
        pytest.skip(f"{_module} is not installed (the [server] and [test] extras)", allow_module_level=True)

import httpx  # noqa: E402

import llama_ref  # noqa: E402
from llama_ref.text.chat import GuardVerdict  # noqa: E402
from llama_ref.server import BackgroundServer, LlamaGuard, create_app  # noqa: E402
from llama_ref.server.app import _message_from  # noqa: E402
from test_cli import write_tiny_gguf  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return llama_ref.load(write_tiny_gguf(tmp_path_factory.mktemp("serve") / "tiny.gguf", context_length=1024))


@pytest.fixture(scope="module")
def served(tiny):
    """(base url, app) of a server on the tiny model, for the whole module."""
    app = create_app(tiny, max_batch=4, name="tiny")
    with BackgroundServer(app) as url:
        yield url, app


@pytest.fixture(scope="module")
def client(served):
    import openai

    return openai.OpenAI(base_url=served[0] + "/v1", api_key="unused", max_retries=0, timeout=60)


def metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics").text
    return float(re.search(rf"^llama_ref_{name} (\S+)$", text, re.M).group(1))


def wait_until(condition, what: str, limit: float = 20.0) -> None:
    """Poll until condition() holds (a bound on the wait, not a timing check)."""
    deadline = time.monotonic() + limit
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.02)


class Gate:
    """Holds the server's model thread (nothing decodes) until opened."""

    def __init__(self, app):
        self.event = threading.Event()
        self.future = app.state.server.batcher.call(self.event.wait)
        wait_until(self.future.running, "the model thread to reach the gate")

    def open(self):
        self.event.set()
        self.future.result(timeout=30)


CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "the theme"}]


# ---- the openai client against the library --------------------------------------------------------------

def test_models_health_and_metrics(served, client):
    import openai

    url, _ = served
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    assert httpx.get(url + "/health").json() == {"status": "ok"}
    text = httpx.get(url + "/metrics").text
    assert "# TYPE llama_ref_requests_total counter" in text and 'endpoint="/v1/models",status="200"' in text
    for name in ("prompt_tokens_total", "completion_tokens_total", "queue_length", "time_per_output_token_seconds"):
        assert f"llama_ref_{name} " in text


def test_greedy_chat_equals_model_chat(tiny, client):
    expected = tiny.chat(CHAT, max_new_tokens=12, stop_ids=[])
    r = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=12, temperature=0,
                                       logprobs=True, top_logprobs=3, extra_body={})
    # stop_ids=[] above only makes the reference run on: the tiny model's answer has no end token in 12.
    choice = r.choices[0]
    assert choice.message.content == expected.text and choice.message.role == "assistant"
    assert [t.logprob for t in choice.logprobs.content] == pytest.approx(expected.logprobs, abs=1e-6)
    assert all(len(t.top_logprobs) == 3 for t in choice.logprobs.content)
    assert r.usage.prompt_tokens == len(expected.prompt_ids) and r.usage.completion_tokens == len(expected.ids)
    assert choice.finish_reason == ("length" if expected.finish_reason == "length" else "stop")

    chunks = list(client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    assert chunks[-1].usage.completion_tokens == len(expected.ids)


def test_sampled_completion_with_seed_equals_generate(tiny, client):
    kw = dict(temperature=0.9, top_p=0.9, seed=7)
    expected = tiny.generate("the theme", max_new_tokens=10, stop_ids=[], top_logprobs=2, **kw)
    r = client.completions.create(model="tiny", prompt="the theme", max_tokens=10, logprobs=2, **kw)
    if expected.finish_reason == "length":  # the reference ran on past an end token only if there was none
        assert r.choices[0].text == expected.text
        assert r.choices[0].logprobs.token_logprobs == pytest.approx(expected.logprobs, abs=1e-6)
    ids = tiny.tokenizer.encode("the theme")
    r2 = client.completions.create(model="tiny", prompt=ids, max_tokens=10, echo=True, **kw)
    assert r2.choices[0].text == "the theme" + r.choices[0].text


def test_streamed_completion_logprobs_equal_the_whole_ones(tiny, client):
    kw = dict(model="tiny", prompt="the theme", max_tokens=8, temperature=0, logprobs=2,
              extra_body={"ignore_eos": True})
    whole = client.completions.create(**kw).choices[0]
    chunks = [c.choices[0] for c in client.completions.create(stream=True, **kw)]
    assert "".join(c.text for c in chunks) == whole.text
    values = [v for c in chunks if c.logprobs for v in c.logprobs.token_logprobs]
    assert values == whole.logprobs.token_logprobs and len(values) == 8
    assert [o for c in chunks if c.logprobs for o in c.logprobs.text_offset] == whole.logprobs.text_offset


def test_llama_stack_client_works_unchanged(tiny, served):
    # Meta's llama-stack-client, when installed (not a test dependency: it needs Python 3.12 from 0.3 on).
    # Releases before 0.3 call Llama Stack's older paths (/v1/openai/v1/...), which this server does not serve.
    lsc = pytest.importorskip("llama_stack_client")
    if tuple(int(p) for p in re.findall(r"\d+", lsc.__version__)[:2]) < (0, 3):
        pytest.skip(f"llama-stack-client {lsc.__version__} predates the /v1/chat/completions paths")
    c = lsc.LlamaStackClient(base_url=served[0], max_retries=0, timeout=60)
    assert [m.id for m in c.models.list()] == ["tiny"] and c.models.retrieve("tiny").id == "tiny"
    expected = tiny.chat(CHAT, max_new_tokens=12, stop_ids=[])
    r = c.chat.completions.create(model="tiny", messages=CHAT, max_tokens=12, temperature=0)
    assert r.choices[0].message.content == expected.text
    assert r.usage.completion_tokens == len(expected.ids)
    chunks = c.chat.completions.create(model="tiny", messages=CHAT, max_tokens=12, temperature=0, stream=True)
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == expected.text
    want = tiny.generate("Once upon", max_new_tokens=6, stop_ids=[])
    r = c.completions.create(model="tiny", prompt="Once upon", max_tokens=6, temperature=0)
    assert r.choices[0].text == want.text
    with pytest.raises(lsc.NotFoundError, match="model_not_found"):
        c.completions.create(model="another", prompt="x", max_tokens=2)
    with pytest.raises(lsc.BadRequestError, match="no guard model"):
        c.moderations.create(input="hello", model="tiny")


def test_completion_echo_logprobs_score_the_prompt(tiny, client):
    r = client.completions.create(model="tiny", prompt="the theme", max_tokens=3, temperature=0, echo=True,
                                  logprobs=1)
    lp = r.choices[0].logprobs
    ids = tiny.tokenizer.encode("the theme")
    assert lp.token_logprobs[0] is None and len(lp.tokens) == len(ids) + 3
    score = tiny.score(ids)
    assert -sum(lp.token_logprobs[1:len(ids)]) == pytest.approx(score.nll, abs=1e-4)


def test_n_choices_and_stop(tiny, client):
    r = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=6, temperature=0, n=3)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert len({c.message.content for c in r.choices}) == 1
    full = tiny.generate("the theme", max_new_tokens=12, stop_ids=[]).text
    stop = full[3:5]
    r = client.completions.create(model="tiny", prompt="the theme", max_tokens=12, temperature=0, stop=[stop])
    assert r.choices[0].text == tiny.generate("the theme", max_new_tokens=12, stop=[stop]).text
    assert stop not in r.choices[0].text


def test_tokenize_and_detokenize(tiny, served):
    url, _ = served
    r = httpx.post(url + "/tokenize", json={"prompt": "the theme"}).json()
    assert r["tokens"] == tiny.tokenizer.encode("the theme") and r["max_model_len"] == tiny.args.max_seq_len
    assert httpx.post(url + "/detokenize", json={"tokens": r["tokens"]}).json() == {"prompt": "the theme"}


def test_tools_are_offered_and_tool_calls_parsed(tiny, served, client):
    url, _ = served
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}]
    history = [{"role": "user", "content": "weather in Paris?"},
               {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {
                   "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
               {"role": "tool", "tool_call_id": "c1", "content": "18 C"}]
    ids = httpx.post(url + "/tokenize", json={"messages": history, "tools": tools}).json()["tokens"]
    prompt = tiny.tokenizer.decode(ids)
    assert '"name": "get_weather"' in prompt and "Paris" in prompt and "18 C" in prompt
    r = client.chat.completions.create(model="tiny", messages=history, tools=tools, max_tokens=4, temperature=0)
    assert r.choices[0].message.content is not None or r.choices[0].message.tool_calls
    # A reply in Llama 3.1's JSON tool-call format becomes an OpenAI tool call.
    message, reason = _message_from('{"type": "function", "name": "get_weather", "parameters": {"city": "Rome"}}',
                                    True)
    assert reason == "tool_calls" and message["content"] is None
    assert message["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city": "Rome"}'}


# ---- concurrency ---------------------------------------------------------------------------------------

def test_requests_that_arrive_together_decode_together_and_equal_sequential(tiny, served):
    url, app = served
    prompts = ["the theme", "t", "hello there, the", "abc", "the the the theme of it", "xyz q"]
    lengths = [20, 5, 14, 30, 9, 17]  # rows end at different steps; later requests join mid-batch
    expected = [tiny.generate(p, max_new_tokens=n, stop_ids=[]).text for p, n in zip(prompts, lengths)]
    steps_before = metric(url, "decode_steps_total")
    results = [None] * len(prompts)

    def ask(i):
        body = {"model": "tiny", "prompt": prompts[i], "max_tokens": lengths[i], "temperature": 0}
        results[i] = httpx.post(url + "/v1/completions", json=body, timeout=60).json()

    gate = Gate(app)  # hold the model thread until every request waits in the queue
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    wait_until(lambda: metric(url, "queue_length") == len(prompts), "all requests to be queued")
    gate.open()
    for t in threads:
        t.join(timeout=60)
    # The tiny model's end token may end a row early (finish "stop"), as it ends the reference's run.
    texts = [r["choices"][0]["text"] for r in results]
    for got, want, r in zip(texts, expected, results):
        assert want.startswith(got) and (got == want or r["choices"][0]["finish_reason"] == "stop")
    tokens = sum(r["usage"]["completion_tokens"] for r in results)
    # Decoded together: fewer batched decode steps than tokens (one step serves up to max_batch rows).
    assert metric(url, "decode_steps_total") - steps_before < tokens


def test_a_conversation_that_goes_on_reuses_its_cached_prefix(tiny, served, client):
    url, _ = served
    first = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=8, temperature=0)
    turn = CHAT + [{"role": "assistant", "content": first.choices[0].message.content},
                   {"role": "user", "content": "and then?"}]
    reused = metric(url, "prompt_tokens_reused_total")
    second = client.chat.completions.create(model="tiny", messages=turn, max_tokens=8, temperature=0)
    assert metric(url, "prompt_tokens_reused_total") > reused
    assert second.choices[0].message.content == tiny.chat(turn, max_new_tokens=8).text


def test_a_client_that_leaves_stops_its_generation(served):
    url, app = served
    cancelled, completion = metric(url, "cancelled_rows_total"), metric(url, "completion_tokens_total")
    first = Gate(app)
    body = {"model": "tiny", "messages": CHAT, "max_tokens": 100, "temperature": 0, "stream": True}
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", url + "/v1/chat/completions", json=body) as response:
            wait_until(lambda: metric(url, "queue_length") == 1, "the request to be queued")
            second = Gate.__new__(Gate)  # queue a second gate before opening the first: the row joins the
            second.event = threading.Event()  # batch (prefilled), then the model thread stops again
            second.future = app.state.server.batcher.call(second.event.wait)
            first.open()
            wait_until(second.future.running, "the row to join the batch")
            assert next(response.iter_lines()).startswith("data: ")  # the role chunk; then the client leaves
    wait_until(lambda: metric(url, "client_disconnects_total") >= 1, "the server to see the disconnect")
    second.open()
    wait_until(lambda: metric(url, "cancelled_rows_total") == cancelled + 1, "the row to be dropped")
    assert metric(url, "completion_tokens_total") == completion  # not one token was generated for it
    assert metric(url, "batch_rows") == 0


def test_past_the_queue_429_with_retry_after(tiny):
    app = create_app(tiny, max_batch=1, max_queue=1, name="tiny")
    with BackgroundServer(app) as url:
        gate = Gate(app)
        body = {"model": "tiny", "prompt": "the", "max_tokens": 2, "temperature": 0}
        waiting = {}
        t = threading.Thread(target=lambda: waiting.update(r=httpx.post(url + "/v1/completions", json=body,
                                                                        timeout=60)))
        t.start()
        wait_until(lambda: metric(url, "queue_length") == 1, "the first request to be queued")
        refused = httpx.post(url + "/v1/completions", json=body, timeout=60)
        gate.open()
        t.join(timeout=60)
    assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["type"] == "rate_limit_error"
    assert waiting["r"].status_code == 200


# ---- bad input -----------------------------------------------------------------------------------------

def _chat(**fields):
    return {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], **fields}


BAD = [
    ("/v1/chat/completions", b"{not json", 400, None),
    ("/v1/chat/completions", [1, 2], 400, None),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, 400, "model"),
    ("/v1/chat/completions", _chat(model="gpt-4"), 404, "model"),
    ("/v1/chat/completions", _chat(messages="hi"), 400, "messages"),
    ("/v1/chat/completions", _chat(messages=[{"role": "wizard", "content": "hi"}]), 400, "messages[0].role"),
    ("/v1/chat/completions", _chat(messages=[{"role": "user", "content": 5}]), 400, "messages[0]"),
    ("/v1/chat/completions", _chat(temperature="hot"), 400, "temperature"),
    ("/v1/chat/completions", _chat(temperature=-1), 400, "temperature"),
    ("/v1/chat/completions", _chat(top_p=0), 400, "top_p"),
    ("/v1/chat/completions", _chat(max_tokens=-1), 400, "max_tokens"),
    ("/v1/chat/completions", _chat(max_tokens="5"), 400, "max_tokens"),
    ("/v1/chat/completions", _chat(n=1000), 400, "n"),
    ("/v1/chat/completions", _chat(seed=1.5), 400, "seed"),
    ("/v1/chat/completions", _chat(stop=["a", "b", "c", "d", "e"]), 400, "stop"),
    ("/v1/chat/completions", _chat(logprobs="yes"), 400, "logprobs"),
    ("/v1/chat/completions", _chat(logprobs=True, top_logprobs=50), 400, "top_logprobs"),
    ("/v1/chat/completions", _chat(stream="yes"), 400, "stream"),
    ("/v1/chat/completions", _chat(frequency_penalty=0.5), 400, "frequency_penalty"),
    ("/v1/chat/completions", _chat(messages=[{"role": "user", "content": "x " * 1200}]), 400, "messages"),
    ("/v1/completions", {"model": "tiny", "prompt": 5}, 400, "prompt"),
    ("/v1/completions", {"model": "tiny", "prompt": [1] * 2000}, 400, "prompt"),
    ("/v1/completions", {"model": "tiny", "prompt": [10 ** 6]}, 400, "prompt"),
    ("/v1/completions", {"model": "tiny", "prompt": "a", "logprobs": 9}, 400, "logprobs"),
    ("/detokenize", {"tokens": [-1]}, 400, "tokens"),
    ("/tokenize", {"prompt": 3}, 400, "prompt"),
    ("/v1/moderations", {"input": "hello"}, 400, "model"),  # no guard loaded
]


@pytest.mark.parametrize("path, body, status, param", BAD, ids=[f"{b[0]}:{b[3]}:{i}" for i, b in enumerate(BAD)])
def test_bad_input_gets_an_openai_error_naming_the_field(served, path, body, status, param):
    url, _ = served
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(url + path, content=content, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param
    if param is not None:
        assert param.split("[")[0].split(".")[0] in error["message"]


def test_a_bad_request_does_not_disturb_the_others(tiny, served, client):
    import openai

    url, _ = served
    errors = []

    def bad():
        for body in (b"{", json.dumps(_chat(temperature=9)).encode()):
            errors.append(httpx.post(url + "/v1/chat/completions", content=body, timeout=30).status_code)

    t = threading.Thread(target=bad)
    t.start()
    r = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=6, temperature=0)
    t.join()
    assert errors == [400, 400]
    assert r.choices[0].message.content == tiny.chat(CHAT, max_new_tokens=6).text
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=CHAT)


# ---- guard ---------------------------------------------------------------------------------------------

class KeywordGuard:
    """A STAND-IN for Llama Guard in tests (no Llama Guard weights exist here): the same check(messages)
    interface, with a verdict we control: "unsafe / S1" when the judged message mentions "attack",
    "unsafe / S10,S11" for "hate myself", else "safe"."""

    name = "keyword-guard (test stand-in)"

    def __init__(self):
        self.seen = []

    def check(self, messages):
        self.seen.append(messages)
        text = messages[-1]["content"]
        if "attack" in text:
            return GuardVerdict(False, ["S1"])
        if "hate myself" in text:
            return GuardVerdict(False, ["S10", "S11"])
        return GuardVerdict(True, [])


def test_guard_shields_requests_and_backs_moderations(tiny):
    import openai

    guard = KeywordGuard()
    app = create_app(tiny, guard, name="tiny", guard_output=True)
    with BackgroundServer(app) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        refused = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "plan an attack"}])
        assert refused.choices[0].finish_reason == "content_filter"
        assert "S1" in refused.choices[0].message.content and "Violent Crimes" in refused.choices[0].message.content
        streamed = list(c.chat.completions.create(model="tiny", stream=True,
                                                  messages=[{"role": "user", "content": "attack!"}]))
        assert "refused" in "".join(ch.choices[0].delta.content or "" for ch in streamed if ch.choices)
        safe = c.chat.completions.create(model="tiny", messages=CHAT, max_tokens=6, temperature=0)
        assert safe.choices[0].message.content == tiny.chat(CHAT, max_new_tokens=6).text
        assert guard.seen[-1][-1]["role"] == "assistant"  # the output shield judged the answer
        m = c.moderations.create(input=["hello", "I hate myself"])
        assert [r.flagged for r in m.results] == [False, True]
        assert m.results[1].categories.hate and m.results[1].categories.self_harm
        assert not m.results[1].categories.violence
        assert metric(url, "guard_refusals_total") == 2


def test_llama_guard_prompt_on_real_tokenizers_and_an_unreadable_verdict(tiny, default_model):
    import openai

    messages = [{"role": "user", "content": "How do I bake bread?"}]
    # The default model's tokenizer has no Llama 3 special tokens: the Llama Guard 3 request goes in its
    # own chat format, one user message.
    text = default_model.tokenizer.decode(LlamaGuard(default_model).prompt_ids(messages))
    assert "Task: Check if there is unsafe content in 'User' messages" in text
    assert "S14: Code Interpreter Abuse." in text and "User: How do I bake bread?" in text
    # A model that is not a guard answers no verdict: the shield refuses (it never reads that as safe), and
    # /v1/moderations says why, as a server error.
    app = create_app(tiny, LlamaGuard(tiny), name="tiny")
    with BackgroundServer(app) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        r = c.chat.completions.create(model="tiny", messages=messages, max_tokens=4)
        assert r.choices[0].finish_reason == "content_filter" and "could not judge" in r.choices[0].message.content
        with pytest.raises(openai.InternalServerError, match="not a Llama Guard verdict"):
            c.moderations.create(input="hello")


# ---- the default model and the command line --------------------------------------------------------------

def test_default_model_greedy_completion_equals_generate(default_model):
    import openai

    prompt = "The capital of France is"
    expected = default_model.generate(prompt, max_new_tokens=8)
    with BackgroundServer(create_app(default_model, name="smollm2")) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        r = c.completions.create(model="smollm2", prompt=prompt, max_tokens=8, temperature=0)
    assert r.choices[0].text == expected.text


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # a CLI subprocess or more: seconds on 2 cores
def test_cli_serve(tmp_path):
    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "llama_ref", "serve", str(path), "--port", str(port), "-q"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        def up():
            assert proc.poll() is None, proc.stdout.read()
            try:
                return httpx.get(url + "/health").status_code == 200
            except httpx.TransportError:
                return False
        wait_until(up, "llama-ref serve to answer", limit=60)
        r = httpx.post(url + "/v1/completions", json={"model": "tiny.gguf", "prompt": "the", "max_tokens": 3,
                                                      "temperature": 0}).json()
        assert r["usage"]["completion_tokens"] <= 3 and r["model"] == "tiny.gguf"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    bad = subprocess.run([sys.executable, "-m", "llama_ref.tools.cli", "serve", str(path), "--guard-output"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--guard-output needs --guard" in bad.stderr


def test_batcher_joins_rows_mid_batch_both_ways(tiny):
    """The scheduling loop alone, with a fixed arrival order: a short prompt joins the running batch beside
    it (prefilled on its own, then stacked), a long one makes the batch be prefilled afresh; every answer
    equals the prompt's answer alone."""
    from llama_ref.server.batcher import Batcher, Job

    short, longer = tiny.tokenizer.encode("abc"), tiny.tokenizer.encode("the theme of the long prompt, the end")
    plan = [(short, 3), (tiny.tokenizer.encode("hello there"), 25), (short + [70, 71], 6), (longer, 6)]
    batcher = Batcher(tiny, max_batch=2)
    try:
        gate = threading.Event()
        held = batcher.call(gate.wait)
        ended = threading.Semaphore(0)
        jobs = []
        for ids, n in plan:
            rows = tiny._rows([None], prompt_ids=[ids], max_new_tokens=n, stop_ids=[])
            jobs.append(Job(rows, lambda i, piece, row, done: done and ended.release()))
            batcher.submit(jobs[-1])
        gate.set()
        held.result(timeout=30)
        for _ in plan:
            assert ended.acquire(timeout=60)
    finally:
        batcher.close()
    for (ids, n), job in zip(plan, jobs):
        assert job.rows[0].ids == tiny.generate(ids, max_new_tokens=n, stop_ids=[]).ids


def test_batcher_drops_the_padding_rows_leave_behind(tiny, monkeypatch):
    """A short prompt batched beside a long one sits behind padding; once the long one leaves, the batch
    is prefilled again, tight, and the answer is still the prompt's answer alone."""
    from llama_ref.server import batcher as batching

    monkeypatch.setattr(batching, "COMPACT_AFTER", 8)
    short, longer = tiny.tokenizer.encode("abc"), tiny.tokenizer.encode("the theme of the long prompt, the end")
    b = batching.Batcher(tiny, max_batch=2)
    try:
        gate = threading.Event()
        held = b.call(gate.wait)
        ended = threading.Semaphore(0)
        jobs = [batching.Job(tiny._rows([None], prompt_ids=[ids], max_new_tokens=n, stop_ids=[]),
                             lambda i, piece, row, done: done and ended.release())
                for ids, n in [(short, 30), (longer, 2)]]
        for job in jobs:
            b.submit(job)
        gate.set()
        held.result(timeout=30)
        assert ended.acquire(timeout=60) and ended.acquire(timeout=60)
    finally:
        b.close()
    assert b.metrics.compactions >= 1
    assert jobs[0].rows[0].ids == tiny.generate(short, max_new_tokens=30, stop_ids=[]).ids


def test_batcher_resumes_a_conversation_inside_a_running_batch(tiny):
    """Turn 2 of a conversation joins a batch that is busy with another prompt: it starts from turn 1's
    kept keys, rotated to the positions it joins at, and answers as it would alone."""
    enc = tiny.tokenizer.encode
    assert_resumed_inside_busy_batch(tiny, enc("the theme of the"), enc(" and then?"),
                                     enc("a much longer prompt that keeps the batch busy, " * 2))


def assert_resumed_inside_busy_batch(model, turn1, follow_up, busy_prompt):
    """Turn 1 runs alone; turn 2 (turn 1, its answer, follow_up) joins while busy_prompt keeps the batch busy.
    The prompt tokens reused are exactly turn 1 and its answer, and both rows answer as they would alone."""
    from llama_ref.server.batcher import Batcher, Job

    b = Batcher(model, max_batch=4)
    ended = threading.Semaphore(0)

    def job(ids, n):
        j = Job(model._rows([None], prompt_ids=[ids], max_new_tokens=n, stop_ids=[]),
                lambda i, piece, row, done: done and ended.release())
        b.submit(j)
        return j

    try:
        first = job(turn1, 6)
        assert ended.acquire(timeout=60)
        turn2 = turn1 + first.rows[0].ids + follow_up
        gates = [threading.Event(), threading.Event()]
        held = b.call(gates[0].wait)
        busy = job(busy_prompt, 20)
        wait_until(held.running, "the model thread to hold")
        second_hold = b.call(gates[1].wait)  # the busy row joins alone, then the thread holds again
        gates[0].set()
        wait_until(second_hold.running, "the busy row to be in the batch")
        reused = b.metrics.reused_prompt_tokens
        second = job(turn2, 6)
        gates[1].set()
        assert ended.acquire(timeout=60) and ended.acquire(timeout=60)
    finally:
        b.close()
    assert b.metrics.reused_prompt_tokens - reused == len(turn1) + len(first.rows[0].ids) - 1
    assert second.rows[0].ids == model.generate(turn2, max_new_tokens=6, stop_ids=[]).ids
    assert busy.rows[0].ids == model.generate(busy.rows[0].prompt_ids, max_new_tokens=20, stop_ids=[]).ids
