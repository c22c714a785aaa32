# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Chapter 2 — Is the answer right? A math verifier, an evaluation harness, and the baseline
#
# Reinforcement learning with *verifiable* rewards needs a program that says "correct" or
# "wrong" for any model output. Before we improve the model we must be able to measure it, and the
# measurement is only as good as that program. This chapter builds it in three layers:
#
# 1. **extraction** — find the final answer in a long, free-form response;
# 2. **normalization** — strip the LaTeX, units and formatting that do not change the value;
# 3. **equivalence** — decide whether two answers are the same *mathematical object*
#    (`0.5`, `\frac12` and `50\%` of 1 are one number; `3\sqrt{13}` is `\sqrt{117}`).
#
# Then an evaluation **harness** runs the engine of chapter 1 over GSM8K and MATH-500, records
# every response as it goes (so an interrupted run resumes where it stopped), and summarizes
# accuracy with honest confidence intervals. We finish with the **baseline**: how good is the
# model before we do anything to it?
#
# The stored outputs come from a real run of Qwen2.5-Coder-0.5B-Instruct on a 2-core CPU.

# %% [markdown]
# ## 0. Parameters
#
# **On a GPU** use `MODEL = "Qwen/Qwen2.5-0.5B-Instruct"`, `DEVICE = "cuda"`, `BATCH_SIZE = 64`,
# and the full test sets (`N_GSM8K = 1319`, `N_MATH = 500`).

# %%
import os
import tempfile

import torch

SMOKE = os.environ.get("RLSCRATCH_SMOKE") == "1"
MODEL = "tiny-random" if SMOKE else "offline:qwen2.5-coder-0.5b-instruct"
DEVICE = "cpu"
N_GSM8K = 4 if SMOKE else 200  # first N problems of the GSM8K test split
N_MATH = 4 if SMOKE else 100  # first N problems of MATH-500
MAX_NEW_TOKENS = 16 if SMOKE else 512
BATCH_SIZE = 16
if SMOKE:  # keep smoke-run records away from the real results
    os.environ["RLSCRATCH_RESULTS"] = tempfile.mkdtemp()
torch.set_num_threads(max(1, os.cpu_count() or 1))
print(f"smoke={SMOKE} model={MODEL} data={os.environ.get('RLSCRATCH_DATA', '(Hub)')}")

# %% [markdown]
# ## 1. Why string matching fails
#
# The reference answer of a MATH problem is LaTeX written by a person; the model writes its own.
# Here are pairs that any grader should accept, and what `==` thinks of them.

# %%
pairs = [("\\frac{1}{2}", "0.5"), ("\\dfrac{14}{3}", "\\frac{14}{3}"), ("3\\sqrt{13}", "\\sqrt{117}"),
         ("90^\\circ", "90"), ("x=5", "5"), ("1,-2", "-2, 1"), ("\\$1,234", "1234"),
         ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\pi/2)"), ("6+9i", "9i+6"), ("\\text{Evelyn}", "Evelyn")]
for gold, pred in pairs:
    print(f"{gold!r:40} vs {pred!r:16} string equal: {gold == pred}")

# %% [markdown]
# ## 2. Extraction
#
# The model's response is a few hundred tokens of reasoning. We look for the final answer with a
# list of rules, most explicit first, and remember which one fired (a falling extraction rate is
# the first sign that a prompt change broke the output format):
#
# | rule | example |
# |---|---|
# | `boxed` | `... so the answer is \boxed{\frac{3}{4}}.` (the *last* `\boxed{}` or `\fbox{}`, nested braces allowed) |
# | `gsm8k` | `#### 42` (the format of GSM8K's reference solutions) |
# | `answer_is` | `The answer is 42.` / `Final answer: 42` |
# | `last_latex` | `... so the area is \(\frac{3\sqrt{3}}{4}\).` (the right-hand side of the last formula, if it looks like a value) |
# | `last_number` | the last number in the text, a weak fallback |
#
# The last two are *fallbacks*: they guess. The harness (section 7) therefore ignores them when a
# response was cut off by the token limit: a truncated response never reached its answer, and
# whatever number it ended on is noise, not an answer.
#
# Everything here is plain string scanning in linear time: the model's output is untrusted, and a
# regular expression with nested quantifiers can take exponential time on a crafted string.

# %%
#| export: verify
"""Grading math answers: extraction, normalization and equivalence. Model output is never evaluated
as code: answers are parsed by a small whitelist parser into SymPy objects, with size guards and a
time limit, and every public function returns (never raises) within a bounded time."""
from __future__ import annotations

import dataclasses
import math
import random
import re
import signal
import threading
from contextlib import contextmanager

import sympy

MAX_ANSWER_CHARS = 300  # longer "answers" are compared as strings only
TIME_LIMIT_S = 1.0  # per answers_match call, where a timer is available (main thread)


@dataclasses.dataclass(frozen=True)
class Extraction:
    answer: str | None
    rule: str  # "boxed", "gsm8k", "answer_is", "last_number" or "none"


