"""The NumPy operations of the forward pass: the reference twins of the Numba kernels.

Each function here has a Numba twin in `llama_ref.kernels` with the same signature; a backend is a set
of these functions and never changes what is computed, only how fast. Shapes use the legend in config.py.
"""

from __future__ import annotations

import numpy as np

from .config import ModelArgs


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """x / sqrt(mean(x^2) + eps) * weight, over the last axis. x (..., D), weight (D,).

    The mean of squares is summed in float64 and rounded once to x's dtype, as the Numba kernel does: one
    cheap pass, and NumPy's pairwise float32 sum made the norms alone put the default model's logits 1.5x
    further from float64 (1.7e-5 against 1.1e-5, the 200-token prompt: llama-ref verify --against float64)."""
    ms = np.mean(np.square(x, dtype=np.float64), axis=-1, keepdims=True).astype(x.dtype)  # (..., 1)
    return (x / np.sqrt(ms + x.dtype.type(eps))) * weight.astype(x.dtype, copy=False)


def _float_weight(w, dtype) -> np.ndarray:
    """w as a float array of dtype: a packed weight (16-bit or quantized) converts itself, one matrix at a time."""
    if not isinstance(w, np.ndarray):
        return w.to_float(dtype)
    return w if w.dtype == dtype else w.astype(dtype)


def linear(x: np.ndarray, w) -> np.ndarray:
    """x @ w.T for a weight stored (out, in) like PyTorch's nn.Linear. x (..., in) -> (..., out).

    `w` is a float array or a packed weight (16-bit or quantized) that converts itself to x's dtype
    one matrix at a time, so packed weights are never expanded for the whole model at once.
    """
    w = _float_weight(w, x.dtype)
    # All rows as one matrix product, so w is read once: `x @ w.T` on a (B, 1, in) batch of decode rows is a
    # stack of B matrix-vector products, each reading all of w. Written as w @ rows.T, which OpenBLAS ran
    # faster than rows @ w.T for 3 to 256 rows (one thread, the default model's layers: 81 against 131 ms
    # for 8 rows; 1 row: the same matrix-vector product either way).
    rows = x.reshape(-1, x.shape[-1])  # (N, in)
    return (w @ rows.T).T.reshape(*x.shape[:-1], w.shape[0])  # (..., out)


# Matrix products with shorter float32 sums: load(..., sums=...). BLAS sums each output in one chain of fused
# multiply-adds per block of its own (OpenBLAS: 288 of the default model's 576 inputs, 448 of 1536), and nearly
# all of a float32 forward pass's distance from float64 is made there (docs/verification.md, 2b). In a chain,
# every term after a large one is rounded at the large one's scale, and a token's activations hold a few
# entries 10-40x their row's rms (massive activations, w2's inputs; every product's input has columns 10-25x
# its rms): summing those columns apart ("apart") is the cheaper half of the remedy, shorter chains
# ("blocked", which does both) the costlier one.
SUM_BLOCK = 96  # inputs per chain in linear_blocked: chunks of a product, each one BLAS call, added pairwise
SUM_APART = 8  # columns of x with its largest entries that linear_blocked sums apart and adds last
# The same for linear_apart. Mean max |dlogit| from float64 over the six prompts of tests/data/float64_distance.json
# (NumPy/Numba, x transformers' recorded float32; in brackets the mean |dlogit|, steadier: one position decides
# a max): 8 columns 0.91x/0.89x (0.82x/0.78x), 16 columns 0.97x/0.84x (0.80x/0.74x), BLAS's own 1.11x/1.02x
# (1.01x/0.93x). 8 columns, since 16 cost more (their gather from w and their product: ~13 ms of a Numba
# prefill of 200 tokens) for the same closeness on the two backends' mean, and left NumPy 3 % from 1.0x.
APART = 8
# The rest of linear_apart's product is summed in chains of CHAIN k's, added in order (kernels/sgemm.KB, the
# Numba backend's): with BLAS's own chains (OpenBLAS's K panels) NumPy's apart sums were 0.91x transformers'
# distance with OpenBLAS's Haswell kernels (AVX2 AMD EPYC) and 1.25x with its SkylakeX ones (AVX-512 AMD EPYC),
# where the products' chains of 64 put it at 0.91x (with rms_norm's float64 sums; 1.01x without them).
CHAIN = 64


