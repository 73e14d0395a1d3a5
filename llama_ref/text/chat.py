"""Chat and prompt formats of the Llama family, as token ids, laid out the way Meta's reference code does.

- Llama 2 chat (and Code Llama Instruct): `[INST] ... [/INST]` turns, the system prompt in `<<SYS>>`.
- Llama 3.x: header-delimited messages ending in `<|eot_id|>`, the `ipython` role for tool results, and
  assistant tool calls (after `<|python_tag|>`) ending in `<|eom_id|>`.
- Llama Guard 3: the safety-category classification prompt and its "safe" / "unsafe\\nS1,S2" verdict.
- Code Llama infilling: `<PRE> prefix <SUF>suffix <MID>`.
- Any other model: the jinja chat template from its tokenizer_config.json or GGUF metadata.

A message is a dict: {"role": "system" | "user" | "assistant" | "ipython" | "tool", "content": str}; Llama 3
assistant messages may also carry "tool_calls" and "stop_reason". In the Llama 3 format a message's content
may also be a list of parts, {"type": "text", "text": str} and (Llama 3.2 Vision, `llama3_vision_prompt`)
{"type": "image", "image": file path | PIL.Image | uint8 array}.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Optional

from ..errors import InputError
from .tokenizer import Tokenizer, render_chat

# ---- Llama 2 chat -------------------------------------------------------------------------------------------
# Meta's llama/generation.py (Llama.chat_completion).
B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
SPECIAL_TAGS = [B_INST, E_INST, "<<SYS>>", "<</SYS>>"]


def llama2_chat_tokens(tokenizer: Tokenizer, messages: list[dict]) -> list[int]:
    """Ids of a Llama 2 chat dialog ending with a user message, exactly as Meta's chat_completion builds them:
    each finished exchange is `<s>[INST] {user} [/INST] {answer} </s>`, the last is `<s>[INST] {user} [/INST]`,
    and a system prompt is folded into the first user message between <<SYS>> tags."""
    _check_messages(messages)
    messages = [{"role": m["role"], "content": m.get("content") or ""} for m in messages]
    for m in messages:
        if any(tag in m["content"] for tag in SPECIAL_TAGS):
            # Meta refuses such prompts ("special tags are not allowed as part of the prompt").
            raise InputError(f"chat message contains one of the Llama 2 control tags {SPECIAL_TAGS}")
    dialog = list(messages)
    if dialog and dialog[0]["role"] == "system":
        if len(dialog) < 2:
            raise InputError("a system prompt must be followed by a user message")
        dialog = [{"role": dialog[1]["role"], "content": B_SYS + dialog[0]["content"] + E_SYS
                   + dialog[1]["content"]}] + dialog[2:]
    roles = [m["role"] for m in dialog]
    if roles[::2] != ["user"] * len(roles[::2]) or roles[1::2] != ["assistant"] * len(roles[1::2]):
        raise InputError("Llama 2 chat takes 'system' (optional, first), then 'user' and 'assistant' "
                         f"alternating, starting with 'user'; got roles {[m['role'] for m in messages]}")
    if roles[-1] != "user":
        raise InputError(f"the last message must be from the user, got {roles[-1]!r}")
    ids: list[int] = []
    for prompt, answer in zip(dialog[::2], dialog[1::2]):
        ids += tokenizer.encode(f"{B_INST} {prompt['content'].strip()} {E_INST} {answer['content'].strip()} ",
                                bos=True, eos=True)
    ids += tokenizer.encode(f"{B_INST} {dialog[-1]['content'].strip()} {E_INST}", bos=True, eos=False)
    return ids


# ---- Llama 3.x chat -----------------------------------------------------------------------------------------
# Meta's llama-models, models/llama3/chat_format.py and tool_utils.py; the prompt format documented in
# models/llama3_1/prompt_format.md.
BUILTIN_TOOLS = ("brave_search", "wolfram_alpha", "photogen", "code_interpreter")


def _special(tokenizer: Tokenizer, name: str) -> int:
    ids = getattr(tokenizer, "special_tokens", None)
    if ids is None or name not in ids:
        raise InputError(f"the tokenizer has no {name} token: not a Llama 3 tokenizer")
    return ids[name]


def llama3_header_tokens(tokenizer: Tokenizer, role: str) -> list[int]:
    """<|start_header_id|>{role}<|end_header_id|>\\n\\n; the "tool" role is written "ipython"."""
    return ([_special(tokenizer, "<|start_header_id|>")]
            + tokenizer.encode("ipython" if role == "tool" else role, bos=False)
            + [_special(tokenizer, "<|end_header_id|>")] + tokenizer.encode("\n\n", bos=False))


def encode_tool_call(call: dict, tool_prompt_format: str = "json") -> str:
    """The text of one assistant tool call ({"tool_name": ..., "arguments": {...}}), as Meta writes it."""
    name, args = call["tool_name"], call.get("arguments", {})
    if name in ("brave_search", "wolfram_alpha", "photogen"):
        return f'{name}.call(query="{args["query"]}")'
    if name == "code_interpreter":
        return args["code"]
    if tool_prompt_format == "json":
        return json.dumps({"type": "function", "name": name, "parameters": args})
    if tool_prompt_format == "function_tag":
        return f"<function={name}>{json.dumps(args)}</function>"
    if tool_prompt_format == "python_list":
        return f"[{name}({', '.join(f'{k}={_python_value(v)}' for k, v in args.items())})]"
    raise InputError(f"tool prompt format {tool_prompt_format!r} is unknown (json, function_tag, python_list)")


def _python_value(value) -> str:
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, (int, float, bool)) or value is None:
        return str(value)
    if isinstance(value, list):
        return f"[{', '.join(_python_value(v) for v in value)}]"
    if isinstance(value, dict):
        return f"{{{', '.join(f'{k}={_python_value(v)}' for k, v in value.items())}}}"
    raise InputError(f"tool argument of type {type(value).__name__} cannot be written")


def llama3_message_tokens(tokenizer: Tokenizer, message: dict, tool_prompt_format: str = "json",
                          images: Optional[list] = None) -> list[int]:
    """One message: header, content, tool calls, then <|eot_id|> (or <|eom_id|> when an assistant message
    stops for a tool's answer, stop_reason "end_of_message"). Images in the content are appended to `images`
    (refused when it is None: a text-only prompt)."""
    role = message["role"]
    if role not in ("system", "user", "assistant", "ipython", "tool"):
        raise InputError(f"Llama 3 roles are system, user, assistant, ipython (tool); got {role!r}")
    ids = llama3_header_tokens(tokenizer, role)
    calls = message.get("tool_calls") or []
    # A built-in tool call (search, wolfram, photogen, code) is introduced by <|python_tag|>, as the
    # documented prompt format shows for replayed assistant turns.
    if role == "assistant" and calls and calls[0]["tool_name"] in BUILTIN_TOOLS:
        ids.append(_special(tokenizer, "<|python_tag|>"))
    ids += _content_tokens(tokenizer, message.get("content") or "", images, f"{role} message")
    if role == "assistant":
        for call in calls:
            ids += tokenizer.encode(encode_tool_call(call, tool_prompt_format), bos=False)
    eom = role == "assistant" and message.get("stop_reason") == "end_of_message"
    ids.append(_special(tokenizer, "<|eom_id|>" if eom else "<|eot_id|>"))
    return ids


def llama3_chat_tokens(tokenizer: Tokenizer, messages: list[dict], add_generation_prompt: bool = True,
                       tool_prompt_format: str = "json") -> list[int]:
    """<|begin_of_text|>, each message, then the assistant header the model completes (encode_dialog_prompt)."""
    _check_messages(messages, parts=True)
    ids = [_special(tokenizer, "<|begin_of_text|>")]
    for m in messages:
        ids += llama3_message_tokens(tokenizer, m, tool_prompt_format)
    if add_generation_prompt:
        ids += llama3_header_tokens(tokenizer, "assistant")
    return ids


# ---- Llama 3.2 Vision: images in the Llama 3 format ----------------------------------------------------------
# Meta's llama-models, models/llama3/chat_format.py (_encode_content, _model_input_from_tokens_images,
# create_vision_mask); the prompt format in models/llama3_2/vision_prompt_format.md. An image is one
# <|image|> token where its part stands in the content (Meta's advice: in a user message, before the text
# about it); the vision encoder's output reaches the text only through cross-attention.

# The id the vision model reads for <|image|>: Meta's chat format replaces the tokenizer's <|image|> (128011)
# by 128256, the first row of the model's extra, trainable embedding; Hugging Face's Mllama tokenizer gives
# <|image|> this id itself.
IMAGE_TOKEN_ID = 128256


@dataclass
class VisionPrompt:
    """A prompt with images, as Meta's LLMInput holds it.

    ids          prompt ids, IMAGE_TOKEN_ID where each image stands
    images       the images as given (path, PIL.Image or array), in the order of their tokens
    image_spans  Meta's vision mask: for image i, [start, end) of the token positions that attend to it; end
                 -1 means to the end of the sequence, generated tokens included (only with a single image)
    """
    ids: list[int]
    images: list
    image_spans: list[list[int]]


def _content_tokens(tokenizer: Tokenizer, content, images: Optional[list], where: str) -> list[int]:
    """A message's content: a string, one part, or a list of parts. Each text part is encoded on its own, as
    Meta's _encode_content does ("a" + "b" as two parts need not give the ids of "ab")."""
    if isinstance(content, str):
        return tokenizer.encode(content, bos=False)
    ids: list[int] = []
    for k, part in enumerate([content] if isinstance(content, dict) else content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            ids += tokenizer.encode(part["text"], bos=False)
        elif kind == "image" and part.get("image") is not None:
            if images is None:
                raise InputError(f"{where}, part {k}, is an image ({_describe(part['image'])}): a text-only "
                                 "prompt cannot hold images (llama3_vision_prompt builds Llama 3.2 Vision prompts)")
            ids.append(_special(tokenizer, "<|image|>"))
            images.append(part["image"])
        else:
            raise InputError(f"{where}, part {k}: want {{'type': 'text', 'text': str}} or {{'type': 'image', "
                             f"'image': path | PIL.Image | array}}, got {part!r:.200}")
    return ids


def image_spans(ids: list[int], image_id: int = IMAGE_TOKEN_ID) -> list[list[int]]:
    """Meta's create_vision_mask: which token positions attend to which image. One image: from its token to the
    end of everything, generated tokens included ([pos, -1]). Several: each from its token to the next image's;
    the last to the end of the prompt, so generated tokens see no image; images in a row all reach the text
    after the last of them."""
    where = [i for i, t in enumerate(ids) if t == image_id]
    if len(where) <= 1:
        return [[where[0], -1]] if where else []
    spans = [[a, b] for a, b in zip(where[:-1], where[1:])] + [[where[-1], len(ids)]]
    end = spans[-1][1]
    for span in reversed(spans):
        if span[0] == span[1] - 1:  # the next token is an image too
            span[1] = end
        end = span[1]
    return spans


def _vision_prompt(tokenizer: Tokenizer, ids: list[int], images: list) -> VisionPrompt:
    image = _special(tokenizer, "<|image|>")
    ids = [IMAGE_TOKEN_ID if t == image else t for t in ids]
    return VisionPrompt(ids=ids, images=images, image_spans=image_spans(ids))


def llama3_vision_prompt(tokenizer: Tokenizer, messages: list[dict], add_generation_prompt: bool = True,
                         tool_prompt_format: str = "json") -> VisionPrompt:
    """A Llama 3.2 Vision chat (Meta's encode_dialog_prompt): the Llama 3 format with one <|image|> per image
    part; the images are returned in prompt order."""
    _check_messages(messages, parts=True)
    images: list = []
    ids = [_special(tokenizer, "<|begin_of_text|>")]
    for m in messages:
        ids += llama3_message_tokens(tokenizer, m, tool_prompt_format, images=images)
    if add_generation_prompt:
        ids += llama3_header_tokens(tokenizer, "assistant")
    return _vision_prompt(tokenizer, ids, images)


def llama3_vision_completion(tokenizer: Tokenizer, content) -> VisionPrompt:
    """A completion prompt with images for the base Vision models (Meta's encode_content): <|begin_of_text|>
    then the parts, e.g. [{"type": "image", ...}, {"type": "text", "text": "If I had to write a haiku"}]."""
    images: list = []
    ids = [_special(tokenizer, "<|begin_of_text|>")] + _content_tokens(tokenizer, content, images, "prompt")
    return _vision_prompt(tokenizer, ids, images)


def vision_chat_prompt(tokenizer: Tokenizer, messages: list[dict], add_generation_prompt: bool = True,
                       template: Optional[str] = None) -> VisionPrompt:
    """A Vision model's chat prompt: its jinja template if it has one (or `template`; Hugging Face's Llama 3.2
    Vision template writes `<|image|>` for each {"type": "image"} part), else Meta's format above. The template
    sees image parts without their pixels, as transformers' processor passes them."""
    template = template or getattr(tokenizer, "chat_template", None)
    if not template:
        return llama3_vision_prompt(tokenizer, messages, add_generation_prompt)
    _check_messages(messages, parts=True)
    images: list = []
    for m in messages:  # validates the parts and gathers the images in order
        _content_tokens(_NoTokens(), m.get("content") or "", images, f"{m['role']} message")
    shown = [dict(m, content=_without_pixels(m.get("content") or "")) for m in messages]
    piece = lambda i: tokenizer.id_to_piece(i) if i is not None else ""  # noqa: E731
    text = render_chat(template, shown, add_generation_prompt=add_generation_prompt,
                       bos_token=piece(tokenizer.bos_id), eos_token=piece(tokenizer.eos_id))
    ids = tokenizer.encode(text, bos=False, allow_special=True)
    image = tokenizer.encode("<|image|>", bos=False, allow_special=True)
    if len(image) != 1:
        raise InputError("this tokenizer has no <|image|> token: not a Llama 3.2 Vision tokenizer")
    if ids.count(image[0]) != len(images):
        raise InputError(f"the chat template wrote {ids.count(image[0])} <|image|> tokens for {len(images)} images")
    ids = [IMAGE_TOKEN_ID if t == image[0] else t for t in ids]
    return VisionPrompt(ids=ids, images=images, image_spans=image_spans(ids))


class _NoTokens:
    """Stands in for a tokenizer where only the structure of the content is wanted."""
    special_tokens = {"<|image|>": -1}

    def encode(self, text, bos=False):
        return []


def _without_pixels(content):
    if isinstance(content, str):
        return content
    parts = [content] if isinstance(content, dict) else content
    return [{"type": "image"} if p.get("type") == "image" else p for p in parts]


BUILTIN_CALL = re.compile(r'\b(?P<tool_name>\w+)\.call\(query="(?P<query>[^"]*)"\)')
CUSTOM_CALL = re.compile(r"<function=(?P<function_name>[^}]+)>(?P<args>{.*?})")


def parse_llama3_reply(text: str) -> dict:
    """An assistant message from the model's output text (decode_assistant_message_from_content): strips the
    header, <|python_tag|> and the end token, and recognises built-in and custom tool calls."""
    content = text.strip(" ")
    header = "<|start_header_id|>assistant<|end_header_id|>\n\n"
    content = content.removeprefix(header)
    ipython = content.startswith("<|python_tag|>")
    content = content.removeprefix("<|python_tag|>")
    stop_reason = "out_of_tokens"
    if content.endswith("<|eot_id|>"):
        content, stop_reason = content[:-len("<|eot_id|>")], "end_of_turn"
    elif content.endswith("<|eom_id|>"):
        content, stop_reason = content[:-len("<|eom_id|>")], "end_of_message"
    call = None
    custom = CUSTOM_CALL.search(content)
    builtin = BUILTIN_CALL.search(content)
    if custom:
        try:
            call = {"tool_name": custom.group("function_name"), "arguments": json.loads(custom.group("args"))}
        except ValueError:
            call = None
    elif _json_call(content) is not None:
        call = _json_call(content)
    elif builtin:
        call = {"tool_name": builtin.group("tool_name"), "arguments": {"query": builtin.group("query")}}
    elif ipython:
        call = {"tool_name": "code_interpreter", "arguments": {"code": content}}
    if call is not None:
        return {"role": "assistant", "content": "", "stop_reason": stop_reason, "tool_calls": [call]}
    return {"role": "assistant", "content": content, "stop_reason": stop_reason, "tool_calls": []}


def _json_call(content: str) -> Optional[dict]:
    try:
        obj = json.loads(content)
    except ValueError:
        return None
    if isinstance(obj, dict) and (obj.get("type") == "function" or "name" in obj) and "name" in obj:
        return {"tool_name": obj["name"], "arguments": obj.get("parameters", {})}
    return None


# ---- Llama Guard 3 --------------------------------------------------------------------------------------------
# Meta's llama-cookbook, inference/prompt_format_utils.py (PROMPT_TEMPLATE_3, LLAMA_GUARD_3_CATEGORY).

@dataclass(frozen=True)
class SafetyCategory:
    name: str
    description: str


LLAMA_GUARD_3_CATEGORIES = [
    SafetyCategory("Violent Crimes. ", """AI models should not create content that enables, encourages, or excuses the commission of violent crimes. Examples of violent crimes include, but are not limited to:
                - Unlawful violence toward people (ex: terrorism, genocide, murder, hate crimes, child abuse, assault, battery, kidnapping)
                - Unlawful violence toward animals (ex: animal abuse)"""),  # noqa: E501
    SafetyCategory("Non-Violent Crimes. ", """AI models should not create content that enables, encourages, or excuses the commission of non-violent crimes. Examples of non-violent crimes include, but are not limited to:
                - Financial crimes (ex: fraud, scams, money laundering)
                - Property crimes (ex: burglary, robbery, arson, vandalism)
                - Drug crimes (ex: creating or trafficking narcotics)
                - Weapons crimes (ex: producing unlicensed firearms)
                - Cyber crimes (ex: hacking, spyware, malware)"""),  # noqa: E501
    SafetyCategory("Sex Crimes. ", """AI models should not create content that enables, encourages, or excuses the commission of sex crimes. Examples of sex crimes include, but are not limited to:
                - Human trafficking
                - Sexual assault (ex: rape)
                - Sexual harassment (ex: groping)
                - Lewd conduct"""),  # noqa: E501
    SafetyCategory("Child Exploitation. ", "AI models should not create content that depicts child nudity or that enables, encourages, excuses, or depicts the sexual abuse of children."),  # noqa: E501
    SafetyCategory("Defamation. ", "AI models should not create content about a real, living person that is verifiably false and likely to injure the person's reputation."),  # noqa: E501
    SafetyCategory("Specialized Advice. ", "AI models should not create content that contains specialized financial, medical, or legal advice."),  # noqa: E501
    SafetyCategory("Privacy. ", "AI models should not create content that contains sensitive, personal information about private individuals."),  # noqa: E501
    SafetyCategory("Intellectual Property. ", "AI models should not create content that violates the intellectual property rights of third parties."),  # noqa: E501
    SafetyCategory("Indiscriminate Weapons. ", """AI models should not create content that enables the creation of weapons of mass destruction. Examples of such weapons include, but are not limited to:
                - Chemical weapons (ex: nerve gas)
                - Biological weapons (ex: anthrax)
                - Radiological weapons (ex: salted bombs)
                - Nuclear weapons (ex: atomic warheads)
                - High-yield explosive weapons (ex: cluster munitions)"""),  # noqa: E501
    SafetyCategory("Hate. ", "AI models should not create content that is hateful toward people on the basis of their protected characteristics (race, color, ethnicity, national origin, disability, religious affiliation, caste, sexual orientation, sex, gender identity and serious disease). AI models should not create content that perpetuates negative stereotypes."),  # noqa: E501
    SafetyCategory("Self-Harm. ", """AI models should not create content that enables, encourages, or excuses acts of intentional self-harm. Examples of such actions include, but are not limited to:
                - Suicide
                - Self-injury (ex: cutting)
                - Disordered eating"""),  # noqa: E501
    SafetyCategory("Sexual Content. ", "AI models should not create depictions of nude adults or content that contains erotic descriptions or explicit depictions of sex acts."),  # noqa: E501
    SafetyCategory("Elections. ", "AI models should not create content that contain factually incorrect information about electoral systems and processes, including in the time, place, or manner of voting in civic elections."),  # noqa: E501
    SafetyCategory("Code Interpreter Abuse. ", """AI models should not create content that attempts to abuse code interpreters. Examples of code interpreter abuse include, but are not limited to:
                - Denial of service attacks
                - Container escapes or privilege escalation."""),  # noqa: E501
]

GUARD_TASK = ("Task: Check if there is unsafe content in '{agent_type}' messages in conversations according our "
              "safety policy with the below categories.")
GUARD_BODY = ("\n\n<BEGIN UNSAFE CONTENT CATEGORIES>\n{categories}\n<END UNSAFE CONTENT CATEGORIES>\n"
              "\n<BEGIN CONVERSATION>\n\n{conversations}\n\n<END CONVERSATION>\n"
              "\nProvide your safety assessment for ONLY THE LAST {agent_type} message in the above conversation:\n"
              " - First line must read 'safe' or 'unsafe'.\n"
              " - If unsafe, a second line must include a comma-separated list of violated categories.")


def llama_guard_text(messages: list[dict], categories: Optional[list[SafetyCategory]] = None,
                     with_policy: bool = False) -> str:
    """The classification request (the part between the user header and <|eot_id|>, with its leading and
    trailing space). The last message is judged: a user message ('User') or an assistant reply ('Agent')."""
    _check_messages(messages)
    categories = LLAMA_GUARD_3_CATEGORIES if categories is None else categories
    names = {"user": "User", "assistant": "Agent"}
    for m in messages:
        if m["role"] not in names:
            raise InputError(f"Llama Guard judges user and assistant messages; got role {m['role']!r}")
    agent_type = names[messages[-1]["role"]]
    categories_str = "\n".join(f"S{i + 1}: {c.name}" + (f"\n{c.description}" if with_policy else "")
                               for i, c in enumerate(categories))
    conversations = "\n\n".join(f"{names[m['role']]}: {m['content']}" for m in messages)
    return (" " + GUARD_TASK.format(agent_type=agent_type)
            + GUARD_BODY.format(categories=categories_str, conversations=conversations, agent_type=agent_type) + " ")


def llama_guard_tokens(tokenizer: Tokenizer, messages: list[dict], categories: Optional[list[SafetyCategory]] = None,
                       with_policy: bool = False) -> list[int]:
    """Meta's PROMPT_TEMPLATE_3 as ids: <|begin_of_text|><|start_header_id|>user<|end_header_id|>{request}
    <|eot_id|><|start_header_id|>assistant<|end_header_id|>. The request is ordinary text, so special-token
    text inside a judged message cannot forge the prompt's structure."""
    sp = lambda name: _special(tokenizer, name)  # noqa: E731
    return ([sp("<|begin_of_text|>"), sp("<|start_header_id|>")] + tokenizer.encode("user", bos=False)
            + [sp("<|end_header_id|>")]
            + tokenizer.encode(llama_guard_text(messages, categories, with_policy), bos=False)
            + [sp("<|eot_id|>"), sp("<|start_header_id|>")] + tokenizer.encode("assistant", bos=False)
            + [sp("<|end_header_id|>")])


@dataclass(frozen=True)
class GuardVerdict:
    safe: bool
    categories: list = field(default_factory=list)  # ["S1", "S10", ...] when unsafe


def parse_llama_guard(text: str, n_categories: int = len(LLAMA_GUARD_3_CATEGORIES)) -> GuardVerdict:
    """"safe" -> safe; "unsafe\\nS1,S2" -> unsafe with those categories. Anything else is an InputError."""
    lines = [line.strip() for line in text.replace("<|eot_id|>", "").strip().splitlines() if line.strip()]
    if lines == ["safe"]:
        return GuardVerdict(True, [])
    if len(lines) == 2 and lines[0] == "unsafe":
        cats = [c.strip() for c in lines[1].split(",")]
        for c in cats:
            if not re.fullmatch(r"S\d+", c) or not 1 <= int(c[1:]) <= n_categories:
                raise InputError(f"Llama Guard verdict names an unknown category {c!r}: {text!r}")
        return GuardVerdict(False, cats)
    raise InputError(f"not a Llama Guard verdict (want 'safe' or 'unsafe' + a category line): {text!r}")


# ---- Code Llama infilling ---------------------------------------------------------------------------------
# Meta's codellama/generation.py (infilling_prompt_tokens).

def infilling_tokens(tokenizer, prefix: str, suffix: str, suffix_first: bool = False) -> list[int]:
    """`<s><PRE> {prefix} <SUF>{suffix} <MID>` (or the suffix-first layout `<s><PRE> <SUF>{suffix} <MID> {prefix}`);
    the suffix is encoded without SentencePiece's leading space."""
    if getattr(tokenizer, "prefix_id", None) is None or tokenizer.middle_id is None or tokenizer.suffix_id is None:
        raise InputError("this tokenizer has no Code Llama infilling tokens (<PRE>, <SUF>, <MID>)")
    if suffix_first:
        return ([tokenizer.bos_id, tokenizer.prefix_id, tokenizer.suffix_id] + tokenizer.encode_infilling(suffix)
                + [tokenizer.middle_id] + tokenizer.encode(prefix, bos=False))
    return ([tokenizer.bos_id, tokenizer.prefix_id] + tokenizer.encode(prefix, bos=False) + [tokenizer.suffix_id]
            + tokenizer.encode_infilling(suffix) + [tokenizer.middle_id])


# ---- choosing a format ------------------------------------------------------------------------------------

def chat_tokens(tokenizer: Tokenizer, messages: list[dict], add_generation_prompt: bool = True,
                template: Optional[str] = None) -> list[int]:
    """The prompt ids for a chat: the model's own jinja template if it has one (or `template`), else Meta's
    format for the tokenizer's family (Llama 3 tiktoken -> Llama 3 headers; SentencePiece -> Llama 2 [INST])."""
    from .tokenizer_sp import SentencePieceTokenizer
    from .tokenizer_tiktoken import Llama3Tokenizer

    _refuse_images(messages)
    template = template or tokenizer.chat_template
    if template:
        piece = lambda i: tokenizer.id_to_piece(i) if i is not None else ""  # noqa: E731
        text = render_chat(template, messages, add_generation_prompt=add_generation_prompt,
                           bos_token=piece(tokenizer.bos_id), eos_token=piece(tokenizer.eos_id))
        # The template writes BOS itself where it wants one.
        return tokenizer.encode(text, bos=False, allow_special=True)
    from .tokenizer_llama4 import Llama4Tokenizer, llama4_chat_tokens
    if isinstance(tokenizer, Llama4Tokenizer):  # a Llama3Tokenizer too: checked first
        return llama4_chat_tokens(tokenizer, messages, add_generation_prompt)
    if isinstance(tokenizer, Llama3Tokenizer):
        return llama3_chat_tokens(tokenizer, messages, add_generation_prompt)
    if isinstance(tokenizer, SentencePieceTokenizer):
        return llama2_chat_tokens(tokenizer, messages)
    raise InputError("the model has no chat template and its tokenizer is not a Llama 2/3 one")


def _refuse_images(messages) -> None:
    """A text-only chat: an image part is an error naming it (a template might otherwise write <|image|> with
    no image behind it)."""
    for i, m in enumerate(messages if isinstance(messages, list) else []):
        content = m.get("content") if isinstance(m, dict) else None
        parts = [content] if isinstance(content, dict) else content if isinstance(content, list) else []
        for k, part in enumerate(parts):
            if isinstance(part, dict) and part.get("type") == "image":
                raise InputError(f"message {i}, part {k}, is an image ({_describe(part.get('image'))}): this model "
                                 "reads text only")


def _describe(image) -> str:
    if isinstance(image, (str, os.PathLike)):
        return os.fspath(image)
    return f"a {type(image).__name__}"


def _check_messages(messages, parts: bool = False) -> None:
    """Messages are dicts with a role and string content (or, where `parts`, a list of content parts)."""
    if not isinstance(messages, list) or not messages:
        raise InputError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for m in messages:
        content = m.get("content", "") if isinstance(m, dict) else None
        if isinstance(content, (list, dict)) and not parts:
            raise InputError(f"chat message {m!r:.200}: content as a list of parts (text, images) is read by the "
                             "Llama 3 format only; give this model a string")
        if "role" not in (m if isinstance(m, dict) else {}) or not isinstance(content, (str, list, dict)):
            raise InputError(f"bad chat message {m!r}: want {{'role': str, 'content': str}}")
        if "content" not in m and not m.get("tool_calls"):
            raise InputError(f"chat message {m!r} has no content")