def _braced(text: str, start: int) -> str | None:
    """Content of the {...} group opening at text[start], or None if unbalanced."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1:i]
    return None


def _last_boxed(text: str) -> str | None:
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = start + (6 if text.startswith("\\boxed", start) else 5)
    while i < len(text) and text[i] == " ":
        i += 1
    if i < len(text) and text[i] == "{":
        return _braced(text, i)
    match = re.match(r"[^\s$]+", text[i:i + 100])  # "\boxed 5"
    return match.group(0) if match else None


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def extract(text: str) -> Extraction:
    """Find the final answer in a response, and which rule found it."""
    if not isinstance(text, str):
        return Extraction(None, "none")
    boxed = _last_boxed(text)
    if boxed is not None and boxed.strip():
        return Extraction(boxed.strip(), "boxed")
    hashes = text.rfind("####")
    if hashes >= 0:
        line = text[hashes + 4:].strip().split("\n", 1)[0].strip()
        if line:
            return Extraction(line, "gsm8k")
    lower = text.lower()
    cue = max(lower.rfind("answer is"), lower.rfind("answer:"))
    if cue >= 0:
        rest = text[cue:].split(":", 1)[1] if text[cue:].lower().startswith("answer:") else text[cue + 9:]
        rest = re.split(r"\.\s|\.$|\n", rest.strip(), maxsplit=1)[0].strip().strip("$ ")
        if rest:
            return Extraction(rest, "answer_is")
    formula = _last_formula(text)
    if formula is not None:
        return Extraction(formula, "last_latex")
    numbers = _NUMBER.findall(text[-5000:])
    if numbers:
        return Extraction(numbers[-1].rstrip(","), "last_number")
    return Extraction(None, "none")


FALLBACK_RULES = ("last_latex", "last_number")  # guesses, not stated answers


def _last_formula(text: str) -> str | None:
    """The right-hand side of the last \\(...\\), \\[...\\] or $...$ formula, if it looks like a bare value."""
    segments = []
    for opener, closer in (("\\(", "\\)"), ("\\[", "\\]")):
        end = text.rfind(closer)
        start = text.rfind(opener, 0, end) if end >= 0 else -1
        if start >= 0:
            segments.append((end, text[start + 2:end]))
    end = text.rfind("$")
    start = text.rfind("$", 0, end) if end > 0 else -1
    if start >= 0:
        segments.append((end, text[start + 1:end].strip("$")))
    if not segments:
        return None
    body = max(segments)[1].rsplit("=", 1)[-1].strip().rstrip(".,")
    words = re.sub(r"\\[a-zA-Z]+", "", body)
    if not body or len(body) > 80 or "\\text" in body or re.search(r"[A-Za-z]{2,}", words):
        return None
    return body


def extract_answer(text: str) -> str | None:
    """The final answer of a response (see `extract` for the rules), or None."""
    return extract(text).answer


# %%
examples = [
    "First 48/2 = 24. Then 48 + 24 = 72. So the answer is $\\boxed{72}$.",
    "We get \\boxed{\\frac{\\sqrt{3}}{2}} after simplifying \\boxed{x}... no wait, \\boxed{\\frac{1}{2}}",
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72",
    "Adding both months gives 72 clips. The answer is 72.",
    "She sold 48 in April and 24 in May, 72 in total",
    "So the area is \\(\\frac{3\\sqrt{3}}{4}\\).",
    "I don't know.",
    "\\boxed{\\frac{1}{2",
]
for e in examples:
    print(f"{str(extract(e)):60} <- {e[:50]!r}")
assert extract(examples[0]) == Extraction("72", "boxed")
assert extract_answer(examples[1]) == "\\frac{1}{2}"
assert extract(examples[2]).rule == "gsm8k" and extract(examples[3]) == Extraction("72", "answer_is")
assert extract(examples[4]) == Extraction("72", "last_number") and extract(examples[6]).answer is None
assert extract(examples[5]) == Extraction("\\frac{3\\sqrt{3}}{4}", "last_latex")

# %% [markdown]
# ## 3. Normalization
#
# Normalization removes what does not change the value: dollar signs and `\$`, `\left`/`\right`,
# spacing commands, `\text{}` wrappers, degree marks, units after a number, thousands separators,
# a trailing period, the unicode minus sign. `\dfrac` and `\tfrac` are display variants of `\frac`.
# We stop there: anything that needs *mathematics* (is `2/4` equal to `1/2`?) belongs to the next
# step.

# %%
#| export: verify
def normalize_answer(answer: str) -> str:
    """Strip formatting that does not change an answer's value (LaTeX decoration, units, separators)."""
    s = answer.strip()
    s = s.replace("\u2212", "-").replace("\u2013", "-").replace("\u00b0", "")
    for old, new in (("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("\\left", ""), ("\\right", ""),
                     ("\\displaystyle", ""), ("\\!", ""), ("\\,", ""), ("\\;", ""), ("\\:", ""),
                     ("\\$", ""), ("$", ""), ("\\%", "%"), ("^\\circ", ""), ("^{\\circ}", ""), ("{,}", ",")):
        s = s.replace(old, new)
    s = re.sub(r"(?<!\\)\\ ", " ", s)  # "\ " is a space, "\\ " a matrix row break
    s = re.sub(r"\\(?:text|textbf|textit|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}", r"\1", s)
    s = s.strip().rstrip(".").strip()
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):  # 1,234,567
        s = s.replace(",", "")
    unit = re.fullmatch(r"(-?[\d.,/]+)\s*([a-zA-Z]+(?: [a-zA-Z]+){0,2})", s)  # "18 dollars", "5 cm"
    if unit and unit.group(2).lower() not in ("i", "e", "pi") and len(unit.group(2)) > 1:
        s = unit.group(1)
    s = re.sub(r"\s+", " ", s).strip()
    base_n = re.fullmatch(r"([0-9A-Za-z]+)_\{?(\d+)\}?", s)  # 040_9, 4210_{5}: a number in base n
    if base_n:
        s = f"{base_n.group(1).lstrip('0') or '0'}_{base_n.group(2)}"
    if re.fullmatch(r"\(?[A-Ea-e]\)?", s):  # multiple choice: (C) -> C
        s = s.strip("()").upper()
    return s


# %%
for raw in ["\\$1,234.", "90^\\circ", "\\dfrac{14}{3}", "\\text{Evelyn}", "5\\text{ cm}", "\\left( 3, \\frac{\\pi}{2} \\right)",
            "\u22125", "18 dollars", "\\text{(C)}", "10\\%", "040_9", "4210_{5}"]:
    print(f"{raw!r:40} -> {normalize_answer(raw)!r}")
assert normalize_answer("\\$1,234.") == "1234" and normalize_answer("5\\text{ cm}") == "5" and normalize_answer("18 dollars") == "18"
assert normalize_answer("\\text{(C)}") == "C" and normalize_answer("\u22125") == "-5"

# %% [markdown]
# ## 4. Equivalence with SymPy — safely
#
# To compare values we turn each answer into a SymPy object. The obvious tool,
# `sympy.sympify(text)`, runs Python's `eval` on its input — with model output that is remote code
# execution. SymPy's LaTeX parser is safe but slow and still happily computes `9^{9^{9^9}}`, a
# number with about 10^369,693,099 digits, which never finishes and cannot be interrupted because
# Python's big-integer power is a single C call.
#
# So we write a small **whitelist parser**. LaTeX is first rewritten into plain infix
# (`\frac{a}{b}` → `((a)/(b))`, `\sqrt{x}` → `sqrt(x)`, `\pi` → `pi`); an unknown command makes the
# parse fail rather than guess. A recursive-descent parser then accepts only numbers, single-letter
# variables, `+ - * / ^ !`, parentheses, implicit multiplication (`3x`, `2\pi`) and a handful of
# functions. Before computing a power or a factorial it checks that the result stays small
# (at most 10,000 digits); otherwise the parse fails and the answer is compared as a string. A timer
# (`signal.setitimer`) bounds the remaining SymPy work where a timer is available.
#
# Two parsed answers are equal if their difference is zero numerically: exactly for numbers
# (with a relative tolerance of 1e-6 for decimals), and at three random points for expressions
# with variables — a randomized identity test that is far faster and more predictable than
# `simplify`.

# %%
#| export: verify
class _Unparsable(Exception):
    pass


_FUNCTIONS = {"sqrt": sympy.sqrt, "sin": sympy.sin, "cos": sympy.cos, "tan": sympy.tan, "log": sympy.log,
              "ln": sympy.log, "exp": sympy.exp, "abs": sympy.Abs}
_CONSTANTS = {"pi": sympy.pi, "oo": sympy.oo, "i": sympy.I, "e": sympy.E}
_LATEX_WORDS = {"pi": "pi", "infty": "oo", "cdot": "*", "times": "*", "div": "/", "sin": "sin", "cos": "cos",
                "tan": "tan", "log": "log", "ln": "ln", "exp": "exp"}
MAX_DIGITS = 10_000


def _latex_to_infix(s: str) -> str:
    """Rewrite the LaTeX subset we accept into plain infix; raise _Unparsable otherwise."""
    out, i = [], 0

    def argument(j):  # a {group} or a single character; returns (text, next index)
        while j < len(s) and s[j] == " ":
            j += 1
        if j >= len(s):
            raise _Unparsable("missing argument")
        if s[j] == "{":
            body = _braced(s, j)
            if body is None:
                raise _Unparsable("unbalanced braces")
            return _latex_to_infix(body), j + len(body) + 2
        if s[j] == "\\":
            m = re.match(r"\\[a-zA-Z]+", s[j:])
            if m and m.group(0)[1:] in _LATEX_WORDS:
                return _LATEX_WORDS[m.group(0)[1:]], j + len(m.group(0))
            raise _Unparsable("bad argument")
        return s[j], j + 1

    while i < len(s):
        c = s[i]
        if c == "\\":
            m = re.match(r"\\([a-zA-Z]+)", s[i:])
            if not m:
                raise _Unparsable(f"unknown command at {s[i:i + 10]!r}")
            name, i = m.group(1), i + len(m.group(0))
            if name == "frac":
                num, i = argument(i)
                den, i = argument(i)
                out.append(f"(({num})/({den}))")
            elif name == "sqrt":
                index = None
                if i < len(s) and s[i] == "[":
                    close = s.find("]", i)
                    if close < 0:
                        raise _Unparsable("bad root index")
                    index, i = _latex_to_infix(s[i + 1:close]), close + 1
                body, i = argument(i)
                out.append(f"sqrt({body})" if index is None else f"(({body})^(1/({index})))")
            elif name in _LATEX_WORDS:
                out.append(f" {_LATEX_WORDS[name]} ")
            else:
                raise _Unparsable(f"unsupported command \\{name}")
        elif c in "^_":
            arg, i = argument(i + 1)
            if c == "_":
                raise _Unparsable("subscripts are not values")
            out.append(f"^({arg})")
        elif c in "{}":
            out.append("(" if c == "{" else ")")
            i += 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


