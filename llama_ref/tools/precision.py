"""Where a float32 forward pass loses precision: its error budget against the same model in float64.

The float64 forward pass of the NumPy backend is the truth (rounding ~1e-16, far below float32's ~6e-8). For
one token sequence, `error_budget` reports for every step of the forward pass (the names of llama_ref.tools.capture):

  own         the rounding error of the step's own operations alone: each operation of the float32 backend
              applied to the float64 truth's inputs rounded to float32, against the float64 operation on
              those same rounded inputs, relative to the output's scale (max |diff| / max |float64|). One
              float32 rounding of the result is ~6e-8; a long float32 sum is several times that.
  accumulated the float32 pass against the float64 pass at that tensor, relative: every earlier step's
              error, carried forward and grown.

and, per kind of operation, `attribution`: the largest logit error of a float64 pass in which only that kind
runs in float32 (on its inputs rounded to float32), i.e. how much of the float32 logits' error that kind
alone would cause. The steps and kinds come from watching the backend's calls, so any model the forward
pass runs (Llama 4's experts too) is covered without a second copy of the forward pass here.

    from .precision import error_budget
    budget = error_budget(model32, model64, tokens)       # same weights; model64 has dtype float64
    print(budget.table())
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from ..model import ops
from .capture import Capture, capture, layer_of
from ..errors import InputError
from ..model.transformer import Transformer

# The backend functions that compute something (rope_frequencies and rope_tables are computed in float64 by
# both passes and rounded once; a backend reuses ops' for them).
OPS = ("embedding", "rms_norm", "linear", "apply_rope", "attention", "swiglu")
ADD = "residual add"  # h + out in the forward pass itself, not a backend call
# The residual stream's capture names, and the branch each adds to the stream before it.
_BRANCHES = {"attention_residual": ("attention_residual", "attention.output"),
             "residual": ("residual", "feed_forward.output")}


@dataclass
class Step:
    """One capture name: the worst own-rounding error of each operation that produced it, and the
    accumulated error of the float32 pass there (both relative to the float64 tensor's max |value|)."""
    name: str
    own: dict = field(default_factory=dict)  # operation -> relative error
    accumulated: float = 0.0

    @property
    def layer(self) -> Optional[int]:
        return layer_of(self.name)


@dataclass
class Budget:
    steps: list  # Step, in forward-pass order
    logits_max_abs: float  # max |float32 logit - float64 logit|
    logits_scale: float  # max |float64 logit|
    attribution: dict  # operation -> max |logit error| when only it runs in float32
    backend: str = "numpy"
    n_tokens: int = 0

    def step(self, name: str) -> Step:
        return next(s for s in self.steps if s.name == name)

    def by_layer(self) -> dict:
        """operation -> (n_layers,) the worst own error of that operation in each layer; and "accumulated"
        -> (n_layers,) the accumulated error of each layer's output (its last step)."""
        layers = sorted({s.layer for s in self.steps if s.layer is not None})
        out = {op: np.zeros(len(layers)) for op in OPS + (ADD,) if any(op in s.own for s in self.steps)}
        out.pop("embedding", None)
        acc = np.zeros(len(layers))
        for s in self.steps:
            if s.layer is None:
                continue
            for op, rel in s.own.items():
                if op in out:
                    out[op][s.layer] = max(out[op][s.layer], rel)
            acc[s.layer] = s.accumulated  # the layer's last step: its output
        out["accumulated"] = acc
        return out

    def table(self, all_steps: bool = False) -> str:
        return format_budget(self, all_steps)


class _Watch(types.ModuleType):
    """A float64 backend that, at every call, also runs the float32 backend's operation on the inputs rounded
    to float32 and keeps its error against the float64 operation on those rounded inputs.

    With `only` set, it instead returns the float32 result for that operation (so that only it rounds)."""

    def __init__(self, backend32: types.ModuleType, only: Optional[str] = None):
        super().__init__("float32_watch")
        self.pending: list[tuple[str, float]] = []  # (operation, relative error) since the last capture name
        for name in ("rope_frequencies", "rope_tables"):
            setattr(self, name, getattr(ops, name))
        for name in OPS:
            setattr(self, name, self._watched(name, getattr(ops, name), getattr(backend32, name), only))

    def _watched(self, name, op64, op32, only):
        def call(*args):
            if only is not None and name != only:
                return op64(*args)
            if name == "embedding":  # (tokens, table, dtype): a lookup, exact in either dtype
                out32, exact = op32(args[0], args[1], np.float32), op64(*args)
            else:
                rounded = tuple(_to32(a) for a in args)
                out32 = op32(*rounded)
                if only is not None:
                    return out32.astype(np.float64)
                exact = op64(*(_widen(a) for a in rounded))
            self.pending.append((name, _rel(out32, exact)))
            return op64(*args)
        return call


class _Steps(Capture):
    """Collects the float64 pass's tensors and hands each capture name the errors of the calls before it."""

    def __init__(self, watch: _Watch):
        super().__init__()
        self.watch, self.own = watch, {}

    def record(self, name: str, x: np.ndarray) -> None:
        own: dict = {}
        for op, rel in self.watch.pending:
            own[op] = max(own.get(op, 0.0), rel)
        self.watch.pending.clear()
        self.own[name] = own
        super().record(name, x)


def error_budget(model32: Transformer, model64: Transformer, tokens, attribute: bool = True) -> Budget:
    """The float32 model's error budget on `tokens` (T,), against model64 (the same weights, dtype float64).

    attribute: also run one float64 pass per kind of operation with only that kind in float32 (about 5
    more float64 passes) for Budget.attribution.
    """
    if model64.dtype != np.float64 or model32.dtype != np.float32:
        raise InputError("error_budget needs a float32 model and a float64 model of the same weights")
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise InputError(f"tokens must be one sequence of shape (T,), got shape {tokens.shape}")
    backend32 = model32.ops

    def run(model, backend, watch=None):
        saved = model.ops
        model.ops = backend
        cache = model.new_cache(1, capacity=max(1, len(tokens)))
        try:
            if watch is None:
                with capture(model) as acts:
                    model.forward(tokens, 0, cache=cache)
                return acts
            steps = _Steps(watch)
            previous, model.capture = model.capture, steps
            try:
                model.forward(tokens, 0, cache=cache)
            finally:
                model.capture = previous
            return steps
        finally:
            model.ops = saved

    truth = run(model64, w := _Watch(backend32), w)
    acts32 = run(model32, backend32)
    steps = []
    previous_residual = None
    for name, exact in truth.items():
        own = dict(truth.own[name])
        branch = _BRANCHES.get(name.rsplit(".", 1)[-1])
        if branch and previous_residual is not None and name[:-len(branch[0])] + branch[1] in truth:
            # h + out: the float32 sum of the two float32-rounded float64 terms against their exact sum.
            own[ADD] = _add_error(truth[previous_residual], truth[name[:-len(branch[0])] + branch[1]])
        if name.endswith("residual") or name == "embeddings":
            previous_residual = name
        ours = acts32.get(name)
        accumulated = _rel(ours, exact) if ours is not None and ours.shape == exact.shape else float("nan")
        steps.append(Step(name, own, accumulated))
    logits32, logits64 = acts32["logits"], truth["logits"]
    attribution = {}
    if attribute:
        for op in OPS[1:]:
            logits = run(model64, _Watch(backend32, only=op))["logits"]
            attribution[op] = float(np.abs(logits - logits64).max())
    return Budget(steps, float(np.abs(logits32.astype(np.float64) - logits64).max()),
                  float(np.abs(logits64).max()), attribution, getattr(model32, "backend_name", "numpy"),
                  len(tokens))


def _to32(a):
    return a.astype(np.float32) if isinstance(a, np.ndarray) and a.dtype == np.float64 else a


def _widen(a):
    return a.astype(np.float64) if isinstance(a, np.ndarray) and a.dtype == np.float32 else a


def _rel(ours: np.ndarray, exact: np.ndarray) -> float:
    scale = float(np.abs(exact).max())
    diff = float(np.abs(ours.astype(np.float64) - exact).max())
    return diff / scale if scale > 0 else diff


def _add_error(h: np.ndarray, out: np.ndarray) -> float:
    a, b = h.astype(np.float32), out.astype(np.float32)
    return _rel(a + b, a.astype(np.float64) + b.astype(np.float64))


def format_budget(budget: Budget, all_steps: bool = False) -> str:
    """One row per layer (the worst own error of each operation in it, and its output's accumulated error);
    with all_steps, one row per step. Then the logits and the attribution per operation."""
    lines = [f"float32 error budget ({budget.backend} backend, {budget.n_tokens} tokens) against float64: "
             "relative errors, max |float32 - float64| / max |float64|",
             "  own: the step's operations alone, on inputs rounded to float32 (one float32 rounding ~6e-8); "
             "accumulated: the float32 pass there"]
    if all_steps:
        lines.append(f"{'step':34s} {'own':>9s}  {'accumulated':>11s}  operations")
        for s in budget.steps:
            own = max(s.own.values(), default=0.0)
            ops_text = ", ".join(f"{op} {rel:.1e}" for op, rel in s.own.items())
            lines.append(f"{s.name:34s} {own:9.1e}  {s.accumulated:11.1e}  {ops_text}")
    else:
        table = budget.by_layer()
        kinds = [k for k in table if k != "accumulated"]
        lines.append(f"{'layer':>5s} " + " ".join(f"{k:>12s}" for k in kinds) + f" {'accumulated':>12s}")
        for i in range(len(table["accumulated"])):
            lines.append(f"{i:5d} " + " ".join(f"{table[k][i]:12.1e}" for k in kinds)
                         + f" {table['accumulated'][i]:12.1e}")
        for name in ("norm", "logits"):
            s = next((s for s in budget.steps if s.name == name), None)
            if s is not None:
                own = ", ".join(f"{op} {rel:.1e}" for op, rel in s.own.items())
                lines.append(f"{name:>5s}  own: {own}; accumulated {s.accumulated:.1e}")
    lines.append(f"logits: max |float32 - float64| = {budget.logits_max_abs:.2e} "
                 f"(max |logit| {budget.logits_scale:.3g})")
    if budget.attribution:
        worst = max(budget.attribution, key=budget.attribution.get)
        lines.append("logits error with only one kind of operation in float32 (the rest float64): "
                     + ", ".join(f"{op} {err:.1e}" for op, err in budget.attribution.items())
                     + f"; largest: {worst}")
    return "\n".join(lines)