def _apart(rows: np.ndarray, n: int) -> "tuple[np.ndarray, np.ndarray]":
    """The n columns of rows (N, K) holding its largest |entries| (n,), and rows with them zeroed (N, K), in
    rows' memory order: a zero term adds nothing to a sum, so the zeroed rows' product is the others' product."""
    K = rows.shape[1]
    cols = np.sort(np.argpartition(np.abs(rows).max(axis=0), K - n)[K - n:])  # (n,) ascending: gathers in order
    rest = rows.copy(order="K")  # (N, K); a transposed product's output stays transposed (no transposing copy)
    rest[:, cols] = 0
    return cols, rest


def _apart_rows(rows: np.ndarray, n: int) -> "tuple[np.ndarray, np.ndarray, np.ndarray]":
    """_apart's columns (n,) and zeroed rows (N, K), and rows' values in those columns (N, n): what
    linear_apart needs. The Numba backend's twin, in one pass over rows: kernels/sums.py."""
    cols, rest = _apart(rows, n)
    return cols, rest, rows[:, cols]


def _sgemm():
    """NumPy's own BLAS's cblas_sgemm as a ctypes function, or None where it cannot be found.

    NumPy's wheels bundle OpenBLAS with a 64-bit integer interface under a prefixed name (scipy-openblas:
    scipy_cblas_sgemm64_; NumPy 1.x: cblas_sgemm64_). Integers are passed as 64-bit: on x86-64 and arm64
    a 32-bit interface reads the low half of the same register or stack slot. A self-check against NumPy's
    own product decides whether it is used at all."""
    import ctypes
    import glob
    import os

    here = os.path.dirname(np.__file__)
    libs = sorted(glob.glob(os.path.join(here + ".libs", "*openblas*"))  # Linux and Windows wheels
                  + glob.glob(os.path.join(here, ".dylibs", "*openblas*")))  # macOS
    for path in libs:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for name in ("scipy_cblas_sgemm64_", "cblas_sgemm64_", "scipy_cblas_sgemm", "cblas_sgemm"):
            fn = getattr(lib, name, None)
            if fn is None:
                continue
            i64, ptr, f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float
            fn.argtypes = [ctypes.c_int] * 3 + [i64] * 3 + [f32, ptr, i64, ptr, i64, f32, ptr, i64]
            fn.restype = None
            a, b = np.arange(6, dtype=np.float32).reshape(3, 2), np.arange(8, dtype=np.float32).reshape(4, 2)
            c = np.ones((3, 4), np.float32)
            fn(101, 111, 112, 3, 4, 2, 1.0, a.ctypes.data, 2, b.ctypes.data, 2, 1.0, c.ctypes.data, 4)
            if np.array_equal(c, a @ b.T + 1):
                return fn
    return None


_SGEMM: list = []  # [cblas_sgemm or None], found on first use


def cblas_sgemm():
    """NumPy's own BLAS's cblas_sgemm through ctypes (_sgemm), or None where it is not found; looked up once."""
    if not _SGEMM:
        _SGEMM.append(_sgemm())
    return _SGEMM[0]