_TOKEN = re.compile(r"\s*(?:(\d+\.?\d*|\.\d+)|([a-zA-Z]+)|(\*\*|[-+*/^()!]))")


def _tokens(s: str) -> list[tuple[str, str]]:
    tokens, pos = [], 0
    s = s.strip()
    while pos < len(s):
        m = _TOKEN.match(s, pos)
        if not m or m.end() == pos:
            raise _Unparsable(f"unexpected {s[pos:pos + 10]!r}")
        number, word, op = m.groups()
        if number is not None:
            if len(number) > 100:
                raise _Unparsable("number too long")
            tokens.append(("num", number))
        elif word is not None:
            if word in _FUNCTIONS or word in _CONSTANTS:
                tokens.append(("name", word))
            else:  # "xy" is x*y; single letters are variables
                tokens.extend(("name", ch) for ch in word)
        else:
            tokens.append(("op", "^" if op == "**" else op))
        pos = m.end()
    return tokens


def _digits(x) -> float:
    x = abs(x)
    return 0.0 if x == 0 else float(sympy.log(x, 10)) if x.is_Rational and x > 1 else 1.0


def _safe_pow(base, exponent):
    if exponent.is_Number and base.is_Number:
        if abs(exponent) > MAX_DIGITS or abs(base) > 1 and abs(float(exponent)) * _digits(base) > MAX_DIGITS:
            raise _Unparsable("power too large")
    elif exponent.is_Number and abs(exponent) > 1000:
        raise _Unparsable("symbolic power too large")
    return sympy.Pow(base, exponent)


class _Parser:
    def __init__(self, tokens):
        self.tokens, self.i = tokens, 0

    def peek(self):
        return self.tokens[self.i] if self.i < len(self.tokens) else ("end", "")

    def take(self, value=None):
        kind, text = self.peek()
        if value is not None and text != value:
            raise _Unparsable(f"expected {value!r}, got {text!r}")
        self.i += 1
        return kind, text

    def parse(self):
        value = self.expr()
        if self.peek()[0] != "end":
            raise _Unparsable(f"trailing {self.peek()[1]!r}")
        return value

    def expr(self):
        value = self.term()
        while self.peek()[1] in ("+", "-"):
            op = self.take()[1]
            rhs = self.term()
            value = value + rhs if op == "+" else value - rhs
        return value

    def term(self):
        value = self.unary()
        while True:
            kind, text = self.peek()
            if text in ("*", "/"):
                self.take()
                rhs = self.unary()
                if text == "/" and rhs == 0:
                    raise _Unparsable("division by zero")
                value = value * rhs if text == "*" else value / rhs
            elif kind in ("num", "name") or text == "(":  # implicit multiplication: 3x, 2pi, (a)(b)
                value = value * self.power()
            else:
                return value

    def unary(self):
        if self.peek()[1] in ("-", "+"):
            sign = self.take()[1]
            value = self.unary()
            return -value if sign == "-" else value
        return self.power()

    def power(self):
        base = self.postfix()
        if self.peek()[1] == "^":
            self.take()
            return _safe_pow(base, self.unary())
        return base

    def postfix(self):
        value = self.atom()
        while self.peek()[1] == "!":
            self.take()
            if not (value.is_Integer and 0 <= value <= 1000):
                raise _Unparsable("factorial argument")
            value = sympy.factorial(value)
        return value

    def atom(self):
        kind, text = self.take()
        if kind == "num":
            return sympy.Rational(text) if "." not in text else sympy.Float(text, 30)
        if kind == "name":
            if text in _FUNCTIONS:
                if self.peek()[1] != "(":
                    return _FUNCTIONS[text](self.power())  # \sqrt2, \sin x
                self.take("(")
                arg = self.expr()
                self.take(")")
                return _FUNCTIONS[text](arg)
            return _CONSTANTS.get(text) or sympy.Symbol(text)
        if text == "(":
            value = self.expr()
            self.take(")")
            return value
        raise _Unparsable(f"unexpected {text!r}")


def parse_math(text: str):
    """A SymPy expression for a normalized answer, or None if it is outside the accepted subset."""
    if len(text) > MAX_ANSWER_CHARS:
        return None
    try:
        return _Parser(_tokens(_latex_to_infix(text))).parse()
    except (_Unparsable, RecursionError, ValueError, TypeError, ZeroDivisionError, OverflowError):
        return None


# %%
print(parse_math("3\\sqrt{13}"), "|", parse_math("\\frac{\\sqrt{3}}{2}"), "|", parse_math("6+9i"), "|",
      parse_math("x^5 - x^4 + 2x"), "|", parse_math("9^{9^{9^9}}"), "|", parse_math("__import__('os')"))
assert parse_math("3\\sqrt{13}") == parse_math("\\sqrt{117}")
assert parse_math("9^{9^{9^9}}") is None  # refused, not computed
assert parse_math("__import__('os')") is None  # not in the grammar

# %% [markdown]
# Now the comparison itself, which has to handle the *shapes* of answers too:
#
# * a **list** `1, -2` is unordered (MATH asks "enter all solutions, separated by commas");
#   `\{1, 2\}` is a set;
# * a **tuple or interval** `(3, \frac{\pi}{2})`, `[2, 5)` is ordered and its brackets matter;
# * a **matrix** `\begin{pmatrix} 1 & 2 \\ 3 & 4 \end{pmatrix}` is compared entry by entry;
# * `a \pm b` stands for the two values `a + b` and `a - b`;
# * an **equation** `x = 5` equals `5` (the variable is dropped when only one side is an
#   equation), and two equations are equal when one is a nonzero multiple of the other
#   (`y = 2x + 1` and `2y - 4x = 2`);
# * a **percentage** `50\%` matches `50` and `0.5`;
# * anything that does not parse is compared as normalized text, case-insensitively.

