"""Llama 4 GGUF files (general.architecture "llama4"), read as llama.cpp reads them.

llama.cpp's llama4 architecture stores only part of a Llama 4 config in the file; the rest is fixed in its
code (src/models/llama4.cpp, llama-cpp-python 0.3.36's vendored tree). llama_ref takes every value from the
same place llama.cpp does, and refuses a file whose keys ask for something llama.cpp's llama4 would not
compute, or would silently ignore:

  value                         from                         llama_ref reads
  ----------------------------  ---------------------------  ----------------------------------------------
  layers, width, heads, KV      the file                     block_count, embedding_length, attention.head_count
  heads, head size, eps, theta                               (_kv), attention.key_length, .layer_norm_rms_epsilon,
                                                             rope.freq_base, context_length, vocab_size
  dense FFN width               the file                     feed_forward_length
  experts, top-k, MoE layers    the file                     expert_count, expert_used_count,
                                                             interleave_moe_layer_step: layer i is MoE when
                                                             (i + 1) % step == 0
  expert (and shared) width     the file                     expert_feed_forward_length; the shared expert has
                                                             the same width (llama.cpp: n_ff_shexp = n_ff_exp)
  RoPE scaling                  the file                     the rope_freqs tensor (Llama 3.1-style divisors,
                                                             as for dense GGUF files), or rope.scaling.type
                                                             none / linear
  chunk size                    llama.cpp's code: 8192       refused unless attention.sliding_window is absent
                                                             (or 8192): llama.cpp overwrites any other non-zero
                                                             value with 8192; 0 (its "no chunking" switch) is
                                                             refused, as llama.cpp then runs a model that is no
                                                             Llama 4 (and asserts on temperature tuning)
  NoPE layers                   llama.cpp's code: every 4th  layer i has no RoPE when (i + 1) % 4 == 0; no key
  chunked layers                llama.cpp's code: pattern 4  attention.sliding_window_pattern, if present, must
                                (3 chunked, 1 full)          name exactly the RoPE layers (llama_ref chunks the
                                                             RoPE layers), else refused
  temperature tuning            llama.cpp's code             on, floor_scale 8192, attn_scale 0.1 (its offset 1
                                                             is Meta's position + 1)
  QK norm                       llama.cpp's code             on unless expert_count is 128 (llama.cpp's
                                                             LLM_TYPE_17B_128E, Maverick, has none)
  router                        llama.cpp's code             sigmoid of the top-k logits, applied to the
                                                             expert's input: what llama_ref.model.llama4 does
  attention scale               llama.cpp's code             1/sqrt(head size); attention.scale is refused

Keys llama.cpp's llama4 does not read but that would change the model if honoured (expert_weights_scale,
expert_gating_func, expert_shared_count, expert_shared_feed_forward_length, attention.scale,
rope.freq_base_swa different from rope.freq_base, ...) are refused unless they hold the value llama.cpp uses;
block_count and expert_count are held to llama.cpp's limits (512, 1024). The keys are read by
model/llama4_config.py (from_llama4_gguf); this module maps the tensors. The tokenizer of a real Llama 4 GGUF
(tokenizer.ggml.pre "llama4") splits text by Meta's llama4 pattern (text/tokenizer.py).

Tensors (ggml lists the fastest axis first; shapes below are numpy's, slowest first):
    token_embd, output_norm, output (absent: tied to token_embd, as llama.cpp does), rope_freqs
    blk.{i}.attn_norm / attn_q / attn_k / attn_v / attn_output, or attn_qkv (rows q, then k, then v)
    blk.{i}.ffn_norm; dense layers blk.{i}.ffn_gate / ffn_up / ffn_down
    MoE layers  blk.{i}.ffn_gate_inp (E, D)  router
                blk.{i}.ffn_gate_exps, ffn_up_exps (E, FE, D), ffn_down_exps (E, D, FE): expert e is [e], a
                matrix stored (out, in) like every other weight, so no transpose is needed
                blk.{i}.ffn_gate_shexp / ffn_up_shexp / ffn_down_shexp   the shared expert
llama.cpp's converter writes Llama 4's q/k rows unpermuted (Llama4Model.undo_permute = False): Meta's, HF's
and GGUF's llama4 rows are all in the same adjacent-pair order, which is llama_ref's.
"""

from __future__ import annotations

import numpy as np

from ..model.config import ModelArgs
from ..model.llama4_config import from_llama4_gguf
from .common import WeightsError
from .gguf import GGUF_TO_META as DENSE_GGUF_TO_META

# GGUF tensor name -> canonical name; "{i}" is the layer index: the dense names, and Llama 4's router and
# shared expert. Experts and attn_qkv are split separately.
GGUF_TO_META = {
    **DENSE_GGUF_TO_META,
    "blk.{i}.ffn_gate_inp.weight": "layers.{i}.feed_forward.router.weight",
    "blk.{i}.ffn_gate_shexp.weight": "layers.{i}.feed_forward.shared_expert.w1.weight",
    "blk.{i}.ffn_down_shexp.weight": "layers.{i}.feed_forward.shared_expert.w2.weight",
    "blk.{i}.ffn_up_shexp.weight": "layers.{i}.feed_forward.shared_expert.w3.weight",
}
EXPERTS = {"ffn_gate_exps.weight": "w1", "ffn_down_exps.weight": "w2", "ffn_up_exps.weight": "w3"}
META_TO_GGUF = {v: k for k, v in GGUF_TO_META.items()}