def _add_product(a: np.ndarray, b: np.ndarray, out: np.ndarray) -> np.ndarray:
    """out += a @ b.T for float32 a (M, K), b (N, K) and out (M, N), C-contiguous (a and b: or F), and out.

    NumPy's own BLAS adds its product onto out as it writes it (sgemm with beta = 1), where `out += a @ b.T`
    writes a second (M, N) array and reads both again (~1/3 of a 16-input product's time on the default
    model's layers at 200 rows, memory-bound on its output). Its sums are the same: each output's K products
    in one chain, then added to out's value (OpenBLAS, a K of APART: the same bits; tests/test_precision.py).
    NumPy's `out += a @ b.T` where that BLAS is not found, and for other arrays."""
    sgemm = cblas_sgemm()
    usable = all(v.dtype == np.float32 and min(v.shape) > 0 for v in (a, b, out))
    layouts = [_blas_layout(v) for v in (a, b)] if usable else [None]
    if sgemm is None or None in layouts or not (out.flags.c_contiguous and out.flags.writeable):
        out += a @ b.T
        return out
    (M, K), N = a.shape, b.shape[0]
    (a_t, lda), (b_t, ldb) = layouts
    ta = 112 if a_t else 111  # a row-major, or a.T row-major
    tb = 111 if b_t else 112  # b row-major (b.T is b transposed), or b.T row-major
    sgemm(101, ta, tb, M, N, K, 1.0, a.ctypes.data, lda, b.ctypes.data, ldb, 1.0, out.ctypes.data, N)
    return out


def _blas_layout(v: np.ndarray) -> "tuple[bool, int] | None":
    """How BLAS reads the 2-D float32 array v in place: (False, row stride) for rows of contiguous values (a
    slice of a matrix's columns too), (True, column stride) for contiguous columns; None for other strides."""
    (R, C), (s0, s1), size = v.shape, v.strides, v.itemsize
    if (s1 == size or C == 1) and s0 % size == 0 and s0 // size >= max(C, 1):
        return False, s0 // size
    if (s0 == size or R == 1) and s1 % size == 0 and s1 // size >= max(R, 1):
        return True, s1 // size
    return None