# %%
#| export: verify
@contextmanager
def _time_limit(seconds: float):
    """Raise TimeoutError after `seconds` (only on the main thread, where SIGALRM can be used)."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def _raise(signum, frame):
        raise TimeoutError

    previous = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _split_top_level(s: str, sep: str = ",") -> list[str]:
    parts, depth, start = [], 0, 0
    for i, c in enumerate(s):
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif c == sep and depth == 0:
            parts.append(s[start:i])
            start = i + 1
    parts.append(s[start:])
    return [p.strip() for p in parts]


def _parts(s: str) -> list[str]:
    """Top-level comma-separated parts, with "a \\pm b" expanded into a + b and a - b."""
    out = []
    for part in _split_top_level(s):
        out += [part.replace("\\pm", "+", 1), part.replace("\\pm", "-", 1)] if "\\pm" in part else [part]
    return out


def _numeric(expr, point) -> complex:
    try:
        return complex(sympy.N(expr.subs(point), 30))
    except (TypeError, ValueError, OverflowError):  # oo, zoo, nan
        return complex("nan")


def _values_equal(a, b, relative: float = 1e-6) -> bool:
    symbols = sorted(a.free_symbols | b.free_symbols, key=str)
    rng = random.Random(0)
    points = [{s: sympy.Rational(rng.randint(1, 997), rng.randint(1, 97)) for s in symbols} for _ in range(3 if symbols else 1)]
    for point in points:
        x, y = _numeric(a, point), _numeric(b, point)
        if not (math.isfinite(abs(x)) and math.isfinite(abs(y))):
            if a != b:
                return False
            continue
        if abs(x - y) > relative * max(1.0, abs(y)):
            return False
    return True


def _proportional(a, b) -> bool:
    """a == c*b for a nonzero constant c (two equations written differently)."""
    symbols = sorted(a.free_symbols | b.free_symbols, key=str)
    rng = random.Random(1)
    ratios = []
    for _ in range(3):
        point = {s: sympy.Rational(rng.randint(1, 997), rng.randint(1, 97)) for s in symbols}
        x, y = _numeric(a, point), _numeric(b, point)
        if abs(y) < 1e-12:
            if abs(x) > 1e-9:
                return False
            continue
        ratios.append(x / y)
    return bool(ratios) and abs(ratios[0]) > 1e-12 and all(abs(r - ratios[0]) < 1e-6 * abs(ratios[0]) for r in ratios)


def _scalar_match(pred: str, gold: str) -> bool:
    if pred == gold or pred.lower() == gold.lower():
        return True
    pred_eq, gold_eq = pred.count("=") == 1, gold.count("=") == 1
    if pred_eq and gold_eq:
        (pl, pr), (gl, gr) = pred.split("="), gold.split("=")
        a, b = parse_math(f"({pl})-({pr})"), parse_math(f"({gl})-({gr})")
        return a is not None and b is not None and (_values_equal(a, b) or _proportional(a, b))
    if pred_eq != gold_eq:  # "x = 5" vs "5": keep the right-hand side
        lhs, rhs = (pred if pred_eq else gold).split("=")
        if re.fullmatch(r"\s*[a-zA-Z]\s*", lhs):
            return _scalar_match(rhs.strip(), gold) if pred_eq else _scalar_match(pred, rhs.strip())
        return False
    if pred.endswith("%") or gold.endswith("%"):
        p, g = pred.rstrip("%").strip(), gold.rstrip("%").strip()
        p_val, g_val = parse_math(p), parse_math(g)
        if p_val is None or g_val is None:
            return False
        if _values_equal(p_val, g_val):
            return True
        return _values_equal(p_val / 100, g_val) if pred.endswith("%") else _values_equal(p_val, g_val / 100)
    a, b = parse_math(pred), parse_math(gold)
    if a is None or b is None:
        return re.sub(r"[\s{}]", "", pred).lower() == re.sub(r"[\s{}]", "", gold).lower()
    return _values_equal(a, b)


def _lists_match(preds: list[str], golds: list[str], ordered: bool) -> bool:
    if len(preds) != len(golds):
        return False
    if ordered:
        return all(_match(p, g) for p, g in zip(preds, golds))
    remaining = list(golds)
    for p in preds:
        hit = next((k for k, g in enumerate(remaining) if _match(p, g)), None)
        if hit is None:
            return False
        remaining.pop(hit)
    return True


def _matrix(s: str) -> list[list[str]] | None:
    s = re.sub(r"^\s*(?:[a-zA-Z]|\\mathbf\{[a-zA-Z]\}|\\vec\{[a-zA-Z]\})\s*=\s*(?=\\begin)", "", s)  # "v = (matrix)"
    m = re.fullmatch(r"\\begin\{[pbv]?matrix\}(.*)\\end\{[pbv]?matrix\}", s, flags=re.S)
    return None if m is None else [[c.strip() for c in row.split("&")] for row in m.group(1).split("\\\\") if row.strip()]


def _match(pred: str, gold: str) -> bool:
    pred, gold = normalize_answer(pred), normalize_answer(gold)
    if pred == gold:
        return True
    pm, gm = _matrix(pred), _matrix(gold)
    if pm is not None or gm is not None:
        return pm is not None and gm is not None and len(pm) == len(gm) and all(
            _lists_match(p, g, ordered=True) for p, g in zip(pm, gm))
    for opening, closing in (("\\{", "\\}"),):
        if pred.startswith(opening) and gold.startswith(opening) and pred.endswith(closing) and gold.endswith(closing):
            return _lists_match(_parts(pred[2:-2]), _parts(gold[2:-2]), ordered=False)
    pred_parts, gold_parts = _parts(pred), _parts(gold)
    if len(pred_parts) > 1 or len(gold_parts) > 1:
        return _lists_match(pred_parts, gold_parts, ordered=False)
    bracketed = re.compile(r"([(\[])(.*)([)\]])", flags=re.S)
    pb, gb = bracketed.fullmatch(pred), bracketed.fullmatch(gold)
    if pb and gb and "," in pb.group(2) and "," in gb.group(2):  # tuples and intervals: ordered, brackets matter
        return (pb.group(1), pb.group(3)) == (gb.group(1), gb.group(3)) and _lists_match(
            _split_top_level(pb.group(2)), _split_top_level(gb.group(2)), ordered=True)
    return _scalar_match(pred, gold)


def answers_match(pred: str | None, gold: str | None) -> bool:
    """True if two answer strings denote the same mathematical object. Never raises."""
    if not isinstance(pred, str) or not isinstance(gold, str) or not pred.strip() or not gold.strip():
        return False
    if len(pred) > 20 * MAX_ANSWER_CHARS:
        return False
    try:
        with _time_limit(TIME_LIMIT_S):
            return bool(_match(pred, gold))
    except Exception:  # TimeoutError, and anything SymPy throws on odd input
        return False


def grade(response: str, gold: str, *, dataset: str = "gsm8k") -> bool:
    """Is the final answer in `response` equivalent to `gold`? `dataset` is "gsm8k" or "math"."""
    if dataset not in ("gsm8k", "math"):
        raise ValueError(f"dataset must be 'gsm8k' or 'math', got {dataset!r}")
    return answers_match(extract_answer(response), gold)


# %% [markdown]
# ### The verifier's report card
#
# A table of tricky cases, each with the verdict we *want*. The second half are pairs the verifier
# must reject: close is not equal.

# %%
CASES = [  # (prediction, gold, expected)
    ("0.5", "\\frac{1}{2}", True), ("\\dfrac{14}{3}", "\\frac{14}{3}", True), ("\\frac12", "0.5", True),
    ("\\sqrt{117}", "3\\sqrt{13}", True), ("9i + 6", "6+9i", True), ("90", "90^\\circ", True),
    ("5", "x=5", True), ("-2, 1", "1,-2", True), ("1234", "\\$1,234", True), ("(3, \\pi/2)", "\\left( 3, \\frac{\\pi}{2} \\right)", True),
    ("Evelyn", "\\text{Evelyn}", True), ("50\\%", "0.5", True), ("2 \\pm \\sqrt{3}", "2+\\sqrt3, 2-\\sqrt3", True),
    ("y = 2x + 1", "2y - 4x = 2", True), ("x^2 + 2x + 1", "(x+1)^2", True), ("\\{1, 2\\}", "\\{2, 1\\}", True),
    ("\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}", "\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}", True),
    ("[2, 5)", "[2,5)", True), ("\\pi", "\\pi", True), ("72 clips", "72", True), ("(C)", "\\text{(C)}", True),
    ("0.333", "\\frac{1}{3}", False), ("[2, 5]", "[2, 5)", False), ("(1, 2)", "(2, 1)", False),
    ("x^2 + 2x", "(x+1)^2", False), ("6-9i", "6+9i", False), ("1, 2", "1, 2, 3", False), ("73", "72", False),
    ("9^{9^{9^9}}", "1", False), ("", "5", False), (None, "5", False), ("__import__('os').system('ls')", "0", False),
]
import time


def show_table(rows: list[dict]) -> None:
    """Print a list of dicts as an aligned text table."""
    columns = list(rows[0])
    cells = [[str(c) for c in columns]] + [[str(r[c]) if r[c] is not None else "-" for c in columns] for r in rows]
    widths = [min(42, max(len(row[i]) for row in cells)) for i in range(len(columns))]
    for row in cells:
        print("  ".join(v[:42].ljust(w) for v, w in zip(row, widths)))


rows = []
for pred, gold, expected in CASES:
    t0 = time.perf_counter()
    got = answers_match(pred, gold)
    rows.append({"prediction": pred, "gold": gold, "expected": expected, "verifier": got,
                 "ms": round(1000 * (time.perf_counter() - t0), 1)})
show_table(rows)
wrong = [r for r in rows if r["expected"] != r["verifier"]]
assert not wrong, wrong

# %% [markdown]
# Deliberate rejections, and why:
#
# * `0.333` vs `\frac13`: a rounded decimal is a different number. MATH's graders (and ours) want
#   the exact value; a 1e-6 relative tolerance only absorbs floating-point noise.
# * `[2, 5]` vs `[2, 5)`: an interval's brackets are part of the answer.
# * `(1, 2)` vs `(2, 1)`: a tuple is ordered; only bare lists are compared as multisets.
# * `9^{9^{9^9}}`: refused before any arithmetic, so its comparison fails fast instead of running
#   forever.
#
# **Safety.** Model output never reaches `eval` or `sympify`; it is tokenized by a whitelist
# grammar. Pathological inputs must return quickly and never raise:

# %%
nasty = ["9^{9^{9^9}}", "{" * 5000, "\\frac{" * 2000, "1" * 100_000, "x" * 100_000, "(" * 10_000 + ")" * 10_000,
         "\\boxed{" + "\\sqrt{" * 3000 + "2" + "}" * 3000 + "}", "10^{10^{10}}!", "\\sqrt[1000000]{2}^{99999999}"]
worst = 0.0
for s in nasty:
    t0 = time.perf_counter()
    grade(s, "2", dataset="math"), answers_match(s, s), extract(s)
    worst = max(worst, time.perf_counter() - t0)
print(f"worst case over {len(nasty)} pathological inputs: {1000 * worst:.0f} ms")
assert worst < 5

# %% [markdown]
# ### A second opinion: Hugging Face `math-verify`
#
# `math-verify` is a widely used rule-based verifier (it is what the Open R1 project grades with).
# We run both on our cases and on pairs of real MATH-500 reference answers with reformatted
# twins. Agreement on these is a sanity check, and every disagreement is worth reading.
# (`math-verify` is a test-time dependency only: `pip install math-verify`.)

# %%
try:
    from math_verify import parse as mv_parse
    from math_verify import verify as mv_verify
except ImportError:
    mv_parse = None
    print("math-verify is not installed; skipping the comparison")


def math_verify_says(pred, gold):
    if mv_parse is None:
        return None
    if not isinstance(pred, str) or not pred:
        return False
    try:
        return bool(mv_verify(mv_parse(f"${gold}$"), mv_parse(f"${pred}$")))
    except Exception:
        return False


if mv_parse is not None:
    for r in rows:
        r["math_verify"] = math_verify_says(r["prediction"], r["gold"])
    agree = sum(r["math_verify"] == r["verifier"] for r in rows) / len(rows)
    print(f"agreement with math-verify on our {len(rows)} cases: {agree:.0%}; disagreements:")
    show_table([{k: r[k] for k in ("prediction", "gold", "expected", "verifier", "math_verify")}
                for r in rows if r["math_verify"] != r["verifier"]])

# %% [markdown]
# On these hand-made cases the two verifiers agree except for `72 clips`: we strip a trailing
# unit or noun after a number, `math-verify` does not. (`tests/test_verify.py` checks that both
# give the same verdicts on another 38 cases.) Agreement on cases we wrote ourselves proves little,
# so after the baseline run below we repeat the comparison on 300 real model responses.
#
# ## 5. The data
#
# One record type for both benchmarks:
#
# * **GSM8K** (Cobbe et al. 2021): grade-school word problems; the gold answer is the number after
#   `####` in the reference solution. As a difficulty measure we count the solution's steps (its
#   lines before `####`).
# * **MATH-500** (Lightman et al. 2023's 500-problem subset of Hendrycks et al.'s MATH): competition
#   problems with a LaTeX gold answer, a subject, and a difficulty level 1-5.
#
# The loader reads from a data directory (`$RLSCRATCH_DATA`; CI points it at a local copy), else
# from the Hugging Face Hub through `datasets`. A malformed line fails with its file and line
# number.

# %%
#| export: data
"""GSM8K and MATH-500 as one record type, from a local data directory or the Hugging Face Hub."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class Problem:
    id: str
    question: str
    answer: str  # the gold final answer (GSM8K: a number; MATH: LaTeX)
    solution: str
    dataset: str  # "gsm8k" or "math"
    level: int  # difficulty: MATH level 1-5; GSM8K number of solution steps
    subject: str | None = None


