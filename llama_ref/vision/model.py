"""Llama 3.2 Vision: the dense Llama decoder with gated cross-attention blocks that read image features.

VisionModel is a Transformer (llama_ref.model.transformer) whose forward runs unchanged; its one hook,
`cross_attention`, is called before every text layer and applies the cross-attention block where Meta's fusion
schedule puts one. The images of a prompt are attached first (`attach_images`): they are encoded once
(llama_ref.vision.encoder) and each cross-attention layer's image keys and values are computed once per cache
and held in it, so prefill in pieces and every decode step reuse them.

Which images a text token sees (Meta's create_vision_mask, llama3/chat_format.py; _pad_masks in
llama3/multimodal/model.py):
  - image j is seen from its <|image|> token up to the next image's token; consecutive image tokens share the
    text that follows them; the last image is seen to the end of the prompt;
  - with one image it is also seen by every generated token; with two or more, generated tokens see no image;
  - a token that sees no image (text before the first image, or those generated tokens) skips the block: Meta
    multiplies its attention output and its MLP output by zero;
  - only the image's own tiles are seen, every token of them (the class token too); its empty tile slots not.
`rule="hf"` follows transformers' MllamaForConditionalGeneration instead, where it differs: a generated token
sees what the last prompt token sees (generate() repeats the mask's last row), and a token that sees no image
attends evenly to every image token, empty slots included (its mask row is all zeros after
_prepare_cross_attention_mask), with only the MLP output zeroed. Meta's rule is the default.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from ..errors import InputError
from ..model.config import ModelArgs
from ..model.transformer import Transformer
from ..text.chat import image_spans  # Meta's create_vision_mask, shared with the chat format
from .config import LEARNABLE_EMBEDDINGS, VisionArgs
from .encoder import attend_all, encode_image

RULES = ("meta", "hf")


class JoinedEmbedding:
    """The token table followed by Meta's learnable embeddings (ids vocab_size .. vocab_size+7, <|image|>
    first), looked up like one table (the backends' embedding reads any table with .rows and .shape)."""

    def __init__(self, table, learnable: np.ndarray):
        self.table, self.learnable = table, learnable
        self.shape = (table.shape[0] + learnable.shape[0], table.shape[1])
        self.dtype = np.float32

    def rows(self, tokens, dtype=np.float32) -> np.ndarray:
        from ..model import ops
        tokens = np.asarray(tokens)
        V = self.table.shape[0]
        extra = tokens >= V
        out = ops.embedding(np.where(extra, 0, tokens), self.table, dtype)  # (..., D)
        out[extra] = self.learnable[tokens[extra] - V].astype(dtype)
        return out


@dataclass
class ImagePrompt:
    """The images of one prompt: their tiles, arrangements, which positions see which image, and (once
    computed) their features (n_images, S, N, D)."""

    tiles: list  # per image: float [n_tiles, 3, C, C]
    aspect_ratios: list  # per image: (h_tiles, w_tiles)
    spans: list  # per image: [start, end) prompt positions, end -1 for "to the end"
    prompt_len: int
    rule: str = "meta"
    features: Optional[np.ndarray] = None
    layer_kv: dict = field(default_factory=dict)  # id(cache) -> per cross layer (keys, values)

    def images_seen(self, pos: int) -> list[int]:
        """The images that text position `pos` attends to."""
        if pos >= self.prompt_len:
            if self.rule == "hf":
                pos = self.prompt_len - 1  # transformers' generate repeats the last prompt row
            elif len(self.spans) > 1:
                return []  # Meta: with two or more images, generated tokens see none
        return [j for j, (a, b) in enumerate(self.spans) if a <= pos and (b == -1 or pos < b)]


class VisionModel(Transformer):
    """A Llama 3.2 Vision model: text decoder (the dense forward), cross-attention blocks, image encoder."""

    max_images = 8  # per prompt: each image adds 4 x 1601 keys and values to every cross-attention layer

    def __init__(self, args: ModelArgs, vision: VisionArgs, weights: dict, *, backend="numpy", dtype=np.float32,
                 freq_divisors=None):
        weights = dict(weights)
        weights["tok_embeddings.weight"] = JoinedEmbedding(weights["tok_embeddings.weight"],
                                                           weights["learnable_embedding.weight"])
        super().__init__(args, weights, backend=backend, dtype=dtype, freq_divisors=freq_divisors)
        self.vision = vision
        # The encoder's two operations the text model lacks (GELU, attention without a causal mask): NumPy
        # references in vision.encoder, Numba/BLAS twins in kernels/vision.py.
        if self.backend_name == "numba":
            from ..kernels import vision as encoder_ops
        else:
            from . import encoder as encoder_ops
        self.vision_gelu, self.vision_attention = encoder_ops.gelu, encoder_ops.bidirectional_attention
        self.images: Optional[ImagePrompt] = None
        self.cross_attention = self._cross_attention  # the hook Transformer.forward calls before each layer

    # ---- images ------------------------------------------------------------------------------------------
    def attach_images(self, images: Sequence, prompt_tokens: Sequence[int], *, rule: str = "meta"
                      ) -> Optional[ImagePrompt]:
        """Give the next prompt its images, one per <|image|> token of `prompt_tokens` (the whole prompt, even
        when it is then fed in pieces). images: paths, PIL images, uint8 arrays or
        llama_ref.vision.preprocess.ImageTiles. None or [] with no image token: a text-only prompt."""
        from .preprocess import ImageError, ImageTiles, check_image_count, preprocess_image
        if rule not in RULES:
            raise InputError(f"rule must be one of {', '.join(RULES)}, got {rule!r}")
        images = list(images or [])
        tokens = [int(t) for t in prompt_tokens]
        n_tokens = sum(t == self.vision.image_token_id for t in tokens)
        check_image_count(len(images), self.max_images)
        if len(images) != n_tokens:
            raise ImageError(f"images: {len(images)} given for {n_tokens} <|image|> tokens in the prompt; "
                             f"each image needs its own <|image|> token")
        v = self.vision
        tiles, ars = [], []
        for j, image in enumerate(images):
            if not isinstance(image, ImageTiles):
                image = preprocess_image(image, tile_size=v.chunk_size, max_num_chunks=v.max_num_chunks,
                                         name=str(image) if isinstance(image, (str,)) else f"image {j}")
            if image.tiles.shape[1:] != (3, v.chunk_size, v.chunk_size) or image.num_tiles > v.max_num_chunks:
                raise ImageError(f"image {j}: tiles of shape {image.tiles.shape} do not fit this model's "
                                 f"{v.max_num_chunks} tiles of {v.chunk_size} pixels")
            tiles.append(image.tiles)
            ars.append(tuple(int(a) for a in image.aspect_ratio))
        if images or self.images is not None:
            self.reset()  # cached keys and values of earlier text were computed with other images (or none)
        self.images = ImagePrompt(tiles, ars, image_spans(tokens, v.image_token_id), len(tokens), rule) \
            if images else None
        return self.images

    def encode_images(self) -> Optional[np.ndarray]:
        """The attached images' features (n_images, S, N, D), computed once per prompt."""
        ip = self.images
        if ip is not None and ip.features is None:
            ip.features = np.stack([encode_image(self, t, ar, f"vision.{j}.")
                                    for j, (t, ar) in enumerate(zip(ip.tiles, ip.aspect_ratios))])
        return None if ip is None else ip.features

    def _image_kv(self, cache) -> list:
        """Each cross-attention layer's image keys (k_norm applied) and values, (n_images, S*N, KVH, HD) each,
        computed once and held in the cache."""
        kv = getattr(cache, "images", None)
        if kv is not None and kv[0] is self.images:
            return kv[1]
        feats = self.encode_images()  # (n, S, N, D)
        n, S, N, D = feats.shape
        a, w = self.args, self.weights
        out = []
        for k in range(len(self.vision.cross_layers)):
            p = f"cross_attention_layers.{k}.attention."
            x = feats.reshape(n, S * N, D)
            keys = self.ops.linear(x, w[p + "wk.weight"]).reshape(n, S * N, a.kv_heads, a.head_dim)
            keys = self.ops.rms_norm(keys, w[p + "k_norm.weight"], a.norm_eps)
            values = self.ops.linear(x, w[p + "wv.weight"]).reshape(n, S * N, a.kv_heads, a.head_dim)
            out.append((keys, values))
        cache.images = (self.images, out)
        return out

    # ---- the cross-attention block ---------------------------------------------------------------------
    def _cross_attention(self, i: int, h: np.ndarray, start_pos: int, cache) -> np.ndarray:
        """Before text layer i: the gated cross-attention block when the schedule puts one there and the
        prompt has images (a text-only prompt skips them all, as Meta's text_only_inference does)."""
        if self.images is None or i not in self.vision.cross_layers:
            return h
        k = self.vision.cross_layers.index(i)
        p = f"cross_attention_layers.{k}."
        a, w, k_ops, ip = self.args, self.weights, self.ops, self.images
        B, T, D = h.shape
        if B != 1:
            raise InputError("a prompt with images is a batch of one")
        H, HD = a.n_heads, a.head_dim
        keys, values = self._image_kv(cache)[k]  # (n, S*N, KVH, HD) each
        n, SN = keys.shape[:2]
        N = SN // self.vision.max_num_chunks
        # Which images each position sees; positions that see the same ones are attended together.
        seen = [tuple(ip.images_seen(start_pos + t)) for t in range(T)]
        has_image = np.array([bool(s) for s in seen], dtype=h.dtype)  # (T,)
        # Queries: RMS-normalised input, projected, each head RMS-normalised (q_norm; the keys had k_norm).
        x = k_ops.rms_norm(h, w[p + "attention_norm.weight"], a.norm_eps)  # (1, T, D)
        self._record(p + "attention_norm", x)
        q = k_ops.linear(x, w[p + "attention.wq.weight"]).reshape(1, T, H, HD)  # (1, T, H, HD)
        q = k_ops.rms_norm(q, w[p + "attention.q_norm.weight"], a.norm_eps)
        heads = np.zeros((1, T, H, HD), h.dtype)  # (1, T, H, HD): zero for a position that sees no image
        for group in sorted(set(seen)):
            rows = np.array([t for t in range(T) if seen[t] == group])
            if group:
                # The seen images' own tiles (every token of each), not their empty slots.
                parts = [slice(0, len(ip.tiles[j]) * N) for j in group]
                gk = np.concatenate([keys[j, s] for j, s in zip(group, parts)])[None]  # (1, K, KVH, HD)
                gv = np.concatenate([values[j, s] for j, s in zip(group, parts)])[None]
            elif ip.rule == "hf":
                # transformers: a row without an image attends evenly to every image token of every slot.
                gk, gv = keys.reshape(1, n * SN, *keys.shape[2:]), values.reshape(1, n * SN, *values.shape[2:])
            else:
                continue  # Meta: the attention output of this row is multiplied by zero
            heads[:, rows] = attend_all(k_ops, q[:, rows], gk, gv)
        self._record(p + "attention.heads", heads)
        out = k_ops.linear(heads.reshape(1, T, H * HD), w[p + "attention.wo.weight"])  # (1, T, D)
        # Gated residual: tanh(gate_attn) scales what the images add.
        h = h + np.tanh(w[p + "gate_attn"].astype(h.dtype)) * out
        self._record(p + "attention_residual", h)
        # Feed-forward (SwiGLU), zeroed for positions that see no image, gated by tanh(gate_ffwd).
        x = k_ops.rms_norm(h, w[p + "ffn_norm.weight"], a.norm_eps)  # (1, T, D)
        gate = k_ops.linear(x, w[p + "feed_forward.w1.weight"])  # (1, T, F)
        up = k_ops.linear(x, w[p + "feed_forward.w3.weight"])  # (1, T, F)
        out = k_ops.linear(k_ops.swiglu(gate, up), w[p + "feed_forward.w2.weight"])  # (1, T, D)
        h = h + np.tanh(w[p + "gate_ffwd"].astype(h.dtype)) * (out * has_image[None, :, None])
        self._record(p + "residual", h)
        return h

    # ---- generation with images -----------------------------------------------------------------------
    def prompt_ids(self, prompt, images: Sequence) -> list[int]:
        """Token ids of a completion prompt with images (Meta's encode_content for the base models): text with
        one "<|image|>" per image where it stands, or, without any, the images first and then the text; each
        text piece is encoded on its own. Ids (a list of ints) are taken as they are."""
        image_id = self.vision.image_token_id
        if not isinstance(prompt, str):
            return [int(t) for t in prompt]
        if self.tokenizer is None:
            raise InputError("this model has no tokenizer: pass token ids (with the image token "
                             f"{image_id} where each image stands) instead of text")
        pieces = prompt.split("<|image|>")
        if len(pieces) == 1:
            pieces = [""] * len(images) + pieces
        ids = self.tokenizer.encode("", bos=True)
        for k, piece in enumerate(pieces):
            if k:
                ids.append(image_id)
            if piece:
                ids += self.tokenizer.encode(piece, bos=False)
        return ids

    def generate(self, prompt, max_new_tokens: int = 32, *, images: "Sequence | None" = None, rule: str = "meta",
                 **kwargs):
        """GenerationMixin.generate with images: `images` (paths, PIL images, arrays or ImageTiles) go with
        one prompt, one <|image|> each (see prompt_ids); rule picks whose cross-attention masks to follow
        ("meta", default, or "hf", see the module docstring). Without images it is the text model's generate
        (the cross-attention blocks are skipped)."""
        if not images and not (isinstance(prompt, str) and "<|image|>" in prompt) and (
                isinstance(prompt, str) or not any(int(t) == self.vision.image_token_id for t in np.ravel(prompt))):
            self.attach_images([], [])
            return super().generate(prompt, max_new_tokens, **kwargs)
        if isinstance(prompt, (list, tuple)) and prompt and not isinstance(prompt[0], (int, np.integer)):
            raise InputError("images go with one prompt, not a batch of prompts")
        ids = self.prompt_ids(prompt, images or [])
        self.attach_images(images or [], ids, rule=rule)
        return self._run_ids(ids, max_new_tokens, kwargs)

    def stream(self, prompt, max_new_tokens: int = 32, *, images: "Sequence | None" = None, rule: str = "meta",
               **kwargs):
        """GenerationMixin.stream with images, as generate takes them."""
        from ..generation.generate import Stream
        if not images:
            self.attach_images([], [])
            return super().stream(prompt, max_new_tokens, **kwargs)
        ids = self.prompt_ids(prompt, images)
        self.attach_images(images, ids, rule=rule)
        row, = self._rows([None], max_new_tokens=max_new_tokens, prompt_ids=[ids], **kwargs)
        return Stream(self, row)

    def chat(self, messages, max_new_tokens: int = 256, *, system: Optional[str] = None, rule: str = "meta",
             stream: bool = False, **kwargs):
        """GenerationMixin.chat where a message's content may hold image parts ({"type": "image", "image": path
        | PIL.Image | array}), through the model's chat template or Meta's Llama 3.2 Vision format
        (llama_ref.text.chat.vision_chat_prompt)."""
        from ..generation.generate import Stream, _as_messages
        from ..text.chat import IMAGE_TOKEN_ID, vision_chat_prompt
        if self.tokenizer is None:
            raise InputError("this model has no tokenizer, so it has no chat format")
        messages = _as_messages(messages)
        if system is not None:
            messages = [{"role": "system", "content": system}] + messages
        vp = vision_chat_prompt(self.tokenizer, messages)  # the model's template, else Meta's format
        ids = [self.vision.image_token_id if t == IMAGE_TOKEN_ID else t for t in vp.ids]  # the same for 128256 vocab
        self.attach_images(vp.images, ids, rule=rule)
        if stream:
            row, = self._rows([None], max_new_tokens=max_new_tokens, prompt_ids=[ids], **kwargs)
            return Stream(self, row)
        return self._run_ids(ids, max_new_tokens, kwargs)

    def _run_ids(self, ids: list[int], max_new_tokens: int, kwargs: dict):
        from ..generation.generate import _decode
        row, = self._rows([None], max_new_tokens=max_new_tokens, prompt_ids=[ids], **kwargs)
        for _ in _decode(self, [row]):
            pass
        return row.result()

    # ---- tokens ------------------------------------------------------------------------------------------
    def _check_tokens(self, tokens: np.ndarray, start_pos: int) -> np.ndarray:
        """The text model's checks, with the learnable embeddings' ids (vocab_size .. +7) allowed."""
        tokens = np.asarray(tokens)
        V = self.args.vocab_size
        extra = (tokens >= V) & (tokens < V + LEARNABLE_EMBEDDINGS) if tokens.dtype.kind in "iu" else False
        checked = super()._check_tokens(np.where(extra, 0, tokens), start_pos)
        return np.where(np.reshape(extra, checked.shape), np.reshape(tokens, checked.shape), checked)
