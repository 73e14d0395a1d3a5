"""Rendering a model's jinja chat template with bounded time and size.

A chat template is code shipped inside a model file. jinja's sandbox keeps it away from Python's internals,
but not from running for ever (the sandbox bounds each `range`, not the product of nested loops) or from
building huge values (`'a' * 10**10`). Every render here has two bounds, and a template that reaches one
is stopped with a TokenizerError saying which:

- time (TEMPLATE_SECONDS): a deadline checked at every iteration of every template loop (a check is
  inserted at the top of each loop body, so a loop that writes nothing is stopped too), at every call
  (functions, methods, macros, so recursion is covered) and at every filter. Those are the only ways a
  template repeats work; everything between two checks is one operation on values bounded as below.
- size (TEMPLATE_MAX_CHARS): no value the template builds may be longer than the bound, measured as the
  length of its text. The operations that can grow a value faster than their operands (`*`, `**`, `%`,
  `+`, `~`, string methods such as replace/join/center/format, and the filters join, replace, indent,
  center, wordwrap, format, tojson, pprint) are checked *before* they run, from their operands, so the
  huge value is never allocated; any other result is checked after. The text a render writes in total
  (output, and blocks or macros whose text is later dropped) is bounded by the same number. Integers are
  bounded to sys.get_int_max_str_digits() digits, Python's own bound for printing one.

The bounds are generous for real chat templates (a few KB of jinja over a conversation that fits a context
window) and fixed, so a template renders the same everywhere.
"""

from __future__ import annotations

import functools
import json
import re
import sys
import time
from typing import Any

TEMPLATE_SECONDS = 5.0  # wall-clock bound on one render
TEMPLATE_MAX_CHARS = 4_000_000  # bound on any value's text and on all the text one render writes
_INT_DIGITS = sys.get_int_max_str_digits() if hasattr(sys, "get_int_max_str_digits") else 4300


class TemplateStopped(Exception):
    """A render reached one of its bounds. Deliberately not a ValueError/TypeError: jinja's filters catch
    those (e.g. `int` turns them into a default), and this must reach render_chat."""


def _text_size(value: Any, cap: int) -> int:
    """About how many characters str(value) has (an upper estimate for containers), counting stops once
    past `cap`, so a list that holds itself many times over (`[l, l]`, repeated) costs at most ~cap steps."""
    if isinstance(value, str):
        return len(value)
    from jinja2.utils import Namespace

    total, stack = 0, [value]
    while stack:
        x = stack.pop()
        if isinstance(x, str):
            total += len(x) + 2  # quotes, inside a container
        elif isinstance(x, (bytes, bytearray)):
            total += 4 * len(x) + 3
        elif isinstance(x, bool) or x is None or isinstance(x, float):
            total += 24
        elif isinstance(x, int):
            total += _digits(x) + 1
        elif isinstance(x, dict):
            total += 2 + 4 * len(x)
            for k, v in x.items():
                stack += (k, v)
                if len(stack) > cap:
                    return cap + 1
        elif isinstance(x, (list, tuple, set, frozenset)):
            total += 2 + 2 * len(x)
            if total > cap:
                return total
            stack.extend(x)
        elif isinstance(x, Namespace):
            stack.append(object.__getattribute__(x, "_Namespace__attrs"))
        else:
            total += 64  # objects jinja hands out (loop, cycler, undefined...): short reprs
        if total > cap:
            return total
    return total


def _digits(n: int) -> int:
    """Decimal digits of |n| (at most one too many)."""
    return int(abs(n).bit_length() * 0.30103) + 1


def _width(x: Any) -> int:
    """What an argument adds to a result: a string its length, a number its value (a width or count)."""
    if isinstance(x, bool):
        return 1
    if isinstance(x, int):
        return max(x, 0)
    if isinstance(x, str):
        return len(x)
    return 0


_FORMAT_NUMBER = re.compile(r"\d+")