class DataError(ValueError):
    pass


def data_dir() -> Path | None:
    """The local data directory (`$RLSCRATCH_DATA`), or None to use the Hugging Face Hub."""
    value = os.environ.get("RLSCRATCH_DATA")
    return Path(value).expanduser() if value else None


def gsm8k_gold(solution: str) -> str:
    """The final answer of a GSM8K reference solution ('... #### 1,234' -> '1234')."""
    if "####" not in solution:
        raise DataError("GSM8K solution without '####'")
    return solution.rsplit("####", 1)[1].strip().replace(",", "")


def _gsm8k_record(row: dict, index: int, split: str) -> Problem:
    steps = [line for line in row["answer"].split("####")[0].splitlines() if line.strip()]
    return Problem(id=f"gsm8k-{split}-{index}", question=row["question"], answer=gsm8k_gold(row["answer"]),
                   solution=row["answer"], dataset="gsm8k", level=len(steps))


def _math_record(row: dict, index: int) -> Problem:
    return Problem(id=row.get("unique_id", f"math500-{index}"), question=row["problem"], answer=row["answer"],
                   solution=row["solution"], dataset="math", level=int(row["level"]), subject=row["subject"])


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{number}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict) or not {"question", "answer"} <= row.keys():
                raise DataError(f"{path}:{number}: expected an object with 'question' and 'answer'")
            rows.append(row)
    return rows