def _product_in_chains(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a @ b.T for a (M, K), b (N, K), each output summed in chains of CHAIN k's from k = 0, the chains' sums
    added in order: ((c0 + c1) + c2) + ..., as kernels/sgemm.py sums the Numba backend's products. Each chain
    is one BLAS product of CHAIN columns, added onto the total by sgemm with beta = 1 (_add_product)."""
    # Row-major both: OpenBLAS sums a transposed operand's chains in another order (its kernels differ with
    # the transposition flags at these sizes), so x's layout in memory would change the bits; the copy of a
    # transposed x (a transposed product's output) costs ~1 % of the product.
    a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)  # (M, K), (N, K)
    out = np.zeros((a.shape[0], b.shape[0]), np.result_type(a, b))  # (M, N); +0 plus the first chain is it
    for k0 in range(0, a.shape[1], CHAIN):
        _add_product(a[:, k0:k0 + CHAIN], b[:, k0:k0 + CHAIN], out)  # (M, CHAIN) by (N, CHAIN) views
    return out


def linear_apart(x: np.ndarray, w, by_rows: bool = False, apart=_apart_rows, chosen=None,
                 products=None) -> np.ndarray:
    """linear(x, w) with the APART columns of x holding its largest entries summed by themselves, added last.

    The product over x with those columns zeroed, in chains of CHAIN k's added in order (_product_in_chains:
    the Numba backend's chains, whatever the BLAS's own blocking), then one of APART inputs for them, which
    BLAS adds onto the first (_add_product). On the default model this puts the float32 logits closer to
    float64 than transformers' float32 (0.91x its distance; 0.62-0.66x with the Numba backend's products),
    for 1.03-1.17x linear's prefill time (one thread, load 3-5, BLAS's own chains then:
    benchmarks/float32_sums.py; the chains of 64 measured no slower on a 512-token prefill, 2.39 s both).
    Every product of 16 rows or more, the output head's too: left to the backend's own product, the head put
    the logits at 0.98x (NumPy) and 0.84x (Numba) transformers' distance, and its apart terms are ~10 ms of
    NumPy's +90-150 ms on a 200-token prefill (issue 21, session 31); the rest is the layers' column choice,
    w's gathered columns and their product added.

    by_rows: the output as a C-contiguous (N, out) product, the Numba backend's layout (its kernels would
    copy linear's transposed one), instead of linear's (out, N) product, transposed; the BLAS calls differ,
    so the last bits can too. apart: the function that chooses the columns (_apart_rows, or the Numba
    backend's twin). chosen: apart(rows, APART) of this x, made already (linears_apart: one choice for the
    products that read the same x). products: the Numba backend's two products in one
    (kernels/sums.apart_product; by_rows): kernels/sgemm.py's own float32 product on runtime.threads' pool,
    the rest's sums in chains of 64 k's added in order and the apart terms summed by themselves and added in
    registers before each tile is stored (the same bits at any thread count), or None (other than float32
    or APART columns) to make them here, by BLAS. A packed w (16-bit or quantized) is widened to float32 here,
    a whole matrix, unless the products take it (the Numba backend decodes it a tile at a time).
    """
    rows = x.reshape(-1, x.shape[-1])  # (N, K)
    if not _apart_fits(rows):
        return linear(x, w)
    cols, rest, x_apart = apart(rows, APART) if chosen is None else chosen  # (APART,), (N, K), (N, APART)
    done = products(rest, x_apart, cols, w) if by_rows and products is not None else None  # (N, R) or None
    if done is not None:  # (a packed w decoded by the products, a tile at a time)
        return done.reshape(*x.shape[:-1], w.shape[0])  # (..., out)
    w = _float_weight(w, x.dtype)
    out = _product_in_chains(rest, w) if by_rows else _product_in_chains(w, rest)  # (N, R), or (R, N) like linear's
    # w's columns gathered after its product, which left them in cache (before it: APART scattered reads per
    # row from memory, which cost more than the product of APART inputs itself)
    w_apart = w[:, cols]  # (R, APART)
    if by_rows:
        return _add_product(x_apart, w_apart, out).reshape(*x.shape[:-1], w.shape[0])  # (..., out)
    return _add_product(w_apart, x_apart, out).T.reshape(*x.shape[:-1], w.shape[0])  # (..., out)


def _apart_fits(rows: np.ndarray) -> bool:
    """Whether linear_apart sums rows (N, K) apart: not with no rows (an unrouted expert) or too few inputs."""
    return rows.shape[0] > 0 and rows.shape[1] >= 4 * APART


def linears_apart(x: np.ndarray, *ws, by_rows: bool = False, apart=_apart_rows, products=None) -> tuple:
    """linear_apart(x, w, by_rows, apart) for each w, the columns of x chosen once: the same bits.

    The choice depends on x alone (its largest |entries| per column), so the products that read the same x
    (wq, wk, wv; w1, w3) can share it, with its zeroed copy of x and the gathered values: ~1/7 of
    linear_apart's time is that choice, the rest's product and the largest terms' stay one per weight."""
    rows = x.reshape(-1, x.shape[-1])  # (N, K)
    if not _apart_fits(rows):
        return tuple(linear(x, w) for w in ws)
    chosen = apart(rows, APART)  # (APART,), (N, K), (N, APART)
    return tuple(linear_apart(rows, w, by_rows, apart, chosen, products).reshape(*x.shape[:-1], -1) for w in ws)


# A product of a few rows of x (a short prompt) reads each of w's values for a few multiply-adds; its sums in
# float64 put the default model's 5- and 8-token prompts at 0.39x and 0.79x transformers' float32 distance from
# float64 (NumPy; the Numba backend 0.32x and 0.63x), against 2.9x and 3.0x with BLAS's product and 1.3x and
# 1.2x with apart sums (with_sums says where they are used and what they cost). FLOAT64_BLOCK: bytes of w
# widened to float64 at a time, which stay in L2.
FLOAT64_BLOCK = 1 << 18


