"""HTTP endpoints in the shapes of the OpenAI API (as its official Python client sends and parses them).

Every request body is checked here, field by field, before anything reaches the model: a bad field is
answered with OpenAI's error object, {"error": {"message", "type", "param", "code"}}, and a 4xx status.
Generation is handed to the Batcher (batcher.py), whose one thread runs the model; this side only turns
its events into JSON or server-sent events.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Optional

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route

from ..text.chat import encode_tool_call, parse_llama3_reply
from ..text.tokenizer_llama4 import parse_llama4_reply
from ..errors import LlamaRefError
from ..generation.generate import chat_prompt_ids, encode_prompt
from .batcher import Batcher, Job, QueueFull
from .guard import GuardError, moderation_result, refusal_text
from .metrics import Metrics

MAX_STOP = 4  # OpenAI allows up to 4 stop sequences
MAX_TOP_LOGPROBS = 20  # chat; completions allow 5


class APIError(LlamaRefError):
    """A request the server refuses, with the fields of OpenAI's error object."""

    def __init__(self, message: str, *, param: Optional[str] = None, status: int = 400,
                 type: str = "invalid_request_error", code: Optional[str] = None):
        super().__init__(message)
        self.message, self.param, self.status, self.type, self.code = message, param, status, type, code

    def response(self) -> JSONResponse:
        headers = {"Retry-After": "1"} if self.status == 429 else None
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=headers)


# ---- reading request fields -------------------------------------------------------------------------------

async def _body(request: Request) -> dict:
    try:
        body = json.loads(await request.body())
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError("the request body must be a JSON object", code="invalid_json")
    return body


def _get(body: dict, name: str, kind: str, default=None, *, low=None, high=None, low_open=False):
    """body[name] checked to be of `kind` ("int", "number", "bool", "str") and within [low, high]."""
    value = body.get(name)
    if value is None:
        return default
    ok = {"int": isinstance(value, int) and not isinstance(value, bool),
          "number": isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value),
          "bool": isinstance(value, bool), "str": isinstance(value, str)}[kind]
    wanted = {"int": "an integer", "number": "a finite number", "bool": "a boolean", "str": "a string"}[kind]
    if not ok:
        raise APIError(f"'{name}' must be {wanted}, got {json.dumps(value)[:40]}", param=name)
    if (low is not None and (value <= low if low_open else value < low)) or (high is not None and value > high):
        lower = "-inf" if low is None else low
        bounds = f"{'(' if low_open else '['}{lower}, {'inf' if high is None else high}]"
        raise APIError(f"'{name}' must be in {bounds}, got {value}", param=name)
    return value


