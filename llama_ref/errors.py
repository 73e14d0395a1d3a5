"""The root of every error llama_ref raises on bad input.

Each error names the file, field or argument at fault. The command line prints a LlamaRefError (or an
OSError about a file) as one line and exits with status 2; anything else is a bug in llama_ref and keeps
its traceback. Every subclass is also a ValueError (FetchError a RuntimeError), as it was before this
root existed, so code that caught those still works.
"""


class LlamaRefError(Exception):
    """Bad input to llama_ref: a file, a config value, an argument. The message names which."""


class InputError(LlamaRefError, ValueError):
    """Bad input from the caller: token ids, positions or lengths that the model cannot accept."""