def _format_bound(fmt: str, args: tuple, kwargs: dict, cap: int) -> int:
    """An upper bound on len(fmt % args) or len(fmt.format(*args, **kwargs)): every field may print the
    largest argument, padded to the largest width written in the format (or passed as `*`)."""
    fields = fmt.count("%") + fmt.count("{")
    if not fields:
        return len(fmt)
    values = list(args) + list(kwargs.values())
    if len(values) == 1 and isinstance(values[0], (tuple, dict)):  # fmt % (a, b) / fmt % {"k": v}
        values = list(values[0].values() if isinstance(values[0], dict) else values[0])
    widest = max([int(n) for n in _FORMAT_NUMBER.findall(fmt)] + [_width(v) for v in values if isinstance(v, int)]
                 + [0])
    largest = max([_text_size(v, cap) for v in values] + [0])
    return len(fmt) + fields * (widest + largest)


def _materialize(x: Any) -> Any:
    """An iterable as a list, so its size can be known before it is joined (a generator from map/select)."""
    if isinstance(x, (str, list, tuple, dict)) or not hasattr(x, "__iter__"):
        return x
    return list(x)


# Filters that rearrange values without writing them as text: their input is not measured (a loop over a
# long conversation calling `messages|length` stays linear).
_STRUCTURAL_FILTERS = frozenset("""abs attr batch count default d dictsort first float groupby int items last
    length list map max min random reject rejectattr reverse round select selectattr slice sort sum unique""".split())