class Server:
    """What the endpoints share: the model, its name, the batcher, the guard and the counters."""

    def __init__(self, model, guard=None, *, name: Optional[str] = None, max_batch: int = 8,
                 max_queue: int = 64, max_n: Optional[int] = None, guard_output: bool = False):
        if model.tokenizer is None:
            raise LlamaRefError("the server needs a model with a tokenizer")
        self.model, self.guard, self.guard_output = model, guard, guard_output
        self.name = name or _model_name(model)
        self.window = model.args.max_seq_len
        self.max_n = max_n or max_batch
        self.metrics = Metrics()
        self.batcher = Batcher(model, max_batch=max_batch, max_queue=max_queue, metrics=self.metrics)
        self.created = int(time.time())

    def check_model(self, body: dict) -> None:
        name = body.get("model")
        if not isinstance(name, str):
            raise APIError("'model' is required and must be a string", param="model")
        if name != self.name:
            raise APIError(f"the model '{name}' does not exist; this server has '{self.name}'", param="model",
                           status=404, code="model_not_found")

    def sampling(self, body: dict, *, default_max_tokens: Optional[int]) -> dict:
        """The generation arguments of a chat or completion request, as model._rows takes them."""
        for name in ("presence_penalty", "frequency_penalty"):
            if _get(body, name, "number", 0.0, low=-2, high=2) != 0:
                raise APIError(f"'{name}' is not supported (use 'repetition_penalty')", param=name)
        max_tokens = _get(body, "max_completion_tokens", "int", None, low=0)
        if max_tokens is None:
            max_tokens = _get(body, "max_tokens", "int", default_max_tokens, low=0)
        stop = body.get("stop")
        if isinstance(stop, str):
            stop = [stop]
        if stop is not None and (not isinstance(stop, list) or len(stop) > MAX_STOP
                                 or not all(isinstance(s, str) and s for s in stop)):
            raise APIError(f"'stop' must be a non-empty string or a list of at most {MAX_STOP}", param="stop")
        seed = _get(body, "seed", "int", None, low=0)
        n = _get(body, "n", "int", 1, low=1, high=self.max_n)
        return dict(
            max_new_tokens=self.window if max_tokens is None else max_tokens,
            temperature=_get(body, "temperature", "number", 1.0, low=0, high=2),
            top_p=_get(body, "top_p", "number", 1.0, low=0, high=1, low_open=True),
            # llama.cpp's and vLLM's extensions to the OpenAI fields.
            top_k=_get(body, "top_k", "int", 0, low=0),
            min_p=_get(body, "min_p", "number", 0.0, low=0, high=1),
            repetition_penalty=_get(body, "repetition_penalty", "number", 1.0, low=0, low_open=True),
            # llama.cpp's and vLLM's ignore_eos: run to max_tokens past the end-of-text tokens.
            stop_ids=[] if _get(body, "ignore_eos", "bool", False) else None,
            stop=stop, seed=None if seed is None else [seed + i for i in range(n)], n=n)

    def rows(self, prompt_ids: list[int], options: dict, top_logprobs: int, param: str):
        """n rows (one per choice) for one prompt; a prompt that leaves no room to answer is refused."""
        if len(prompt_ids) >= self.window:
            raise APIError(f"'{param}': the prompt has {len(prompt_ids)} tokens; the context window is {self.window} "
                           f"(and the answer needs at least one)", param=param, code="context_length_exceeded")
        options = dict(options)
        n = options.pop("n")
        return self.model._rows([None] * n, prompt_ids=[prompt_ids] * n, top_logprobs=top_logprobs, **options)

    async def on_model_thread(self, fn):
        return await asyncio.wrap_future(self.batcher.call(fn))

    async def shield(self, messages: list[dict]):
        """The guard's verdict on the conversation's last message; None when it is safe or no guard runs.
        An unreadable verdict refuses too: a shield that cannot judge must not let the request through."""
        if self.guard is None:
            return None
        try:
            verdict = await self.on_model_thread(lambda: self.guard.check(messages))
        except GuardError as e:
            self.metrics.refusals += 1
            return f"I can't help with that: the safety guard could not judge it ({e})."
        if verdict.safe:
            return None
        self.metrics.refusals += 1
        return refusal_text(verdict, "request" if messages[-1]["role"] == "user" else "answer")


def _model_name(model) -> str:
    source = getattr(model, "source", None) or "llama_ref"
    return Path(str(source)).name


# ---- running a job ---------------------------------------------------------------------------------------

