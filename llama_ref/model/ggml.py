"""llama.cpp's quantized arithmetic, written out in NumPy: the specification of `arithmetic="ggml"`.

In the default ("exact") arithmetic a quantized weight is widened to float32 and multiplied with the float32
activations. ggml's CPU backend does something else, and this module says exactly what, one short function
per ggml routine (the names are ggml's; file references are to ggml/src/ in llama.cpp):

1. The activation row is itself quantized, 32 values at a time, to the block type ggml pairs with the weight
   type (type_traits_cpu[...].vec_dot_type in ggml-cpu/ggml-cpu.c):
       Q8_0, Q4_0, Q5_0 weights  x Q8_0 activations   (quantize_row_q8_0)
       Q4_1, Q5_1 weights        x Q8_1 activations   (quantize_row_q8_1: Q8_0 plus s = d * sum(q))
       F16 weights               x F16 activations    (the row rounded to fp16)
       Q4_K, Q5_K, Q6_K weights  x Q8_K activations   (256 values per block: model/ggml_kquants.py)
2. Each 32-value block contributes an integer dot product of the two blocks' quants, exact in int32.
3. The integers are scaled by the product of the two blocks' fp16 scales (a float32 product) and summed in
   float32, in the order of the SIMD code that runs on an x86 CPU with AVX2 (ggml-cpu/arch/x86/quants.c):
   8 float32 lanes, lane j holding the integer sum of products 4j .. 4j+3 of every block, each block added
   with one fused multiply-add per lane, then the lanes added pairwise (hsum_float_8). Q4_0 matrices are
   repacked by llama.cpp (ggml-cpu/repack.cpp, ggml_gemv_q4_0_8x8_q8_0) and sum each block's 32 products as
   one integer before the multiply-add: one lane.

Rounding rules, all of them:
- fp16 scales: float32 -> fp16 rounds to nearest, ties to even (F16C's vcvtps2ph; NumPy's astype(float16)).
- Q8_0/Q8_1 activations (x86 quantize_row_q8_0, NOT the scalar quantize_row_q8_0_ref that gguf.quants
  mirrors): d = amax / 127 and id = 127 / amax, both float32; q = x * id rounded to nearest, ties to EVEN
  (_mm256_round_ps); the block keeps fp16(d). The scalar reference instead multiplies by 1 / d and rounds
  ties away from zero (roundf); both are here, the reference one for the weights' own quantization.
- A fused multiply-add rounds once: fma() below computes float32(a * b + c) with one rounding, exactly
  (float64 with round-to-odd), as the Numba twin's llvm.fma.f32 (the CPU's vfmadd) does.

Outside the products, ggml mode follows llama.cpp's CPU graph where it reaches the logits (measured in
docs/verification.md): RMSNorm sums squares in float64 and multiplies by 1/sqrtf(mean + eps); the KV cache
is fp16 (llama.cpp's default type_k = type_v = F16), so keys and values are rounded to fp16, and the queries
too (ggml multiplies an F16 matrix with F16 rows); softmax(scale * q.k) sums exp in float64 and multiplies by
the reciprocal; the probabilities are rounded to fp16 for the product with the fp16 values; RoPE angles are
p * theta_scale^i with theta_scale = powf(base, -2/n_dims), the power built by repeated float32
multiplication as ggml_rope_cache_init does.

Which x86 build is mirrored (ISA, below). llama.cpp compiles its CPU backend for one instruction set, and
outside the quantized products (whose integers are exact and whose float order is the AVX2 code's on both)
the vector width changes the order of three float32 computations: ggml_vec_dot_f16 (attention), the sums of
ggml's softmax, and ggml_v_expf (softmax, SiLU), a different polynomial evaluation at each width:
    "avx512"  a build with AVX-512 F and DQ: 16-lane vectors (measured against llama.cpp on an Intel CPU
              with AVX-512 VNNI: tests/data/llamacpp_ggml_logits.npz)
    "avx2"    a build with AVX2 and FMA only: 8-lane vectors (measured on an AMD EPYC znver3:
              tests/data/llamacpp_ggml_logits_avx2.npz)
The two builds' logits differ (docs/verification.md, section 5). ISA defaults to what this host would run
(host_isa(); LLAMA_REF_GGML_ISA=avx2 or avx512 chooses), and every function that depends on it also takes
`isa` to compute either order on any CPU.

This module is itself a backend (the functions of llama_ref.model.ops with their signatures), used by
llama_ref.load(..., arithmetic="ggml", backend="numpy"); kernels/ggml.py is its Numba twin.
"""

from __future__ import annotations

import os

import numpy as np

from ..errors import InputError
from . import ops

