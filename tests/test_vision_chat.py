"""Llama 3.2 Vision prompts (llama_ref.text.chat.llama3_vision_prompt / llama3_vision_completion) against Meta's
ChatFormat: tests/data/vision/chat_cases.json holds what llama-models' models/llama3/chat_format.py makes of
the same dialogs (tests/fixtures/make_vision_chat_cases.py): the ids the model reads, Meta's vision mask spans
and the images in order. Equality is exact: these are integers."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from llama_ref.errors import InputError
from llama_ref.text.chat import (IMAGE_TOKEN_ID, chat_tokens, image_spans, llama2_chat_tokens, llama3_chat_tokens,
                                 llama3_vision_completion, llama3_vision_prompt, vision_chat_prompt)

DATA = Path(__file__).parent / "data" / "vision"
CASES = json.loads((DATA / "chat_cases.json").read_text())


def with_paths(content):
    """The fixture names files; llama_ref is given their paths."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return with_paths([content])[0]
    return [dict(p, image=DATA / "images" / p["image"]) if p["type"] == "image" else p for p in content]


def test_image_token_is_metas(llama3):
    assert llama3.special_tokens["<|image|>"] == CASES["image_token"] == 128011


@pytest.mark.parametrize("case", CASES["dialogs"], ids=lambda c: f"{len(c['messages'])}msg-{len(c['images'])}img")
def test_dialogs_equal_metas(llama3, case):
    messages = [dict(m, content=with_paths(m["content"])) for m in case["messages"]]
    prompt = llama3_vision_prompt(llama3, messages)
    assert prompt.ids == case["ids"]
    assert prompt.image_spans == case["mask"]
    assert [Path(p).name for p in prompt.images] == case["images"]


@pytest.mark.parametrize("case", CASES["completions"], ids=lambda c: f"{len(c['content'])}parts")
def test_completions_equal_metas(llama3, case):
    prompt = llama3_vision_completion(llama3, with_paths(case["content"]))
    assert prompt.ids == case["ids"]
    assert prompt.image_spans == case["mask"]
    assert [Path(p).name for p in prompt.images] == case["images"]


def test_images_come_back_as_given(llama3):
    pil = Image.open(DATA / "images" / "chelsea.png")
    arr = np.zeros((5, 7, 3), np.uint8)
    prompt = llama3_vision_prompt(llama3, [{"role": "user", "content": [
        {"type": "image", "image": pil}, {"type": "text", "text": "and"}, {"type": "image", "image": arr}]}])
    assert prompt.images[0] is pil and prompt.images[1] is arr
    assert prompt.ids.count(IMAGE_TOKEN_ID) == 2


def test_text_parts_and_strings(llama3):
    """Text-only part lists are read by the plain Llama 3 format too; one part is one string."""
    one = [{"role": "user", "content": "Hello there"}]
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hello there"}]}]
    assert llama3_chat_tokens(llama3, parts) == llama3_chat_tokens(llama3, one)
    assert llama3_vision_prompt(llama3, one).ids == llama3_chat_tokens(llama3, one)
    assert llama3_vision_prompt(llama3, one).image_spans == []


def test_images_refused_where_they_cannot_go(llama3):
    msg = [{"role": "user", "content": [{"type": "image", "image": "x.png"}, {"type": "text", "text": "hi"}]}]
    with pytest.raises(InputError, match=re.escape("user message, part 0, is an image (x.png)")):
        llama3_chat_tokens(llama3, msg)
    with pytest.raises(InputError, match=re.escape("message 0, part 0, is an image (x.png): this model reads")):
        chat_tokens(llama3, msg)
    # a model with a jinja template would otherwise write <|image|> with no image behind it
    two = [{"role": "user", "content": "hi"}, {"role": "user", "content": {"type": "image", "image": np.zeros(3)}}]
    with pytest.raises(InputError, match=re.escape("message 1, part 0, is an image (a ndarray)")):
        chat_tokens(llama3, two, template=HF_LIKE)


@pytest.mark.parametrize("part", [{"type": "video", "video": "x.mp4"}, {"type": "text", "text": 3}, "plain",
                                  {"type": "image"}, {"type": "image", "image": None}])
def test_bad_parts_are_named(llama3, part):
    with pytest.raises(InputError, match="part 1"):
        llama3_vision_prompt(llama3, [{"role": "user", "content": [{"type": "text", "text": "a"}, part]}])


def test_llama2_format_refuses_part_lists():
    with pytest.raises(InputError, match="Llama 3 format only"):
        llama2_chat_tokens(None, [{"role": "user", "content": [{"type": "text", "text": "hi"}]}])


def test_image_spans_rules():
    I = IMAGE_TOKEN_ID  # noqa: E741
    assert image_spans([1, 2, 3]) == []
    assert image_spans([1, I, 5, 6]) == [[1, -1]]
    assert image_spans([1, I, 5, I, 6, 7]) == [[1, 3], [3, 6]]
    # images in a row share the text after the last one
    assert image_spans([1, I, I, 5, I, 6]) == [[1, 4], [2, 4], [4, 6]]
    assert image_spans([I, I, I]) == [[0, 3], [1, 3], [2, 3]]


# Hugging Face's Llama 3.2 Vision template, reduced to its message layout (the released one adds a default
# system prompt with dates and tools): the image parts become <|image|>, text parts are written as they are.
HF_LIKE = ("{{- bos_token }}{%- for message in messages %}"
           "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
           "{%- if message['content'] is string %}{{- message['content'] }}{%- else %}"
           "{%- for content in message['content'] %}{%- if content['type'] == 'image' %}{{- '<|image|>' }}"
           "{%- elif content['type'] == 'text' %}{{- content['text'] }}{%- endif %}{%- endfor %}{%- endif %}"
           "{{- '<|eot_id|>' }}{%- endfor %}"
           "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}")


@pytest.mark.parametrize("case", [c for c in CASES["dialogs"] if c["images"]],
                         ids=lambda c: f"{len(c['messages'])}msg-{len(c['images'])}img")
def test_template_prompts_equal_metas(llama3, case):
    """Through a jinja template the same dialogs give Meta's ids, spans and images (each text part here sits
    between special tokens, so encoding parts one by one or together gives the same ids)."""
    messages = [dict(m, content=with_paths(m["content"])) for m in case["messages"]]
    prompt = vision_chat_prompt(llama3, messages, template=HF_LIKE)
    assert prompt.ids == case["ids"]
    assert prompt.image_spans == case["mask"]
    assert [Path(p).name for p in prompt.images] == case["images"]
    assert vision_chat_prompt(llama3, messages).ids == case["ids"]  # no template: Meta's format


def test_template_that_drops_images_is_refused(llama3):
    text_only = HF_LIKE.replace("{{- '<|image|>' }}", "")
    msg = [{"role": "user", "content": [{"type": "image", "image": "a.png"}, {"type": "text", "text": "hi"}]}]
    with pytest.raises(InputError, match=re.escape("wrote 0 <|image|> tokens for 1 images")):
        vision_chat_prompt(llama3, msg, template=text_only)
