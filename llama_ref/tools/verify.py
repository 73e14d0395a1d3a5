"""Compare a model's activations with a reference file, and find where two implementations part ways.

A reference file holds named arrays (the names of llama_ref.tools.capture) for one token sequence; see
docs/verification.md for the format. `dump` writes one from a llama_ref model; any other implementation can
write one too. `verify` runs a model on the file's tokens, compares every tensor both sides have, and reports:

  per tensor    max and mean absolute difference, the same relative to the reference's scale, and the
                worst position;
  logits        argmax and top-k agreement and the KL divergence of the next-token distributions;
  divergence    the first tensor, in forward-pass order, whose relative difference passes the tolerance:
                the layer where the two computations part ways.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

from .capture import MOE_NAMES, activation_names, layer_of, run_and_capture
from ..errors import InputError
from ..model.transformer import Transformer
from ..generation.sampling import log_softmax
from ..weights.bf16 import bf16_bits_to_float32

FORMAT = "llama_ref.activations"
FORMAT_VERSION = 1
META_KEY = "__metadata__"  # npz member holding the JSON metadata (safetensors: the header's metadata)
DEFAULT_TOLERANCE = 1e-3
BUDGET_PROMPT = "The capital of France is"  # `verify --against float64` runs it when given no prompt


class ReferenceFileError(InputError):
    """A reference file is missing, unreadable or does not fit the model it is compared with."""


# ---- the reference file --------------------------------------------------------------------------------

def save_reference(path: "str | Path", arrays: dict, meta: Optional[dict] = None) -> Path:
    """Write named arrays and a JSON-able dict of metadata to .npz or .safetensors, atomically."""
    path = Path(path)
    kind = _file_kind(path)
    meta = {"format": FORMAT, "version": FORMAT_VERSION, **(meta or {})}
    arrays = {name: np.ascontiguousarray(a) for name, a in arrays.items()}
    if META_KEY in arrays:
        raise ReferenceFileError(f"{path}: {META_KEY} is reserved for the metadata")
    for name, a in arrays.items():
        if a.dtype.kind not in "biuf":
            raise ReferenceFileError(f"{path}: array {name!r} has dtype {a.dtype}; only numbers can be stored")
    # Written beside the target and renamed into place, so a failure never leaves a partial file.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent if str(path.parent) else ".")
    os.close(fd)
    try:
        if kind == "npz":
            with open(tmp, "wb") as f:
                np.savez(f, **arrays, **{META_KEY: np.array(json.dumps(meta))})
        else:
            from safetensors.numpy import save_file
            save_file(arrays, tmp, metadata={META_KEY: json.dumps(meta)})
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private; a written file follows the umask
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


def load_reference(path: "str | Path") -> tuple[dict[str, np.ndarray], dict]:
    """(arrays, metadata) of a reference file (.npz or .safetensors)."""
    path = Path(path)
    kind = _file_kind(path)
    if not path.is_file():
        raise ReferenceFileError(f"{path}: file not found")
    if kind == "npz":
        try:
            with np.load(path, allow_pickle=False) as f:
                arrays = {name: f[name] for name in f.files}
        except Exception as e:  # zip and format errors come in many types; all mean "not a valid npz"
            raise ReferenceFileError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from None
        raw = arrays.pop(META_KEY, None)
        meta_text = str(raw) if raw is not None else None
    else:
        arrays, meta_text = _read_safetensors(path)
    meta = {}
    if meta_text:
        try:
            meta = json.loads(meta_text)
        except json.JSONDecodeError as e:
            raise ReferenceFileError(f"{path}: metadata is not valid JSON ({e})") from None
    return arrays, meta


def _file_kind(path: Path) -> str:
    if path.suffix == ".npz":
        return "npz"
    if path.suffix == ".safetensors":
        return "safetensors"
    raise ReferenceFileError(f"{path}: a reference file must end in .npz or .safetensors")


def _read_safetensors(path: Path) -> tuple[dict[str, np.ndarray], Optional[str]]:
    """Every tensor of a safetensors file, through the checkpoint reader's checks; BF16 widened exactly to
    float32 (NumPy has no bfloat16)."""
    from ..weights.common import WeightsError
    from ..weights.safetensors_file import REFERENCE_DTYPES, read_safetensors_header

    try:
        tensors, metadata = read_safetensors_header(path, REFERENCE_DTYPES)
    except WeightsError as e:
        detail = str(e).removeprefix(f"{path}: ")
        raise ReferenceFileError(f"{path}: not a safetensors file llama_ref can read ({detail})") from None
    arrays = {name: bf16_bits_to_float32(t.read()) if t.dtype_name == "bfloat16" else t.read()
              for name, t in tensors.items()}
    meta_text = metadata.get(META_KEY)
    return arrays, meta_text if isinstance(meta_text, str) else None


def dump(model: Transformer, tokens, path: "str | Path", names: Optional[Iterable[str]] = None,
         extra_meta: Optional[dict] = None) -> Path:
    """Run `model` on `tokens` and write every captured activation (or those matching `names`) to `path`."""
    tokens = np.asarray(tokens, dtype=np.int64)
    acts = run_and_capture(model, tokens, names)
    meta = {"model": str(model.source) if model.source else None, "args": model.args.to_params_json(),
            "dtype": model.dtype.name, "backend": model.backend_name, "qk_layout": "interleaved",
            "n_tokens": int(tokens.size), **(extra_meta or {})}
    return save_reference(path, {"tokens": tokens, **acts}, meta)


# ---- comparison ----------------------------------------------------------------------------------------

@dataclass
class TensorDiff:
    """How one named tensor differs from the reference."""

    name: str
    shape: tuple
    max_abs: float
    mean_abs: float
    rel: float  # max_abs / max|reference|: the largest error on the tensor's own scale
    mean_rel: float  # mean_abs / mean|reference|
    position_max_abs: np.ndarray  # (T,) max |difference| at each position
    jump: float = 1.0  # rel / the largest rel of every earlier tensor (inf when all earlier are exact)

    @property
    def layer(self) -> Optional[int]:
        return layer_of(self.name)

    @property
    def worst_position(self) -> int:
        return int(np.argmax(self.position_max_abs))


@dataclass
class LogitsDiff:
    """Agreement of the next-token distributions, position by position."""

    top1_agree: np.ndarray  # (T,) bool: same argmax
    topk_overlap: np.ndarray  # (T,) fraction of the reference's top k that are also in ours
    kl: np.ndarray  # (T,) KL(reference || ours) of softmax(logits), in nats
    k: int

    @property
    def top1_rate(self) -> float:
        return float(self.top1_agree.mean())


@dataclass
class Report:
    tensors: list[TensorDiff]  # in forward-pass order
    logits: Optional[LogitsDiff]
    tolerance: float
    missing: list[str] = field(default_factory=list)  # in the reference, not produced by the model
    mismatched: list[str] = field(default_factory=list)  # in both but with shapes that cannot be matched

    @property
    def first_divergence(self) -> Optional[TensorDiff]:
        """The first tensor, in forward order, whose relative difference passes the tolerance."""
        return next((t for t in self.tensors if t.rel > self.tolerance), None)

    @property
    def max_rel(self) -> float:
        return max((t.rel for t in self.tensors), default=0.0)

    @property
    def passed(self) -> bool:
        return bool(self.tensors) and not self.mismatched and self.first_divergence is None

    def table(self, all_tensors: bool = False) -> str:
        return format_report(self, all_tensors)


def _forward_order(names: list[str]) -> list[str]:
    """Capture names in the order the forward pass makes them; any other names last, alphabetically."""
    n_layers = max((layer_of(n) for n in names if layer_of(n) is not None), default=-1) + 1
    order = {}
    for name in activation_names(n_layers):
        order[name] = len(order)
        if name.endswith(".ffn_norm"):  # a Llama 4 MoE layer's router follows its ffn_norm
            order.update({name[:-len("ffn_norm")] + moe: len(order) + k for k, moe in enumerate(MOE_NAMES)})
    return sorted(names, key=lambda n: (order.get(n, len(order)), n))


def _match_shape(ours: np.ndarray, ref: np.ndarray) -> Optional[np.ndarray]:
    """`ours` in the reference's shape (a batch axis of 1 or heads flattened into one axis); None if not."""
    if ours.shape == ref.shape:
        return ours
    if ref.ndim == ours.ndim + 1 and ref.shape[0] == 1 and ref.shape[1:] == ours.shape:
        return ours[None]
    if ours.size == ref.size and ref.ndim >= 1 and ref.shape[0] == ours.shape[0]:
        return ours.reshape(ref.shape)
    return None


