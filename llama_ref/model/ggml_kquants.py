"""llama.cpp's K-quant arithmetic (Q4_K, Q5_K, Q6_K weights by Q8_K activations), written out in NumPy.

The K-quant half of the specification of `arithmetic="ggml"` (llama_ref/model/ggml.py has the 32-value block
types and says what the mode is). File references are to ggml/src/ in the llama.cpp that llama-cpp-python
0.3.36 vendors, built for x86 (GCC, floating-point contraction on). Everything here is the same in a build for
AVX-512 (VNNI) and one for AVX2 only: both run these routines' AVX2 code (measured: every routine's output
bit for bit equal on the two builds); what differs between them is model/ggml.py's `isa`.

1. The activation row is quantized to Q8_K (type_traits_cpu[...].vec_dot_type = GGML_TYPE_Q8_K): 256 values
   per block, a float32 scale d (NOT fp16, unlike Q8_0), int8 quants, and bsums, the integer sums of each 16
   quants. quantize_row_q8_K in ggml-cpu/arch/x86/quants.c simply calls the scalar quantize_row_q8_K_ref
   (ggml-quants.c): there is no SIMD version on x86, so what differs from the x86 Q8_0 is the rule itself:
   the scale is signed by the value of largest magnitude, iscale = -127 / max, q = nearest_int(iscale * x)
   (ties to even, by the 1.5 * 2^23 trick) and d = 1 / iscale, where x86 Q8_0 takes 127 / amax and keeps
   fp16(amax / 127). A block of zeros keeps d = 0 and q = 0 (its bsums are left unwritten in ggml; they are
   multiplied by d = 0 there, 0 here).
2. The weights' sub-block scales stay integers: Q4_K and Q5_K have 6-bit scales sc and mins mn per 32
   values (and fp16 d, dmin per 256), Q6_K signed 8-bit scales per 16 values (and fp16 d). Every integer sum
   below is exact in int32, whatever order ggml adds it in; only where the integers meet the float scales is
   the order ggml's, and that is what each function writes out.
3. Which routine runs on the one-token path (the only path this mode mirrors, see model/ggml.py):
       Q4_K, rows % 8 == 0   ggml_gemv_q4_K_8x8_q8_K (ggml-cpu/arch/x86/repack.cpp): llama.cpp REPACKS
                             Q4_K matrices whose rows come in groups of 8 on any AVX2 CPU (repack.cpp,
                             ggml_repack_get_optimal_repack_type); one integer per super-block.
       Q4_K, other rows      ggml_vec_dot_q4_K_q8_K (ggml-cpu/arch/x86/quants.c, the __AVX2__ branch).
       Q5_K, Q6_K            ggml_vec_dot_q5_K_q8_K, ggml_vec_dot_q6_K_q8_K (__AVX2__ branches). x86 does not
                             repack them (only ARM's NEON does), whatever their rows.
   The AVX2 branches are the ones compiled with AVX-512 too (quants.c tests __AVX2__ first for these types).

Rounding rules: int32 -> float32 conversions round to nearest even (vcvtdq2ps; NumPy's astype); a fused
multiply-add is model/ggml.py's fma (float64, rounded once); other float32 operations round each step.

The weights' integer parts are read per tile of rows from what llama_ref.weights.packed keeps (Q4_K / Q5_K:
`head`, the file's scale bytes of every super-block; Q4_K's quants `qs`; Q5_K and Q6_K: `blocks`, the file's
bytes).
"""

from __future__ import annotations

import numpy as np

from .ggml import fma, vec_dot_lanes

QK_K = 256  # values per super-block of Q4_K / Q5_K / Q6_K / Q8_K
TILE_BYTES = 64 << 20  # int32 temporaries per step of quantized_linear (rows tiled to stay under this)


# ---- activations: quantize_row_q8_K ------------------------------------------------------------------------