def llama4_tensors(args: ModelArgs, tensor) -> "list[tuple[str, object]]":
    """The canonical tensors one GGUF tensor holds, as (name, function of the tensor giving the part).

    The function maps a gguf ReaderTensor-like object (its data the stored bytes or elements) to the part's
    own tensor of the same kind, so that packed and dequantized loading share one plan. [] for rope_freqs;
    None for a name llama4 does not have."""
    name = tensor.name
    parts = name.split(".", 2)
    if name == "rope_freqs.weight":
        return []
    if parts[0] != "blk" or len(parts) != 3:
        canonical = GGUF_TO_META.get(name)
        return None if canonical is None else [(canonical, None)]
    _, i, rest = parts
    p = f"layers.{i}."
    if rest in EXPERTS:
        # One entry per configured expert (at most llama.cpp's 1024); check_tensor_types holds the file to it.
        return [(f"{p}feed_forward.experts.{e}.{EXPERTS[rest]}.weight", e) for e in range(args.llama4.n_experts)]
    if rest == "attn_qkv.weight":
        hd = args.head_dim
        q, kv = args.n_heads * hd, args.kv_heads * hd
        return [(p + "attention.wq.weight", (0, q)), (p + "attention.wk.weight", (q, q + kv)),
                (p + "attention.wv.weight", (q + kv, q + 2 * kv))]
    canonical = GGUF_TO_META.get(f"blk.{{i}}.{rest}")
    return None if canonical is None else [(canonical.format(i=i), None)]


def slice_tensor(tensor, part):
    """Part of a GGUF tensor as a tensor of its own: expert e of a 3-D one (an int), or a row range (a pair)
    of a matrix. Works on the stored data (elements or block bytes), so quantized experts stay packed."""
    dims = [int(n) for n in tensor.shape]  # fastest axis first
    if isinstance(part, int):
        data = tensor.data[part]
        new_dims = dims[:2]
    else:
        start, stop = part
        data = tensor.data[start:stop]
        new_dims = [dims[0], stop - start]
    n_elements = int(np.prod(new_dims))
    return tensor._replace(data=data, shape=np.array(new_dims, dtype=np.uint64), n_elements=n_elements,
                           n_bytes=data.nbytes, data_offset=tensor.data_offset)


def check_tensor_types(args: ModelArgs, reader_tensors, where: str) -> None:
    """Before anything is read: every tensor's name is one of llama4's and its shape the config's."""
    from .common import expected_shapes

    want = expected_shapes(args)
    for t in reader_tensors:
        plan = llama4_tensors(args, t)
        if plan is None:
            raise WeightsError(f"{where}: unexpected tensor {t.name} for a llama4 model")
        dims = tuple(int(n) for n in reversed(t.shape))
        for canonical, part in plan:
            if canonical not in want:
                raise WeightsError(f"{where}: unexpected tensor {t.name} for this llama4 config")
            if isinstance(part, int):
                shape = dims[1:]
                if len(dims) != 3 or dims[0] != args.llama4.n_experts:
                    raise WeightsError(f"{where}: tensor {t.name} has shape {dims}, expected "
                                       f"({args.llama4.n_experts}, ...) experts")
            elif part is not None:
                shape = (part[1] - part[0], dims[1]) if len(dims) == 2 else None
                if dims[0] != sum(n for n in (args.n_heads * args.head_dim, 2 * args.kv_heads * args.head_dim)):
                    raise WeightsError(f"{where}: tensor {t.name} has shape {dims}, the config implies "
                                       f"({args.n_heads * args.head_dim + 2 * args.kv_heads * args.head_dim}, "
                                       f"{args.dim})")
            else:
                shape = dims
            if shape != want[canonical]:
                raise WeightsError(f"{where}: tensor {t.name} has shape {dims}, the config implies "
                                   f"{want[canonical]} for {canonical}")


def load_llama4_gguf(path, reader, meta: dict, progress: bool = False, packed: bool = False, mmap: bool = False):
    """The weights of a llama4 GGUF file, as weights.gguf.load_gguf returns them (args, weights, extras)."""
    from .common import check_weights
    from .gguf import _read_owned, dequantize
    from .packed import from_gguf_tensor as packed_from_gguf_tensor

    where = str(path)
    names = {t.name for t in reader.tensors}
    args = from_llama4_gguf(meta, where, has_output_tensor="output.weight" in names)
    check_tensor_types(args, reader.tensors, where)  # names and shapes, before any byte is read
    tensors = reader.tensors
    if progress:
        from tqdm import tqdm
        tensors = tqdm(tensors, desc=f"loading {path.name}", unit="tensor", leave=False)
    weights, freq_divisors = {}, None
    for t in tensors:
        if t.name == "rope_freqs.weight":
            freq_divisors = dequantize(t).reshape(-1)  # (HD/2,) the Llama 3.1-style divisors
            continue
        if not mmap and t.tensor_type.name in ("F32", "F16", "BF16"):
            t = _read_owned(path, t)  # a kept array would otherwise be a view of the map
        for canonical, part in llama4_tensors(args, t):
            piece = t if part is None else slice_tensor(t, part)
            kept = packed_from_gguf_tensor(piece) if packed else None
            weights[canonical] = kept if kept is not None else np.ascontiguousarray(dequantize(piece))
        if not mmap:
            reader.release(t)  # the map's pages of a tensor copied out (gguf.GGUFFile.release)
    if args.tie_word_embeddings:
        weights["output.weight"] = weights.get("tok_embeddings.weight")
    if "tok_embeddings.weight" not in weights:
        raise WeightsError(f"{where}: tensor token_embd.weight is missing")
    check_weights(args, weights, where)
    if freq_divisors is not None and freq_divisors.shape != (args.head_dim // 2,):
        raise WeightsError(f"{where}: rope_freqs has {freq_divisors.size} values, expected {args.head_dim // 2}")
    return args, weights, {"metadata": meta, "freq_divisors": freq_divisors, "format": "gguf"}