def _to_half_split(x: np.ndarray) -> np.ndarray:
    """q or k (T, n, HD) from Meta's interleaved RoPE pairs to HF's half-split order within each head."""
    T, n, hd = x.shape
    return x.reshape(T, n, hd // 2, 2).swapaxes(-1, -2).reshape(T, n, hd)  # (T, n, HD)


def tensor_diff(name: str, ours: np.ndarray, ref: np.ndarray) -> TensorDiff:
    """Differences of two arrays of one shape whose first axis is the position (T, ...)."""
    a, b = ours.astype(np.float64), ref.astype(np.float64)
    # Equal values (infinities included) differ by 0; a NaN on either side is an infinite difference.
    with np.errstate(invalid="ignore"):
        d = np.where(a == b, 0.0, np.nan_to_num(np.abs(a - b), nan=np.inf))
    finite = np.abs(b[np.isfinite(b)])
    scale, mean_scale = float(finite.max(initial=0.0)), float(finite.mean()) if finite.size else 0.0
    max_abs, mean_abs = float(d.max(initial=0.0)), float(d.mean()) if d.size else 0.0
    position_max = d.reshape(d.shape[0], -1).max(axis=1) if d.ndim >= 1 and d.size else np.zeros(0)
    return TensorDiff(name, tuple(ref.shape), max_abs, mean_abs,
                      rel=_ratio(max_abs, scale), mean_rel=_ratio(mean_abs, mean_scale),
                      position_max_abs=position_max)


def _ratio(num: float, den: float) -> float:
    if num == 0:
        return 0.0
    return num / den if den > 0 else float("inf")


def logits_diff(ours: np.ndarray, ref: np.ndarray, k: int = 5) -> LogitsDiff:
    """Argmax, top-k and KL agreement of two (T, V) logit arrays."""
    a, b = ours.astype(np.float64).reshape(-1, ours.shape[-1]), ref.astype(np.float64).reshape(-1, ref.shape[-1])
    k = max(1, min(k, a.shape[-1]))
    top1 = np.argmax(a, -1) == np.argmax(b, -1)
    top_a, top_b = np.argsort(-a, -1)[:, :k], np.argsort(-b, -1)[:, :k]  # (T, k)
    overlap = np.array([len(set(x) & set(y)) / k for x, y in zip(top_a, top_b)])
    # KL(p_ref || p_ours) from log-softmax in float64: exact enough to see float32 rounding.
    log_p, log_q = log_softmax(b), log_softmax(a)
    kl = np.maximum((np.exp(log_p) * (log_p - log_q)).sum(-1), 0.0)
    return LogitsDiff(top1, overlap, kl, k)


def compare(ours: dict, reference: dict, tolerance: float = DEFAULT_TOLERANCE, top_k: int = 5,
            qk_layout: str = "interleaved") -> Report:
    """Compare every tensor both dicts hold (names of llama_ref.tools.capture, each (T, ...))."""
    if qk_layout not in ("interleaved", "half_split"):
        raise ReferenceFileError(f"qk_layout must be 'interleaved' or 'half_split', got {qk_layout!r}")
    tensors, missing, mismatched = [], [], []
    worst_before = 0.0
    for name in _forward_order([n for n in reference if n != "tokens"]):
        if name not in ours:
            missing.append(name)
            continue
        mine, ref = ours[name], np.asarray(reference[name])
        if qk_layout == "half_split" and name.endswith((".attention.q", ".attention.k")) and mine.ndim == 3:
            mine = _to_half_split(mine)
        matched = _match_shape(mine, ref)
        if matched is None:
            mismatched.append(f"{name}: ours {mine.shape}, reference {ref.shape}")
            continue
        if ref.ndim == matched.ndim and ref.shape[0] == 1 and mine.shape[0] != 1:
            matched, ref = matched[0], ref[0]  # a batch axis of 1 on both: positions come next
        diff = tensor_diff(name, matched, ref)
        diff.jump = diff.rel / worst_before if worst_before > 0 else (float("inf") if diff.rel > 0 else 1.0)
        worst_before = max(worst_before, diff.rel)
        tensors.append(diff)
    logits = None
    if "logits" in reference and "logits" in ours and not any(m.startswith("logits:") for m in mismatched):
        ref_logits = np.asarray(reference["logits"])
        logits = logits_diff(ours["logits"].reshape(ref_logits.shape), ref_logits, top_k)
    return Report(tensors, logits, tolerance, missing, mismatched)


def verify(model: Transformer, reference: "str | Path | dict", tolerance: float = DEFAULT_TOLERANCE,
           top_k: int = 5, qk_layout: Optional[str] = None) -> Report:
    """Run `model` on the reference's tokens with capture on and compare with the reference's tensors.

    reference: a file (.npz, .safetensors) or a dict of arrays. qk_layout: "half_split" when the reference's
    q and k are in Hugging Face's RoPE order; by default the file's metadata says, else "interleaved".
    """
    where = "reference"
    meta: dict = {}
    if isinstance(reference, (str, Path)):
        where = str(reference)
        reference, meta = load_reference(reference)
    if "tokens" not in reference:
        raise ReferenceFileError(f"{where}: has no 'tokens' array: the token ids the tensors were computed for")
    tokens = np.asarray(reference["tokens"]).reshape(-1)
    if tokens.dtype.kind not in "iu":
        raise ReferenceFileError(f"{where}: 'tokens' must hold integer ids, got dtype {tokens.dtype}")
    names = [n for n in reference if n != "tokens"]
    if not names:
        raise ReferenceFileError(f"{where}: holds no tensors to compare besides 'tokens'")
    ours = run_and_capture(model, tokens, names)
    report = compare(ours, reference, tolerance, top_k, qk_layout or meta.get("qk_layout", "interleaved"))
    if not report.tensors and not report.mismatched:
        raise ReferenceFileError(f"{where}: none of its tensors has a llama_ref capture name "
                             f"(e.g. {names[0]!r}); see docs/verification.md")
    return report


# ---- the readable table --------------------------------------------------------------------------------

def format_report(report: Report, all_tensors: bool = False) -> str:
    """A table of the differences: every tensor, or (default) one row per layer with its worst tensor."""
    lines = [f"{'tensor':<40} {'shape':<18} {'max abs':>10} {'mean abs':>10} {'rel':>10} {'jump':>8} "
             f"{'worst pos':>9}"]
    first = report.first_divergence

    def row(t: TensorDiff, label: Optional[str] = None) -> str:
        jump = "-" if t.jump == 1.0 else ("new" if np.isinf(t.jump) else f"x{t.jump:.3g}")
        flag = "  <- first past tolerance" if t is first else ("  !" if t.rel > report.tolerance else "")
        return (f"{label or t.name:<40} {str(t.shape):<18} {t.max_abs:>10.3g} {t.mean_abs:>10.3g} "
                f"{t.rel:>10.3g} {jump:>8} {t.worst_position:>9}{flag}")

    if all_tensors:
        lines += [row(t) for t in report.tensors]
    else:
        # One row per layer (its worst tensor), in forward order; tensors outside the layers and the first
        # tensor past tolerance get rows of their own.
        groups: dict = {}
        for t in report.tensors:
            groups.setdefault(t.name if t.layer is None else t.layer, []).append(t)
        for key, members in groups.items():
            if isinstance(key, str):
                lines.append(row(members[0]))
                continue
            worst = max(members, key=lambda t: t.rel)
            lines.append(row(worst, f"layers.{key} (worst: {worst.name.split('.', 2)[2]})"))
            if first in members and first is not worst:
                lines.append(row(first))
    if report.logits is not None:
        lg = report.logits
        lines.append("")
        lines.append(f"logits: argmax agrees at {int(lg.top1_agree.sum())}/{lg.top1_agree.size} positions, "
                     f"top-{lg.k} overlap {lg.topk_overlap.mean():.3f}, "
                     f"KL(ref||ours) mean {lg.kl.mean():.3g} max {lg.kl.max():.3g} nats")
        bad = np.flatnonzero(~lg.top1_agree)
        if bad.size:
            lines.append(f"        argmax differs at positions {', '.join(map(str, bad[:10]))}"
                         + (" ..." if bad.size > 10 else ""))
    for name in report.missing:
        lines.append(f"not produced by the model (skipped): {name}")
    for text in report.mismatched:
        lines.append(f"shape mismatch: {text}")
    lines.append("")
    if first is not None:
        where = f"layer {first.layer}" if first.layer is not None else "outside the layers"
        lines.append(f"FAIL: first difference past tolerance {report.tolerance:g}: {first.name} ({where}), "
                     f"rel {first.rel:.3g}, worst at position {first.worst_position}")
    elif report.mismatched:
        lines.append("FAIL: some tensors could not be compared (shape mismatch)")
    else:
        lines.append(f"PASS: {len(report.tensors)} tensors within relative tolerance {report.tolerance:g} "
                     f"(largest {report.max_rel:.3g})")
    return "\n".join(lines)


# ---- the command line: `llama-ref dump` and `llama-ref verify` -------------------------------------------

CLI_EXAMPLES = """examples:
  llama-ref dump smollm2-135m-instruct --prompt "The capital of France is" -o ref.npz
  llama-ref verify smollm2-135m-instruct --reference ref.npz --dtype float64
  llama-ref verify path/to/model.gguf --reference theirs.safetensors --tolerance 1e-2 --all
  llama-ref verify smollm2-135m-instruct --against float64 --prompt "Once upon a time" --backend numba
file format: docs/verification.md; --against float64: the float32 error budget per layer and operation
"""


def add_subcommands(sub) -> None:
    """Add `dump` and `verify` to the llama-ref argument parser's subcommands."""
    import argparse

    from ..weights.fetch import DEFAULT_MODEL

    fmt = argparse.RawDescriptionHelpFormatter
    for name, text in (("dump", "write a model's activations for a prompt to a reference file"),
                       ("verify", "compare a model's activations with a reference file, or its float32 "
                                  "forward pass with its own float64 one (--against float64)")):
        c = sub.add_parser(name, help=text, description=text, epilog=CLI_EXAMPLES, formatter_class=fmt)
        c.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                       help=f"GGUF file, model directory or name (default: {DEFAULT_MODEL})")
        c.add_argument("--dtype", choices=["float32", "float64"], default="float32",
                       help="computation dtype (default float32)")
        c.add_argument("--backend", choices=["numpy", "numba"], default="numpy")
        c.add_argument("--sums", choices=["blas", "apart", "blocked"], default=None,
                       help="how the float32 matrix products are summed (llama_ref.load's sums; default: its "
                            "default)")
        src = c.add_mutually_exclusive_group(required=name == "dump")
        src.add_argument("--prompt", help="text to run (encoded with the model's tokenizer)"
                         + ("" if name == "dump" else f"; with --against (default {BUDGET_PROMPT!r})"))
        src.add_argument("--tokens", help="comma-separated token ids to run instead of a prompt")
        c.add_argument("--bos", action=argparse.BooleanOptionalAction, default=None,
                       help="add the BOS token to --prompt (default: the model's own convention)")
        if name == "dump":
            c.add_argument("--names", nargs="+", default=None, metavar="PATTERN",
                           help="keep only these capture names (fnmatch patterns, e.g. 'layers.*.residual')")
            c.add_argument("-o", "--output", required=True, help="file to write (.npz or .safetensors)")
        else:
            against = c.add_mutually_exclusive_group(required=True)
            against.add_argument("--reference", help="reference file (.npz or .safetensors)")
            against.add_argument("--against", choices=["float64"],
                                 help="print the float32 pass's error budget against the same model in float64: "
                                      "per layer and operation, its own rounding and the accumulated error")
            c.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                           help=f"largest relative difference accepted per tensor (default {DEFAULT_TOLERANCE:g})")
            c.add_argument("--top-k", type=int, default=5, help="k of the top-k agreement (default 5)")
            c.add_argument("--all", action="store_true", help="one row per tensor instead of per layer")
            c.add_argument("--no-attribution", dest="attribution", action="store_false",
                           help="with --against: skip the float64 passes that attribute the logits' error to "
                                "each kind of operation")