def _environment(max_chars: int, seconds: float):
    from jinja2 import nodes
    from jinja2.compiler import CodeGenerator
    from jinja2.runtime import Context, Macro, markup_join, str_join
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from jinja2.nodes import EvalContext
    from jinja2.environment import Environment

    class _Generator(CodeGenerator):
        def _output_const_repr(self, group) -> str:
            # Constant text written by the template: charged to the render's total.
            return f"environment.bounded_emit_text({super()._output_const_repr(group)})"

        def visit_Concat(self, node, frame) -> None:  # `a ~ b`: measured before it is joined
            if frame.eval_ctx.volatile:
                self.write("environment.bounded_concat(context.eval_ctx.autoescape, (")
            else:
                self.write(f"environment.bounded_concat({bool(frame.eval_ctx.autoescape)}, (")
            for arg in node.nodes:
                self.visit(arg, frame)
                self.write(", ")
            self.write("))")

    class BoundedSandbox(ImmutableSandboxedEnvironment):
        code_generator_class = _Generator
        intercepted_binops = frozenset({"*", "**", "%", "+"})

        def __init__(self, **kwargs):
            super().__init__(finalize=self.bounded_emit, **kwargs)
            self.max_chars, self.seconds = max_chars, seconds
            self.deadline = time.monotonic() + seconds
            self.written = 0
            self.filters = {name: self._bounded_filter(name, f) for name, f in self.filters.items()}

        # -- the two bounds -------------------------------------------------------------------------------
        def start(self) -> None:
            self.deadline, self.written = time.monotonic() + self.seconds, 0

        def bounded_tick(self) -> None:
            if time.monotonic() > self.deadline:
                raise TemplateStopped(f"it ran longer than {self.seconds:g} s, the bound on a chat template's "
                                      "time (a loop or recursion that does not end soon enough)")

        def _check(self, size: int, what: str) -> None:
            if size > self.max_chars:
                raise TemplateStopped(f"{what} would be over {self.max_chars:,} characters (about {size:,}), "
                                      "the bound on a chat template's values")

        def _check_value(self, value: Any, what: str) -> Any:
            self._check(_text_size(value, self.max_chars), what)
            return value

        def _charge(self, n: int) -> None:
            self.written += n
            if self.written > self.max_chars:
                raise TemplateStopped(f"it wrote over {self.max_chars:,} characters, the bound on a chat "
                                      "template's text")

        # -- hooks the compiled template calls ------------------------------------------------------------
        def bounded_emit(self, value: Any) -> Any:  # {{ value }}
            self._charge(_text_size(value, self.max_chars))
            return value

        def bounded_emit_text(self, text: str) -> str:  # constant text between tags
            self._charge(len(text))
            return text

        def bounded_concat(self, autoescape: bool, values: tuple) -> str:
            self._check(sum(_text_size(v, self.max_chars) for v in values), "the text joined by '~'")
            return markup_join(values) if autoescape else str_join(values)

        def call_binop(self, context, operator: str, left: Any, right: Any) -> Any:
            self.bounded_tick()
            numbers = (int, float)
            if operator == "*":
                if isinstance(left, int) and isinstance(right, int):
                    if _digits(left) + _digits(right) > _INT_DIGITS:
                        raise TemplateStopped(f"'*' would make an integer of over {_INT_DIGITS} digits")
                elif isinstance(right, int) and not isinstance(left, numbers):
                    self._check(_text_size(left, self.max_chars) * max(right, 0), "the result of '*'")
                elif isinstance(left, int) and not isinstance(right, numbers):
                    self._check(_text_size(right, self.max_chars) * max(left, 0), "the result of '*'")
            elif operator == "**":
                # |left| >= 2**(bits-1), so the power has at least (bits-1) * right * log10(2) digits.
                if isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
                    if (abs(left).bit_length() - 1) * right * 0.30103 > _INT_DIGITS:
                        raise TemplateStopped(f"'**' would make an integer of over {_INT_DIGITS} digits")
            elif operator == "+":
                if not (isinstance(left, numbers) and isinstance(right, numbers)):
                    self._check(_text_size(left, self.max_chars) + _text_size(right, self.max_chars),
                                "the result of '+'")
            elif operator == "%" and isinstance(left, str):
                self._check(_format_bound(left, (right,), {}, self.max_chars), "the text formatted by '%'")
            return self.binop_table[operator](left, right)

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's own signature)
            __self.bounded_tick()
            if not isinstance(__obj, Macro):  # a macro's body is checked as it runs
                args = __self._check_call(__obj, args, kwargs)
            result = super().call(__context, __obj, *args, **kwargs)
            return __self._check_value(result, f"the result of {getattr(__obj, '__name__', 'a call')}()")

        def _check_call(self, obj, args: tuple, kwargs: dict) -> tuple:
            target = getattr(obj, "__wrapped__", obj)  # the sandbox wraps str.format
            receiver, name = getattr(target, "__self__", None), getattr(target, "__name__", "")
            cap = self.max_chars
            if not isinstance(receiver, str):
                # Any other function: a number past the bound is a count or width nothing needs.
                for a in list(args) + list(kwargs.values()):
                    if isinstance(a, int) and not isinstance(a, bool) and a > cap:
                        raise TemplateStopped(f"{name or 'a function'}() was given {a:,}, over the bound of "
                                              f"{cap:,} on a chat template's values")
                return args
            n, what = len(receiver), f"the result of str.{name}()"
            widths = [_width(a) for a in list(args) + list(kwargs.values())]
            if name == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
                old, new = args[0], args[1]
                count = receiver.count(old) if old else n + 1
                if len(args) > 2 and isinstance(args[2], int) and args[2] >= 0:
                    count = min(count, args[2])
                self._check(n + count * max(0, len(new) - len(old)), what)
            elif name == "join" and args:
                items = _materialize(args[0])
                args = (items,) + args[1:]
                if hasattr(items, "__len__"):
                    self._check(sum(_text_size(i, cap) for i in items) + n * max(len(items) - 1, 0), what)
            elif name in ("format", "format_map"):
                self._check(_format_bound(receiver, args, kwargs, cap), what)
            elif name in ("center", "ljust", "rjust", "zfill"):
                self._check(max([n] + widths), what)
            elif name == "expandtabs":
                self._check(n + receiver.count("\t") * max(widths + [8]), what)
            elif name == "translate":
                table = args[0] if args else {}
                longest = max([_text_size(v, cap) for v in table.values()] + [1]) if isinstance(table, dict) else 1
                self._check(n * longest, what)
            else:  # case changes and the like: at most 3 characters per character
                self._check(3 * n + sum(widths), what)
            return args

        # -- filters ----------------------------------------------------------------------------------------
        def _bounded_filter(self, name: str, f):
            @functools.wraps(f)
            def run(*args, **kwargs):
                self.bounded_tick()
                lead = 0  # filters that take the context / eval context / environment first
                while lead < len(args) and isinstance(args[lead], (Context, EvalContext, Environment)):
                    lead += 1
                if lead < len(args):
                    value = _materialize(args[lead]) if name == "join" else args[lead]
                    args = args[:lead] + (value,) + args[lead + 1:]
                    self._check_filter(name, value, args[lead + 1:], kwargs)
                result = f(*args, **kwargs)
                if name not in _STRUCTURAL_FILTERS or isinstance(result, str):
                    self._check_value(result, f"the result of the filter {name}")
                return result

            return run

        def _check_filter(self, name: str, value: Any, rest: tuple, kwargs: dict) -> None:
            cap, what = self.max_chars, f"the result of the filter {name}"
            extra = list(rest) + list(kwargs.values())
            for a in extra:
                if isinstance(a, int) and not isinstance(a, bool) and a > cap:
                    raise TemplateStopped(f"the filter {name} was given {a:,}, over the bound of {cap:,} on a "
                                          "chat template's values")
            if name in _STRUCTURAL_FILTERS:
                return
            size = _text_size(value, cap)
            self._check(size, f"the text the filter {name} works on")
            widths = [_width(a) for a in extra]
            if name == "join":
                sep = rest[0] if rest else kwargs.get("d", "")
                count = len(value) if hasattr(value, "__len__") else 1
                self._check(size + _text_size(sep, cap) * count, what)
            elif name == "replace" and len(rest) >= 2:
                old, new = str(rest[0]), str(rest[1])
                count = str(value).count(old) if old else size + 1
                self._check(size + count * max(0, len(new) - len(old)), what)
            elif name == "indent":
                lines = str(value).count("\n") + 1
                self._check(size + lines * max(widths + [4]), what)
            elif name == "center":
                self._check(max([size] + widths), what)
            elif name == "wordwrap":
                self._check(size * (2 + max(widths[1:] + [1])) if len(widths) > 1 else 2 * size + 1, what)
            elif name == "format":
                self._check(_format_bound(str(value), tuple(rest), kwargs, cap), what)
            elif name in ("tojson", "pprint"):
                indent = kwargs.get("indent", rest[1] if name == "tojson" and len(rest) > 1 else None)
                seps = kwargs.get("separators", rest[2] if name == "tojson" and len(rest) > 2 else None)
                per_item = 2 + _width(indent) * 8 + (_text_size(seps, cap) if seps else 0)
                self._check(size * per_item, what)
            else:
                self._check(size + sum(widths), what)

        # -- loops: a deadline check at the top of every loop body ----------------------------------------
        def _parse(self, source, name, filename):
            tree = super()._parse(source, name, filename)
            for loop in tree.find_all(nodes.For):
                tick = nodes.Call(nodes.EnvironmentAttribute("bounded_tick"), [], [], None, None,
                                  lineno=loop.lineno)
                loop.body.insert(0, nodes.ExprStmt(tick, lineno=loop.lineno))
            return tree

    return BoundedSandbox