def linear_float64_sums(x: np.ndarray, w) -> np.ndarray:
    """linear(x, w) with each output summed in float64 and rounded once to x's dtype (float32).

    Every product of two float32 values is exact in float64 (24 + 24 significant bits of 53), so an output
    lies within a float32 rounding of the exact sum unless the sum falls within ~K float64 ulps of a halfway
    point between two float32 values. w's rows are widened a block at a time into one reused buffer (the
    whole of w in float64 would be twice its size, written and read again). The Numba twin:
    kernels/sums.float64_sums."""
    w = _float_weight(w, x.dtype)
    rows = x.reshape(-1, x.shape[-1])  # (N, K)
    R, K = w.shape
    x64 = rows.astype(np.float64)  # (N, K)
    out = np.empty((rows.shape[0], R), x.dtype)  # (N, R)
    step = min(R, max(1, FLOAT64_BLOCK // (8 * K)))  # rows of w per block
    w64 = np.empty((step, K), np.float64)  # (step, K), reused
    for r0 in range(0, R, step):
        r1 = min(R, r0 + step)
        w64[: r1 - r0] = w[r0:r1]
        out[:, r0:r1] = x64 @ w64[: r1 - r0].T  # (N, r1 - r0) float64 sums, rounded once
    return out.reshape(*x.shape[:-1], R)  # (..., out)


def linear_blocked(x: np.ndarray, w) -> np.ndarray:
    """linear(x, w) with each output summed in chains of SUM_BLOCK inputs, the largest terms added last.

    Two orders of the same float32 sum: (1) in a chain, every term after a large one is rounded at the large
    one's scale, and a token's activations hold a few entries 10-40x their row's rms (a column of w2's input,
    the first token's massive activations), so the SUM_APART columns of x with the largest entries are summed
    by themselves and added to the rest at the end; (2) the rest is cut into chunks of SUM_BLOCK inputs, one
    BLAS product each, added pairwise. On the default model this puts the float32 logits about 1.5x closer
    to float64 than transformers' float32, at a cost in speed (benchmarks/float32_sums.py).
    """
    w = _float_weight(w, x.dtype)
    rows = x.reshape(-1, x.shape[-1])  # (N, K)
    N, K = rows.shape
    R = w.shape[0]
    C = K // SUM_BLOCK  # whole chunks; a remainder joins the last one
    if C < 2 or N == 0:  # (no rows: an expert no token was routed to)
        return linear(x, w)
    # The columns holding the largest entries, and x with them zeroed (a zero term adds nothing to a sum).
    apart, rest = _apart(rows, SUM_APART)
    main = C * SUM_BLOCK
    chunks_x = rest[:, :main].reshape(N, C, SUM_BLOCK).transpose(1, 2, 0)  # (C, SUM_BLOCK, N) views, no copy
    out = np.empty((R, N), x.dtype)  # (R, N), transposed at the end like linear's w @ rows.T
    # Weight rows a block at a time, so that the C partial products of a block (4 MiB) stay in cache; 1 MiB
    # made BLAS calls too small (one thread, the default model's products at 200 rows: 68 against 57 ms).
    block = max(16, min(R, (1 << 20) // (C * N)))
    parts = np.empty((C, block, N), x.dtype)  # (C, block, N)
    for r0 in range(0, R, block):
        r1 = min(R, r0 + block)
        p = parts[:, : r1 - r0]
        chunks_w = w[r0:r1, :main].reshape(r1 - r0, C, SUM_BLOCK).transpose(1, 0, 2)  # (C, rows, SUM_BLOCK)
        np.matmul(chunks_w, chunks_x, out=p)  # one BLAS call per chunk
        if main < K:
            p[-1] += w[r0:r1, main:] @ rest[:, main:].T
        n = C
        while n > 1:  # pairwise: fold the upper half onto the lower
            half = n // 2
            p[:half] += p[n - half:n]
            n -= half
        out[r0:r1] = p[0]
    out += w[:, apart] @ rows[:, apart].T  # the largest terms, last
    return out.T.reshape(*x.shape[:-1], R)  # (..., out)


SUMS = {"apart": linear_apart, "blocked": linear_blocked}  # load(..., sums=...) other than "blas"
SUMS_MIN_ROWS = {"apart": 16, "blocked": 2}  # fewer rows of x: float64 sums, a decode step's the backend's own


def with_sums(backend, sums: str):
    """A copy of a backend (ops, or llama_ref.kernels) whose float32 matrix products are summed as
    SUMS[sums] sums them ("apart": linear_apart, "blocked": linear_blocked).

    Products of fewer than SUMS_MIN_ROWS[sums] rows of x, or than the Numba backend's F32_BLAS_MIN_ROWS (its
    own kernels), read each weight for a few multiply-adds. Over a prompt's positions (x (..., T, K), T >= 2:
    a short prompt, whose first token holds the massive activations) they are summed in float64
    (linear_float64_sums, or the Numba backend's twin): every output within a rounding of the exact sum,
    where the backends' own sums put the default model's 5- and 8-token prompts at 2.9x and 3.0x
    transformers' distance from float64 (NumPy; Numba 1.15x and 0.91x), and apart sums at 1.3x and 1.2x.
    It costs: float64 multiply-adds run at half float32's rate, and NumPy widens w a block at a time on one
    thread (issue 21: the prefill of a 5-15-token prompt 1.3-1.4x (Numba) and 1.7-2.3x (NumPy) the time of
    the backend's own product at two threads). A decode step (one position a sequence: x (..., 1, K), a batch
    of them too; the fused steps) keeps the backend's own product, summed in short chains already (the Numba
    kernels' SIMD lanes, OpenBLAS's sgemv's 8 partial sums of 72 of 576 inputs): the model's most repeated
    products, where float64 would cost the most. So do packed weights (16-bit, quantized) in the Numba kernels
    under 16 rows; from 16 rows "apart" takes them (decoded a tile at a time: kernels/sums._packed_apart), but
    bf16 on AMX tiles (kernels/sums.packed_apart).
    A backend other than ops (the Numba backend) gets linear_apart's output in its rows' layout (by_rows),
    as its own linear gives it, the columns chosen by its kernel and both products made by its own float32
    gemm in one pass (kernels/sums.py, kernels/sgemm.py).
    Its linears (the forward pass's wq/wk/wv and w1/w3, which read the same x) choose x's columns once for all
    of them (linears_apart), the same bits as its linear one weight at a time. Everything else is the backend's."""
    import functools
    import sys
    import types

    product, together, few = SUMS[sums], linears_apart if sums == "apart" else None, linear_float64_sums
    packed_apart = None  # the Numba backend's packed weights it sums apart (kernels/sums.packed_apart)
    if backend.linear is not linear:
        from llama_ref.kernels.sums import apart_product, apart_rows, float64_sums, packed_apart

        few = float64_sums
        if sums == "apart":  # its column choice, and its products
            product = functools.partial(linear_apart, by_rows=True, apart=apart_rows, products=apart_product)
            together = functools.partial(linears_apart, by_rows=True, apart=apart_rows, products=apart_product)
    copy = types.ModuleType(f"{backend.__name__}+{sums}_sums")
    copy.__dict__.update({k: v for k, v in vars(backend).items() if not k.startswith("__")})
    own, own_together = backend.linear, getattr(backend, "linears", None)
    small = max(SUMS_MIN_ROWS[sums], getattr(sys.modules[own.__module__], "F32_BLAS_MIN_ROWS", 0))

    def own_product(x, w) -> bool:
        """Whether summed_linear leaves this product to the backend's own linear."""
        rows = x.size // x.shape[-1]
        packed_kernel = own is not linear and not isinstance(w, np.ndarray) and not (
            sums == "apart" and rows >= small and packed_apart(w, rows))
        decode = x.ndim < 2 or x.shape[-2] == 1  # one position a sequence
        return x.dtype != np.float32 or packed_kernel or (decode and rows < small)

    def summed_linear(x, w):
        if own_product(x, w):
            return own(x, w)
        return few(x, w) if x.size // x.shape[-1] < small else product(x, w)

    def summed_linears(x, *ws):
        """summed_linear(x, w) for each w, with one choice of x's columns for those summed apart."""
        mine = [w for w in ws if not own_product(x, w)]
        if not mine and own_together is not None:  # all the backend's own (decode): its own together, if any
            return own_together(x, *ws)
        if together is None or len(mine) < 2 or x.size // x.shape[-1] < small:
            return tuple(summed_linear(x, w) for w in ws)
        summed = iter(together(x, *mine))  # in ws' order
        return tuple(own(x, w) if own_product(x, w) else next(summed) for w in ws)

    copy.linear = summed_linear
    # The backend's own linears (if any) would skip summed_linear: it is kept for the products that are all its
    # own. "apart" shares the column choice between the others; "blocked" takes them one by one.
    copy.linears = summed_linears
    return copy


def embedding(tokens: np.ndarray, table, dtype) -> np.ndarray:
    """Rows of the embedding table for each token id. tokens (...,) -> (..., D)."""
    if not isinstance(table, np.ndarray):
        return table.rows(tokens, dtype)
    return table[tokens].astype(dtype, copy=False)


def rope_frequencies(args: ModelArgs, freq_divisors: "np.ndarray | None" = None) -> np.ndarray:
    """Rotation speed of each pair of a head, in radians per position. Returns (HD/2,) float64.

    Computed in float64 and rounded once by the caller, so the table is as exact as its dtype allows.
    """
    hd = args.head_dim
    freqs = 1.0 / (args.rope_theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd))  # (HD/2,)
    s = args.rope_scaling
    if s is not None and s.kind == "linear":
        freqs = freqs / s.factor
    elif s is not None and s.kind == "llama3":
        # Llama 3.1: long wavelengths (low frequencies) are slowed by `factor`, short ones kept as trained,
        # and the band between the two cut-offs blends the two smoothly.
        wavelen = 2 * np.pi / freqs
        low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
        high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
        band = max(s.high_freq_factor - s.low_freq_factor, 1e-300)  # no band when equal (Llama 4 Scout)
        smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / band
        blended = (1 - smooth) * freqs / s.factor + smooth * freqs
        freqs = np.where(wavelen < high_wavelen, freqs, np.where(wavelen > low_wavelen, freqs / s.factor, blended))
    if freq_divisors is not None:
        # GGUF files of Llama 3.1 carry the scaling precomputed as one divisor per frequency (rope_freqs).
        freqs = freqs / np.asarray(freq_divisors, dtype=np.float64)
    return freqs


def rope_tables(freqs: np.ndarray, start_pos: int, length: int, dtype) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin of position * frequency for positions start_pos .. start_pos+length-1. Each (T, HD/2)."""
    positions = np.arange(start_pos, start_pos + length, dtype=np.float64)  # (T,)
    angles = np.outer(positions, freqs)  # (T, HD/2)
    return np.cos(angles).astype(dtype), np.sin(angles).astype(dtype)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate each adjacent pair (x[2i], x[2i+1]) of every head by its angle (Meta's pairing).

    x (B, T, n, HD); cos, sin (T, HD/2). Returns a new array of x's shape.
    """
    pairs = x.reshape(*x.shape[:-1], -1, 2)  # (B, T, n, HD/2, 2)
    even, odd = pairs[..., 0], pairs[..., 1]  # (B, T, n, HD/2) each
    c, s = cos[:, None, :], sin[:, None, :]  # (T, 1, HD/2): the same angle for every head
    out = np.empty_like(pairs)
    out[..., 0] = even * c - odd * s
    out[..., 1] = even * s + odd * c
    return out.reshape(x.shape)  # (B, T, n, HD)


ATTENTION_BLOCK = 256  # queries per block of a long chunk's attention


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, start_pos: int,
              key_mask: "np.ndarray | None" = None) -> np.ndarray:
    """Causal grouped-query attention of a chunk of queries over all cached keys.

    q (B, T, H, HD) for positions start_pos .. start_pos+T-1; k, v (B, S, KVH, HD) for positions 0 .. S-1,
    S = start_pos + T. Query head h reads KV head h // (H // KVH); no KV head is copied. key_mask (B, S)
    bool, optional, marks padding keys (False) that no query may attend to. Returns (B, T, H, HD).
    """
    if q.shape[1] > ATTENTION_BLOCK:
        # A long chunk goes in blocks of queries, each over the keys its last query can see: memory stays
        # O(block x S), and the causal upper triangle is mostly skipped. All at once, a 2048-token prompt's
        # scores took 0.5 GB per layer at the 1B shape, and einsum ran 40x longer than at 512 tokens.
        T = q.shape[1]
        out = np.empty(q.shape, q.dtype)  # (B, T, H, HD)
        for t0 in range(0, T, ATTENTION_BLOCK):
            t1 = min(T, t0 + ATTENTION_BLOCK)
            seen = start_pos + t1  # keys 0 .. seen-1 are visible to some query of the block
            out[:, t0:t1] = attention(q[:, t0:t1], k[:, :seen], v[:, :seen], start_pos + t0,
                                      None if key_mask is None else key_mask[:, :seen])
        return out
    B, T, H, HD = q.shape
    S, KVH = k.shape[1], k.shape[2]
    G = H // KVH  # query heads per KV head
    # einsum sums each q.k in SIMD lanes over the contiguous head axis; OpenBLAS's sgemm sums its HD products
    # in one chain, with ~3x the rounding error (hypothesis found 2.5e-6 against float64 where einsum has
    # 7.6e-7). A strided q was summed otherwise too, with 2-3x the error on the default model: q is copied.
    qg = np.ascontiguousarray(q).reshape(B, T, KVH, G, HD)  # (B, T, KVH, G, HD)
    scores = np.einsum("btkgd,bskd->bkgts", qg, k)  # (B, KVH, G, T, S)
    scores /= q.dtype.type(np.sqrt(HD))
    # Query t sits at position start_pos + t and may see keys 0 .. start_pos + t.
    visible = np.arange(S)[None, :] <= (start_pos + np.arange(T))[:, None]  # (T, S)
    if key_mask is not None:
        visible = visible[None] & key_mask[:, None, :]  # (B, T, S)
        visible = visible[:, None, None]  # (B, 1, 1, T, S)
    scores = np.where(visible, scores, -np.inf)
    # Softmax over keys, shifted by the row maximum so exp never overflows.
    row_max = scores.max(axis=-1, keepdims=True)  # (B, KVH, G, T, 1)
    if key_mask is not None:
        # A left-padding query sees no key at all: its row is all -inf. Shift it by 0 instead of -inf so it
        # gives zeros rather than NaN (NaN would leak into the real rows through the padding's values).
        row_max = np.where(np.isneginf(row_max), row_max.dtype.type(0), row_max)
    scores -= row_max  # in place: at long context these are the largest arrays of the step
    probs = np.exp(scores, out=scores)
    total = probs.sum(axis=-1, keepdims=True)  # (B, KVH, G, T, 1)
    if key_mask is not None:
        total = np.where(total == 0, total.dtype.type(1), total)
    probs /= total
    # The weighted sum of values, again one product per KV head (BLAS; einsum had twice its rounding error
    # against float64 at 2048 keys).
    values = np.ascontiguousarray(v.transpose(0, 2, 1, 3))  # (B, KVH, S, HD)
    out = np.matmul(probs.reshape(B, KVH, G * T, S), values).reshape(B, KVH, G, T, HD)
    return out.transpose(0, 3, 1, 2, 4).reshape(B, T, H, HD)  # (B, T, H, HD)


def swiglu(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """silu(gate) * up, the gated activation of Llama's feed-forward. Shapes (..., F)."""
    with np.errstate(over="ignore"):  # exp(-gate) overflows to inf for gate << 0, giving silu = -0 exactly
        return gate / (1 + np.exp(-gate)) * up
