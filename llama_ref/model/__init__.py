"""The model itself: its configuration (config.py, presets.py), the NumPy operations that are the
specification (ops.py), the forward pass (transformer.py), the KV cache (cache.py) and Llama 4's mixture of
experts (llama4.py, llama4_config.py). Everything else in llama_ref feeds this package or drives it."""
