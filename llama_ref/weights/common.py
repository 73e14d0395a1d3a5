"""What every checkpoint reader shares: the canonical tensor names and their expected shapes, and reading
a tensor's bytes into memory."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..model.config import ModelArgs
from ..errors import LlamaRefError


class WeightsError(LlamaRefError, ValueError):
    """A checkpoint file is missing, damaged, or does not fit its config."""


def expected_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Every tensor of the canonical (Meta) layout with the shape the config implies."""
    d, hd, f = args.dim, args.head_dim, args.ffn_hidden_dim
    shapes = {"tok_embeddings.weight": (args.vocab_size, d), "norm.weight": (d,),
              "output.weight": (args.vocab_size, d)}
    for i in range(args.n_layers):
        p = f"layers.{i}."
        shapes.update({
            p + "attention_norm.weight": (d,),
            p + "attention.wq.weight": (args.n_heads * hd, d),
            p + "attention.wk.weight": (args.kv_heads * hd, d),
            p + "attention.wv.weight": (args.kv_heads * hd, d),
            p + "attention.wo.weight": (d, args.n_heads * hd),
            p + "ffn_norm.weight": (d,),
        })
        if args.llama4 is not None and i in args.llama4.moe_layers:  # experts, their router, the shared expert
            from ..model.llama4_config import moe_shapes
            shapes.update(moe_shapes(args, p + "feed_forward."))
        else:
            shapes.update({
                p + "feed_forward.w1.weight": (f, d),
                p + "feed_forward.w2.weight": (d, f),
                p + "feed_forward.w3.weight": (f, d),
            })
    return shapes


def check_layer_count(args: ModelArgs, names, where: str) -> None:
    """The config's layer count against the layers the file holds, before anything loops over layers.

    A damaged or hostile config may claim 10^9 layers; naming every expected tensor of every layer would
    then run for hours. Only counting the file's own tensor names is bounded by the file.
    """
    layers = {name.split(".")[1] for name in names if name.startswith("layers.")}
    if args.n_layers != len(layers):
        raise WeightsError(f"{where}: the config says {args.n_layers} layers, the checkpoint holds tensors "
                           f"of {len(layers)}")


def check_weights(args: ModelArgs, weights: dict, where: str) -> None:
    """Every expected tensor present with its expected shape; nothing unexpected left over."""
    check_layer_count(args, weights, where)
    shapes = expected_shapes(args)
    missing = [name for name in shapes if name not in weights]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise WeightsError(f"{where}: tensor {missing[0]} is missing{more}")
    for name, shape in shapes.items():
        got = tuple(weights[name].shape)
        if got != shape:
            raise WeightsError(f"{where}: tensor {name} has shape {got}, the config implies {shape}")
    extra = sorted(set(weights) - set(shapes))
    if extra:
        raise WeightsError(f"{where}: unexpected tensor {extra[0]} for this config")


def permute_hf_to_meta(w, n_heads: int):
    """Rows of an HF q/k projection (half-split RoPE order) -> Meta's interleaved-pair order.

    Within each head, HF keeps the first halves of all pairs, then all second halves:
        HF   rows of a head: [x0 x1 ... x(h/2-1) | y0 y1 ... y(h/2-1)]
        Meta rows of a head: [x0 y0 x1 y1 ... ]
    For wk pass n_kv_heads. Works on any array whose first axis is rows.
    """
    rows = w.shape[0]
    hd = rows // n_heads
    return w.reshape(n_heads, 2, hd // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_meta_to_hf(w, n_heads: int):
    """Inverse of permute_hf_to_meta (what HF's convert_llama_weights_to_hf applies)."""
    rows = w.shape[0]
    hd = rows // n_heads
    return w.reshape(n_heads, hd // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def pread_into(path: Path, offset: int, out: np.ndarray) -> None:
    """Fill `out` with the bytes of `path` at `offset` (no memory map, so no file pages stay resident)."""
    buf = memoryview(out.reshape(-1).view(np.uint8))
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        done = 0
        while done < len(buf):
            n = f.readinto(buf[done:])
            if not n:
                raise WeightsError(f"{path}: truncated: file ends inside a tensor's data")
            done += n


# Far more elements than any real tensor has (2**48 float32 = 1 PiB), and small enough that numpy's int64
# byte counts never overflow: shapes and strides read from a file are held to it before numpy sees them.
MAX_ELEMENTS = 2 ** 48


def checked_shape(shape, where: str, name: str, what: str = "shape") -> tuple[int, ...]:
    """A shape (or strides) read from a file header as a tuple of ints, refused unless every entry is a
    non-negative int and their product (zeros counted as one, so an empty tensor cannot hide a huge
    dimension) stays below MAX_ELEMENTS; otherwise numpy would fail from deep inside (or allocate).
    Strides are offsets, not counts: each one is held below MAX_ELEMENTS, not their product (that of a
    (4, 4, 1601, 1280) tensor, Llama 3.2 Vision's gated positional embedding, is 2e16)."""
    if not isinstance(shape, (list, tuple)) or not all(type(n) is int for n in shape):
        raise WeightsError(f"{where}: tensor {name} has a malformed {what} {shape!r}")
    size = 1
    for n in shape:
        if n < 0:
            raise WeightsError(f"{where}: tensor {name} has a negative entry in its {what} {tuple(shape)}")
        size = max(size, n) if what == "stride" else size * max(n, 1)
        if size >= MAX_ELEMENTS:
            raise WeightsError(f"{where}: tensor {name} has an impossibly large {what} {tuple(shape)}")
    return tuple(shape)