def _from_hub(name: str, config: str | None, split: str, tried: Path | None) -> list[dict]:
    try:
        import datasets

        return list(datasets.load_dataset(name, config, split=split))
    except Exception as err:
        where = f"{tried} (from $RLSCRATCH_DATA)" if tried else "no local copy ($RLSCRATCH_DATA is not set)"
        raise DataError(f"could not load {name} {split}: looked in {where}, then the Hugging Face Hub failed "
                        f"({type(err).__name__}). Set RLSCRATCH_DATA to a folder with gsm8k/ and math500/ "
                        f"(see README) or go online.") from err


def load_gsm8k(split: str = "test", limit: int | None = None) -> list[Problem]:
    """GSM8K problems ('train' or 'test'), the first `limit` of them."""
    if split not in ("train", "test"):
        raise ValueError(f"GSM8K split must be 'train' or 'test', got {split!r}")
    root = data_dir()
    path = root / "gsm8k" / f"{split}.jsonl" if root else None
    rows = _read_jsonl(path) if path and path.exists() else _from_hub("openai/gsm8k", "main", split, path)
    problems = []
    for i, row in enumerate(rows[:limit]):
        try:
            problems.append(_gsm8k_record(row, i, split))
        except (DataError, KeyError) as err:
            raise DataError(f"{path or 'openai/gsm8k'}: record {i + 1}: {err}") from None
    return problems


def load_math500(limit: int | None = None) -> list[Problem]:
    """The MATH-500 test problems, the first `limit` of them."""
    root = data_dir()
    path = root / "math500" / "test.json" if root else None
    if path and path.exists():
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
    else:
        rows = _from_hub("HuggingFaceH4/MATH-500", None, "test", path)
    problems = []
    for i, row in enumerate(rows[:limit]):
        try:
            problems.append(_math_record(row, i))
        except (KeyError, TypeError, ValueError) as err:
            raise DataError(f"{path or 'HuggingFaceH4/MATH-500'}: record {i + 1}: missing or bad field {err}") from None
    return problems


# %%
import collections

gsm8k = load_gsm8k("test", limit=N_GSM8K)
math500 = load_math500(limit=N_MATH)
print(gsm8k[0])
print(f"GSM8K: {len(gsm8k)} problems, steps {collections.Counter(p.level for p in gsm8k).most_common()}")
print(f"MATH-500: {len(math500)} problems, levels {sorted(collections.Counter(p.level for p in math500).items())}")
print("subjects:", dict(collections.Counter(p.subject for p in math500)))
# the verifier agrees with itself on every gold answer, and GSM8K golds parse as numbers
assert all(answers_match(p.answer, p.answer) for p in gsm8k + math500)
assert all(parse_math(p.answer) is not None for p in gsm8k)

# %% [markdown]
# ## 6. Prompts
#
# The same question can be asked in different ways, and for a small model the wording changes the
# score. All templates live in one place, `rlscratch.prompts`, so that every experiment names the
# one it used:
#
# * `plain` — the bare question as raw text, no chat template (the instruct model usually answers
#   with an immediate end-of-turn: it has only learned to reply inside its chat format);
# * `chat` — the question as the user turn of the chat template: our **baseline**, "no reasoning
#   prompt";
# * `step_by_step` — the chat template plus an instruction to reason step by step and put the final
#   answer in `\boxed{}`.
#
# Chapter 3 uses three more: `think` (the chat template plus "Let's think step by step."),
# `few_shot` and `plain_few_shot` (eight worked examples before the question, as chat turns or as
# raw text).

# %%
#| export: prompts
"""Prompt templates: every experiment names one of these."""
from __future__ import annotations

STEP_BY_STEP = "Please reason step by step, and put your final answer within \\boxed{}."
THINK = "Let's think step by step."  # zero-shot chain of thought, Kojima et al. 2022

# The eight GSM8K chain-of-thought exemplars of Wei et al. 2022, "Chain-of-Thought Prompting Elicits
# Reasoning in Large Language Models" (NeurIPS 2022), Table 20: (question, worked answer).
GSM8K_COT_EXEMPLARS = [
    ("There are 15 trees in the grove. Grove workers will plant trees in the grove today. After they are done, "
     "there will be 21 trees. How many trees did the grove workers plant today?",
     "There are 15 trees originally. Then there were 21 trees after some more were planted. So there must have "
     "been 21 - 15 = 6. The answer is 6."),
    ("If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the parking lot?",
     "There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5. The answer is 5."),
    ("Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they have left in total?",
     "Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = 74. After eating 35, "
     "they had 74 - 35 = 39. The answer is 39."),
    ("Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. How many lollipops did "
     "Jason give to Denny?",
     "Jason started with 20 lollipops. Then he had 12 after giving some to Denny. So he gave Denny 20 - 12 = 8. "
     "The answer is 8."),
    ("Shawn has five toys. For Christmas, he got two toys each from his mom and dad. How many toys does he have now?",
     "Shawn started with 5 toys. If he got 2 toys each from his mom and dad, then that is 4 more toys. 5 + 4 = 9. "
     "The answer is 9."),
    ("There were nine computers in the server room. Five more computers were installed each day, from monday to "
     "thursday. How many computers are now in the server room?",
     "There were originally 9 computers. For each of 4 days, 5 more computers were added. So 5 * 4 = 20 computers "
     "were added. 9 + 20 is 29. The answer is 29."),
    ("Michael had 58 golf balls. On tuesday, he lost 23 golf balls. On wednesday, he lost 2 more. How many golf "
     "balls did he have at the end of wednesday?",
     "Michael started with 58 golf balls. After losing 23 on tuesday, he had 58 - 23 = 35. After losing 2 more, "
     "he had 35 - 2 = 33 golf balls. The answer is 33."),
    ("Olivia has $23. She bought five bagels for $3 each. How much money does she have left?",
     "Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. So she has 23 - 15 dollars "
     "left. 23 - 15 is 8. The answer is 8."),
]

TEMPLATES = ("plain", "chat", "step_by_step", "think", "few_shot", "plain_few_shot")
_STOP = {"plain_few_shot": ["\n\nQ:", "\nQ:"]}


def format_prompt(tokenizer, question: str, template: str = "chat") -> str:
    """The model input for `question` under a named template (see TEMPLATES).

    plain: the bare question, no chat template. chat: the question as the user turn. step_by_step:
    + "reason step by step ... \\boxed{}". think: + "Let's think step by step." few_shot: the 8
    exemplars as earlier chat turns. plain_few_shot: the exemplars as raw "Q: ... A: ..." text.
    """
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; choose from {TEMPLATES}")
    if template == "plain":
        return question
    if template == "plain_few_shot":
        shots = "".join(f"Q: {q}\nA: {a}\n\n" for q, a in GSM8K_COT_EXEMPLARS)
        return f"{shots}Q: {question}\nA:"
    messages = []
    if template == "few_shot":
        for q, a in GSM8K_COT_EXEMPLARS:
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    suffix = {"step_by_step": f"\n{STEP_BY_STEP}", "think": f"\n{THINK}"}.get(template, "")
    messages.append({"role": "user", "content": question + suffix})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def stop_strings(template: str) -> list[str] | None:
    """Extra stop strings a template needs (raw-text few-shot prompts would go on to invent the next Q:)."""
    return _STOP.get(template)