def run_subcommand(args) -> int:
    """Run `llama-ref dump` or `llama-ref verify`; verify returns 1 when past the tolerance."""
    from ..loading import load

    if args.command == "verify":
        if not args.tolerance >= 0:
            raise InputError(f"--tolerance must be >= 0, got {args.tolerance}")
        if args.top_k < 1:
            raise InputError(f"--top-k must be >= 1, got {args.top_k}")
        if args.against is not None:
            return _run_budget(args)
        if args.prompt is not None or args.tokens is not None:
            raise InputError("--prompt and --tokens go with --against (a reference file holds its own tokens)")
        load_reference(args.reference)  # a bad reference file is reported before the model is loaded
    else:
        _file_kind(Path(args.output))
    model = load(args.model, backend=args.backend, dtype=np.dtype(args.dtype), progress=True, sums=args.sums)
    if args.command == "dump":
        meta = {} if args.tokens is not None else {"prompt": args.prompt}
        tokens = _cli_tokens(args, model)
        path = dump(model, tokens, args.output, args.names, meta)
        print(f"wrote {path} ({len(tokens)} tokens, dtype {model.dtype.name})")
        return 0
    report = verify(model, args.reference, args.tolerance, args.top_k)
    print(format_report(report, args.all))
    return 0 if report.passed else 1


