"""Text in and out: tokenizers (SentencePiece for Llama 1/2, tiktoken for Llama 3, Llama 4's own), chat formats
and jinja chat templates, saved conversations, and the checks on text files given to the CLI."""