def render_template(template: str, variables: dict, *, max_chars: "int | None" = None,
                    seconds: "float | None" = None) -> str:
    """Render a jinja chat template in the bounded sandbox with transformers' settings and helpers
    (raise_exception, strftime_now, its tojson). Raises TemplateStopped at a bound; jinja's and Python's
    own errors pass through for the caller to report. The bounds default to the module's constants."""
    max_chars = TEMPLATE_MAX_CHARS if max_chars is None else max_chars
    seconds = TEMPLATE_SECONDS if seconds is None else seconds
    from jinja2.exceptions import TemplateError
    from jinja2.utils import generate_lorem_ipsum

    if len(template) > max_chars:
        raise TemplateStopped(f"the template is {len(template):,} characters long, over the bound of {max_chars:,}")

    def raise_exception(message):
        raise TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # transformers' tojson: no HTML escaping, non-ASCII kept (jinja2's own filter escapes both)
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        import datetime

        if len(fmt) * 32 > max_chars:  # one directive writes at most a few dozen characters
            raise TemplateStopped(f"strftime_now was given a format of {len(fmt):,} characters")
        return datetime.datetime.now().strftime(fmt)

    def lipsum(n=5, html=True, min=20, max=100):  # noqa: A002 (jinja's names)
        if _width(n) * _width(max) * 16 > max_chars:
            raise TemplateStopped(f"lipsum({n}, max={max}) would be over the bound of {max_chars:,} characters")
        return generate_lorem_ipsum(n, html, min, max)

    # The same environment settings as transformers' apply_chat_template, so templates render identically.
    env = _environment(max_chars, seconds)(trim_blocks=True, lstrip_blocks=True,
                                          extensions=["jinja2.ext.loopcontrols"])
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now, lipsum=lipsum)
    env.filters["tojson"] = env._bounded_filter("tojson", tojson)
    compiled = env.from_string(template)
    env.start()  # compiling may fold constants through the hooks: the render starts from zero
    return compiled.render(**variables)
