"""`python -m llama_ref ...` is the `llama-ref` command."""

from .tools.cli import main

raise SystemExit(main())