QK = 32  # values per block of Q8_0 / Q8_1 / Q4_0 / Q4_1 / Q5_0 / Q5_1
LANES = 8  # float32 lanes of an AVX2 register: the partial sums of ggml's x86 dot products
TILE = 4096  # weight rows per step of linear(): bounds the int32 temporaries to ~TILE * K * 4 bytes
ISAS = ("avx512", "avx2")  # the x86 builds of llama.cpp whose arithmetic this module can mirror


def host_isa() -> str:
    """The build of llama.cpp's CPU backend this host runs at its best: "avx512" where the CPU has AVX-512 F
    and DQ (llama.cpp's condition for its 16-lane expf, softmax and SiLU), else "avx2" (any other x86 CPU
    with AVX2 and FMA; elsewhere llama.cpp runs other code, which this module does not claim to mirror).
    LLAMA_REF_GGML_ISA overrides it."""
    chosen = os.environ.get("LLAMA_REF_GGML_ISA", "")
    if chosen:
        if chosen not in ISAS:
            raise InputError(f"LLAMA_REF_GGML_ISA must be one of {ISAS}, got {chosen!r}")
        return chosen
    try:  # NumPy's own run-time CPU detection
        from numpy._core._multiarray_umath import __cpu_features__ as features
    except ImportError:
        features = {}
    return "avx512" if features.get("AVX512F") and features.get("AVX512DQ") else "avx2"


ISA = host_isa()  # the build mirrored when a function's `isa` is None; a caller may set it


def _isa(isa: "str | None") -> str:
    isa = ISA if isa is None else isa
    if isa not in ISAS:
        raise InputError(f"isa must be one of {ISAS}, got {isa!r}")
    return isa


def fp16(x: np.ndarray) -> np.ndarray:
    """Round float32 to the nearest fp16 (ties to even) and back: GGML_CPU_FP32_TO_FP16 then FP16_TO_FP32."""
    with np.errstate(over="ignore"):  # past 65504 fp16 is inf, as in ggml
        return np.asarray(x, np.float32).astype(np.float16).astype(np.float32)