def quantize_row_q8_K(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """quantize_row_q8_K (x86: quantize_row_q8_K_ref, ggml-quants.c). x (N, K) float32, K % 256 == 0.

    Returns d (N, nb) float32, q (N, nb, 256) int8 and bsums (N, nb, 16) int32 (sum of each 16 quants):
    max = the first value of largest magnitude, iscale = float32(-127 / max), q = min(127, rint(iscale * x))
    with the float32 product rounded half to even, d = float32(1 / iscale). x ~ d * q.
    """
    N, K = x.shape
    blocks = np.asarray(x, np.float32).reshape(N, K // QK_K, QK_K)  # (N, nb, 256)
    first = np.abs(blocks).argmax(axis=2)[:, :, None]  # (N, nb, 1): the first largest |x|, as ggml's `>` loop
    vmax = np.take_along_axis(blocks, first, axis=2)[:, :, 0]  # (N, nb), signed
    nonzero = vmax != 0
    with np.errstate(divide="ignore"):
        iscale = np.where(nonzero, np.float32(-127) / vmax, np.float32(0)).astype(np.float32)  # (N, nb)
        d = np.where(nonzero, np.float32(1) / iscale, np.float32(0)).astype(np.float32)
    q = np.minimum(np.rint(blocks * iscale[:, :, None]), 127).astype(np.int8)  # (N, nb, 256)
    bsums = q.reshape(N, K // QK_K, 16, 16).sum(axis=3, dtype=np.int32)  # (N, nb, 16)
    return d, q, bsums


# ---- weights: the integers of each super-block -------------------------------------------------------------

def weight_superblocks(w, rows: slice) -> dict:
    """The integer parts of rows `rows` of a Q4_K / Q5_K / Q6_K weight (llama_ref.weights.packed), as ggml's
    dot products read them; R rows, nb super-blocks each.

    Q4_K / Q5_K: q (R, nb, 8, 32) uint8 (0..15 / 0..31, value order), sc and mn (R, nb, 8) int32 (6-bit),
    d and dmin (R, nb) float32 (fp16 values).  Q6_K: q (R, nb, 256) uint8 (0..63, before ggml's -32),
    sc (R, nb, 16) int32 (signed 8-bit, one per 16 values), d (R, nb) float32 (fp16 value).
    """
    if w.format == "q6_k":
        blocks = w.blocks[rows]  # the file's bytes: (R, nb * 210)
        R, nb = blocks.shape[0], w.shape[1] // QK_K
        b = blocks.reshape(R * nb, w.type_size)  # 128 bytes ql | 64 bytes qh | 16 int8 scales | d fp16
        q = w.values(b).reshape(R, nb, QK_K)  # the six bits, 0..63
        sc = b[:, 192:208].view(np.int8).astype(np.int32).reshape(R, nb, 16)
        d = np.ascontiguousarray(b[:, 208:210]).view("<f2")[:, 0].astype(np.float32).reshape(R, nb)
        return {"q": q, "sc": sc, "d": d}
    if w.format not in ("q4_k", "q5_k"):
        raise TypeError(f"no K-quant dot product for {w.format}")
    head = w.head[rows]  # (R, nb, 16): d fp16 | dmin fp16 | 12 bytes of 6-bit scales and mins
    R, nb = head.shape[:2]
    from ..weights.packed import kquant_scales  # the 12 bytes -> 8 scales and 8 mins, as the file stores them

    h16 = np.ascontiguousarray(head[:, :, :4]).view("<f2").astype(np.float32)  # (R, nb, 2): d, dmin
    sc, mn = kquant_scales(head.reshape(R * nb, 16)[:, 4:16])  # (R * nb, 8) each
    if w.format == "q4_k":  # kept as Q4_1 sub-blocks: 16 bytes, value j low nibble, j + 16 high
        b = w.qs[rows].reshape(R, nb, 8, 16)
        q = np.concatenate([b & np.uint8(15), b >> np.uint8(4)], axis=3)  # (R, nb, 8, 32)
    else:  # Q5_K: the file's bytes, the five bits of each value
        q = w.values(w.blocks[rows].reshape(R * nb, w.type_size)).reshape(R, nb, 8, 32)
    return {"q": q, "sc": sc.reshape(R, nb, 8).astype(np.int32), "mn": mn.reshape(R, nb, 8).astype(np.int32),
            "d": h16[:, :, 0], "dmin": h16[:, :, 1]}


# ---- integer sums ------------------------------------------------------------------------------------------

def subblock_lane_dots(wq: np.ndarray, xq: np.ndarray) -> np.ndarray:
    """Integer dot products per 32-value sub-block and per lane: wq (R, nb, 8, 32), xq (N, nb, 256) ->
    (N, R, nb, 8 sub-blocks, 8 lanes) int32, lane u holding products 4u .. 4u+3 of the sub-block
    (_mm256_maddubs_epi16 then _mm256_madd_epi16: pairs of pairs)."""
    R, nb = wq.shape[:2]
    N = xq.shape[0]
    w5 = wq.reshape(R, nb, 8, 8, 4).astype(np.int32)
    x5 = xq.reshape(N, nb, 8, 8, 4).astype(np.int32)
    return np.einsum("rbsut,nbsut->nrbsu", w5, x5)  # |each| <= 4 * 63 * 128


def subblock_sums(bsums: np.ndarray) -> np.ndarray:
    """Q8_K's bsums (N, nb, 16) -> the sums of each 32-value sub-block (N, nb, 8) (_mm_hadd_epi16)."""
    return bsums[:, :, 0::2] + bsums[:, :, 1::2]


# ---- dot products ------------------------------------------------------------------------------------------

def ggml_gemv_q4_K_8x8_q8_K(wb: dict, xd, xq, xbsums) -> np.ndarray:
    """Repacked Q4_K by Q8_K (ggml-cpu/arch/x86/repack.cpp, AVX2), rows in groups of 8. -> (N, R).

    Per super-block, one integer for the values and one for the mins:
        iacc     = sum_j sc[j] * (q_j . x_j)             (the 8 sub-blocks' dot products, scaled, summed)
        iacc_min = sum_j mn[j] * (bsum[2j] + bsum[2j+1])
    then acc = fma(float32(iacc), d_w * d_x, acc) and acc_min = fma(float32(iacc_min), dmin_w * d_x, acc_min)
    super-block after super-block (one float32 lane per row), and the result is acc - acc_min.
    """
    sub = subblock_lane_dots(wb["q"], xq).sum(axis=4)  # (N, R, nb, 8): each sub-block's 32 products
    iacc = (sub * wb["sc"][None]).sum(axis=3)  # (N, R, nb) int32
    iacc_min = (subblock_sums(xbsums)[:, None] * wb["mn"][None]).sum(axis=3)  # (N, R, nb)
    scale = wb["d"][None] * xd[:, None]  # (N, R, nb) float32: d_w * d_x
    scale_min = wb["dmin"][None] * xd[:, None]
    acc = vec_dot_lanes(iacc[..., None], scale)  # one lane
    acc_min = vec_dot_lanes(iacc_min[..., None], scale_min)
    return acc - acc_min


def kquant_mins_4lanes(wb: dict, xd, xbsums) -> np.ndarray:
    """The mins of ggml_vec_dot_q4_K_q8_K: 4 integer lanes per super-block, lane k = mn[2k] S[2k] +
    mn[2k+1] S[2k+1] with S the sub-block sums of the activations (_mm_madd_epi16), each added into a float32
    lane by fma(dmin, lane, acc_m) with dmin = -(d_x * dmin_w); then (m0 + m2) + (m1 + m3). -> (N, R)."""
    prod = subblock_sums(xbsums)[:, None] * wb["mn"][None]  # (N, R, nb, 8)
    N, R, nb, _ = prod.shape
    lanes = prod.reshape(N, R, nb, 4, 2).sum(axis=4).astype(np.float32)  # (N, R, nb, 4), exact
    dmin = -(xd[:, None] * wb["dmin"][None])  # (N, R, nb) float32
    acc_m = np.zeros((N, R, 4), np.float32)
    for b in range(nb):
        acc_m = fma(dmin[:, :, b, None], lanes[:, :, b], acc_m)
    return (acc_m[..., 0] + acc_m[..., 2]) + (acc_m[..., 1] + acc_m[..., 3])


def kquant_lanes(wb: dict, xq) -> np.ndarray:
    """The 8 integer lanes of ggml_vec_dot_q4_K_q8_K / q5_K per super-block: lane u = sum_j sc[j] *
    (products 4u .. 4u+3 of sub-block j). -> (N, R, nb, 8) int32."""
    return (subblock_lane_dots(wb["q"], xq) * wb["sc"][None, :, :, :, None]).sum(axis=3)


def ggml_vec_dot_q4_K_q8_K(wb: dict, xd, xq, xbsums) -> np.ndarray:
    """Q4_K by Q8_K, not repacked (ggml-cpu/arch/x86/quants.c, __AVX2__). -> (N, R).

    acc[u] = fma(d_x * d_w, float32(lane u), acc[u]) super-block after super-block (kquant_lanes), the mins
    in 4 lanes of their own (kquant_mins_4lanes); result hsum_float_8(acc) + the mins' sum.
    """
    scale = xd[:, None] * wb["d"][None]  # (N, R, nb) float32: y.d * fp16(x.d)
    return vec_dot_lanes(kquant_lanes(wb, xq), scale) + kquant_mins_4lanes(wb, xd, xbsums)


def ggml_vec_dot_q5_K_q8_K(wb: dict, xd, xq, xbsums) -> np.ndarray:
    """Q5_K by Q8_K (ggml-cpu/arch/x86/quants.c, __AVX2__). -> (N, R).

    The 8 lanes of Q4_K's with 5-bit values; the mins as ONE integer per super-block (sum_j mn[j] S[j], by
    _mm_hadd_epi32), summed in a float32 scalar: summs = fma(dmin, float32(that), summs) with dmin =
    -(d_x * dmin_w) (`summs += dmin * sum`, contracted by GCC). Result hsum_float_8(acc) + summs.
    """
    scale = xd[:, None] * wb["d"][None]  # (N, R, nb)
    main = vec_dot_lanes(kquant_lanes(wb, xq), scale)
    mins = (subblock_sums(xbsums)[:, None] * wb["mn"][None]).sum(axis=3).astype(np.float32)  # (N, R, nb)
    dmin = -(xd[:, None] * wb["dmin"][None])
    summs = np.zeros(main.shape, np.float32)
    for b in range(mins.shape[2]):
        summs = fma(dmin[:, :, b], mins[:, :, b], summs)
    return main + summs


def ggml_vec_dot_q6_K_q8_K(wb: dict, xd, xq, xbsums) -> np.ndarray:
    """Q6_K by Q8_K (ggml-cpu/arch/x86/quants.c, __AVX2__). -> (N, R).

    The quants are taken unsigned (q = 0..63) and the -32 of every value is folded in through bsums. Lane u
    of a super-block (8 chunks c of 32 values, 16-value scales sc):
        sum_c sc[2c + (u >= 4)] * (products 32c + 4u .. 32c + 4u + 3)  -  32 * (sc[2u] bsum[2u] + sc[2u+1] bsum[2u+1])
    (the second term is _mm256_madd_epi16(bsums, scales) << 5: its lanes are not the first term's, so the
    lanes differ from those of the signed values q - 32). acc[u] = fma(d_x * d_w, float32(lane u), acc[u]),
    then hsum_float_8.
    """
    R, nb = wb["q"].shape[:2]
    N = xq.shape[0]
    dots = subblock_lane_dots(wb["q"].reshape(R, nb, 8, 32), xq)  # (N, R, nb, 8 chunks, 8 lanes)
    lane_scale = np.repeat(wb["sc"].reshape(R, nb, 8, 2), 4, axis=3)  # (R, nb, 8, 8): sc[2c + (u >= 4)]
    main = (dots * lane_scale[None]).sum(axis=3)  # (N, R, nb, 8)
    offset = (xbsums[:, None] * wb["sc"][None]).reshape(N, R, nb, 8, 2).sum(axis=4) * 32  # (N, R, nb, 8)
    scale = xd[:, None] * wb["d"][None]  # (N, R, nb)
    return vec_dot_lanes(main - offset, scale)


# ---- the product in ggml mode ------------------------------------------------------------------------------

def dot_for(w):
    """The routine llama.cpp's CPU backend runs on the one-token path for this K-quant matrix (see above)."""
    if w.format == "q4_k":
        return ggml_gemv_q4_K_8x8_q8_K if w.shape[0] % 8 == 0 else ggml_vec_dot_q4_K_q8_K
    return {"q5_k": ggml_vec_dot_q5_K_q8_K, "q6_k": ggml_vec_dot_q6_K_q8_K}[w.format]


def quantized_linear(x2: np.ndarray, w) -> np.ndarray:
    """x2 (N, K) float32 @ w.T for a Q4_K / Q5_K / Q6_K weight w (R, K), in ggml's arithmetic. -> (N, R)."""
    N, K = x2.shape
    R = w.shape[0]
    xd, xq, xbsums = quantize_row_q8_K(x2)  # (N, nb), (N, nb, 256), (N, nb, 16)
    dot = dot_for(w)
    tile = max(8, TILE_BYTES // (N * K) // 8 * 8)  # rows per step: N * tile * K / 4 int32 temporaries
    out = np.empty((N, R), np.float32)
    for r0 in range(0, R, tile):
        out[:, r0:r0 + tile] = dot(weight_superblocks(w, slice(r0, r0 + tile)), xd, xq, xbsums)
    return out