class Run:
    """A submitted job seen from the HTTP side: its events arrive on an asyncio queue."""

    def __init__(self, server: Server, rows):
        self.rows, self.queue = rows, asyncio.Queue()
        loop = asyncio.get_running_loop()
        self.job = Job(rows, lambda i, piece, row, done: loop.call_soon_threadsafe(
            self.queue.put_nowait, (i, piece, len(row.ids), done)))
        self.pending, self.metrics = len(rows), server.metrics
        try:
            server.batcher.submit(self.job)
        except QueueFull as e:
            raise APIError(str(e), status=429, type="rate_limit_error", code="queue_full") from None

    async def events(self, request: Request):
        """(choice index, text piece, tokens so far, done) until every row ends; a client that goes away
        cancels the job (checked twice a second while nothing arrives)."""
        try:
            while self.pending:
                try:
                    event = await asyncio.wait_for(self.queue.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return
                    continue
                if event[3]:
                    self.pending -= 1
                    error = getattr(self.rows[event[0]], "error", None)
                    if error is not None:
                        raise APIError(f"generation failed: {error}", status=500, type="server_error")
                yield event
        finally:
            if self.pending:  # the client went away (or this task was cancelled): stop generating
                self.job.cancel()
                self.metrics.disconnects += 1

    async def wait(self, request: Request) -> None:
        async for _ in self.events(request):
            pass
        if self.pending:
            raise APIError("the client disconnected", status=499, code="client_closed")


def _finish_reason(row) -> str:
    return {"stop": "stop", "length": "length"}.get(row.finish_reason, "stop")


def _token_logprobs(tokenizer, row, start: int, end: int) -> list[dict]:
    """Chat-style logprobs entries for tokens start..end-1 of a row."""
    def entry(i, lp):
        # The token's own bytes: a byte-level token may hold part of a character, which its text can't show.
        return {"token": tokenizer.decode([i]), "logprob": lp,
                "bytes": list(tokenizer.decode_bytes([i], at_start=False))}

    out = []
    for t in range(start, end):
        item = entry(row.ids[t], row.logprobs[t])
        item["top_logprobs"] = [entry(i, lp) for i, lp in row.top[t]] if row.top is not None else []
        out.append(item)
    return out


# ---- chat completions ------------------------------------------------------------------------------------

TOOL_PROMPT = ("You have access to the following functions. To call one, reply with only a JSON object of the "
               'form {"type": "function", "name": function name, "parameters": a dictionary of argument '
               "names and values}. Do not use variables.\n\n")


def _content_text(content, where: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise APIError(f"'{where}.content' must be a string or a list of text parts", param=where)


def _messages(server: Server, body: dict) -> tuple[list[dict], bool]:
    """The request's messages in llama_ref.text.chat's form (and whether tools were offered)."""
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise APIError("'messages' must be a non-empty list of messages", param="messages")
    # Meta's own chat formats (Llama 3.x, Llama 4) write structured tool calls themselves.
    specials = getattr(server.model.tokenizer, "special_tokens", None) or {}
    meta_format = ("<|eom_id|>" in specials or "<|eom|>" in specials) and not server.model.tokenizer.chat_template
    out = []
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise APIError(f"'{where}' must be an object with a 'role'", param=where)
        role = {"developer": "system"}.get(m["role"], m["role"])
        if role not in ("system", "user", "assistant", "tool"):
            raise APIError(f"'{where}.role' must be system, developer, user, assistant or tool, got "
                           f"{m['role']!r}", param=f"{where}.role")
        message = {"role": role, "content": _content_text(m.get("content"), where)}
        calls = [_tool_call(c, f"{where}.tool_calls") for c in m.get("tool_calls") or []] if role == "assistant" else []
        if calls and meta_format:
            message["tool_calls"] = calls  # llama_ref.text.chat / tokenizer_llama4 write them in Meta's format
        elif calls:  # a jinja template: the calls as the text the model would have written
            message["content"] += "".join(encode_tool_call(c) for c in calls)
        out.append(message)
    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise APIError("'tools' must be a list of tools", param="tools")
    offered = bool(tools) and body.get("tool_choice") != "none"
    if offered:
        functions = []
        for j, t in enumerate(tools):
            if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(t.get("function"), dict) \
                    or not isinstance(t["function"].get("name"), str):
                raise APIError(f"'tools[{j}]' must be {{'type': 'function', 'function': {{'name': ...}}}}",
                               param=f"tools[{j}]")
            functions.append(t["function"])
        text = TOOL_PROMPT + "\n\n".join(json.dumps(f) for f in functions)
        if out[0]["role"] == "system":
            out[0] = {**out[0], "content": out[0]["content"] + "\n\n" + text}
        else:
            out.insert(0, {"role": "system", "content": text})
    return out, offered


def _tool_call(call, where: str) -> dict:
    try:
        fn = call["function"]
        arguments = json.loads(fn.get("arguments") or "{}")
        return {"tool_name": fn["name"], "arguments": arguments}
    except (TypeError, KeyError, ValueError, AttributeError):
        raise APIError(f"'{where}' entries must be {{'type': 'function', 'function': {{'name': str, "
                       f"'arguments': JSON text}}}}", param=where) from None


def _is_llama4(tokenizer) -> bool:
    from ..text.tokenizer_llama4 import Llama4Tokenizer
    return isinstance(tokenizer, Llama4Tokenizer) and not tokenizer.chat_template


def _message_from(text: str, tools_offered: bool, llama4: bool = False) -> tuple[dict, Optional[str]]:
    """The assistant message of a reply; with tools offered, a reply that is a tool call becomes one (read as
    Meta's Llama 4 ChatFormat reads it for a Llama 4 model, else as its Llama 3 one)."""
    if tools_offered:
        parsed = parse_llama4_reply(text) if llama4 else parse_llama3_reply(text)
        if parsed["tool_calls"]:
            calls = [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                      "function": {"name": c["tool_name"], "arguments": json.dumps(c["arguments"])}}
                     for c in parsed["tool_calls"]]
            return {"role": "assistant", "content": None, "tool_calls": calls}, "tool_calls"
    return {"role": "assistant", "content": text}, None


async def chat_completions(server: Server, request: Request, body: dict):
    server.check_model(body)
    messages, tools_offered = _messages(server, body)
    options = server.sampling(body, default_max_tokens=None)
    want_logprobs = _get(body, "logprobs", "bool", False)
    top = _get(body, "top_logprobs", "int", 0, low=0, high=MAX_TOP_LOGPROBS)
    if top and not want_logprobs:
        raise APIError("'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    stream = _get(body, "stream", "bool", False)
    include_usage = stream and isinstance(body.get("stream_options"), dict) and \
        bool(body["stream_options"].get("include_usage"))
    try:
        prompt_ids = chat_prompt_ids(server.model, messages)
    except LlamaRefError as e:
        raise APIError(f"'messages' cannot be written in the model's chat format: {e}", param="messages") from None
    rows = server.rows(prompt_ids, options, top, "messages")
    ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    judged = [m for m in messages if m["role"] in ("user", "assistant")]
    refusal = await server.shield(judged) if judged and judged[-1]["role"] == "user" else None
    if refusal is not None:
        choices = [{"index": i, "message": {"role": "assistant", "content": refusal}, "finish_reason":
                    "content_filter", "logprobs": None} for i in range(len(rows))]
        usage = {"prompt_tokens": len(prompt_ids), "completion_tokens": 0, "total_tokens": len(prompt_ids)}
        if stream:
            return _sse(_chat_chunks_of(ident, created, server.name, choices, usage if include_usage else None))
        return JSONResponse({"id": ident, "object": "chat.completion", "created": created, "model": server.name,
                             "choices": choices, "usage": usage})

    run = Run(server, rows)
    buffered = tools_offered or (server.guard is not None and server.guard_output)
    if stream and not buffered:
        return _sse(_chat_stream(server, request, run, ident, created, want_logprobs, include_usage))
    await run.wait(request)
    choices = []
    for i, row in enumerate(rows):
        message, reason = _message_from(row.text, tools_offered, _is_llama4(server.model.tokenizer))
        if server.guard is not None and server.guard_output and message["content"]:
            blocked = await server.shield(judged + [{"role": "assistant", "content": row.text}])
            if blocked is not None:
                message, reason = {"role": "assistant", "content": blocked}, "content_filter"
        choices.append({"index": i, "message": message, "finish_reason": reason or _finish_reason(row),
                        "logprobs": {"content": _token_logprobs(server.model.tokenizer, row, 0, len(row.ids))}
                        if want_logprobs else None})
    usage = _usage(prompt_ids, rows)
    if stream:  # buffered: the whole answer in one chunk (a tool call or an output-shielded answer)
        return _sse(_chat_chunks_of(ident, created, server.name, choices, usage if include_usage else None))
    return JSONResponse({"id": ident, "object": "chat.completion", "created": created, "model": server.name,
                         "choices": choices, "usage": usage})


def _usage(prompt_ids, rows) -> dict:
    completion = sum(len(r.ids) for r in rows)
    return {"prompt_tokens": len(prompt_ids), "completion_tokens": completion,
            "total_tokens": len(prompt_ids) + completion}


def _chunk(ident, created, model, choices, usage=None) -> str:
    return "data: " + json.dumps({"id": ident, "object": "chat.completion.chunk", "created": created,
                                  "model": model, "choices": choices, "usage": usage}) + "\n\n"


async def _chat_stream(server: Server, request: Request, run: Run, ident, created, want_logprobs, include_usage):
    """Server-sent events: a role delta, a delta per piece of text, a finish chunk per choice, [DONE]."""
    name, tokenizer = server.name, server.model.tokenizer
    sent = [0] * len(run.rows)  # tokens whose logprobs were sent, per choice
    for i in range(len(run.rows)):
        yield _chunk(ident, created, name, [{"index": i, "delta": {"role": "assistant", "content": ""},
                                             "logprobs": None, "finish_reason": None}])
    async for i, piece, n_ids, done in run.events(request):
        row = run.rows[i]
        if piece or (done and want_logprobs and n_ids > sent[i]):
            logprobs = {"content": _token_logprobs(tokenizer, row, sent[i], n_ids)} if want_logprobs else None
            sent[i] = n_ids
            yield _chunk(ident, created, name, [{"index": i, "delta": {"content": piece}, "logprobs": logprobs,
                                                 "finish_reason": None}])
        if done:
            yield _chunk(ident, created, name, [{"index": i, "delta": {}, "logprobs": None,
                                                 "finish_reason": _finish_reason(row)}])
    if include_usage:
        yield _chunk(ident, created, name, [], _usage(run.rows[0].prompt_ids, run.rows))
    yield "data: [DONE]\n\n"


async def _chat_chunks_of(ident, created, name, choices, usage):
    """A finished answer as a stream: one delta per choice, then [DONE]."""
    for c in choices:
        delta = {"role": "assistant", **{k: v for k, v in c["message"].items() if k != "role"}}
        if delta.get("tool_calls"):
            delta["tool_calls"] = [{"index": j, **call} for j, call in enumerate(delta["tool_calls"])]
        yield _chunk(ident, created, name, [{"index": c["index"], "delta": delta, "logprobs": c["logprobs"],
                                             "finish_reason": c["finish_reason"]}])
    if usage is not None:
        yield _chunk(ident, created, name, [], usage)
    yield "data: [DONE]\n\n"


def _sse(gen) -> StreamingResponse:
    return StreamingResponse(gen, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


# ---- completions -----------------------------------------------------------------------------------------

def _prompts(server: Server, body: dict) -> list[list[int]]:
    """'prompt': a string, a list of token ids, or a list of either."""
    prompt = body.get("prompt")
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt)):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        prompts = prompt
    else:
        raise APIError("'prompt' must be a string, a list of token ids, or a list of those", param="prompt")
    try:
        return [encode_prompt(server.model, p) for p in prompts]
    except LlamaRefError as e:
        raise APIError(f"'prompt': {e}", param="prompt") from None


def _completion_logprobs(tokenizer, ids: list[int], logprobs: list, top: Optional[list], offset: int) -> dict:
    tokens = [tokenizer.decode([i]) for i in ids]
    offsets, at = [], offset
    for t in tokens:
        offsets.append(at)
        at += len(t)
    return {"tokens": tokens, "token_logprobs": logprobs, "text_offset": offsets,
            "top_logprobs": [{tokenizer.decode([i]): lp for i, lp in alts} for alts in top] if top else None}


async def completions(server: Server, request: Request, body: dict):
    server.check_model(body)
    prompts = _prompts(server, body)
    if body.get("suffix"):
        raise APIError("'suffix' is not supported", param="suffix")
    options = server.sampling(body, default_max_tokens=16)
    logprobs = _get(body, "logprobs", "int", None, low=0, high=5)
    echo = _get(body, "echo", "bool", False)
    stream = _get(body, "stream", "bool", False)
    tokenizer = server.model.tokenizer
    rows = [r for ids in prompts for r in server.rows(ids, options, logprobs or 0, "prompt")]
    for ids in prompts:
        refusal = await server.shield([{"role": "user", "content": tokenizer.decode(ids)}])
        if refusal is not None:
            return _completion_response(server, prompts, rows, refusal=refusal)
    run = Run(server, rows)
    if stream:
        return _sse(_completion_stream(server, request, run, prompts, echo, logprobs is not None))
    await run.wait(request)
    echoed = None
    if echo and logprobs is not None:  # the prompt's own log-probabilities (the first token has none)
        echoed = [await server.on_model_thread(lambda ids=ids: _prompt_logprobs(server.model, ids, logprobs))
                  for ids in prompts]
    return _completion_response(server, prompts, rows, echo=echo, logprobs=logprobs, echoed=echoed)


def _prompt_logprobs(model, ids: list[int], top: int):
    from ..generation.sampling import log_softmax

    logp = log_softmax(model.logits(ids))  # (T, V)
    values = [None] + [float(logp[t - 1, ids[t]]) for t in range(1, len(ids))]
    alts = [[]] + [[(int(i), float(logp[t - 1, i])) for i in (-logp[t - 1]).argsort(kind="stable")[:top]]
                   for t in range(1, len(ids))]
    return values, alts


def _completion_response(server: Server, prompts, rows, *, echo=False, logprobs=None, echoed=None, refusal=None):
    tokenizer, per_prompt = server.model.tokenizer, len(rows) // len(prompts)
    choices = []
    for c, row in enumerate(rows):
        ids = prompts[c // per_prompt]
        prefix = tokenizer.decode(ids) if echo else ""
        entry = None
        if logprobs is not None and refusal is None:
            entry = _completion_logprobs(tokenizer, row.ids, row.logprobs, row.top, len(prefix))
            if echoed is not None:
                values, alts = echoed[c // per_prompt]
                head = _completion_logprobs(tokenizer, ids, values, alts, 0)
                if not logprobs:
                    head["top_logprobs"] = None
                entry = {k: (head[k] or []) + (entry[k] or []) if k != "top_logprobs" or head[k] or entry[k]
                         else None for k in entry}
        choices.append({"index": c, "text": refusal if refusal is not None else prefix + row.text,
                        "logprobs": entry,
                        "finish_reason": "content_filter" if refusal is not None else _finish_reason(row)})
    prompt_tokens = sum(len(p) for p in prompts)
    completion = 0 if refusal is not None else sum(len(r.ids) for r in rows)
    return JSONResponse({"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                         "model": server.name, "choices": choices,
                         "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                                   "total_tokens": prompt_tokens + completion}})


async def _completion_stream(server: Server, request: Request, run: Run, prompts, echo: bool, want_logprobs: bool):
    ident, created, tokenizer = f"cmpl-{uuid.uuid4().hex}", int(time.time()), server.model.tokenizer
    per_prompt = len(run.rows) // len(prompts)

    def chunk(index, text, reason=None, logprobs=None):
        return "data: " + json.dumps({"id": ident, "object": "text_completion", "created": created,
                                      "model": server.name, "choices": [{"index": index, "text": text,
                                      "logprobs": logprobs, "finish_reason": reason}]}) + "\n\n"

    sent = [0] * len(run.rows)  # tokens whose logprobs were sent, per choice
    offset = [0] * len(run.rows)  # characters of text sent, per choice
    if echo:
        for c in range(len(run.rows)):
            text = tokenizer.decode(prompts[c // per_prompt])
            offset[c] = len(text)
            yield chunk(c, text)
    async for i, piece, n_ids, done in run.events(request):
        row = run.rows[i]
        if piece or (done and want_logprobs and n_ids > sent[i]):
            logprobs = None
            if want_logprobs:
                top = row.top[sent[i]:n_ids] if row.top is not None else None
                logprobs = _completion_logprobs(tokenizer, row.ids[sent[i]:n_ids], row.logprobs[sent[i]:n_ids],
                                                top, offset[i])
            sent[i], offset[i] = n_ids, offset[i] + len(piece)
            yield chunk(i, piece, logprobs=logprobs)
        if done:
            yield chunk(i, "", _finish_reason(row))
    yield "data: [DONE]\n\n"


# ---- the other endpoints ----------------------------------------------------------------------------------

async def moderations(server: Server, request: Request, body: dict):
    if server.guard is None:
        raise APIError("no guard model is loaded: start the server with --guard GUARD_MODEL to use "
                       "/v1/moderations", param="model", code="no_guard_model")
    inputs = body.get("input")
    if isinstance(inputs, str):
        inputs = [inputs]
    if isinstance(inputs, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in inputs):
        inputs = [p.get("text") for p in inputs]
    if not isinstance(inputs, list) or not inputs or not all(isinstance(t, str) for t in inputs):
        raise APIError("'input' must be a string or a list of strings", param="input")
    results = []
    for text in inputs:
        try:
            verdict = await server.on_model_thread(lambda text=text: server.guard.check(
                [{"role": "user", "content": text}]))
        except GuardError as e:
            raise APIError(str(e), status=500, type="server_error", code="guard_error") from None
        results.append(moderation_result(verdict))
    return JSONResponse({"id": f"modr-{uuid.uuid4().hex}", "model": getattr(server.guard, "name", "llama-guard"),
                         "results": results})


async def tokenize(server: Server, request: Request, body: dict):
    if "messages" in body:
        messages, _ = _messages(server, body)
        try:
            ids = chat_prompt_ids(server.model, messages)
        except LlamaRefError as e:
            raise APIError(f"'messages': {e}", param="messages") from None
    else:
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise APIError("'prompt' must be a string (or give 'messages')", param="prompt")
        add_special = _get(body, "add_special_tokens", "bool", True)
        ids = server.model.tokenizer.encode(prompt, bos=None if add_special else False)
    return JSONResponse({"tokens": ids, "count": len(ids), "max_model_len": server.window})


async def detokenize(server: Server, request: Request, body: dict):
    ids = body.get("tokens")
    vocab = server.model.args.vocab_size
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise APIError("'tokens' must be a list of token ids", param="tokens")
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise APIError(f"'tokens': id {bad[0]} is outside the vocabulary (0 .. {vocab - 1})", param="tokens")
    return JSONResponse({"prompt": server.model.tokenizer.decode(ids)})


def _model_card(server: Server) -> dict:
    return {"id": server.name, "object": "model", "created": server.created, "owned_by": "llama_ref",
            "max_model_len": server.window}


async def models(server: Server, request: Request, body=None):
    return JSONResponse({"object": "list", "data": [_model_card(server)]})


async def retrieve_model(server: Server, request: Request, body=None):
    server.check_model({"model": request.path_params["name"]})
    return JSONResponse(_model_card(server))


async def health(server: Server, request: Request, body=None):
    return JSONResponse({"status": "ok"})


async def metrics(server: Server, request: Request, body=None):
    return PlainTextResponse(server.metrics.render(), media_type="text/plain; version=0.0.4")


# ---- the application -------------------------------------------------------------------------------------

def _endpoint(server: Server, name: str, handler, reads_body: bool):
    """Wrap a handler: read its JSON body, turn refusals into OpenAI error objects, count the request."""
    async def endpoint(request: Request):
        try:
            body = await _body(request) if reads_body else None
            response = await handler(server, request, body)
        except APIError as e:
            response = e.response()
        except LlamaRefError as e:  # bad input found deeper down (llama_ref's own checks)
            response = APIError(str(e)).response()
        except Exception as e:  # a bug: this request fails, the server and the other requests go on
            response = APIError(f"internal error: {type(e).__name__}: {e}", status=500,
                                type="server_error").response()
        server.metrics.count_request(name, response.status_code)
        return response
    return endpoint


def create_app(model, guard=None, *, name: Optional[str] = None, max_batch: int = 8, max_queue: int = 64,
               max_n: Optional[int] = None, guard_output: bool = False) -> Starlette:
    """An ASGI app serving `model` (run it with uvicorn). guard: a shield with check(messages) -> verdict,
    e.g. llama_ref.server.LlamaGuard(llama_ref.load(...)); guard_output also checks every answer."""
    server = Server(model, guard, name=name, max_batch=max_batch, max_queue=max_queue, max_n=max_n,
                    guard_output=guard_output)
    table = [("/v1/chat/completions", "POST", chat_completions), ("/v1/completions", "POST", completions),
             ("/v1/moderations", "POST", moderations), ("/tokenize", "POST", tokenize),
             ("/detokenize", "POST", detokenize), ("/v1/models", "GET", models),
             ("/v1/models/{name:path}", "GET", retrieve_model), ("/health", "GET", health),
             ("/metrics", "GET", metrics)]
    routes = [Route(path, _endpoint(server, path, fn, method == "POST"), methods=[method])
              for path, method, fn in table]

    @asynccontextmanager
    async def lifespan(app):
        yield
        server.batcher.close()

    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.server = server
    return app