def fma(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """float32 a * b + c rounded once (vfmadd), exactly. The product of two float32 is exact in float64; the
    float64 sum s = p + c is rounded, but to odd (TwoSum's error e says which way s was rounded; if s is
    inexact and its last bit even, it moves one ulp towards e): a number rounded to odd with 53 >= 24 + 2
    bits rounds to float32 as the exact sum would, so there is one rounding in effect, never two."""
    a, b, c = (np.asarray(v, np.float32).astype(np.float64) for v in (a, b, c))
    p = a * b  # exact
    s = p + c
    t = s - p
    e = (p - (s - t)) + (c - t)  # TwoSum: p + c = s + e exactly
    step = np.isfinite(s) & (e != 0) & ((s.view(np.int64) & 1) == 0)
    s = np.where(step, np.nextafter(s, np.where(e > 0, np.inf, -np.inf)), s)
    return s.astype(np.float32)


# ---- activations: quantize_row_q8_0 / q8_1 -----------------------------------------------------------------

def quantize_row_q8_0(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x86 quantize_row_q8_0 (ggml-cpu/arch/x86/quants.c). x (N, K) float32, K % 32 == 0.

    Returns d (N, K/32) float32 holding fp16 values, and q (N, K/32, 32) int8 with x ~ d * q.
    """
    N, K = x.shape
    blocks = np.asarray(x, np.float32).reshape(N, K // QK, QK)  # (N, nb, 32)
    amax = np.abs(blocks).max(axis=2)  # (N, nb)
    d = amax / np.float32(127)  # float32, rounded to fp16 only when stored
    with np.errstate(divide="ignore"):
        inv = np.where(amax != 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)  # 127/amax, not 1/d
    q = np.rint(blocks * inv[:, :, None])  # (N, nb, 32) float32 product, rounded half to even
    return fp16(d), q.astype(np.int8)


def quantize_row_q8_1(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x86 quantize_row_q8_1: quantize_row_q8_0's d and q, plus s = fp16(d * sum(q)) per block with the
    float32 d before its fp16 rounding. x (N, K) -> d (N, nb), q (N, nb, 32) int8, s (N, nb) float32."""
    N, K = x.shape
    blocks = np.asarray(x, np.float32).reshape(N, K // QK, QK)
    amax = np.abs(blocks).max(axis=2)
    d = amax / np.float32(127)
    with np.errstate(divide="ignore"):
        inv = np.where(amax != 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    q = np.rint(blocks * inv[:, :, None])  # (N, nb, 32)
    s = d * q.sum(axis=2, dtype=np.int32).astype(np.float32)  # (N, nb) float32 product
    return fp16(d), q.astype(np.int8), fp16(s)


def quantize_row_q8_0_ref(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scalar quantize_row_q8_0_ref (ggml-quants.c), as gguf.quants and llama-quantize make Q8_0 weights:
    id = 1 / d (not 127 / amax) and roundf, ties away from zero. x (N, K) -> d (N, nb), q (N, nb, 32)."""
    N, K = x.shape
    blocks = np.asarray(x, np.float32).reshape(N, K // QK, QK)
    d = np.abs(blocks).max(axis=2) / np.float32(127)  # (N, nb)
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
    v = blocks * inv[:, :, None]  # (N, nb, 32)
    q = np.sign(v) * np.floor(np.abs(v) + np.float32(0.5))  # roundf
    return fp16(d), q.astype(np.int8)


# ---- weights as signed integers per block ------------------------------------------------------------------

def weight_blocks(w, rows: slice) -> tuple[np.ndarray, np.ndarray, "np.ndarray | None"]:
    """The quants of rows `rows` of a Q8_0 / Q4_0 / Q4_1 / Q5_0 / Q5_1 weight (llama_ref.weights.packed) as
    ggml's dot products read them: q (R, nb, 32) int8 in value order, d (R, nb) and m (R, nb) or None,
    float32 (fp16 values). Q4_0's and Q5_0's values are offset to -8..7 and -16..15 (ggml subtracts 8 or 16
    before multiplying); Q4_1's and Q5_1's stay 0..15 and 0..31, their offset m apart."""
    if w.format in ("q8_0", "q5_0", "q5_1"):  # one byte per value (Q5_0: q - 16, Q5_1: q), weights/packed.py
        q = w.qs[rows].view(np.int8)  # (R, K)
        return q.reshape(q.shape[0], -1, QK), w.d[rows], (w.m[rows] if w.format == "q5_1" else None)
    if w.format in ("q4_0", "q4_1"):
        b = w.qs[rows].reshape(-1, w.d.shape[1], QK // 2)  # (R, nb, 16): value j low nibble, j + 16 high
        q = np.concatenate([b & np.uint8(15), b >> np.uint8(4)], axis=2).astype(np.int8)  # (R, nb, 32)
        if w.format == "q4_0":
            return q - np.int8(8), w.d[rows], None
        return q, w.d[rows], w.m[rows]
    raise TypeError(f"no ggml dot product for {w.format}")


def block_dots(wq: np.ndarray, xq: np.ndarray, lanes: int) -> np.ndarray:
    """Integer dot products of every weight row with every activation row, per block and per lane.

    wq (R, nb, 32) and xq (N, nb, 32) int8 -> (N, R, nb, lanes) int32; lane j sums products
    j * 32/lanes .. (j + 1) * 32/lanes - 1 of the block (vpdpbusd / vpmaddubsw + vpmaddwd), exactly.
    """
    R, nb, _ = wq.shape
    N = xq.shape[0]
    w4 = wq.reshape(R, nb, lanes, QK // lanes).astype(np.int32)
    x4 = xq.reshape(N, nb, lanes, QK // lanes).astype(np.int32)
    return np.einsum("rblk,nblk->nrbl", w4, x4)  # int32: |sum| <= 32 * 128 * 127


def hsum_float_8(acc: np.ndarray) -> np.ndarray:
    """hsum_float_8: 8 lanes (..., 8) -> (...,) as (lane i + lane i+4), then (0 + 2) and (1 + 3), then the two."""
    r = acc[..., :4] + acc[..., 4:]  # (..., 4)
    r = r[..., :2] + r[..., 2:]  # (..., 2)
    return r[..., 0] + r[..., 1]


def vec_dot_lanes(sumi: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """The float32 sum of one row's blocks: acc[lane] = fma(scale[b], sumi[b, lane], acc[lane]) block after
    block, then the lanes added (hsum_float_8; one lane is its own sum). sumi (N, R, nb, L) int32, scale
    (N, R, nb) float32 -> (N, R) float32."""
    N, R, nb, L = sumi.shape
    acc = np.zeros((N, R, L), np.float32)
    q = sumi.astype(np.float32)  # exact: |sumi| < 2^24
    for b in range(nb):
        acc = fma(scale[:, :, b, None], q[:, :, b], acc)  # (N, R, L)
    return acc[..., 0] if L == 1 else hsum_float_8(acc)


def ggml_vec_dot_q8_0_q8_0(wq, wd, xq, xd) -> np.ndarray:
    """Q8_0 weights (R, nb, 32), (R, nb) by Q8_0 activations (N, nb, 32), (N, nb) -> (N, R): 8 lanes."""
    scale = wd[None, :, :] * xd[:, None, :]  # (N, R, nb) float32: fp16(x.d) * fp16(y.d)
    return vec_dot_lanes(block_dots(wq, xq, LANES), scale)


def ggml_gemv_q4_0_8x8_q8_0(wq, wd, xq, xd) -> np.ndarray:
    """Q4_0 weights (q - 8 in -8..7) by Q8_0 activations -> (N, R), as llama.cpp's repacked Q4_0 (x86 AVX2
    gemv) sums: each block's 32 products as one integer, fma(d_w * d_x, sumi, acc) block after block."""
    scale = wd[None, :, :] * xd[:, None, :]  # (N, R, nb)
    return vec_dot_lanes(block_dots(wq, xq, 1), scale)


def ggml_vec_dot_q4_0_q8_0(wq, wd, xq, xd) -> np.ndarray:
    """Q4_0 by Q8_0 when the matrix is not repacked (rows not a multiple of 8): the 8-lane order of Q8_0."""
    return ggml_vec_dot_q8_0_q8_0(wq, wd, xq, xd)


def ggml_vec_dot_q4_1_q8_1(wq, wd, wm, xq, xd, xs) -> np.ndarray:
    """Q4_1 (q 0..15, d, m) or Q5_1 (ggml_vec_dot_q5_1_q8_1: q 0..31) by Q8_1 (q, d, s) -> (N, R):
    sum_b d_w d_x sumi_b over 8 lanes, plus the offsets sum_b m_w * s_x summed in float32 separately
    (`summs`, contracted to an FMA by the compiler), added last."""
    scale = wd[None, :, :] * xd[:, None, :]  # (N, R, nb)
    main = vec_dot_lanes(block_dots(wq, xq, LANES), scale)
    summs = np.zeros(main.shape, np.float32)
    for b in range(wd.shape[1]):
        summs = fma(wm[None, :, b], xs[:, None, b], summs)  # m * s, both fp16 values
    return main + summs


# ---- the backend: llama_ref.model.ops's functions in ggml's arithmetic -------------------------------------

# ggml_vec_dot_q5_0_q8_0 is ggml_vec_dot_q8_0_q8_0 on the values q - 16 (the same 8 lanes, the same FMAs).
DOTS = {"q8_0": ggml_vec_dot_q8_0_q8_0, "q4_0": ggml_gemv_q4_0_8x8_q8_0, "q5_0": ggml_vec_dot_q8_0_q8_0}


def quantized_linear(x2: np.ndarray, w) -> np.ndarray:
    """x2 (N, K) float32 @ w.T for a Q8_0 / Q4_0 / Q4_1 / Q5_0 / Q5_1 weight w (R, K), in ggml's arithmetic;
    Q4_K / Q5_K / Q6_K in model/ggml_kquants.py."""
    if w.format in ("q4_k", "q5_k", "q6_k"):  # 256-value super-blocks by Q8_K activations: their own module
        from . import ggml_kquants
        return ggml_kquants.quantized_linear(x2, w)
    R = w.shape[0]
    out = np.empty((x2.shape[0], R), np.float32)
    if w.format in ("q4_1", "q5_1"):  # the types with an offset m pair with Q8_1 (its s = d * sum(q))
        xd, xq, xs = quantize_row_q8_1(x2)
        for r0 in range(0, R, TILE):
            wq, wd, wm = weight_blocks(w, slice(r0, r0 + TILE))
            out[:, r0:r0 + TILE] = ggml_vec_dot_q4_1_q8_1(wq, wd, wm, xq, xd, xs)
        return out
    xd, xq = quantize_row_q8_0(x2)  # (N, nb), (N, nb, 32)
    dot = DOTS[w.format]
    if w.format == "q4_0" and R % 8:
        dot = ggml_vec_dot_q4_0_q8_0  # llama.cpp repacks Q4_0 only when the rows come in groups of 8
    for r0 in range(0, R, TILE):
        wq, wd, _ = weight_blocks(w, slice(r0, r0 + TILE))
        out[:, r0:r0 + TILE] = dot(wq, wd, xq, xd)
    return out


def supported(w) -> bool:
    """Whether ggml mode multiplies by this weight in integers (else: as in exact mode, see linear)."""
    return getattr(w, "format", None) in ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k", "q5_k", "q6_k")


def linear(x: np.ndarray, w) -> np.ndarray:
    """x @ w.T, w stored (out, in), in ggml's arithmetic. x (..., in) -> (..., out).

    Q8_0 / Q4_0 / Q4_1: quantized activations and integer block sums (above). F16: the row rounded to fp16
    first (ggml's F16 x F16 product; the products of two fp16 are exact in float32). Float32 weights: the
    float32 product, as in exact mode. Other stored formats are refused when the model loads.
    """
    rows = np.ascontiguousarray(x.reshape(-1, x.shape[-1]), dtype=np.float32)  # (N, in)
    if supported(w):
        out = quantized_linear(rows, w)
    elif getattr(w, "format", None) == "f16":
        out = ops.linear(fp16(rows), w)
    else:
        out = ops.linear(rows, w)
    return out.reshape(*x.shape[:-1], w.shape[0])


def embedding(tokens: np.ndarray, table, dtype) -> np.ndarray:
    """ggml_get_rows dequantizes the rows exactly as llama_ref.weights.packed does: unchanged."""
    return ops.embedding(tokens, table, dtype)


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """ggml_compute_forward_rms_norm_f32 then ggml_mul: mean = float32(sum(x*x in float64, in order) / n),
    y = x * (1 / sqrtf(mean + eps)) * weight, each step rounded to float32. x (..., D)."""
    sq = np.square(x, dtype=np.float32).astype(np.float64)  # the float32 product, widened
    total = np.cumsum(sq, axis=-1)[..., -1:]  # (..., 1): added one after another, as ggml's loop (not pairwise)
    mean = (total / x.shape[-1]).astype(np.float32)  # (..., 1)
    scale = np.float32(1) / np.sqrt(mean + np.float32(eps))  # float32 sqrt and division
    return (x * scale) * weight.astype(np.float32, copy=False)


def rope_frequencies(args, freq_divisors=None) -> np.ndarray:
    """As exact mode (the tables below recompute the angles the way ggml does)."""
    return ops.rope_frequencies(args, freq_divisors)


def rope_scale_factors(freqs: np.ndarray) -> tuple[np.float32, np.ndarray]:
    """ggml's theta_scale (float32) and the per-pair factors (HD/2,) float32 that divide the angle, from the
    float64 frequencies of rope_frequencies: theta_scale is their ratio, the factors what remains (1 for
    plain RoPE; Llama 3.1's rope_freqs otherwise)."""
    n = freqs.shape[0]
    theta_scale = np.float32(freqs[1] / freqs[0]) if n > 1 else np.float32(1)
    factor = (float(theta_scale) ** np.arange(n) / freqs).astype(np.float32)  # (HD/2,)
    factor[np.abs(factor - 1) < 1e-5] = 1  # plain RoPE: the two series differ by float rounding only
    return theta_scale, factor


def _c_math_library():
    """The C library's cosf and sinf, the functions ggml_rope_cache_init calls; None where none is found."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("m")
    try:
        lib = ctypes.CDLL(name)
        cos_f, sin_f = lib.cosf, lib.sinf
    except (OSError, AttributeError, TypeError):
        return None
    for f in (cos_f, sin_f):
        f.restype, f.argtypes = ctypes.c_float, [ctypes.c_float]
    return cos_f, sin_f


_LIBM = _c_math_library()


def cosf(x: np.float32) -> np.float32:
    """The C library's cosf, as llama.cpp calls it. glibc's is not correctly rounded: it differs by one ulp
    from the float32-rounded cosine at ~2.6% of angles (glibc 2.36), and a RoPE table one ulp off can change
    llama.cpp's logits (docs/verification.md, section 5b). Without a C math library: the correctly rounded
    value. The Numba twin calls the same function (math.cos on a float32 compiles to a call of cosf)."""
    return np.float32(_LIBM[0](float(x))) if _LIBM else np.float32(np.cos(np.float64(x)))


def sinf(x: np.float32) -> np.float32:
    """The C library's sinf (see cosf)."""
    return np.float32(_LIBM[1](float(x))) if _LIBM else np.float32(np.sin(np.float64(x)))


def rope_tables(freqs: np.ndarray, start_pos: int, length: int, dtype) -> tuple[np.ndarray, np.ndarray]:
    """ggml_rope_cache_init: for position p, theta_i = p * theta_scale^i built by float32 multiplication
    (theta *= theta_scale), theta_scale = powf(base, -2/n_dims), divided by the model's frequency factor;
    cos and sin by the C library's cosf and sinf (glibc's are not correctly rounded). freqs (HD/2,) float64
    from rope_frequencies: theta_scale is its ratio and the per-pair factors are what remains of it (1 for
    plain RoPE). Returns cos, sin (T, HD/2)."""
    theta_scale, factor = rope_scale_factors(freqs)
    n = freqs.shape[0]
    cos = np.empty((length, n), np.float32)
    sin = np.empty((length, n), np.float32)
    for t in range(length):
        theta = np.float32(start_pos + t)
        for i in range(n):
            angle = np.float32(theta / factor[i]) if factor[i] != 1 else theta
            cos[t, i], sin[t, i] = cosf(angle), sinf(angle)
            theta = np.float32(theta * theta_scale)
    return cos.astype(dtype, copy=False), sin.astype(dtype, copy=False)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """rotate_pairs (ggml-cpu/ops.cpp) as GCC compiles it (floating-point contraction on): each pair (x0, x1)
    becomes (fma(x0, cos, -(x1 sin)), fma(x0, sin, x1 cos)), one product fused. x (B, T, n, HD), cos, sin
    (T, HD/2) -> x's shape. (Fusing the other product, or none, was measured to break bit-equality.)"""
    pairs = x.reshape(*x.shape[:-1], -1, 2)  # (B, T, n, HD/2, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    c, s = cos[:, None, :], sin[:, None, :]  # (T, 1, HD/2)
    out = np.empty_like(pairs)
    out[..., 0] = fma(x0, c, -(x1 * s))
    out[..., 1] = fma(x0, s, x1 * c)
    return out.reshape(x.shape)


def reduce_add_16(v: np.ndarray) -> np.ndarray:
    """_mm512_reduce_add_ps (GCC): 16 lanes (..., 16) -> (...,): halves added, 16 -> 8 -> 4, then
    (0 + 2, 1 + 3), then the two."""
    v = v[..., :8] + v[..., 8:]
    v = v[..., :4] + v[..., 4:]
    v = v[..., :2] + v[..., 2:]
    return v[..., 0] + v[..., 1]


def reduce_add_8(v: np.ndarray) -> np.ndarray:
    """The end of GGML_F32x8_REDUCE (AVX, ggml-cpu/simd-mappings.h): 8 lanes (..., 8) -> (...,): the two
    128-bit halves added (lane i + lane i+4), then _mm_hadd_ps twice: (0 + 1) + (2 + 3). (hsum_float_8, which
    quants.c and the AVX2 softmax use, adds (0 + 2) + (1 + 3) instead.)"""
    r = v[..., :4] + v[..., 4:]
    return (r[..., 0] + r[..., 1]) + (r[..., 2] + r[..., 3])


def ggml_vec_dot_f16(x: np.ndarray, y: np.ndarray, isa: "str | None" = None) -> np.ndarray:
    """ggml_vec_dot_f16 (ggml-cpu/vec.cpp): x, y (..., n) float32 holding fp16 values -> (...,) float32.

    Four accumulators of L lanes (GGML_F16_EPR: L = 16 on AVX-512, 8 on AVX2; GGML_F16_STEP = 4 L): element
    i < n - n % 4L goes to accumulator (i % 4L) // L, lane i % L, added in order of i (an FMA of an exact
    fp16 x fp16 product: one float32 rounding); then accumulators 0 + 2 and 1 + 3, their sum, and its lanes
    (reduce_add_16 or reduce_add_8) into a float64 sum; the last n % 4L products are added to it one by one
    in float64, and the sum is rounded to float32."""
    lanes = 16 if _isa(isa) == "avx512" else 8
    step = 4 * lanes
    x, y = np.broadcast_arrays(x, y)
    n = x.shape[-1]
    m = n - n % step
    p = x[..., :m] * y[..., :m]  # (..., m) exact in float32
    p = p.reshape(*p.shape[:-1], m // step, 4, lanes)  # (..., steps, 4 accumulators, lanes)
    acc = np.zeros(p.shape[:-3] + (4, lanes), np.float32)
    for s in range(m // step):
        acc = acc + p[..., s, :, :]
    a = acc[..., 0, :] + acc[..., 2, :]
    b = acc[..., 1, :] + acc[..., 3, :]
    total = (reduce_add_16 if lanes == 16 else reduce_add_8)(a + b).astype(np.float64)
    for i in range(m, n):  # leftovers: sumf += (ggml_float)(x[i] * y[i])
        total = total + (x[..., i] * y[..., i]).astype(np.float64)
    return total.astype(np.float32)


def _c(h: str) -> np.float32:
    return np.float32(float.fromhex(h))


def _bits(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, np.float32).view(np.uint32)


def _float(bits: np.ndarray) -> np.ndarray:
    return np.asarray(bits, np.uint32).view(np.float32)


def ggml_v_expf(x: np.ndarray, isa: "str | None" = None) -> np.ndarray:
    """ggml_v_expf (ggml-cpu/vec.h): exp(x) in float32 by a degree-5 polynomial on the reduced argument
    b = x - n ln 2, n = round(x / ln 2). Every FMA rounds once. The two x86 versions evaluate it differently:

    avx512: j = 1 + b c1 + ... (the 1 inside the polynomial's last FMA), result j * 2^n (vscalefps, one
            rounding); |n| > 192 gives 0 or inf.
    avx2:   j = b c1 + ... WITHOUT the 1 (c1 b a plain product), result fma(j, k, k) = k (1 + j) rounded once,
            k = 2^n built in the exponent bits of z; for 126 < |n| <= 192 the scaling is split in two
            (s2 (1 + j) rounded, then times s1, so a subnormal result is rounded twice); |n| > 192: s1 * s1,
            0 or inf. The same j and b, so the two differ by the last roundings only.
    A NaN argument comes back as itself (x86 passes the first NaN operand through every step)."""
    x = np.asarray(x, np.float32)
    with np.errstate(invalid="ignore", over="ignore", under="ignore"):
        r = _c("0x1.8p23")
        z = fma(x, _c("0x1.715476p+0"), r)
        n = z - r
        b = fma(-n, _c("0x1.7f7d1cp-20"), fma(-n, _c("0x1.62e4p-1"), x))
        u = b * b
        p = fma(fma(_c("0x1.0e4020p-7"), b, _c("0x1.573e2ep-5")), u, fma(_c("0x1.555e66p-3"), b, _c("0x1.fffdb6p-2")))
        if _isa(isa) == "avx512":
            j = fma(p, u, fma(_c("0x1.ffffecp-1"), b, np.float32(1)))
            res = np.ldexp(j, np.nan_to_num(n, nan=0, posinf=0, neginf=0).astype(np.int32)).astype(np.float32)
            big = np.abs(n) > 192  # also x = -inf (n = -inf)
            res = np.where(big, np.where(n <= 0, np.float32(0), np.float32(np.inf)), res)
            return np.where(np.isnan(x), x, res).astype(np.float32)
        j = fma(p, u, _c("0x1.ffffecp-1") * b)
        e = _bits(z) << np.uint32(23)  # n in the exponent field (z = 1.5 * 2^23 + n: n in its low bits)
        k = _float(e + _bits(np.float32(1)))  # 2^n for |n| <= 126
        g = np.where(n <= 0, np.uint32(0x82000000), np.uint32(0))  # split 2^n = s2 * s1 when 126 < |n|
        s1 = _float(g + np.uint32(0x7F000000))  # 2^-125 (n <= 0) or 2^127
        s2 = _float(e - g)
        out = fma(k, j, k)  # |n| <= 126
        out = np.where(np.abs(n) > 126, fma(s2, j, s2) * s1, out)
        out = np.where(np.abs(n) > 192, s1 * s1, out)
        return np.where(np.isnan(x), x, out).astype(np.float32)


def ggml_vec_soft_max_f32(x: np.ndarray, row_max: np.ndarray, isa: "str | None" = None):
    """ggml_vec_soft_max_f32 (ggml-cpu/vec.cpp) over the last axis (a multiple of 16 long): e = ggml_v_expf(x -
    max), and the float64 sum of the float32 sums of its vectors (16 lanes by _mm512_reduce_add_ps on
    AVX-512, 8 in hsum_float_8's order on AVX2), vector after vector. x (..., S), row_max (..., 1) ->
    e (..., S) float32, total (..., 1) float64."""
    isa = _isa(isa)
    e = ggml_v_expf(x - row_max, isa)  # (..., S)
    if isa == "avx512":
        chunks = reduce_add_16(e.reshape(*e.shape[:-1], -1, 16))  # (..., S/16)
    else:
        chunks = hsum_float_8(e.reshape(*e.shape[:-1], -1, 8))  # (..., S/8)
    chunks = chunks.astype(np.float64)
    total = np.zeros(e.shape[:-1] + (1,), np.float64)
    for c in range(chunks.shape[-1]):
        total[..., 0] += chunks[..., c]
    return e, total


def soft_max(scores: np.ndarray, scale: np.float32, visible: np.ndarray, isa: "str | None" = None) -> np.ndarray:
    """ggml_compute_forward_soft_max_f32 over the last axis (a multiple of 16 long): x * scale + mask
    (0 or -inf), ggml_vec_soft_max_f32 with the row maximum, times float32(1 / sum)."""
    w = np.where(visible, scores * scale, np.float32(-np.inf))
    e, total = ggml_vec_soft_max_f32(w, w.max(axis=-1, keepdims=True), isa)
    return e * (1.0 / total).astype(np.float32)


# What the KV cache holds (Transformer.new_cache, model/cache.py): llama.cpp's default cache type is F16, so keys
# and values are rounded to fp16 as they are stored. attention() below rounds them again, which changes nothing
# for them (fp16 values are their own rounding) and keeps it right for any k, v it is handed.
cache_values = fp16
# ... held in float16 arrays (KVCache's storage): an fp16 value is a float16 number, so nothing is lost, the cache
# takes half the memory, and a decode at a long context reads half the bytes (kernels/ggml_step.py reads them in
# place). attention() widens them to float32 first, as ggml_vec_dot_f16 does.
cache_storage = np.float16


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, start_pos: int,
              key_mask: "np.ndarray | None" = None, isa: "str | None" = None) -> np.ndarray:
    """llama.cpp's attention without flash attention, over an F16 KV cache, as its one-token decode sums.

    q (B, T, H, HD), k, v (B, S, KVH, HD) -> (B, T, H, HD). K and V are rounded to fp16 (the cache type) and
    q too (ggml_mul_mat of an F16 matrix converts the other operand to F16): q.k by ggml_vec_dot_f16, scaled
    after the product (ggml_soft_max_ext's scale), softmax as ggml's; the probabilities are rounded to fp16
    and multiplied with each column of the fp16 values (llama.cpp keeps V transposed) by ggml_vec_dot_f16.
    The keys are padded with masked zeros to a multiple of 64, as llama.cpp's cache view is (n_kv).
    """
    isa = _isa(isa)
    B, T, H, HD = q.shape
    S, KVH = k.shape[1], k.shape[2]
    G = H // KVH
    P = -(-S // 64) * 64  # n_kv: the cache view, padded
    kp = np.zeros((B, P, KVH, HD), np.float32)
    vp = np.zeros((B, P, KVH, HD), np.float32)
    kp[:, :S], vp[:, :S] = fp16(k), fp16(v)
    qg = fp16(q).reshape(B, T, KVH, G, 1, HD).transpose(0, 2, 3, 1, 4, 5)  # (B, KVH, G, T, 1, HD)
    kk = kp.transpose(0, 2, 1, 3)[:, :, None, None]  # (B, KVH, 1, 1, P, HD)
    scores = ggml_vec_dot_f16(qg, kk, isa)  # (B, KVH, G, T, P)
    visible = np.arange(P)[None, :] <= (start_pos + np.arange(T))[:, None]  # (T, P)
    if key_mask is not None:
        km = np.zeros((B, P), bool)
        km[:, :S] = key_mask
        visible = (visible[None] & km[:, None, :])[:, None, None]  # (B, 1, 1, T, P)
    probs = fp16(soft_max(scores, np.float32(1 / np.sqrt(HD)), visible, isa))  # (B, KVH, G, T, P)
    if key_mask is not None:
        probs = np.nan_to_num(probs)  # a padding query that sees no key: zeros, not NaN
    vt = vp.transpose(0, 2, 3, 1)[:, :, None, None]  # (B, KVH, 1, 1, HD, P): V transposed
    out = ggml_vec_dot_f16(probs[:, :, :, :, None, :], vt, isa)  # (B, KVH, G, T, HD)
    return out.transpose(0, 3, 1, 2, 4).reshape(B, T, H, HD)


def swiglu(gate: np.ndarray, up: np.ndarray, isa: "str | None" = None) -> np.ndarray:
    """ggml_vec_swiglu_f32: ggml_v_silu(gate) * up with ggml_v_silu(x) = x / (1 + ggml_v_expf(-x)), in vectors
    of 16 (AVX-512) or 8 (AVX2) values; the rows here are multiples of that long (ggml's scalar tail, with
    libm's expf, is not mirrored)."""
    g = np.asarray(gate, np.float32)
    return (g / (np.float32(1) + ggml_v_expf(-g, isa))) * up


# ---- choosing this arithmetic at load (llama_ref.load(..., arithmetic="ggml")) -------------------------------

def check_options(*, weights, dtype, parallel) -> str:
    """The `weights` choice for ggml mode, or an InputError for a load option it cannot honour."""
    if parallel is not None:
        raise InputError("arithmetic='ggml' runs in one process (parallel must be None)")
    if np.dtype(dtype) != np.float32:
        raise InputError(f"arithmetic='ggml' computes in float32, got dtype {np.dtype(dtype)}")
    if weights == "float32":
        raise InputError("arithmetic='ggml' multiplies the stored quantized blocks: weights must be 'packed' "
                         "(the default in this mode), not 'float32'")
    return "packed"


def backend_for(backend: str, weights: dict, where: str):
    """The module computing ggml's arithmetic for `backend` ("numpy": this one; "numba": kernels/ggml.py),
    once every matrix of `weights` is of a type it implements (else an InputError naming the tensor)."""
    for name, w in weights.items():
        fmt = "f32" if isinstance(w, np.ndarray) and w.dtype == np.float32 else getattr(w, "format", None)
        if getattr(w, "ndim", 0) == 2 and not supported(w) and fmt not in ("f16", "f32"):
            raise InputError(f"{where}: tensor {name} is {fmt or w.dtype}; arithmetic='ggml' implements "
                             f"Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K, F16 and F32 matrices")
    if backend == "numpy":
        import sys
        return sys.modules[__name__]
    if backend == "numba":
        from ..kernels import ggml as compiled  # imported lazily, like the exact Numba backend
        return compiled
    raise InputError(f"backend must be 'numpy' or 'numba', got {backend!r}")


__all__ = ["rms_norm", "linear", "embedding", "apply_rope", "attention", "swiglu", "rope_frequencies",
           "rope_tables", "cache_values", "cache_storage"]