def _cli_tokens(args, model) -> list:
    """The token ids of --tokens, or of --prompt (BUDGET_PROMPT when neither is given)."""
    if args.tokens is not None:
        try:
            tokens = [int(t) for t in args.tokens.replace(" ", "").split(",") if t]
        except ValueError:
            raise InputError(f"--tokens must be comma-separated integers, got {args.tokens!r}") from None
    else:
        prompt = BUDGET_PROMPT if args.prompt is None else args.prompt
        if not prompt:
            raise InputError("--prompt is empty")
        tokens = model.tokenizer.encode(prompt, bos=args.bos)
    if not tokens:
        raise InputError("no tokens to run")
    return tokens


def _run_budget(args) -> int:
    """`llama-ref verify MODEL --against float64`: the float32 model's error budget (llama_ref.tools.precision);
    1 when some tensor's accumulated relative error is past --tolerance."""
    from ..loading import load
    from .precision import error_budget

    if args.dtype != "float32":
        raise InputError("--against float64 measures the float32 forward pass: leave --dtype at float32")
    model32 = load(args.model, backend=args.backend, dtype=np.float32, progress=True, sums=args.sums)
    model64 = load(args.model, backend="numpy", dtype=np.float64, progress=False)
    budget = error_budget(model32, model64, _cli_tokens(args, model32), attribute=args.attribution)
    print(budget.table(args.all))
    worst = max(budget.steps, key=lambda s: s.accumulated)
    if worst.accumulated > args.tolerance:
        print(f"FAIL: {worst.name} is {worst.accumulated:.3g} from float64, past tolerance {args.tolerance:g}")
        return 1
    print(f"PASS: every tensor within relative tolerance {args.tolerance:g} of float64 "
          f"(largest {worst.accumulated:.3g}, {worst.name})")
    return 0
