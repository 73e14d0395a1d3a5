"""Numba CPU kernels, installed as llama_ref.kernels. Each has a NumPy twin in llama_ref.ops."""
