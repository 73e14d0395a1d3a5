"""Llama 3.2 Vision: images in, text out (preprocessing, the vision encoder, cross-attention)."""
