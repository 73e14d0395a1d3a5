"""llama_ref: a readable pure-NumPy reference implementation of the Llama family."""

from .model import presets  # llama_ref.presets.get("llama-3.1-8b"): the architecture of every official model
from .errors import LlamaRefError
from .model.config import ConfigError, ModelArgs, RopeScaling
from .weights.fetch import DEFAULT_MODEL, FetchError, fetch
from .loading import load
from .errors import InputError
from .model.cache import KVCache
from .model.transformer import Transformer
from .text.tokenizer import TokenizerError
from .weights.common import WeightsError

__version__ = "0.1.0"

__all__ = ["load", "presets", "LlamaRefError", "fetch", "DEFAULT_MODEL", "ModelArgs", "RopeScaling", "Transformer",
           "KVCache", "ConfigError", "FetchError", "InputError", "TokenizerError", "WeightsError"]
