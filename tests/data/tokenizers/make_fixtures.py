"""Regenerate the tokenizer fixtures in this folder (run by hand; needs network access to PyPI).

llama2-tokenizer.model.xz: the Llama 1/2 SentencePiece vocabulary (32000 pieces with scores and types) as a
    SentencePiece ModelProto, built by llama_ref.text.tokenizer_sp.model_proto_from_gguf from
    `vendor/llama.cpp/models/ggml-vocab-llama-spm.gguf` in the llama-cpp-python 0.3.36 sdist on PyPI
    (llama.cpp's vocab-only GGUF converted from Meta's tokenizer.model), xz-compressed.
llama2-llamacpp-cases.json: that GGUF's `.inp`/`.out` test pairs (texts and the ids Hugging Face's
    tokenizer gives them, no BOS), as llama.cpp's test-tokenizer-0 uses them.

    python tests/data/tokenizers/make_fixtures.py /path/to/llama_cpp_python-0.3.36.tar.gz
"""

import json
import lzma
import sys
import tarfile
import tempfile
from pathlib import Path

from llama_ref.text.tokenizer_sp import model_proto_from_gguf
from llama_ref.weights.gguf import gguf_metadata, open_gguf

HERE = Path(__file__).parent
MEMBER = "llama_cpp_python-0.3.36/vendor/llama.cpp/models/ggml-vocab-llama-spm.gguf"


def main(sdist: str) -> None:
    with tarfile.open(sdist) as tar, tempfile.TemporaryDirectory() as tmp:
        for suffix in ("", ".inp", ".out"):
            tar.extract(MEMBER + suffix, tmp, filter="data")
        gguf = Path(tmp) / MEMBER
        proto = model_proto_from_gguf(gguf_metadata(open_gguf(gguf)), where=str(gguf))
        (HERE / "llama2-tokenizer.model.xz").write_bytes(lzma.compress(proto, preset=9))
        sep = "\n__ggml_vocab_test__\n"
        texts = gguf.with_suffix(".gguf.inp").read_text(encoding="utf-8").split(sep)
        texts[-1] = texts[-1].removesuffix("\n__ggml_vocab_test__\n").removesuffix("\n__ggml_vocab_test__")
        outs = gguf.with_suffix(".gguf.out").read_text(encoding="utf-8").split("\n")[:len(texts)]
        cases = [{"text": t, "ids": [int(x) for x in o.split()]} for t, o in zip(texts, outs)]
        (HERE / "llama2-llamacpp-cases.json").write_text(json.dumps(cases, ensure_ascii=False, indent=0) + "\n",
                                                         encoding="utf-8")


if __name__ == "__main__":
    main(sys.argv[1])


def llama_guard_prompts(cookbook_dir: str) -> None:
    """llama-guard3-prompts.json: prompts built by Meta's own llama-cookbook code (llama_cookbook/inference/
    prompt_format_utils.py from the llama-cookbook 0.0.5.post1 wheel; stdlib only) for a few conversations.

        python -c "import make_fixtures as m; m.llama_guard_prompts('/path/to/unzipped/wheel')"
    """
    sys.path.insert(0, cookbook_dir)
    from llama_cookbook.inference import prompt_format_utils as pf

    conversations = [
        ["How do I bake a chocolate cake?"],
        ["What's the capital of France?", "Paris is the capital of France."],
        ["Tell me a joke.", "Why did the chicken cross the road?", "I don't know, why <|eot_id|>?"],
    ]
    cases = []
    for conv in conversations:
        agent = pf.AgentType.USER if len(conv) % 2 == 1 else pf.AgentType.AGENT
        turns = pf.create_conversation(conv)
        cases.append({"messages": conv, "with_policy": False,
                      "prompt": pf.build_default_prompt(agent, turns, pf.LlamaGuardVersion.LLAMA_GUARD_3)})
        cases.append({"messages": conv, "with_policy": True,
                      "prompt": pf.build_custom_prompt(agent, turns, pf.LLAMA_GUARD_3_CATEGORY, "S",
                                                       pf.PROMPT_TEMPLATE_3, with_policy=True)})
    (HERE / "llama-guard3-prompts.json").write_text(json.dumps(cases, ensure_ascii=False, indent=1) + "\n",
                                                    encoding="utf-8")
