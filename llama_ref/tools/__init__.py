"""What users run around the model: the `llama-ref` command line (cli.py), conversion between checkpoint
formats (convert.py), checkpoint information (info.py), capture of intermediate tensors (capture.py), comparison
with reference activations (verify.py) and the float32-vs-float64 error budget (precision.py)."""