# %% [markdown]
# ## 7. The harness
#
# `evaluate` runs one prompt template and one sampling setting over a list of problems with the
# batched engine. Every finished batch is appended to a JSON-lines file — one record per problem
# with the prompt, the response(s), the extracted answer(s), correctness, token counts and time —
# and flushed to disk. Re-running with the same settings reads the file and only generates what is
# missing; an interrupted run (a closed laptop, a killed kernel) loses at most one batch, and a
# half-written last line is ignored. The run's settings are stored next to the records, and a
# rerun with different settings under the same name is refused rather than mixed. Records keep
# the raw responses, and grading is re-done from them whenever a run is loaded, so an improved
# verifier applies to old runs without generating anything again.
#
# `summarize` turns records into the numbers we report: accuracy with a **Wilson 95% confidence
# interval** (better behaved than ±1.96·√(p(1−p)/n) for small n or extreme p), accuracy per
# difficulty level and subject, mean response length, extraction rate, and throughput.

# %%
#| export: evaluate
"""Run a prompt template x sampling setting over a dataset; record, resume and summarize."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from collections import defaultdict
from pathlib import Path

from rlscratch.data import Problem
from rlscratch.generate import generate
from rlscratch.prompts import format_prompt, stop_strings
from rlscratch.results import results_dir
from rlscratch.verify import FALLBACK_RULES, answers_match, extract


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    model: str
    template: str = "chat"
    max_new_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    n: int = 1
    seed: int = 0

    def run_name(self, dataset: str) -> str:
        digest = hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()[:10]
        return f"{dataset}-{self.template}-t{self.temperature}-n{self.n}-{digest}"


def grade_record(record: dict) -> dict:
    """(Re)compute a record's extracted answers, rules and correctness from its responses.

    A response cut off by the token limit only counts if it stated an answer (e.g. a \\boxed{}):
    a fallback guess from a truncated response is recorded as no answer (rule "truncated").
    """
    extracted, rules, correct = [], [], []
    for text, finish in zip(record["responses"], record["finish"]):
        found = extract(text)
        answer, rule = found.answer, found.rule
        if finish == "length" and rule in FALLBACK_RULES:
            answer, rule = None, "truncated"
        extracted.append(answer)
        rules.append(rule)
        correct.append(answers_match(answer, record["gold"]))
    record.update(extracted=extracted, rules=rules, correct=correct)
    return record


def _load_records(path: Path) -> dict[str, dict]:
    records = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by an interruption: redo that problem
                continue
            records[record["id"]] = grade_record(record)  # graded by the current verifier
    return records


def evaluate(model, tokenizer, problems: list[Problem], settings: EvalSettings, *, batch_size: int = 16,
             run_dir: Path | None = None, progress: bool = True) -> list[dict]:
    """Evaluate `problems`, resuming from (and appending to) the run's JSONL file. Returns records in order."""
    if not problems:
        raise ValueError("no problems to evaluate")
    datasets = {p.dataset for p in problems}
    if len(datasets) != 1:
        raise ValueError(f"one dataset per run, got {sorted(datasets)}")
    run_dir = Path(run_dir or results_dir() / "runs")
    run_dir.mkdir(parents=True, exist_ok=True)
    name = settings.run_name(datasets.pop())
    path, meta = run_dir / f"{name}.jsonl", run_dir / f"{name}.settings.json"
    if meta.exists() and json.loads(meta.read_text()) != dataclasses.asdict(settings):
        raise ValueError(f"{meta} holds other settings; choose another run_dir")
    meta.write_text(json.dumps(dataclasses.asdict(settings), indent=1))
    done = _load_records(path)
    todo = [p for p in problems if p.id not in done]
    bar = None
    if progress and todo:
        from tqdm import tqdm  # a text bar: it stays readable in saved notebook outputs

        bar = tqdm(total=len(problems), initial=len(problems) - len(todo), desc=name, unit="problem")
    if todo and path.exists() and not path.read_text(encoding="utf-8").endswith("\n"):
        with open(path, "a", encoding="utf-8") as f:  # end a half-written line before appending
            f.write("\n")
    per_batch = max(1, batch_size // settings.n)
    tokens_done, seconds_done = 0, 0.0
    for start in range(0, len(todo), per_batch):
        chunk = todo[start:start + per_batch]
        prompts = [format_prompt(tokenizer, p.question, settings.template) for p in chunk]
        seed = None if settings.temperature == 0 else settings.seed + len(done) + start
        t0 = time.perf_counter()
        completions = generate(model, tokenizer, prompts, max_new_tokens=settings.max_new_tokens,
                               temperature=settings.temperature, top_p=settings.top_p, n=settings.n,
                               stop=stop_strings(settings.template), seed=seed, batch_size=batch_size)
        seconds = time.perf_counter() - t0
        lines = []
        for k, problem in enumerate(chunk):
            samples = completions[k * settings.n:(k + 1) * settings.n]
            record = grade_record({
                "id": problem.id, "dataset": problem.dataset, "level": problem.level, "subject": problem.subject,
                "gold": problem.answer, "prompt": prompts[k], "responses": [c.text for c in samples],
                "tokens": [len(c.token_ids) for c in samples], "finish": [c.finish_reason for c in samples],
                "mean_logprob": [sum(c.logprobs) / max(1, len(c.logprobs)) for c in samples],
                "seconds": seconds / len(chunk),
            })
            done[problem.id] = record
            lines.append(json.dumps(record) + "\n")
        with open(path, "a", encoding="utf-8") as f:
            f.writelines(lines)
            f.flush()
            os.fsync(f.fileno())
        tokens_done += sum(len(c.token_ids) for c in completions)
        seconds_done += seconds
        if bar is not None:
            correct = sum(r["correct"][0] for r in done.values())
            bar.set_postfix(acc=f"{correct / len(done):.2f}", tok_s=f"{tokens_done / seconds_done:.0f}")
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    return [done[p.id] for p in problems]


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval for a binomial proportion."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def summarize(records: list[dict]) -> dict:
    """Accuracy (first sample) with a Wilson 95% CI, by level and subject, lengths and throughput."""
    n = len(records)
    correct = sum(bool(r["correct"][0]) for r in records)
    low, high = wilson_interval(correct, n)
    by_level, by_subject = defaultdict(list), defaultdict(list)
    for r in records:
        by_level[r["level"]].append(bool(r["correct"][0]))
        if r.get("subject"):
            by_subject[r["subject"]].append(bool(r["correct"][0]))
    tokens = [t for r in records for t in r["tokens"]]
    seconds = sum(r["seconds"] for r in records)
    return {
        "n": n, "accuracy": correct / n if n else 0.0, "ci95": [low, high],
        "by_level": {k: {"n": len(v), "accuracy": sum(v) / len(v)} for k, v in sorted(by_level.items())},
        "by_subject": {k: {"n": len(v), "accuracy": sum(v) / len(v)} for k, v in sorted(by_subject.items())},
        "mean_tokens": sum(tokens) / max(1, len(tokens)),
        "extraction_rate": sum(x is not None for r in records for x in r["extracted"]) / max(1, len(tokens)),
        "truncated_rate": sum(f == "length" for r in records for f in r["finish"]) / max(1, len(tokens)),
        "problems_per_min": 60 * n / seconds if seconds else None,
        "tokens_per_s": sum(tokens) / seconds if seconds else None,
    }


# %% [markdown]
# A resume check on two problems before the real run: evaluate once, cut the file in the middle of
# its last line as an interruption would, and evaluate again. Only the damaged record is redone.

# %%
from pathlib import Path

from rlscratch.generate import generate, pack_for_cpu
from rlscratch.model import load_model

model, tokenizer = load_model(MODEL, device=DEVICE)
model = pack_for_cpu(model)  # chapter 1: identical outputs, faster decoding on a CPU (no-op elsewhere)
scratch = Path(tempfile.mkdtemp())
check = EvalSettings(model=MODEL, max_new_tokens=8)
first = evaluate(model, tokenizer, gsm8k[:2], check, run_dir=scratch, progress=False)
log = next(scratch.glob("*.jsonl"))
log.write_text(log.read_text()[:-40])  # the last record loses its end
second = evaluate(model, tokenizer, gsm8k[:2], check, run_dir=scratch, progress=False)
assert [r["responses"] for r in first] == [r["responses"] for r in second]
assert len(log.read_text().splitlines()) == 3  # two good records + the redone one after the broken line
print("resume check passed:", [r["extracted"] for r in second])

# %% [markdown]
# ## 8. The baseline
#
# Greedy decoding, the `chat` template, no reasoning instruction: the model as it comes. We
# evaluate the first 200 GSM8K test problems and the first 100 MATH-500 problems. With n = 200 a
# 95% interval is about ±6 points wide at 40% accuracy; with n = 100 about ±10 — enough to see large
# effects, not small ones. Responses are capped at 512 new tokens.
#
# The records are stored in `data/results/runs/`, so re-running this cell reuses them; the first
# run took the time printed below.

# %%
gsm8k_run = evaluate(model, tokenizer, gsm8k, EvalSettings(model=MODEL, template="chat", max_new_tokens=MAX_NEW_TOKENS),
                     batch_size=BATCH_SIZE)
math_run = evaluate(model, tokenizer, math500, EvalSettings(model=MODEL, template="chat", max_new_tokens=MAX_NEW_TOKENS),
                    batch_size=BATCH_SIZE)
baseline = {"gsm8k": summarize(gsm8k_run), "math500": summarize(math_run)}
for name, s in baseline.items():
    print(f"{name:8} n={s['n']:3d}  accuracy {s['accuracy']:.1%}  95% CI [{s['ci95'][0]:.1%}, {s['ci95'][1]:.1%}]  "
          f"mean {s['mean_tokens']:.0f} tokens  extracted {s['extraction_rate']:.0%}  truncated {s['truncated_rate']:.0%}  "
          f"{s['problems_per_min']:.1f} problems/min ({s['tokens_per_s']:.0f} tokens/s at batch {BATCH_SIZE})")

# %%
import matplotlib.pyplot as plt

fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
for ax, (name, s, label) in zip(axes[:2], [("GSM8K", baseline["gsm8k"], "solution steps"),
                                            ("MATH-500", baseline["math500"], "level")]):
    levels = list(s["by_level"])
    ax.bar([str(k) for k in levels], [s["by_level"][k]["accuracy"] for k in levels], color="C0")
    for i, k in enumerate(levels):
        ax.text(i, s["by_level"][k]["accuracy"] + 0.01, f"n={s['by_level'][k]['n']}", ha="center", fontsize=8)
    ax.set(title=f"{name}: accuracy by difficulty", xlabel=label, ylabel="accuracy", ylim=(0, 1))
subjects = baseline["math500"]["by_subject"]
axes[2].barh(list(subjects), [v["accuracy"] for v in subjects.values()], color="C1")
axes[2].set(title="MATH-500: accuracy by subject", xlim=(0, 1))
plt.tight_layout()
plt.show()

# %% [markdown]
# Let us read a few responses: one right, one wrong, to see what the errors look like.

# %%
right = next((r for r in gsm8k_run if r["correct"][0]), gsm8k_run[0])
wrong = next((r for r in gsm8k_run if not r["correct"][0]), gsm8k_run[-1])
for title, r in (("RIGHT", right), ("WRONG", wrong)):
    print(f"=== {title}: gold {r['gold']}, extracted {r['extracted'][0]!r} by rule {r['rules'][0]}\n{r['responses'][0][-700:]}\n")
rules = collections.Counter(rule for r in gsm8k_run + math_run for rule in r["rules"])
print("extraction rules used:", dict(rules))

# %% [markdown]
# ### Checking the grader on real responses
#
# The hand-built cases above test what we thought of. Real responses test what we did not. We grade
# every baseline response a second time with `math-verify` (which does its own extraction from the
# full text) and read each disagreement.
#
# The first time this cell ran, on an earlier version of our verifier, there were five
# disagreements out of 300, and each one taught something:
#
# * three MATH responses hit the 512-token limit in the middle of their reasoning, and the
#   `last_number` fallback happened to pick up the gold number from the unfinished text. We counted
#   them correct; `math-verify` did not. We agree with `math-verify`: since then the harness
#   ignores fallback extractions from truncated responses (section 7);
# * a response ended with "the value of \\(9 \\& 2\\) is \\(\\frac{3\\sqrt{3}}{4}\\)" — correct, but
#   with no box, and our last-number fallback read "4". This is why the `last_latex` rule exists;
# * the model wrote the base-9 answer as `040_9` where the reference has `40_9`: a leading zero.
#   Normalization now strips leading zeros of base-n numbers.
#
# What remains after those fixes is printed below. In the stored run it is a single GSM8K response
# that was cut off at 512 tokens while its last number happened to be the gold answer:
# `math-verify` credits it, we deliberately do not (the model never stated an answer).

# %%
if mv_parse is not None:
    disagreements = []
    for r in gsm8k_run + math_run:
        try:
            theirs = bool(mv_verify(mv_parse(f"${r['gold']}$"), mv_parse(r["responses"][0])))
        except Exception:
            theirs = False
        if theirs != r["correct"][0]:
            disagreements.append({"id": r["id"], "gold": r["gold"], "ours": r["extracted"][0], "rule": r["rules"][0],
                                  "finish": r["finish"][0], "ours_correct": r["correct"][0], "math_verify": theirs})
    total = len(gsm8k_run) + len(math_run)
    print(f"agreement with math-verify on {total} real responses: {1 - len(disagreements) / total:.1%}")
    if disagreements:
        show_table(disagreements)

# %% [markdown]
# What the baseline shows:
#
# * Without being asked, the instruction-tuned model already reasons step by step and puts most
#   final answers in `\\boxed{}` (see the extraction rules above): it was fine-tuned on answers
#   formatted that way.
# * Accuracy falls with difficulty: more solution steps on GSM8K, higher levels on MATH. With
#   100 MATH problems the per-level bars rest on 6-25 problems each, so read them as a trend, not
#   as five measurements.
# * Many MATH responses run into the 512-token limit before reaching an answer (the `truncated`
#   rate). Part of the gap between GSM8K and MATH is the length budget, not only difficulty.
#
# The results become **row 1** of the book's results table, saved where later chapters and the
# README read them:

# %%
import json

from rlscratch.results import results_dir

if not SMOKE:
    table_path = results_dir() / "results_table.json"
    table = json.loads(table_path.read_text()) if table_path.exists() else {}
    table["base"] = {k: {"n": v["n"], "accuracy": v["accuracy"], "ci95": v["ci95"], "mean_tokens": v["mean_tokens"]}
                     for k, v in baseline.items()}
    table_path.write_text(json.dumps(table, indent=1))
    print(json.dumps(table, indent=1))

# %% [markdown]
# ## Summary
#
# * `rlscratch.verify`: `extract_answer`, `answers_match`, `grade` — extraction with named rules,
#   normalization, and SymPy-backed equivalence through a whitelist parser, bounded in time;
# * `rlscratch.data`: GSM8K and MATH-500 as `Problem` records, from a local folder or the Hub;
# * `rlscratch.prompts`: the named templates;
# * `rlscratch.evaluate`: a resumable harness and `summarize`.
#
# Chapter 3 spends more compute at inference time — reasoning prompts, sampling, voting — and
# measures each gain against this baseline.
