# ---
# jupyter:
#   jupytext:
#     formats: ipynb,scripts//py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python (rlscratch)
#     language: python
#     name: rlscratch
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
DATA = "a local folder ($RLSCRATCH_DATA)" if os.environ.get("RLSCRATCH_DATA") else "the Hugging Face Hub"
print(f"smoke={SMOKE} model={MODEL} data from {DATA}")

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
# The grader we build in this chapter will become the **reward** of chapters 5 and 6: reinforcement
# learning raises the probability of whatever the grader calls correct. That puts an unusual weight
# on its mistakes. A *false negative* (a right answer marked wrong) wastes a training signal. A
# *false positive* (a wrong answer marked right) is worse: it is a reward for being wrong, and a
# policy that finds a family of such answers will learn to produce them, because that is what it is
# optimised to do. So the grader's first rule is: **never accept what is not equal**; its second is
# to accept every way of writing what is.
#
# The whole pipeline at a glance; sections 2 to 4 build it box by box.

# %%
import matplotlib.pyplot as plt
from matplotlib.patches import FancyBboxPatch

stages = [  # (x, y, title, what it does)
    (0, 1, "response", "the model's text"),
    (1, 1, "cut", "at the first chat-template\nmarker (<|im_end|>, ...)"),
    (2, 1, "extract", "\\boxed{} > #### > 'answer is'\n> last formula > last number\n(the rule is recorded)"),
    (3, 1, "truncated?", "a response cut off by the\ntoken limit: a fallback\nguess is no answer"),
    (0, 0, "gold answer", "from the dataset"),
    (1, 0, "normalize", "LaTeX decoration, units,\nseparators, unicode"),
    (2, 0, "shape", "value, list, set, interval,\nrelation, tuple, matrix"),
    (3, 0, "parse + compare", "whitelist parser -> SymPy;\nexact rationals, intervals,\nrandom points"),
    (4, 0, "verdict", "True or False\n(refused or out of time:\nFalse)"),
]
box_w, box_h = 0.82, 0.62
fig, ax = plt.subplots(figsize=(14, 4.2))
centres = {}
for x, y, title, detail in stages:
    colour = "C1" if title in ("response", "gold answer") else "C2" if title == "verdict" else "C0"
    ax.add_patch(FancyBboxPatch((x - box_w / 2, y - box_h / 2), box_w, box_h, boxstyle="round,pad=0.02",
                                facecolor=colour, alpha=0.18, edgecolor=colour))
    ax.text(x, y + 0.19, title, ha="center", va="center", fontsize=10, weight="bold")
    ax.text(x, y - 0.08, detail, ha="center", va="center", fontsize=7.5)
    centres[title] = (x, y)
for a, b in [("response", "cut"), ("cut", "extract"), ("extract", "truncated?"), ("gold answer", "normalize"),
             ("normalize", "shape"), ("shape", "parse + compare"), ("parse + compare", "verdict")]:
    (x0, y0), (x1, y1) = centres[a], centres[b]
    ax.annotate("", xy=(x1 - box_w / 2, y1), xytext=(x0 + box_w / 2, y0), arrowprops=dict(arrowstyle="->", lw=1.3))
ax.annotate("", xy=(1.12, box_h / 2), xytext=(3, 1 - box_h / 2),
            arrowprops=dict(arrowstyle="->", lw=1.3, connectionstyle="arc3,rad=0.15"))
ax.text(2.1, 0.5, "the extracted answer (or none)", fontsize=8, ha="center")
ax.text(4, 1, "score_response: the one\nscoring rule, for evaluation\nand for rewards", ha="center", va="center",
        fontsize=8, style="italic")
ax.set(xlim=(-0.5, 4.5), ylim=(-0.45, 1.45))
ax.set_title("the verifier: from a response to a verdict", fontsize=11)
ax.axis("off")
plt.show()

# %% [markdown]
# ## 2. Extraction
#
# The model's response is a few hundred tokens of reasoning. We look for the final answer with a
# list of rules, most explicit first, and remember which one fired (a falling extraction rate is
# the first sign that a prompt change broke the output format):
#
# | rule | example |
# |---|---|
# | `boxed` | `... so the answer is \boxed{\frac{3}{4}}.` (the *last* `\boxed{}` or `\fbox{}`, nested braces allowed; boxes joined to it by "or", "and" or a comma on the same line form one list: `$x = \boxed{3}$ or $x = \boxed{-4}$`) |
# | `gsm8k` | `#### 42` (the format of GSM8K's reference solutions) |
# | `answer_is` | `The answer is 42.`, `Final answer: 42`, `**Final Answer:** 45 apples`, `The answer is 90 seconds (that is, ...)` (the sentence after the last cue, without a trailing remark in parentheses) |
# | `last_latex` | `... so the area is \(\frac{3\sqrt{3}}{4}\).` (the right-hand side of the last formula, if it looks like a value, or a single word: `$even$`) |
# | `last_number` | the last number in the text, a weak fallback |
# | `malformed_box` | *no answer*: the last `\boxed{` never closes (decided below) |
#
# Before any rule, the response is cut at the first chat-template marker (`<|im_start|>`,
# `<|im_end|>`, ...): a small model sometimes writes its answer and then goes on to invent the next
# user turn, with answers of its own that are not answers to our question.
#
# **A box that never closes.** What should `... so the answer is \boxed{\frac{1}{2}` (the last box
# is opened and never closed) give? Left to the rules above, no box is readable, so the
# `last_number` fallback answers `2`: a fragment of the answer the model began to write, which was
# one half. If the gold answer is 2, that is a reward for a wrong answer. We decide: **an unreadable
# last box means the response has no answer** (rule `malformed_box`). The model announced its final
# answer there, so neither an earlier box (it may have changed its mind) nor a stray number is a
# safer guess. The cost is a false negative in the rare case where the fragment happens to be the
# answer, which is the side a reward should err on. (In the stored runs of chapters 2 and 3, every
# unclosed last box comes from a response cut off by the token limit, which already yields no answer;
# the rule matters for responses that end by themselves.)
#
# The last two rules are *fallbacks*: they guess. The scoring rule of section 4 therefore ignores
# them when a response was cut off by the token limit: a truncated response never reached its
# answer, and whatever number it ended on is noise, not an answer.
#
# Everything here is plain string scanning in linear time: the model's output is untrusted, and a
# regular expression with nested quantifiers can take exponential time on a crafted string.

# %%
#| export: verify
"""Grading math answers: extraction, normalization and equivalence. Model output is never evaluated
as code: answers are parsed by a small whitelist parser into SymPy objects and compared exactly
(rational arithmetic, or interval arithmetic at high precision for irrational values). Every public
function returns, and never raises, within a bounded time, on any thread."""
from __future__ import annotations

import dataclasses
import functools
import gc
import random
import re
import threading
import time
from contextlib import contextmanager

import sympy
from mpmath.ctx_iv import MPIntervalContext

MAX_ANSWER_CHARS = 300  # longer "answers" are compared as strings only
TIME_LIMIT_S = 0.1  # CPU seconds per comparison, on any thread (a deadline the work checks as it goes)


@dataclasses.dataclass(frozen=True)
class Extraction:
    answer: str | None
    rule: str  # "boxed", "gsm8k", "answer_is", "last_latex", "last_number" or "none"


CHAT_MARKERS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|start_header_id|>")
FALLBACK_RULES = ("last_latex", "last_number")  # guesses, not stated answers


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
    """Content of the last \\boxed{} (or \\fbox{}). Boxes joined to it by "or", "and" or a comma on the
    same line ("$x = \\boxed{3}$ or $x = \\boxed{-4}$") are one answer, a list."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    answers = [_box_at(text, start)]
    while answers[0] is not None:  # walk back over boxes joined by a connective
        before = text.rfind("\\boxed", max(0, start - 300), start)
        content = _box_at(text, before) if before >= 0 else None
        if content is None:
            break
        gap = text[before + 7 + len(content):start]
        if not _JOINED.fullmatch(gap) or not content.strip():
            break
        answers.insert(0, content)
        start = before
    return None if answers[-1] is None else ", ".join(a.strip() for a in answers)


_JOINED = re.compile(r"[\s$}]*(?:(?:,|;|\bor\b|\band\b|\\text\{\s*(?:or|and)\s*\})[\s$]*)?(?:[a-zA-Z]\s*=[\s$]*)?")


def _box_at(text: str, start: int) -> str | None:
    i = start + (6 if text.startswith("\\boxed", start) else 5)
    while i < len(text) and text[i] == " ":
        i += 1
    if i < len(text) and text[i] == "{":
        return _braced(text, i)
    match = re.match(r"[^\s$]+", text[i:i + 100])  # "\boxed 5"
    return match.group(0) if match else None


def _last_box_unreadable(text: str) -> bool:
    """Is there a last \\boxed (or \\fbox) whose content cannot be read: "\\boxed{\\frac{1}{2" never closes?"""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    return start >= 0 and _box_at(text, start) is None


# %% [markdown]
# A first check of the box reader: nested braces, boxes joined into a list, a box without braces, and
# one that never closes.

# %%
for text in ["so \\boxed{\\frac{3}{4}}.", "$x = \\boxed{3}$ or $x = \\boxed{-4}$", "\\boxed 5 apples",
             "we try \\boxed{1} first; finally \\boxed{\\sqrt{2}}", "\\boxed{\\frac{1}{2"]:
    print(f"{text!r:55} -> last box {_last_boxed(text)!r:18} unreadable: {_last_box_unreadable(text)}")
assert _braced("{a{b}c}d", 0) == "a{b}c" and _braced("{a{b}", 0) is None
assert _last_boxed("so \\boxed{\\frac{3}{4}}.") == "\\frac{3}{4}"
assert _last_boxed("$x = \\boxed{3}$ or $x = \\boxed{-4}$") == "3, -4"
assert _last_boxed("we try \\boxed{1} first; finally \\boxed{\\sqrt{2}}") == "\\sqrt{2}"  # not joined: words between
assert _last_boxed("\\boxed{\\frac{1}{2") is None and _last_box_unreadable("\\boxed{\\frac{1}{2")

# %% [markdown]
# Next, the answer stated in words: the sentence after the last "answer is" or "answer:", without a
# trailing remark in parentheses.

# %%
#| export: verify
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_ANSWER_CUE = re.compile(r"answer\**\s*(?:is\b\s*:?|:)", re.IGNORECASE)


def _stated_answer(text: str) -> str | None:
    """What follows the last "answer is" / "answer:" up to the end of its sentence."""
    cue = None
    for cue in _ANSWER_CUE.finditer(text):
        pass
    if cue is None:
        return None
    rest = text[cue.end():cue.end() + 1000].lstrip(" \t\n*:$")  # "**Final Answer:** 45", "answer is: $5$"
    rest = re.sub(r"^\\[\[(]\s*(.*?)\s*\\[\])]", r"\1", rest, flags=re.S)  # "answer is:\n\[ 42 \]"
    rest = re.split(r"\.\s|\.$|\n", rest, maxsplit=1)[0].strip().strip("*$ ").rstrip(".").strip()
    remark = re.search(r"\s\(", rest)  # "90 seconds (that is, a minute and a half)"
    if remark and re.search(r"[A-Za-z]{2,}", rest[remark.end():]) and not rest[remark.end():].startswith("\\"):
        rest = rest[:remark.start()].strip()
    return rest or None


# %%
for text in ["The answer is 72.", "**Final Answer:** 45 apples", "The final answer is: $\\frac{1}{2}$.",
             "It takes 90 s. The answer is 90 seconds (that is, a minute and a half).", "No cue here: 7"]:
    print(f"{text!r:75} -> {_stated_answer(text)!r}")
assert _stated_answer("The answer is 72.") == "72" and _stated_answer("No cue here: 7") is None
assert _stated_answer("It takes 90 s. The answer is 90 seconds (that is, a minute and a half).") == "90 seconds"

# %% [markdown]
# `extract` tries the rules in order; the last formula and the last number are the fallbacks.

# %%
#| export: verify
def extract(text: str) -> Extraction:
    """Find the final answer in a response, and which rule found it."""
    if not isinstance(text, str):
        return Extraction(None, "none")
    for marker in CHAT_MARKERS:  # the model ran on into a turn of its own invention: ignore it
        text = text.split(marker, 1)[0]
    if _last_box_unreadable(text):  # the final answer was begun and never finished: no answer, not a guess
        return Extraction(None, "malformed_box")
    boxed = _last_boxed(text)
    if boxed is not None and boxed.strip():
        return Extraction(boxed.strip(), "boxed")
    hashes = text.rfind("####")
    if hashes >= 0:
        line = text[hashes + 4:].strip().split("\n", 1)[0].strip()
        if line:
            return Extraction(line, "gsm8k")
    stated = _stated_answer(text)
    if stated is not None:
        return Extraction(stated, "answer_is")
    formula = _last_formula(text)
    if formula is not None:
        return Extraction(formula, "last_latex")
    numbers = _NUMBER.findall(text[-5000:])
    if numbers:
        return Extraction(numbers[-1].rstrip(","), "last_number")
    return Extraction(None, "none")



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
    if re.fullmatch(r"[A-Za-z]{2,20}", body):  # a one-word answer such as $even$
        return body
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
    "So $x = \\boxed{3}$ or $x = \\boxed{-4}$.",
    "Adding up: 20 + 25 = 45.\n\n**Final Answer:** 45 apples",
    "It takes 90 s. The answer is 90 seconds (that is, a minute and a half).",
    "So the answer is \\boxed{5}.<|im_end|>\n<|im_start|>user\nWhat is 3+4?<|im_end|>\n<|im_start|>assistant\n\\boxed{7}",
    "Since $f(-x) = f(x)$, the function is $even$.",
]
for e in examples:
    print(f"{str(extract(e)):60} <- {e[:50]!r}")
assert extract(examples[0]) == Extraction("72", "boxed")
assert extract_answer(examples[1]) == "\\frac{1}{2}"
assert extract(examples[2]).rule == "gsm8k" and extract(examples[3]) == Extraction("72", "answer_is")
assert extract(examples[4]) == Extraction("72", "last_number") and extract(examples[6]).answer is None
assert extract(examples[5]) == Extraction("\\frac{3\\sqrt{3}}{4}", "last_latex")
assert extract(examples[8]) == Extraction("3, -4", "boxed") and extract(examples[9]) == Extraction("45 apples", "answer_is")
assert extract(examples[10]).answer == "90 seconds" and extract(examples[11]).answer == "5"
assert extract(examples[12]) == Extraction("even", "last_latex")
assert extract(examples[7]) == Extraction(None, "malformed_box")  # not last_number "2": see the decision above

# %% [markdown]
# ## 3. Normalization
#
# Normalization removes what does not change the value, and nothing that needs mathematics (is
# `2/4` equal to `1/2`? that is the next step's question):
#
# * **LaTeX decoration**: `\left`/`\right`, `\displaystyle`, spacing commands, `$` and `\$`;
#   `\dfrac`, `\tfrac` and `\cfrac` are `\frac`; `\ge`, `\geq` and `≥` are one symbol; `\varnothing`
#   is `\emptyset`; `\mathbb{R}` is the interval `(-\infty, \infty)`.
# * **Unicode**: `−` is `-`, `π` is `\pi`, `√5` is `\sqrt{5}`, `×` and `·` are products.
# * **Separators**: `1,234`, `1{,}234`, `1,\!234` and `1\,234` are 1234.
# * **Units and words after a value**: `5\text{ cm}^2`, `16\mbox{ feet}^2`, `3\,\mathrm{kg}`,
#   `12 \text{ square feet}`, `16\pi \text{ square units}`, `45 apples`. Only words are units, and
#   only after something that ends like a value: `\text{ or } 20` is a second answer, not a unit.
# * **Degrees and ordinals**: `90^\circ`, `20^\circ\text{C}`, `9^{\text{th}}`, `21st`.
# * **Labels**: `x \in [2, 5]` is `[2, 5]`; `(a, b) = (5, 1)` is `(5, 1)`.
# * **Numbers in a base**: `040_9` and `40_{9}` are both `40_9`.
# * **Multiple choice**: `(C)`, `\text{(C)}` and `\text{(B) Circle}` become the letter.
#
# The words "or" and "and" between answers (`x = 3 \text{ or } x = -4`, `2 \text{ and } 9`) are kept
# as words: the comparison reads them as list separators.

# %%
#| export: verify
_UNICODE = {"\u2212": "-", "\u2013": "-", "\u2014": "-", "\u00d7": "\\times ", "\u22c5": "\\cdot ", "\u00b7": "\\cdot ",
            "\u00f7": "\\div ", "\u03c0": "\\pi ", "\u221e": "\\infty ", "\u2264": "<=", "\u2265": ">=",
            "\u222a": "\\cup ", "\u2229": "\\cap ", "\u2205": "\\emptyset ", "\u00b1": "\\pm ", "\u00b0": "^\\circ ",
            "\u2208": "\\in ", "\u211d": "\\mathbb{R}", "\u00a0": " ", "\u2009": " ", "\u202f": " "}
_REWRITES = [  # (pattern, replacement), applied in order
    (r"\\[dtc]frac(?![a-zA-Z])", r"\\frac"),
    (r"\\(?:left|right)\.|\\(?:left|right|[bB]igg?[lr]?|displaystyle|textstyle)(?![a-zA-Z])", ""),
    (r",\s*\\!\s*(?=\d{3})", ","),  # 11,\! 111,\! 100
    (r"\\!", ""),
    (r"(?<=\d)\\,(?=\d{3})", ""),  # 1\,000
    (r"\\[,;:](?![a-zA-Z])|\\q?quad(?![a-zA-Z])|~", " "),
    (r"(?<!\\)\\ ", " "),  # "\ " is a space, "\\ " a matrix row break
    (r"\\\$|\$", ""),
    (r"\\%", "%"),
    (r"\{,\}", ","),
    (r"\\(?:geq?|geqslant)(?![a-zA-Z])|=>", ">="),
    (r"\\(?:leq?|leqslant)(?![a-zA-Z])|=<", "<="),
    (r"\\gt(?![a-zA-Z])", ">"),
    (r"\\lt(?![a-zA-Z])", "<"),
    (r"\\varnothing(?![a-zA-Z])|\\\{\s*\\\}", r"\\emptyset"),
    (r"\\mathbb\s*\{?\s*R\s*\}?", r"(-\\infty,\\infty)"),
    (r"\\infin(?![a-zA-Z])", r"\\infty"),
    # degrees: 90^\circ, 90^{\circ}, 20^\circ\text{C}, \degree
    (r"\^\s*\{?\s*\\circ\s*\}?(?:\s*\\(?:text|mathrm|textnormal)\s*\{\s*[CF]\s*\}|\s*[CF](?![a-zA-Z]))?|\\degree(?![a-zA-Z])", ""),
    # ordinals: 9^{\text{th}}, 9^\text{th}, 21st
    (r"(\d)\s*\^\s*\{?\s*(?:\\(?:text|mathrm|textnormal|rm)\s*)?\{?\s*(?:st|nd|rd|th)\s*\}?\s*\}?", r"\1"),
    (r"(\d)(?:st|nd|rd|th)\b", r"\1"),
    # "x = 3 \text{ or } x = -4": connectives become plain words, split later
    (r"\\(?:text|textnormal|textrm|mbox|mathrm)\s*\{\s*(or|and)\s*\}", r" \1 "),
]
_REWRITES = [(re.compile(p), r) for p, r in _REWRITES]
_TEXT_COMMAND = re.compile(r"\\(?:text|textbf|textit|textnormal|textrm|textsf|mathrm|mathbf|mathit|mbox|operatorname|emph)"
                           r"\s*\{([^{}]*)\}")
_UNIT_WORDS = re.compile(r"(?<![\\a-zA-Z])([a-zA-Z]{2,}\.?(?:/[a-zA-Z]+)?(?:\s+[a-zA-Z]{2,}\.?(?:/[a-zA-Z]+)?){0,3})"
                         r"(\s*\^\s*\{?[23]\}?)?\s*$")  # words separated by spaces: no backtracking blow-up
_MATH_WORDS = {"pi", "sqrt", "sin", "cos", "tan", "cot", "sec", "csc", "log", "ln", "exp", "infty", "i"}
_CONNECTIVES = {"or", "and", "to", "plus", "minus", "times", "but", "not", "if"}


def _strip_units(s: str) -> str:
    """Drop unit words after a value: "5\\text{ cm}^2", "16\\pi square units", "45 apples", "3\\,\\mathrm{kg}"."""
    for _ in range(4):
        m = re.search(r"\\(?:text|textnormal|textrm|mbox|mathrm|textit|operatorname)\s*\{([^{}]*)\}(\s*\^\s*\{?[23]\}?)?\s*$", s)
        if m is None:
            m = _UNIT_WORDS.search(s)
            if m is None or m.group(1).split()[0].lower().rstrip(".") in _MATH_WORDS | _CONNECTIVES:
                return s
        unit, value = m.group(1).strip(), s[:m.start()].rstrip()
        if not re.fullmatch(r"[A-Za-z][A-Za-z .\-/]*", unit) or unit.split()[0].lower() in _MATH_WORDS | _CONNECTIVES:
            return s  # "\text{ or 20}" is a second answer, not a unit
        if not re.search(r"(?:[\d})\]!%]|\\pi|\\infty)$", value):  # only after a value
            return s
        s = value
    return s


def normalize_answer(answer: str) -> str:
    """Strip formatting that does not change an answer's value (LaTeX decoration, units, separators)."""
    s = answer.strip()
    for old, new in _UNICODE.items():
        s = s.replace(old, new)
    s = re.sub(r"\u221a\s*(\d+|[a-zA-Z])", r"\\sqrt{\1}", s)  # unicode root: 3√5
    s = re.sub(r"\u221a\s*\(([^()]*)\)", r"\\sqrt{\1}", s)
    s = s.replace("\u221a", "\\sqrt")
    for pattern, replacement in _REWRITES:
        s = pattern.sub(replacement, s)
    s = re.sub(r"\s+", " ", s).strip().rstrip(".").strip()
    s = _strip_units(s)
    for _ in range(3):  # \text{...} and friends: keep the content
        s = _TEXT_COMMAND.sub(r"\1", s)
    s = _strip_units(re.sub(r"\s+", " ", s).strip().rstrip(".").strip())  # \text{18 dollars}
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):  # 1,234,567
        s = s.replace(",", "")
    s = re.sub(r"^[a-zA-Z]\s*\\in\s*", "", s)  # x \in [a, b]
    s = re.sub(r"^\(\s*[a-zA-Z](?:\s*,\s*[a-zA-Z])+\s*\)\s*=\s*(?=[(\[])", "", s)  # (a, b) = (5, 1)
    base_n = re.fullmatch(r"\(?([0-9A-Za-z]+)\)?\s*_\s*\{?\(?(\d+)\)?\}?", s)  # 040_9, 4210_{5}: a number in base n
    if base_n:
        s = f"{base_n.group(1).lstrip('0') or '0'}_{base_n.group(2)}"
    choice = re.fullmatch(r"\(?([A-Ea-e])\)|([A-E])|\(([A-E])\)\s+\S.*", s)  # (C), C, (B) Circle
    if choice:
        s = next(g for g in choice.groups() if g).upper()
    return s

# %%
for raw in ["\\$1,234.", "90^\\circ", "\\dfrac{14}{3}", "\\text{Evelyn}", "5\\text{ cm}", "\\left( 3, \\frac{\\pi}{2} \\right)",
            "\u22125", "18 dollars", "\\text{(C)}", "10\\%", "040_9", "4210_{5}", "16\\mbox{ feet}^2", "20^\\circ\\text{C}",
            "9^{\\text{th}} \\text{ floor}", "16\\pi \\text{ square units}", "\\text{(B) Circle}", "1,\\!000", "3\u221a5",
            "x = 3 \\text{ or } x = -4", "18 \\text{ or } 20", "x \\in [2,5]", "\\mathbb{R}"]:
    print(f"{raw!r:40} -> {normalize_answer(raw)!r}")
assert normalize_answer("\\$1,234.") == "1234" and normalize_answer("5\\text{ cm}") == "5" and normalize_answer("18 dollars") == "18"
assert normalize_answer("\\text{(C)}") == "C" and normalize_answer("\u22125") == "-5" and normalize_answer("16\\mbox{ feet}^2") == "16"
assert normalize_answer("9^{\\text{th}} \\text{ floor}") == "9" and normalize_answer("16\\pi \\text{ square units}") == "16\\pi"
assert normalize_answer("\\text{(B) Circle}") == "B" and normalize_answer("1,\\!000") == "1000"
assert normalize_answer("18 \\text{ or } 20") == "18 or 20"  # two answers, not a unit

# %% [markdown]
# ## 4. Equivalence: exact, safe, and bounded in time
#
# To compare values we turn each answer into a SymPy object, and three requirements shape how.
#
# **Safe.** The obvious tool, `sympy.sympify(text)`, runs Python's `eval` on its input: with model
# output, that is remote code execution. So we write a small whitelist parser (4.2).
#
# ### 4.1 A time bound that holds on every thread
#
# **Bounded in time.** SymPy happily starts computing `9^{9^{9^9}}`, a number with about
# 10^369,693,099 digits, which never finishes. A reward is computed millions of times during
# training, often in worker threads, so every comparison must return quickly *on any thread*. A
# timer signal (`SIGALRM`) cannot do this: Python delivers signals only to the main thread, and not
# in the middle of one long C call (a big-integer power is one). We use two ideas instead:
#
# 1. **Refuse before trying.** Every step that could be slow checks its size first: an exact number
#    may have at most 2,000 digits, a factorial at most 500!, an exponential must stay below
#    10^10,000, interval arithmetic (4.3) at most 40,000 bits of precision. What fails a check is
#    refused, not attempted. Each remaining step then takes at most milliseconds.
# 2. **A deadline checked as the work goes.** `answers_match` gives each call a budget
#    (`TIME_LIMIT_S`, 0.1 s), stored per thread; the parser and the comparison call `_tick()` at
#    every token, node and point, and give up when it is spent. Because every single step is
#    short, checking between steps bounds the whole call. The budget is counted in the thread's
#    own CPU time, not in wall-clock time, and without the time Python spends collecting garbage
#    (in a large training process one collection can take 0.15 s): on a busy machine a comparison
#    may take longer, but it does the same work and reaches the same verdict, which matters for a
#    reward.
#
# Whatever cannot be decided in time counts as *no match*: a reward of 0 for an answer we could not
# check is the safe side.
#
# One more thread-safety detail: mpmath (under SymPy and our interval arithmetic) caches constants
# such as π at the highest precision asked for so far, and two threads refreshing that cache at once
# could read a value of the wrong precision. Comparisons therefore take a lock. Python runs one
# thread at a time anyway, so the lock costs no speed, and the budget counts only the thread's own
# CPU time, not its wait.

# %%
#| export: verify
class _Unparsable(Exception):
    pass


class _Refused(Exception):
    """Cannot be decided within the time bound (too large, or outside what we evaluate)."""


class _OutOfTime(Exception):
    pass


_state = threading.local()  # per-thread deadline and interval-arithmetic context


def _work_clock() -> float:
    """CPU seconds this thread has spent, not counting garbage collection (which is not our work, and
    in a large process one collection can take a tenth of a second)."""
    return time.thread_time() - getattr(_state, "gc_seconds", 0.0)


def _count_garbage_collection(phase: str, info: dict) -> None:
    if phase == "start":
        _state.gc_start = time.thread_time()
    elif getattr(_state, "gc_start", None) is not None:
        _state.gc_seconds = getattr(_state, "gc_seconds", 0.0) + time.thread_time() - _state.gc_start
        _state.gc_start = None


gc.callbacks.append(_count_garbage_collection)


def _tick() -> None:
    """Raise _OutOfTime once this thread has spent the CPU time of the current call.

    The clock is the thread's own work, so a verdict does not depend on how busy the machine is.
    Reading it costs about a microsecond, so the cheap wall clock is read first: until wall time has
    passed the deadline, the work clock cannot have."""
    deadline = getattr(_state, "deadline", None)
    if deadline is not None and time.monotonic() > deadline[0] and _work_clock() > deadline[1]:
        raise _OutOfTime


_ONE_AT_A_TIME = threading.RLock()  # mpmath and SymPy keep caches that two threads must not update at once


@contextmanager
def _time_limit(seconds: float):
    """Run the code inside alone (see _ONE_AT_A_TIME) with a budget of `seconds` of CPU time that `_tick`
    enforces, on any thread. Python runs one thread at a time anyway, so the lock costs no speed."""
    with _ONE_AT_A_TIME:
        previous = getattr(_state, "deadline", None)
        deadline = (time.monotonic() + seconds, _work_clock() + seconds)
        _state.deadline = deadline if previous is None else (min(previous[0], deadline[0]), min(previous[1], deadline[1]))
        try:
            yield
        finally:
            _state.deadline = previous

# %% [markdown]
# ### 4.2 A whitelist parser
#
# LaTeX is first rewritten into plain infix (`\frac{a}{b}` → `((a)/(b))`, `\sqrt{x}` → `sqrt(x)`,
# `\pi` → `pi`); an unknown command makes the parse fail rather than guess. A recursive-descent
# parser then accepts only numbers, single-letter and Greek variables, `+ - * / ^ !`, parentheses,
# `|x|`, implicit multiplication (`3x`, `2\pi`) and a short list of functions (`\sqrt`, the six
# trigonometric functions and their inverses, `\sin^2 x`, `\log`, `\ln`, `\log_b`, `\exp`,
# `\binom`). Some readings need care:
#
# * **Decimals are exact**: `0.1` is the rational 1/10, so `0.1 + 0.2` *is* `0.3`.
# * **Mixed numbers**: a whole number directly before a proper fraction of integers is their sum,
#   `3\frac{1}{4}` = 13/4 (and `3 1/4` too); elsewhere juxtaposition is a product, `2\frac{\pi}{3}`.
# * **E-notation**: `3.1e8` and `4.7E-3` are numbers, not products with Euler's `e`.
# * **Odd roots of negative numbers** are real: `\sqrt[3]{-8}` = -2.
# * Before computing a power, a factorial or a binomial, the parser checks the size of the result
#   (the refusals of 4.1).

# %%
#| export: verify
_FUNCTIONS = {"sqrt": sympy.sqrt, "sin": sympy.sin, "cos": sympy.cos, "tan": sympy.tan, "cot": sympy.cot,
              "sec": sympy.sec, "csc": sympy.csc, "arcsin": sympy.asin, "arccos": sympy.acos, "arctan": sympy.atan,
              "sinh": sympy.sinh, "cosh": sympy.cosh, "tanh": sympy.tanh, "log": sympy.log, "ln": sympy.log,
              "exp": sympy.exp, "abs": sympy.Abs}
_INVERSE = {"sin": sympy.asin, "cos": sympy.acos, "tan": sympy.atan}  # \sin^{-1} x
_CONSTANTS = {"pi": sympy.pi, "oo": sympy.oo, "i": sympy.I, "e": sympy.E}
_GREEK = {"alpha", "beta", "gamma", "delta", "epsilon", "varepsilon", "zeta", "eta", "theta", "vartheta", "kappa",
          "lambda", "mu", "nu", "xi", "rho", "sigma", "tau", "phi", "varphi", "chi", "psi", "omega"}
_LATEX_WORDS = {"pi": "pi", "infty": "oo", "cdot": "*", "times": "*", "div": "/", **{f: f for f in _FUNCTIONS},
                **{g: g for g in _GREEK}}
MAX_DIGITS = 2_000  # an exact number may have at most this many digits


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
        _tick()
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
            elif name in ("binom", "dbinom", "tbinom"):
                n, i = argument(i)
                k, i = argument(i)
                out.append(f" binom(({n}),({k})) ")
            elif name == "sqrt":
                index = None
                if i < len(s) and s[i] == "[":
                    close = s.find("]", i)
                    if close < 0:
                        raise _Unparsable("bad root index")
                    index, i = _latex_to_infix(s[i + 1:close]), close + 1
                body, i = argument(i)
                out.append(f"sqrt({body})" if index is None else f" root(({body}),({index})) ")
            elif name == "log" and s[i:i + 1] == "_":  # \log_{b} x = log(x) / log(b)
                base, i = argument(i + 1)
                while i < len(s) and s[i] == " ":
                    i += 1
                if s[i:i + 1] == "(":
                    depth, j = 0, i
                    while j < len(s):
                        depth += {"(": 1, ")": -1}.get(s[j], 0)
                        if depth == 0:
                            break
                        j += 1
                    body, i = _latex_to_infix(s[i + 1:j]), j + 1
                elif s[i:i + 1] in ("{", "\\"):
                    body, i = argument(i)
                else:
                    m = re.match(r"[0-9.]+|[a-zA-Z]", s[i:])
                    if not m:
                        raise _Unparsable("log without argument")
                    body, i = m.group(0), i + len(m.group(0))
                out.append(f"(log({body})/log({base}))")
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


# %% [markdown]
# The first stage in action, and what it refuses:

# %%
for latex in ["\\frac{1}{2}", "3\\sqrt{13}", "\\sqrt[3]{-8}", "\\log_2 8", "\\binom{5}{2}", "2\\pi r^{2}"]:
    print(f"{latex!r:20} -> {_latex_to_infix(latex)!r}")
for bad in ["\\unknown{3}", "x_1", "\\frac{1}{"]:
    try:
        _latex_to_infix(bad)
        raise AssertionError(f"{bad!r} should be refused")
    except _Unparsable as err:
        print(f"{bad!r:20} -> refused: {err}")

# %% [markdown]
# The tokenizer splits the infix text into numbers, names and operators (`xy` is two variables,
# `3.1e8` one number). Powers are computed only after a size check: the number of digits of the
# result is estimated first, and anything beyond `MAX_DIGITS` is refused, not attempted.

# %%
#| export: verify
_TOKEN = re.compile(r"\s*(?:(\d+\.?\d*(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?)|([a-zA-Z]+)|(\*\*|[-+*/^()!|,]))")
_NAMES = set(_FUNCTIONS) | set(_CONSTANTS) | _GREEK | {"binom", "root"}


def _tokens(s: str) -> list[tuple[str, str]]:
    tokens, pos = [], 0
    s = s.strip()
    while pos < len(s):
        _tick()
        m = _TOKEN.match(s, pos)
        if not m or m.end() == pos:
            raise _Unparsable(f"unexpected {s[pos:pos + 10]!r}")
        number, word, op = m.groups()
        if number is not None:
            if len(number) > 100:
                raise _Unparsable("number too long")
            tokens.append(("num", number))
        elif word is not None:
            if word in _NAMES:
                tokens.append(("name", word))
            else:  # "xy" is x*y; single letters are variables
                tokens.extend(("name", ch) for ch in word)
        else:
            tokens.append(("op", "^" if op == "**" else op))
        pos = m.end()
    return tokens


def _digits(x) -> float:
    """Decimal digits of a rational's numerator or denominator, whichever is longer."""
    return max(int(x.p).bit_length(), int(x.q).bit_length()) * 0.30103


def _safe_pow(base, exponent):
    _tick()
    if exponent.is_Number:
        if abs(exponent) > 10 * MAX_DIGITS:
            raise _Unparsable("exponent too large")
        if base.is_Rational and exponent.is_Rational and abs(base) != 1 and float(abs(exponent)) * _digits(base) > MAX_DIGITS:
            raise _Unparsable("power too large")
        if base.free_symbols and abs(exponent) > 1000:
            raise _Unparsable("symbolic power too large")
    if isinstance(base, sympy.Pow) and base.exp.is_Number and exponent.is_Number and abs(base.exp * exponent) > 10 * MAX_DIGITS:
        raise _Unparsable("power too large")  # (x^999)^999 would become x^998001
    return sympy.Pow(base, exponent)


def _root(value, index):
    """The n-th root; the real one for a negative number and an odd n (\\sqrt[3]{-8} = -2)."""
    if index.is_Integer and index > 0 and value.is_Number and value < 0 and index % 2 == 1:
        return -_safe_pow(-value, 1 / index)
    return _safe_pow(value, 1 / index)


# %%
print(_tokens("3x^2 + 2pi - sqrt(2)"))
assert _tokens("2pi") == [("num", "2"), ("name", "pi")] and _tokens("xy") == [("name", "x"), ("name", "y")]
assert _tokens("3.1e8") == [("num", "3.1e8")]
for base, exponent in [(9, 9 ** 9), (10, 3000)]:
    try:
        _safe_pow(sympy.Integer(base), sympy.Integer(exponent))
        raise AssertionError("should be refused")
    except _Unparsable as err:
        print(f"{base}^{exponent}: refused before computing ({err})")
assert _safe_pow(sympy.Integer(2), sympy.Integer(10)) == 1024 and _root(sympy.Integer(-8), sympy.Integer(3)) == -2

# %% [markdown]
# The parser itself is a textbook recursive descent, one method per precedence level: `expr`
# (`+ -`), `term` (`* /` and implicit multiplication), `unary` (a sign), `power` (`^`, right
# associative), `postfix` (`!`), `atom` (numbers, names, functions, parentheses, `|x|`).

# %%
#| export: verify
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
            _tick()
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
            if not (value.is_Integer and 0 <= value <= 500):
                raise _Unparsable("factorial argument")
            value = sympy.factorial(value)
        return value

    def arguments(self):
        self.take("(")
        args = [self.expr()]
        while self.peek()[1] == ",":
            self.take()
            args.append(self.expr())
        self.take(")")
        return args

    def function(self, name):
        exponent = None
        if self.peek()[1] == "^":  # \sin^2 x, \sin^{-1} x
            self.take()
            exponent = self.postfix()
        if name in ("binom", "root"):
            n, k = self.arguments()
            if name == "root":
                return _root(n, k)
            if not (n.is_Integer and k.is_Integer and 0 <= n <= 1000):
                raise _Unparsable("binomial arguments")
            return sympy.binomial(n, k)
        if self.peek()[1] == "(":
            args = self.arguments()
            if len(args) != 1:
                raise _Unparsable("one argument expected")
            arg = args[0]
        else:  # \sin 2x: the argument runs up to the next operator or function
            arg = self.power()
            while self.peek()[0] == "num" or self.peek()[0] == "name" and self.peek()[1] not in _FUNCTIONS:
                arg = arg * self.power()
        if exponent == -1 and name in _INVERSE:
            return _INVERSE[name](arg)
        value = _FUNCTIONS[name](arg)
        return value if exponent is None else _safe_pow(value, exponent)

    def atom(self):
        kind, text = self.take()
        if kind == "num":
            mantissa, _, exponent = text.lower().partition("e")
            value = sympy.Rational(mantissa)  # decimals are exact: 0.1 + 0.2 == 0.3
            if exponent:  # 3.1e8, 4.7E-3
                if abs(int(exponent)) > MAX_DIGITS:
                    raise _Unparsable("exponent too large")
                value *= sympy.Integer(10) ** int(exponent)
            return value
        if kind == "name":
            if text in _FUNCTIONS or text in ("binom", "root"):
                return self.function(text)
            return _CONSTANTS.get(text) or sympy.Symbol(text)
        if text == "(":
            value = self.expr()
            self.take(")")
            return value
        if text == "|":
            value = self.expr()
            self.take("|")
            return sympy.Abs(value)
        raise _Unparsable(f"unexpected {text!r}")


# %%
def parse_tokens(text):
    return _Parser(_tokens(text)).parse()


for text in ["(1+2)(3+4)", "2^3^2", "-2^2", "5!", "|-3|", "2/3", "3x^2 + 1"]:
    print(f"{text!r:12} -> {parse_tokens(text)}")
assert parse_tokens("(1+2)(3+4)") == 21 and parse_tokens("2^3^2") == 512 and parse_tokens("-2^2") == -4
assert parse_tokens("5!") == 120 and parse_tokens("|-3|") == 3 and parse_tokens("2/3") == sympy.Rational(2, 3)

# %% [markdown]
# Last, the entry points: mixed numbers are rewritten before parsing, `_parse` caches its results,
# and `parse_math` runs it under the time limit.

# %%
#| export: verify
_MIXED = re.compile(r"(?<![\w.^}/])(\d+)\s*\\frac\s*(?:\{(\d+)\}|(\d))\s*(?:\{(\d+)\}|(\d))")
_PLAIN_MIXED = re.compile(r"(?<![\w.^}/])(\d+)\s+(\d+)\s*/\s*(\d+)(?![\d.])")


def _mixed_numbers(s: str) -> str:
    """3\\frac{1}{4} and "3 1/4" are 3 + 1/4 (a proper fraction after a whole number), not 3 * 1/4."""
    def mixed(whole, num, den, original):
        return f"({whole}+{num}/{den})" if int(num) < int(den) else original

    s = _MIXED.sub(lambda m: mixed(m.group(1), m.group(2) or m.group(3), m.group(4) or m.group(5), m.group(0)), s)
    return _PLAIN_MIXED.sub(lambda m: mixed(m.group(1), m.group(2), m.group(3), m.group(0)), s)


@functools.lru_cache(maxsize=4096)
def _parse(text: str):
    if len(text) > MAX_ANSWER_CHARS:
        return None
    try:
        return _Parser(_tokens(_latex_to_infix(_mixed_numbers(text)))).parse()
    except (_Unparsable, RecursionError, ValueError, TypeError, ZeroDivisionError, OverflowError, AttributeError):
        return None


def parse_math(text: str):
    """A SymPy expression for a normalized answer, or None if it is outside the accepted subset."""
    try:
        with _time_limit(TIME_LIMIT_S):
            return _parse(text)
    except _OutOfTime:
        return None

# %%
for text in ["3\\sqrt{13}", "\\frac{\\sqrt{3}}{2}", "6+9i", "x^5 - x^4 + 2x", "0.1 + 0.2", "3\\frac{1}{4}", "2\\frac{\\pi}{3}",
             "4.7E-3", "\\sin^2 x + \\csc t", "\\log_2 8", "\\sqrt[3]{-8}", "9^{9^{9^9}}", "__import__('os')"]:
    print(f"{text!r:26} -> {parse_math(text)}")
assert parse_math("3\\sqrt{13}") == parse_math("\\sqrt{117}") and parse_math("0.1 + 0.2") == parse_math("0.3")
assert parse_math("3\\frac{1}{4}") == sympy.Rational(13, 4) and parse_math("\\sqrt[3]{-8}") == -2
assert parse_math("9^{9^{9^9}}") is None  # refused, not computed
assert parse_math("__import__('os')") is None  # not in the grammar

# %% [markdown]
# ### 4.3 Equal means equal
#
# The first version of this verifier called two numbers equal when they differed by less than a
# millionth of their size. That is a reasonable rule for measurements and a bad one for answers.
# Here is what it accepts:

# %%
def within_a_millionth(pred: str, gold: str) -> bool:  # the old rule, for comparison
    x, y = float(parse_math(pred)), float(parse_math(gold))
    return abs(x - y) <= 1e-6 * max(1.0, abs(y))


near_misses = [("1000001", "1000000"), ("2^{31}-1", "2^{31}"), ("10^{-20}", "0"), ("1267650600228229401496703205377", "2^{100}")]
for pred, gold in near_misses:
    print(f"{pred:34} vs {gold:9}  within a millionth: {within_a_millionth(pred, gold)}")

# %% [markdown]
# Integers that differ by one, a power of two and its neighbour, a tiny number against zero, a large
# power against itself plus one written out in digits: each would be rewarded. The rule is replaced by **exact comparison**:
#
# * Two rationals (integers, fractions, decimals, which are exact rationals here) are compared
#   exactly.
# * Irrational values (`3\sqrt{13}`, `\cos\frac{\pi}{12}`) are evaluated with **interval
#   arithmetic** (mpmath's `iv` context): each side becomes an interval that is guaranteed to contain
#   its exact value. If the two intervals do not overlap, the values differ, and that is a proof,
#   not an estimate. If they still overlap at a precision of 1,200 bits (about 360 digits), or
#   300 bits more than the size of the largest intermediate value if that is more, we call them
#   equal: two different answers of a few hundred characters that agree to 90 digits after the
#   largest of their parts would have to be constructed for the purpose.
#   A tiny number is never "about zero": its interval is tiny but does not contain zero.
# * Expressions with variables are compared at random rational points (both signs, so `\sqrt{x^2}`
#   is not `x`): equal only if they agree at four points. A polynomial identity that holds at four
#   random rationals by accident is astronomically unlikely, and this is far faster and more
#   predictable than `simplify`.
# * A **tolerance exists only for decimal approximations**, and it is scaled to the digits the
#   decimal states: a decimal with at least six significant digits matches an exact value if it is
#   that value rounded, or cut off, at its last digit. `0.333333` matches `\frac{1}{3}`; `0.333`
#   and `3.14` do not match `\frac{1}{3}` and `\pi`, and `17.99999` does not match 18.

# %%
#| export: verify
_MAX_BITS = 33_000  # magnitudes beyond 2^±33000 (about 10^±10000) are refused
_MAX_EXP_ARG = 22_000  # e^x for |x| above this would pass that bound
_FIRST_BITS, _SECOND_BITS, _MOST_BITS = 200, 1_200, 40_000


def _ctx(bits: int) -> MPIntervalContext:
    """This thread's interval-arithmetic context (mpmath contexts are not thread-safe), at `bits` precision."""
    ctx = getattr(_state, "ctx", None)
    if ctx is None:
        ctx = _state.ctx = MPIntervalContext()
    ctx.prec = bits
    return ctx


def _bits(x) -> int:
    """log2 of the largest endpoint of an interval (a large negative number for [0, 0]); refuses inf/nan."""
    top = -10 ** 9
    for sign, man, exp, bc in x._mpi_:
        if man == 0:
            if bc != 0:  # inf or nan
                raise _Refused("unbounded")
            continue
        top = max(top, exp + bc)
    if top > _MAX_BITS:
        raise _Refused("too large")
    return top


class _Complex:
    """A complex interval: real and imaginary parts as mpmath intervals (im None for a real value)."""

    def __init__(self, re_, im=None):
        self.re, self.im = re_, im
        _bits(re_)
        if im is not None:
            _bits(im)


def _positive(x) -> bool:
    return x.a > 0


def _negative(x) -> bool:
    return x.b < 0


def _add(x: _Complex, y: _Complex) -> _Complex:
    im = x.im if y.im is None else y.im if x.im is None else x.im + y.im
    return _Complex(x.re + y.re, im)


def _mul(x: _Complex, y: _Complex) -> _Complex:
    if x.im is None and y.im is None:
        return _Complex(x.re * y.re)
    if x.im is None:
        return _Complex(x.re * y.re, x.re * y.im)
    if y.im is None:
        return _Complex(x.re * y.re, x.im * y.re)
    return _Complex(x.re * y.re - x.im * y.im, x.re * y.im + x.im * y.re)


def _reciprocal(x: _Complex, ctx) -> _Complex:
    if x.im is None:
        if not (_positive(x.re) or _negative(x.re)):
            raise _Refused("division by an interval around 0")
        return _Complex(1 / x.re)
    norm = x.re * x.re + x.im * x.im
    if not _positive(norm):
        raise _Refused("division by an interval around 0")
    return _Complex(x.re / norm, -x.im / norm)


def _exp(x: _Complex, ctx) -> _Complex:
    if x.re.b > _MAX_EXP_ARG or x.re.a < -_MAX_EXP_ARG:
        raise _Refused("exponential too large")
    if x.im is None:
        return _Complex(ctx.exp(x.re))
    if _bits(x.im) > 300:
        raise _Refused("angle too large")
    r = ctx.exp(x.re)
    return _Complex(r * ctx.cos(x.im), r * ctx.sin(x.im))


def _log(x: _Complex, ctx) -> _Complex:
    if x.im is None and _positive(x.re):
        return _Complex(ctx.log(x.re))
    if x.im is None and _negative(x.re):
        return _Complex(ctx.log(-x.re), ctx.pi)
    if x.im is not None and (_positive(x.re) or _positive(x.im) or _negative(x.im)):
        return _Complex(ctx.log(x.re * x.re + x.im * x.im) / 2, ctx.atan2(x.im, x.re))
    raise _Refused("logarithm near 0 or on its branch cut")


def _power_of(x: _Complex, n: int, ctx) -> _Complex:
    result = _Complex(ctx.mpf(1))
    for _ in range(abs(n)):
        result = _mul(result, x)
    return _reciprocal(result, ctx) if n < 0 else result


# %% [markdown]
# The arithmetic of intervals, checked: 1/3 is not a binary fraction, so its interval has a (tiny)
# width; i·i is exactly -1; the logarithm of -1 is iπ; dividing by an interval around zero is refused.

# %%
ctx = _ctx(64)
third = _Complex(ctx.mpf(1) / 3)
print("1/3 at 64 bits:", third.re)
assert third.re.a < third.re.b  # a (tiny) interval, not a point
square = _mul(_Complex(ctx.mpf(0), ctx.mpf(1)), _Complex(ctx.mpf(0), ctx.mpf(1)))
print("i * i:", square.re, "+", square.im, "i")
assert square.re.a == square.re.b == -1 and square.im.a == square.im.b == 0
log_minus_one = _log(_Complex(ctx.mpf(-1)), ctx)
print("log(-1):", log_minus_one.re, "+", log_minus_one.im, "i")
assert log_minus_one.im.a < 3.14159266 and log_minus_one.im.b > 3.14159265
try:
    _reciprocal(_Complex(ctx.mpf([-1, 1])), ctx)
    raise AssertionError("should be refused")
except _Refused as err:
    print("1 / [-1, 1]: refused,", err)

# %% [markdown]
# `_evaluate` walks a SymPy expression and returns a complex interval that contains its exact value
# (`scale` records the size of the largest term of a sum, which decides the precision needed later).

# %%
#| export: verify
def _evaluate(expr, point: dict, ctx, scale: list):
    """A complex interval that contains the exact value of `expr` with symbols set to `point`."""
    _tick()
    if expr.is_Rational:
        return _Complex(ctx.mpf(int(expr.p)) / int(expr.q))
    if expr is sympy.pi:
        return _Complex(ctx.pi)
    if expr is sympy.E:
        return _Complex(ctx.e)
    if expr is sympy.I:
        return _Complex(ctx.mpf(0), ctx.mpf(1))
    if expr.is_Symbol:
        if expr not in point:
            raise _Refused("unbound symbol")
        p, q = point[expr]
        return _Complex(ctx.mpf(p) / q)
    args = [_evaluate(a, point, ctx, scale) for a in expr.args] if not expr.is_Pow else None
    if expr.is_Add:
        total = args[0]
        for term in args:
            scale[0] = max(scale[0], _bits(term.re), _bits(term.im) if term.im is not None else -10 ** 9)
        for term in args[1:]:
            total = _add(total, term)
        return total
    if expr.is_Mul:
        total = args[0]
        for factor in args[1:]:
            total = _mul(total, factor)
        return total
    if expr.is_Pow:
        return _power(expr.base, expr.exp, point, ctx, scale)
    name = type(expr).__name__
    (x,) = args if len(args) == 1 else (None,)
    if x is None:
        raise _Refused(f"{name} with {len(args)} arguments")
    if name == "exp":
        return _exp(x, ctx)
    if name == "log":
        return _log(x, ctx)
    if name == "Abs":
        return _Complex(ctx.sqrt(x.re * x.re + (x.im * x.im if x.im is not None else 0)))
    if x.im is not None:
        raise _Refused(f"{name} of a complex number")
    v = x.re
    if name in ("sin", "cos", "tan", "cot", "sec", "csc"):
        if _bits(v) > 300:
            raise _Refused("trigonometric argument too large")
        return _Complex(getattr(ctx, name)(v))
    if name in ("sinh", "cosh", "tanh"):
        if _bits(v) > 14:
            raise _Refused("hyperbolic argument too large")
        up, down = ctx.exp(v), ctx.exp(-v)
        return _Complex({"sinh": (up - down) / 2, "cosh": (up + down) / 2, "tanh": (up - down) / (up + down)}[name])
    if name == "atan":
        return _Complex(ctx.atan2(v, ctx.mpf(1)))
    if name in ("asin", "acos"):
        if not (v.a > -1 and v.b < 1):
            raise _Refused("inverse sine outside (-1, 1)")
        other = ctx.sqrt(1 - v * v)
        return _Complex(ctx.atan2(v, other) if name == "asin" else ctx.atan2(other, v))
    raise _Refused(f"unsupported function {name}")


def _power(base, exponent, point, ctx, scale) -> _Complex:
    b = _evaluate(base, point, ctx, scale)
    if exponent.is_Integer:
        n = int(exponent)
        size = max(_bits(b.re), _bits(b.im) if b.im is not None else -10 ** 9)
        if abs(n) * max(size, 1) > _MAX_BITS:
            raise _Refused("power too large")
        if b.im is None:
            if n < 0 and not (_positive(b.re) or _negative(b.re)):
                raise _Refused("division by an interval around 0")
            return _Complex(b.re ** n)
        result, square, k = _Complex(ctx.mpf(1)), b, abs(n)
        while k:
            _tick()
            if k & 1:
                result = _mul(result, square)
            k >>= 1
            if k:
                square = _mul(square, square)
        return _reciprocal(result, ctx) if n < 0 else result
    if exponent.is_Rational and exponent.q == 2 and b.im is None and _negative(b.re):  # sqrt(-3) = i sqrt(3)
        root = _Complex(ctx.mpf(0), ctx.sqrt(-b.re))
        return _power_of(root, int(exponent.p), ctx)
    if b.im is None and _positive(b.re) and exponent.is_Rational:
        e = ctx.mpf(int(exponent.p)) / int(exponent.q)
        if abs(float(exponent)) * max(abs(_bits(b.re)), 1) > _MAX_BITS:
            raise _Refused("power too large")
        return _Complex(ctx.exp(e * ctx.log(b.re)))
    return _exp(_mul(_evaluate(exponent, point, ctx, scale), _log(b, ctx)), ctx)  # b^w = e^(w log b)


# %%
root2 = _evaluate(parse_math("\\sqrt{2}"), {}, _ctx(64), [0]).re
print("an interval around sqrt(2):", root2)
assert root2.a * root2.a <= 2 <= root2.b * root2.b  # it really contains sqrt(2)
tiny = _evaluate(parse_math("e^{-100}"), {}, _ctx(200), [0]).re
print("e^{-100} lies in", tiny)
assert tiny.a > 0  # tiny, but provably not zero

# %% [markdown]
# Finally the comparison: two intervals that do not overlap prove two values different; with
# variables, the comparison is repeated at random rational points.

# %%
#| export: verify
def _apart(x: _Complex, y: _Complex) -> bool:
    """Do two complex intervals certainly hold different numbers?"""
    zero = x.re * 0

    def disjoint(u, v):
        return u.b < v.a or v.b < u.a

    return disjoint(x.re, y.re) or disjoint(x.im if x.im is not None else zero, y.im if y.im is not None else zero)


def _equal_at(a, b, point: dict) -> bool:
    """Is a == b at `point` (symbol -> (p, q) rational)? Decided with intervals at two precisions:
    intervals that do not overlap prove a difference; overlapping at the higher precision (at least
    ~360 digits more than the largest intermediate value) counts as equal."""
    scale = [0]
    for bits in (_FIRST_BITS, None):
        if bits is None:
            bits = max(_SECOND_BITS, 300 + scale[0])
            if bits > _MOST_BITS:
                raise _Refused("needs too much precision")
        ctx = _ctx(bits)
        x, y = _evaluate(a, point, ctx, scale), _evaluate(b, point, ctx, scale)
        scale[0] = max(scale[0], _bits(x.re), _bits(y.re))
        if _apart(x, y):
            return False
    return True


def _has_infinity(expr) -> bool:
    return expr.has(sympy.oo, -sympy.oo, sympy.zoo, sympy.nan)


def _points(symbols, seed: int = 0):
    """Random rational points with both signs, the same for every call (deterministic verdicts)."""
    rng = random.Random(seed)
    for k in range(1_000):  # the signs run through every combination (bit j of k: sign of symbol j)
        yield {s: ((-1) ** (k >> j & 1) * rng.randint(1, 97), rng.randint(1, 13)) for j, s in enumerate(symbols)}


def _same_value(a, b) -> bool:
    """Are two SymPy expressions equal? Exactly for rationals; by interval arithmetic otherwise; and with
    variables, at several random points (a randomized identity test: faster than `simplify`, and bounded)."""
    if a == b:
        return True
    if a.is_Rational and b.is_Rational:
        return False
    if _has_infinity(a) or _has_infinity(b):
        return False
    symbols = sorted(a.free_symbols | b.free_symbols, key=str)
    if not symbols:
        return _equal_at(a, b, {})
    agreed, tried = 0, 0
    for point in _points(symbols):
        tried += 1
        if tried > 12:
            return False
        try:
            if not _equal_at(a, b, point):
                return False
        except _Refused:
            continue  # outside a domain (log of a negative, a pole): try another point
        agreed += 1
        if agreed == 4:
            return True


def _proportional(a, b, *, positive: bool = False) -> bool:
    """a == c*b for a constant c != 0 (c > 0 if `positive`): one equation or inequality written two ways."""
    symbols = sorted(a.free_symbols | b.free_symbols, key=str)
    if not symbols:
        return False
    for bits in (_FIRST_BITS, _SECOND_BITS):
        ctx, ratio, agreed, tried = _ctx(bits), None, 0, 0
        for point in _points(symbols, seed=1):
            tried += 1
            if tried > 12:
                return False
            try:
                x, y = _evaluate(a, point, ctx, [0]), _evaluate(b, point, ctx, [0])
                if ratio is None:
                    ratio = _mul(x, _reciprocal(y, ctx))
                    if not (_positive(ratio.re) or _negative(ratio.re)) or (positive and not _positive(ratio.re)):
                        return False
                elif _apart(x, _mul(ratio, y)):
                    return False
            except _Refused:
                continue
            agreed += 1
            if agreed == 4:
                break
    return True

# %%
for pred, gold in near_misses + [("3\\sqrt{13}", "\\sqrt{117}"), ("\\sqrt{3+2\\sqrt{2}}", "1+\\sqrt{2}"),
                                 ("e^{-100}", "0"), ("\\csc^2 t", "1+\\cot^2 t"), ("\\sqrt{x^2}", "x")]:
    print(f"{pred:34} vs {gold:11}  equal: {_same_value(parse_math(pred), parse_math(gold))}")
assert not any(_same_value(parse_math(p), parse_math(g)) for p, g in near_misses)
assert _same_value(parse_math("\\sqrt{3+2\\sqrt{2}}"), parse_math("1+\\sqrt{2}"))
assert _same_value(parse_math("\\csc^2 t"), parse_math("1+\\cot^2 t")) and not _same_value(parse_math("\\sqrt{x^2}"), parse_math("x"))

# %% [markdown]
# ### 4.4 The shapes of answers
#
# An answer is not always one number. The comparison first decides the *shape* of each side, then
# compares shapes:
#
# * a **list or set**: `1, -2`, `\{1, 2\}`, `x = 3 \text{ or } x = -4`, `2 \text{ and } 9`; braces
#   or none, order never matters, and `a \pm b` stands for `a + b` and `a - b`. A single value
#   equals a one-element set. `\emptyset` is the empty set;
# * an **interval or region**: unions in any order, `\setminus`, `\mathbb{R}`, and linear
#   inequalities (`x \ge 2`, `2 < x \le 5`, `x < 2 \text{ or } x > 5`) become SymPy sets, which
#   put unions in a canonical order and merge what touches: `(0,10) \setminus \{4\}` is
#   `(0,4) \cup (4,10)`;
# * an **inequality** against an inequality: both are moved to the form `f > 0` (or `f \ge 0`) and
#   must have the same strictness and proportional `f` with a positive factor: `-y > -3` is `y < 3`,
#   `7 \ge y` is `y \le 7`;
# * an **equation** against an equation: the differences of their sides must be proportional
#   (`y = 2x + 1` and `2y - 4x = 2`); against a value, an equation with a single variable on the
#   left counts as its right-hand side (`x = 5` is `5`);
# * a **tuple** `(3, \frac{\pi}{2})` or interval `[2, 5)`: ordered, brackets must agree;
# * a **matrix** (`pmatrix`, `bmatrix`, or `array` in brackets; never `vmatrix`, a determinant):
#   entry by entry. A linear combination of matrices is evaluated first, so an unevaluated sum
#   matches only if it equals the gold; a column vector also matches a tuple of its entries;
# * a **percentage** `50\%` matches `50` and `0.5` (but `1000\%` does not match 10);
# * a **number in a base**: against the gold `61_8`, the digits `61` match (the question asked for
#   base 8) but the decimal value 49 does not;
# * anything that does not parse is compared as normalized text (words case-insensitively).

# %%
#| export: verify
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
    """Elements of a list: top-level commas and the words "or"/"and"; "a \\pm b" becomes a + b and a - b."""
    out = []
    for piece in _split_top_level(s):
        for part in re.split(r"\s+(?:or|and)\s+|;", piece):
            part = part.strip()
            if part.count("\\pm") == 1:
                out += [part.replace("\\pm", "+"), part.replace("\\pm", "-")]
            elif part.count("\\mp") == 1:
                out += [part.replace("\\mp", "-"), part.replace("\\mp", "+")]
            elif part:
                out.append(part)
    return out


_RELATION = re.compile(r"<=|>=|<|>")


def _relation(s: str):
    """(parts, operators) of an inequality or a chain of them (a < x <= b), or None."""
    if "\\begin" in s:
        return None
    pieces = _RELATION.split(s)
    if len(pieces) < 2 or len(pieces) > 3 or "=" in s.replace("<=", "").replace(">=", ""):
        return None
    return [p.strip() for p in pieces], _RELATION.findall(s)


def _equation(s: str):
    """(lhs, rhs) of an equation with exactly one '=', or None."""
    if s.count("=") != 1 or _RELATION.search(s) or "\\begin" in s:
        return None
    lhs, rhs = (part.strip() for part in s.split("="))
    return (lhs, rhs) if lhs and rhs else None


# %%
assert _split_top_level("(1, 2), [3, 4)") == ["(1, 2)", "[3, 4)"]
assert _parts("x=3 or x=-4") == ["x=3", "x=-4"] and _parts("2 \\pm \\sqrt{3}") == ["2 + \\sqrt{3}", "2 - \\sqrt{3}"]
assert _relation("2 < x <= 5") == (["2", "x", "5"], ["<", "<="]) and _relation("y = 2x") is None
assert _equation("y = 2x + 1") == ("y", "2x + 1") and _equation("a = b = c") is None
print("lists, relations and equations are split as expected")

# %% [markdown]
# Regions: intervals, finite sets, their unions, intersections and differences, and linear
# inequalities in one variable, all as SymPy sets.

# %%
#| export: verify
def _linear_solution(f, strict: bool):
    """The set where f > 0 (f >= 0 if not strict), for f linear in one variable; None otherwise."""
    symbols = list(f.free_symbols)
    if len(symbols) != 1:
        return None
    x = symbols[0]
    k, c = sympy.diff(f, x), f.subs(x, 0)
    if k.free_symbols or c.free_symbols or not (k.is_Rational and c.is_number) or k == 0:
        return None
    root = -c / k
    if k > 0:
        return sympy.Interval(root, sympy.oo, left_open=strict, right_open=True)
    return sympy.Interval(-sympy.oo, root, left_open=True, right_open=strict)


def _inequality(lhs: str, op: str, rhs: str):
    """(f, strict) with the inequality written as f > 0 or f >= 0, or None."""
    left, right = _parse(lhs), _parse(rhs)
    if left is None or right is None:
        return None
    f = left - right if op in (">", ">=") else right - left
    return f, op in ("<", ">")


def _bounded_number(expr) -> bool:
    """A constant we can evaluate within the bounds (safe to hand to SymPy's comparisons), or +-oo."""
    if expr in (sympy.oo, -sympy.oo):
        return True
    if expr.free_symbols or _has_infinity(expr):
        return False
    try:
        x = _evaluate(expr, {}, _ctx(_FIRST_BITS), [0])
        return x.im is None and _bits(x.re) < 3000
    except _Refused:
        return False


def _region(s: str):
    """A SymPy set for an interval, a union/intersection/difference of them, a finite set or a linear inequality."""
    s = s.strip()
    for op, combine in (("\\cup", sympy.Union), ("\\cap", sympy.Intersection), ("\\setminus", sympy.Complement)):
        pieces = _split_on_command(s, op)
        if len(pieces) > 1:
            sets = [_region(p) for p in pieces]
            if any(x is None for x in sets):
                return None
            return combine(*sets) if combine is not sympy.Complement else functools.reduce(sympy.Complement, sets)
    if s == "\\emptyset":
        return sympy.EmptySet
    if s.startswith("\\{") and s.endswith("\\}"):
        values = [_parse(p) for p in _parts(s[2:-2])] if s[2:-2].strip() else []
        if any(v is None or not _bounded_number(v) for v in values):
            return None
        return sympy.FiniteSet(*values)
    interval = re.fullmatch(r"([(\[])(.*)([)\]])", s, flags=re.S)
    if interval:
        ends = _split_top_level(interval.group(2))
        if len(ends) == 2:
            low, high = _parse(ends[0]), _parse(ends[1])
            if low is None or high is None or not (_bounded_number(low) and _bounded_number(high)):
                return None
            return sympy.Interval(low, high, left_open=interval.group(1) == "(", right_open=interval.group(3) == ")")
    pieces = _parts(s)
    if len(pieces) > 1 and all(_relation(p) for p in pieces):  # x < 2 or x > 5
        sets = [_region(p) for p in pieces]
        return None if any(x is None for x in sets) else sympy.Union(*sets)
    relation = _relation(s)
    if relation:
        parts, ops = relation
        result = sympy.Reals
        for left, op, right in zip(parts, ops, parts[1:]):
            inequality = _inequality(left, op, right)
            solution = inequality and _linear_solution(*inequality)
            if solution is None or not all(_bounded_number(e) for e in (solution.start, solution.end)):
                return None
            result = sympy.Intersection(result, solution)
        return result
    return None


def _split_on_command(s: str, command: str) -> list[str]:
    """Split at top-level occurrences of a LaTeX command such as \\cup."""
    parts, depth, start, i = [], 0, 0, 0
    while i < len(s):
        c = s[i]
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif depth == 0 and s.startswith(command, i) and not s[i + len(command):i + len(command) + 1].isalpha():
            parts.append(s[start:i])
            start = i = i + len(command)
            continue
        i += 1
    parts.append(s[start:])
    return [p.strip() for p in parts]


def _components(region) -> list:
    if isinstance(region, sympy.Union):
        return [c for arg in region.args for c in _components(arg)]
    if isinstance(region, sympy.FiniteSet):
        return [("point", v) for v in region.args]
    if isinstance(region, sympy.Interval):
        return [("interval", region.start, region.end, region.left_open, region.right_open)]
    if region == sympy.EmptySet:
        return []
    if region == sympy.Reals:
        return [("interval", -sympy.oo, sympy.oo, True, True)]
    return [("other", region)]


def _same_region(a, b) -> bool:
    if a == b:
        return True
    ca, cb = _components(a), _components(b)
    if len(ca) != len(cb) or any(c[0] == "other" for c in ca + cb):
        return False
    for x, y in zip(ca, cb):
        if x[0] != y[0] or x[3:] != y[3:] or not all(_same_value(u, v) for u, v in zip(x[1:3], y[1:3])):
            return False
    return True


# %%
for text in ["x >= 2", "2 < x <= 5", "x < 2 or x > 5", "(0,10) \\setminus \\{4\\}", "(2, \\infty) \\cup (-\\infty, 1)"]:
    print(f"{text!r:35} -> {_region(text)}")
assert _same_region(_region("(0,10) \\setminus \\{4\\}"), _region("(0,4)\\cup(4,10)"))
assert not _same_region(_region("[2, 5]"), _region("[2, 5)"))

# %% [markdown]
# Matrices: each cell is parsed; a linear combination of matrices is evaluated to one matrix.

# %%
#| export: verify
_MATRIX = re.compile(r"\\begin\{(pmatrix|bmatrix|Bmatrix|matrix|smallmatrix|array)\}(?:\{[^{}]*\})?(.*?)\\end\{\1\}", re.S)


def _matrix(s: str):
    """A matrix (list of rows of SymPy values) for a matrix or a linear combination of matrices, or None.

    Returns "text" when the string holds a matrix we cannot read."""
    if "\\begin" not in s:
        return None
    s = re.sub(r"^\s*(?:[a-zA-Z]|\\vec\s*\{?[a-zA-Z]\}?)\s*=\s*", "", s)  # "v = (matrix)"
    blocks = []

    def keep(m):
        rows = [[c.strip() for c in row.replace("\\hline", "").split("&")] for row in m.group(2).split("\\\\") if row.strip()]
        blocks.append(rows)
        return f" \x00{len(blocks) - 1}\x00 "

    rest = _MATRIX.sub(keep, s).strip()
    rest = re.sub(r"^[(\[]\s*(\x00\d+\x00)\s*[)\]]$", r"\1", rest)  # \left[ \begin{array}...\end{array} \right]
    if not blocks or "\\begin" in rest:
        return "text"
    total = None
    covered = 0
    rest = re.sub(r"\s+", "", rest)
    for m in re.finditer(r"([+-]?)([^+\x00-]*?)\x00(\d+)\x00", rest):  # [sign] [coefficient] matrix
        if m.start() != covered:
            return "text"
        covered = m.end()
        coefficient = m.group(2).removesuffix("\\cdot").removesuffix("*") or "1"
        c = _parse(coefficient)
        values = [[_parse(cell) for cell in row] for row in blocks[int(m.group(3))]]
        if c is None or any(v is None for row in values for v in row) or len({len(r) for r in values}) != 1:
            return "text"
        c = -c if m.group(1) == "-" else c
        scaled = [[c * v for v in row] for row in values]
        if total is not None and [len(r) for r in total] != [len(r) for r in scaled]:
            return "text"
        total = scaled if total is None else [[u + v for u, v in zip(r, q)] for r, q in zip(total, scaled)]
    return total if total is not None and covered == len(rest) else "text"


def _same_matrix(a, b) -> bool:
    return (len(a) == len(b) and all(len(r) == len(q) for r, q in zip(a, b))
            and all(_same_value(u, v) for r, q in zip(a, b) for u, v in zip(r, q)))

# %%
combination = "\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix} + 2\\begin{pmatrix} 1 & 0 \\\\ 0 & 1 \\end{pmatrix}"
print(_matrix(combination))
assert _matrix(combination) == [[3, 2], [3, 6]]
assert _matrix("\\begin{vmatrix} 1 & 2 \\\\ 3 & 4 \\end{vmatrix}") == "text"  # a determinant is not a matrix

# %% [markdown]
# ### 4.5 Putting it together
#
# First the comparison of two single values (a scalar shape), with the one tolerance we allow:
# decimal approximations with at least six significant digits.

# %%
#| export: verify
def _plain(s: str) -> str:
    return re.sub(r"[\s{}]", "", s)


def _approximation_matches(decimal: str, other) -> bool:
    """A decimal with at least 6 significant digits approximates `other` if it is `other` rounded or cut
    off at its last stated digit."""
    digits = decimal.lstrip("-").replace(".", "").lstrip("0")
    if "." not in decimal or len(digits) < 6 or other.free_symbols or _has_infinity(other):
        return False
    d = sympy.Rational(decimal)
    ulp = sympy.Rational(1, 10 ** len(decimal.split(".")[1]))
    x = _evaluate(other, {}, _ctx(_SECOND_BITS), [0])
    if x.im is not None:
        return False
    v = x.re
    low, high = (d - ulp / 2, d + ulp / 2)
    rounded = v.a >= _ctx(_SECOND_BITS).mpf(int(low.p)) / int(low.q) and v.b <= _ctx(_SECOND_BITS).mpf(int(high.p)) / int(high.q)
    cut_low, cut_high = (d, d + ulp) if d >= 0 else (d - ulp, d)
    ctx = _ctx(_SECOND_BITS)
    cut = v.a >= ctx.mpf(int(cut_low.p)) / int(cut_low.q) and v.b < ctx.mpf(int(cut_high.p)) / int(cut_high.q)
    return bool(rounded or cut)


_DECIMAL = re.compile(r"-?\d*\.\d+")


def _scalar_match(pred: str, gold: str) -> bool:
    if pred == gold or re.fullmatch(r"[A-Za-z][A-Za-z ]+", pred) and pred.lower() == gold.lower():  # Monday, monday
        return True
    pe, ge = _equation(pred), _equation(gold)
    if pe and ge:
        a, b = _parse(f"({pe[0]})-({pe[1]})"), _parse(f"({ge[0]})-({ge[1]})")
        return a is not None and b is not None and (_same_value(a, b) or _proportional(a, b))
    if pe or ge:  # "x = 5" vs "5": keep the right-hand side when the left is a variable
        lhs, rhs = pe or ge
        if not re.fullmatch(r"[a-zA-Z]|\\(?:" + "|".join(_GREEK) + ")", lhs):
            return False
        return _match(rhs, gold) if pe else _match(pred, rhs)
    pr, gr = _relation(pred), _relation(gold)
    if pr or gr:
        if pr and gr and len(pr[1]) == len(gr[1]) == 1:
            a, b = _inequality(pr[0][0], pr[1][0], pr[0][1]), _inequality(gr[0][0], gr[1][0], gr[0][1])
            if a and b and a[1] == b[1] and _proportional(a[0], b[0], positive=True):
                return True
        ra, rb = _region(pred), _region(gold)
        return ra is not None and rb is not None and _same_region(ra, rb)
    if pred.endswith("%") or gold.endswith("%"):
        p, g = pred.rstrip("%").strip(), gold.rstrip("%").strip()
        p_val, g_val = _parse(p), _parse(g)
        if p_val is None or g_val is None:
            return False
        if _same_value(p_val, g_val):
            return True
        if pred.endswith("%") and not gold.endswith("%") and not g_val.is_Integer:  # 50% vs 0.5
            return _same_value(p_val / 100, g_val)
        if gold.endswith("%") and not pred.endswith("%") and not p_val.is_Integer:
            return _same_value(p_val, g_val / 100)
        return False
    pb, gb = re.fullmatch(r"([0-9A-Za-z]+)_(\d+)", pred), re.fullmatch(r"([0-9A-Za-z]+)_(\d+)", gold)
    if pb or gb:  # a number in base n: the same digits (a bare number is read in the gold's base)
        if pb and gb:
            return pb.groups() == gb.groups() or pb.group(1).lower() == gb.group(1).lower() and pb.group(2) == gb.group(2)
        if pb:  # a numeral in base n against a plain number: compare values (1010_2 = 10)
            digits, base = pb.group(1).lower(), int(pb.group(2))
            if not 2 <= base <= 36 or any(int(ch, 36) >= base for ch in digits) or not re.fullmatch(r"\d+", gold):
                return False
            return int(digits, base) == int(gold)
        digits, base = gb.group(1).lower(), int(gb.group(2))  # the gold's base, the digits alone (61 for 61_8)
        return (pred.lstrip("0") or "0").lower() == digits
    a, b = _parse(pred), _parse(gold)
    if a is None or b is None:
        return _plain(pred) == _plain(gold)
    if _DECIMAL.fullmatch(pred) and _approximation_matches(pred, b):
        return True
    if _DECIMAL.fullmatch(gold) and _approximation_matches(gold, a):
        return True
    return _same_value(a, b)


# %%
assert _approximation_matches("0.333333", parse_math("\\frac{1}{3}")) and not _approximation_matches("0.333", parse_math("\\frac{1}{3}"))
assert _approximation_matches("3.14159", parse_math("\\pi")) and not _approximation_matches("17.99999", parse_math("18"))
for pred, gold in [("50%", "0.5"), ("1010_2", "10"), ("y = 2x + 1", "2y - 4x = 2"), ("7 >= y", "y <= 7")]:
    print(f"{pred!r:14} vs {gold!r:14} -> {_scalar_match(pred, gold)}")
    assert _scalar_match(pred, gold)

# %% [markdown]
# Then the dispatch on shapes, and the public comparison `answers_match`, which never raises and
# runs under the time limit.

# %%
#| export: verify
def _shape(s: str) -> str:
    if "\\begin" in s:
        return "matrix"
    if s == "\\emptyset" or (s.startswith("\\{") and s.endswith("\\}")):
        return "set"
    if any(_split_on_command(s, op)[1:] for op in ("\\cup", "\\cap", "\\setminus")):
        return "region"
    if len(_parts(s)) > 1:
        return "list"
    if re.fullmatch(r"[(\[].*,.*[)\]]", s, flags=re.S) and len(_split_top_level(s[1:-1])) > 1 and _balanced(s[1:-1]):
        return "tuple"
    if _relation(s):
        return "relation"
    return "scalar"


def _balanced(s: str) -> bool:
    depth = 0
    for c in s:
        depth += 1 if c in "([{" else -1 if c in ")]}" else 0
        if depth < 0:
            return False
    return depth == 0


def _same_elements(preds: list[str], golds: list[str]) -> bool:
    """Equal as sets: every element of each side matches one of the other, duplicates ignored."""
    def unique(items):
        kept = []
        for item in items:
            if not any(_match(item, k) for k in kept):
                kept.append(item)
        return kept

    preds, golds = unique(preds), unique(golds)
    if len(preds) != len(golds):
        return False
    remaining = list(golds)
    for p in preds:
        hit = next((k for k, g in enumerate(remaining) if _match(p, g)), None)
        if hit is None:
            return False
        remaining.pop(hit)
    return True


def _elements(s: str, shape: str) -> list[str]:
    if s == "\\emptyset":
        return []
    return _parts(s[2:-2]) if shape == "set" else _parts(s)


def _match(pred: str, gold: str) -> bool:
    _tick()
    pred, gold = normalize_answer(pred), normalize_answer(gold)
    if pred == gold:
        return True
    if len(pred) > MAX_ANSWER_CHARS or len(gold) > MAX_ANSWER_CHARS:
        return _plain(pred) == _plain(gold)
    ps, gs = _shape(pred), _shape(gold)
    if "matrix" in (ps, gs):
        pm, gm = _matrix(pred), _matrix(gold)
        if {ps, gs} == {"matrix", "tuple"}:  # a vector written as a tuple: (1, 2) vs a column or row
            vector, entries = (pm, gold) if ps == "matrix" else (gm, pred)
            if not isinstance(vector, list) or entries[0] != "(" or not (len(vector) == 1 or {len(r) for r in vector} == {1}):
                return False
            values = [_parse(e) for e in _split_top_level(entries[1:-1])]
            flat = [v for row in vector for v in row]
            return None not in values and len(values) == len(flat) and all(_same_value(u, v) for u, v in zip(values, flat))
        if isinstance(pm, list) and isinstance(gm, list):
            return _same_matrix(pm, gm)
        return pm == gm == "text" and _plain(pred) == _plain(gold)
    if "region" in (ps, gs) or {ps, gs} in ({"tuple", "relation"}, {"set", "relation"}, {"list", "relation"}):
        ra, rb = _region(pred), _region(gold)
        return ra is not None and rb is not None and _same_region(ra, rb)
    if ps in ("set", "list") or gs in ("set", "list"):
        if "tuple" in (ps, gs):
            return False
        return _same_elements(_elements(pred, ps) if ps != "scalar" else [pred],
                              _elements(gold, gs) if gs != "scalar" else [gold])
    if ps == "tuple" or gs == "tuple":
        if ps != gs or (pred[0], pred[-1]) != (gold[0], gold[-1]):
            return False
        pp, gp = _split_top_level(pred[1:-1]), _split_top_level(gold[1:-1])
        return len(pp) == len(gp) and all(_match(p, g) for p, g in zip(pp, gp))
    return _scalar_match(pred, gold)


def answers_match(pred: str | None, gold: str | None) -> bool:
    """True if two answer strings denote the same mathematical object. Never raises; uses at most about
    TIME_LIMIT_S of CPU time, on any thread (what cannot be decided by then counts as no match)."""
    if not isinstance(pred, str) or not isinstance(gold, str) or not pred.strip() or not gold.strip():
        return False
    if len(pred) > 20 * MAX_ANSWER_CHARS or len(gold) > 20 * MAX_ANSWER_CHARS:
        return False
    try:
        with _time_limit(TIME_LIMIT_S):
            return bool(_match(pred, gold))
    except Exception:  # _OutOfTime, _Refused, and anything SymPy throws on odd input
        return False


# %%
for text in ["1, 2", "(1, 2)", "[2, 5)", "\\{1\\}", "x >= 2", "(0,4) \\cup (4,10)", "\\begin{pmatrix} 1 \\end{pmatrix}", "7"]:
    print(f"{text!r:36} -> {_shape(text)}")
assert [_shape(t) for t in ("1, 2", "(1, 2)", "x >= 2", "7")] == ["list", "tuple", "relation", "scalar"]
assert answers_match("x=3 \\text{ or } x=-4", "\\{3, -4\\}") and not answers_match("(1, 2)", "(2, 1)")
assert answers_match(None, "5") is False and answers_match("\\frac{1}{0}", "1") is False  # never raises

# %% [markdown]
# Finally `score_response`, **the one scoring rule** of the book: the evaluation harness
# (section 7) and the reward of chapter 5 both call it, so a truncated response is treated the
# same way in both. `grade` is its yes/no form.

# %%
#| export: verify
@dataclasses.dataclass(frozen=True)
class Score:
    answer: str | None  # the extracted answer (None if there is none, or only a guess from a cut-off response)
    rule: str  # the extraction rule, or "truncated"
    correct: bool


def score_response(response: str, gold: str, *, truncated: bool = False) -> Score:
    """The one scoring rule, for evaluation and for rewards: extract the final answer and compare it with
    `gold`. A response cut off by the token limit (`truncated`) only counts if it stated its answer:
    a fallback guess (the last number or formula of unfinished reasoning) is not an answer."""
    found = extract(response)
    answer, rule = found.answer, found.rule
    if truncated and (rule in FALLBACK_RULES or rule == "malformed_box"):  # cut off before it finished
        answer, rule = None, "truncated"
    return Score(answer, rule, answers_match(answer, gold))


def grade(response: str, gold: str, *, dataset: str = "gsm8k", truncated: bool = False) -> bool:
    """Is the final answer in `response` equivalent to `gold`? `dataset` is "gsm8k" or "math";
    `truncated`: the response hit the token limit (see `score_response`)."""
    if dataset not in ("gsm8k", "math"):
        raise ValueError(f"dataset must be 'gsm8k' or 'math', got {dataset!r}")
    return score_response(response, gold, truncated=truncated).correct

# %%
unfinished = "In May she sold 48 / 2 = 24 clips, so in April and May together she sold 48 + 24"
print("not marked truncated:", score_response(unfinished, "24"))
print("marked truncated:    ", score_response(unfinished, "24", truncated=True))
assert score_response(unfinished, "24").correct and not score_response(unfinished, "24", truncated=True).correct
malformed = "So the answer is \\boxed{\\frac{1}{2"
print("unclosed box:        ", score_response(malformed, "2"))
assert not grade(malformed, "2") and not grade(malformed, "\\frac{1}{2}")  # no answer: never a reward
assert score_response(malformed, "2", truncated=True).rule == "truncated"

# %% [markdown]
# ### The verifier's report card
#
# A table of tricky cases of every kind above, each with the verdict we *want*. About half are pairs
# the verifier must reject: close is not equal.

# %%
CASES = [  # (prediction, gold, expected)
    # values and exactness
    ("0.5", "\\frac{1}{2}", True), ("\\dfrac{14}{3}", "\\frac{14}{3}", True), ("\\sqrt{117}", "3\\sqrt{13}", True),
    ("9i + 6", "6+9i", True), ("6-9i", "6+9i", False), ("73", "72", False), ("1000001", "1000000", False),
    ("2^{31}-1", "2^{31}", False), ("10^{-20}", "0", False), ("1267650600228229401496703205377", "2^{100}", False),
    ("0.333333", "\\frac{1}{3}", True), ("0.333", "\\frac{1}{3}", False), ("3.14", "\\pi", False),
    # numbers in other clothes
    ("3\\frac{1}{4}", "\\frac{13}{4}", True), ("3\\frac{1}{4}", "\\frac{3}{4}", False), ("\\cfrac{1}{2}", "0.5", True),
    ("3.1e8", "3.1 \\times 10^{8}", True), ("4.7E-3", "0.047", False), ("1,\\!000", "1000", True), ("3\u221a5", "\\sqrt{45}", True),
    # units, words, bases, choices
    ("90", "90^\\circ", True), ("1234", "\\$1,234", True), ("72 clips", "72", True), ("16", "16\\mbox{ feet}^2", True),
    ("9^{\\text{th}} \\text{ floor}", "9", True), ("17 \\text{ feet}", "16", False), ("61", "61_8", True), ("49", "61_8", False),
    ("(C)", "\\text{(C)}", True), ("\\text{(B) Circle}", "\\text{(B)}", True), ("\\text{(B) Circle}", "(C)", False),
    ("Evelyn", "\\text{Evelyn}", True), ("50\\%", "0.5", True), ("1000\\%", "10", False),
    # lists, sets, intervals, relations
    ("5", "x=5", True), ("-2, 1", "1,-2", True), ("x=3 \\text{ or } x=-4", "\\{3, -4\\}", True), ("1, 2", "1, 2, 3", False),
    ("2 \\pm \\sqrt{3}", "2+\\sqrt3, 2-\\sqrt3", True), ("\\varnothing", "\\emptyset", True), ("\\emptyset", "\\{0\\}", False),
    ("(2,\\infty)\\cup(-\\infty,1)", "(-\\infty, 1) \\cup (2, \\infty)", True), ("(0,10) \\setminus \\{4\\}", "(0,4)\\cup(4,10)", True),
    ("(0,4)\\cup(4,10)", "(0,10)", False), ("[2, 5]", "[2, 5)", False), ("x \\in [2,5]", "[2,5]", True),
    ("7 \\geq y", "y \\le 7", True), ("-y > -3", "y < 3", True), ("y \\ge 2", "y > 2", False),
    ("y = 2x + 1", "2y - 4x = 2", True), ("x + 2y = 5", "2x + y = 5", False), ("(a,b)=(5,1)", "(5,1)", True), ("(1, 2)", "(2, 1)", False),
    # expressions and matrices
    ("x^2 + 2x + 1", "(x+1)^2", True), ("x^2 + 2x", "(x+1)^2", False), ("\\csc^2 t", "1+\\cot^2 t", True),
    ("\\tan x", "\\sin x/\\cos x", True), ("\\sqrt{x^2}", "x", False),
    ("\\left[\\begin{array}{cc} 1 & 2 \\\\ 3 & 4 \\end{array}\\right]", "\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}", True),
    ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix} + \\begin{pmatrix} 3 \\\\ 4 \\end{pmatrix}", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", False),
    # refused or malformed
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
# * `1000001` vs `1000000`, `2^{31}-1` vs `2^{31}`, `10^{-20}` vs `0`: close is not equal (4.3).
# * `0.333` vs `\frac13`, `3.14` vs `\pi`: a decimal with few digits is a different number, not an
#   approximation we accept; MATH's graders want the exact value.
# * `49` vs `61_8`: the question asked for base 8; 49 is the right value in the wrong base.
# * `1000\%` vs `10`: a percentage is divided by 100 only to match a gold that is a fraction.
# * `[2, 5]` vs `[2, 5)`: an interval's brackets are part of the answer; `(1, 2)` vs `(2, 1)`: a
#   tuple is ordered; only lists and sets are compared without order.
# * `\sqrt{x^2}` vs `x`: they differ for negative `x`, which is why the random points have both
#   signs.
# * the sum of two matrices against one of them: it is evaluated, and it is not that matrix.
# * `9^{9^{9^9}}`: refused before any arithmetic, so its comparison fails fast.
#
# **Safety.** Model output never reaches `eval` or `sympify`; it is tokenized by a whitelist
# grammar. Pathological inputs must return quickly and never raise, and the time bound must hold in
# worker threads too, where rewards will be computed. We run each input through every public
# function on four threads at once:

# %%
from concurrent.futures import ThreadPoolExecutor

nasty = ["9^{9^{9^9}}", "{" * 5000, "\\frac{" * 2000, "1" * 100_000, "x" * 100_000, "(" * 10_000 + ")" * 10_000,
         "\\boxed{" + "\\sqrt{" * 3000 + "2" + "}" * 3000 + "}", "10^{10^{10}}!", "\\sqrt[1000000]{2}^{99999999}",
         "e^{e^{e^{e^{e}}}}", "\\exp(\\exp(\\exp(\\exp(10))))", "(x^{999})^{999}", "\\sin(10^{1999})", "x^{x^{x^{x}}}",
         "a" * 5000 + "1", "\\boxed{1} " * 600, ", ".join(str(k) for k in range(140))]


def seconds_for(s: str) -> float:
    t0 = time.perf_counter()
    grade(s, "2", dataset="math"), answers_match(s, s), answers_match(s, "e^{e^{e^{e^{e}}}}"), extract(s), parse_math(s)
    return time.perf_counter() - t0


with ThreadPoolExecutor(max_workers=4) as pool:
    times = list(pool.map(seconds_for, nasty))
print(f"worst of {len(nasty)} pathological inputs on worker threads: {1000 * max(times):.0f} ms")
assert max(times) < 2  # generous: the point is that nothing runs away

# %% [markdown]
# ### A second opinion: Hugging Face `math-verify`
#
# `math-verify` is a widely used rule-based verifier (it is what the Open R1 project grades with).
# We run both on our cases. (`math-verify` is a test-time dependency only: `pip install
# math-verify`.)

# %%
import logging

try:
    from math_verify import parse as mv_parse
    from math_verify import verify as mv_verify

    logging.getLogger("math_verify").setLevel(logging.ERROR)  # it logs each of its own timeouts (the comparison then returns False)
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
    agree = sum(r["math_verify"] == r["expected"] for r in rows) / len(rows)
    print(f"math-verify agrees with the expected verdict on {agree:.0%} of our {len(rows)} cases; where it does not:")
    show_table([{k: r[k] for k in ("prediction", "gold", "expected", "verifier", "math_verify")}
                for r in rows if r["math_verify"] != r["expected"]])

# %% [markdown]
# Agreement on cases we wrote while building the verifier proves little. A fairer test is a set of
# cases labelled by *reading* them, not by running either verifier:
# `benchmarks/verify_hard_cases.json` holds 241 real responses from the runs of this chapter and the
# next (every MATH response, and samples of the GSM8K ones: boxed, unboxed, cut off, degenerate) and
# a few hundred hand-written responses and answers of every kind in this section, including the
# near misses that must be rejected. Each is labelled "is the final answer of this response the gold
# answer?". Both verifiers get the full response and do their own extraction.

# %%
import json
from pathlib import Path

root = next(p for p in (Path.cwd(), *Path.cwd().parents) if (p / "benchmarks" / "verify_hard_cases.json").exists())
hard = json.loads((root / "benchmarks" / "verify_hard_cases.json").read_text())["cases"]
ours = [score_response(c["response"], c["gold"], truncated=c["truncated"]).correct for c in hard]
labels = [c["label"] for c in hard]
verdicts = {"ours": ours}
if mv_parse is not None:
    def mv_on_response(c):
        try:
            return bool(mv_verify(mv_parse(f"${c['gold']}$"), mv_parse(c["response"])))
        except Exception:
            return False

    verdicts["math-verify"] = [mv_on_response(c) for c in hard]
print(f"{len(hard)} labelled cases ({sum(labels)} correct answers)")
for name, v in verdicts.items():
    fp = sum(x and not y for x, y in zip(v, labels))
    fn = sum(y and not x for x, y in zip(v, labels))
    print(f"{name:12} agreement {sum(x == y for x, y in zip(v, labels)) / len(hard):.1%}   "
          f"false positives {fp:2d}   false negatives {fn:2d}")
assert not any(x and not y for x, y in zip(ours, labels))  # no reward for a wrong answer

# %% [markdown]
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
# * `plain` — the bare question as raw text, no chat template (never used for evaluation: the instruct
#   model was tuned to reply inside its chat format; section 7 shows what it does without one);
# * `chat` — the question as the user turn of the chat template: our **baseline**, "no reasoning
#   prompt";
# * `step_by_step` — the chat template plus an instruction to reason step by step and put the final
#   answer in `\boxed{}`.
#
# Chapter 3 uses three more: `think` (the chat template plus "Let's think step by step."),
# `few_shot` and `plain_few_shot` (eight worked examples before the question, as chat turns or as
# raw text).
#
# A chat template's turns are built as a list of messages (`chat_messages`) and rendered by one
# function, `render_chat`, the only place a conversation goes through the tokenizer's chat template;
# chapter 4 extends such a conversation with the model's own answers and feedback on them.

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
    return render_chat(tokenizer, chat_messages(question, template))


def chat_messages(question: str, template: str = "chat") -> list[dict[str, str]]:
    """The chat turns of a chat template (any of TEMPLATES but plain and plain_few_shot), ending with the
    user's question: the start of a conversation that later turns (chapter 4's refinement) extend."""
    if template not in TEMPLATES or template in ("plain", "plain_few_shot"):
        raise ValueError(f"{template!r} is not a chat template; choose from {TEMPLATES[1:5]}")
    messages = []
    if template == "few_shot":
        for q, a in GSM8K_COT_EXEMPLARS:
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    suffix = {"step_by_step": f"\n{STEP_BY_STEP}", "think": f"\n{THINK}"}.get(template, "")
    messages.append({"role": "user", "content": question + suffix})
    return messages


def render_chat(tokenizer, messages: list[dict[str, str]]) -> str:
    """A conversation (dicts with "role" and "content", ending with a user turn) through the tokenizer's
    chat template, ready for the assistant's next turn: the one way the book builds a chat prompt."""
    if not messages or messages[-1].get("role") != "user":
        raise ValueError("a chat prompt must end with a user turn")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def stop_strings(template: str) -> list[str] | None:
    """Extra stop strings a template needs (raw-text few-shot prompts would go on to invent the next Q:)."""
    return _STOP.get(template)


# %% [markdown]
# ## 7. The harness
#
# `evaluate` runs one prompt template and one sampling setting over a list of problems with the
# batched engine. Every problem is appended to a JSON-lines file the moment its samples are
# finished (the engine's `on_prompt_done`, chapter 1) — one record per problem with the prompt, the
# response(s), the extracted answer(s), correctness, token counts and time — and flushed to disk.
# Re-running with the same settings reads the file and only generates what is missing; an
# interrupted run (a closed laptop, a killed kernel) loses only the problems still being decoded,
# and a half-written last line is dropped and redone. The run's settings are stored next to the records,
# and a rerun with different settings under the same name is refused rather than mixed. Records
# keep the raw responses, and grading is re-done from them whenever a run is loaded, with the same
# `score_response` that will compute rewards, so an improved verifier applies to old runs without
# generating anything again; when that changes a verdict, the file is rewritten with the new
# grades, so the records on disk always say what the chapter reports.
#
# A run is identified by its settings (`EvalSettings`): the template, the sampling parameters, the
# token limit, the seed, and the **weights**. The model's name is not enough: chapters 5 and 6 train
# the model, and a trained checkpoint must never be served the records of the model it started
# from. `evaluate` therefore adds the weights' SHA-256 (`weights_fingerprint`, chapter 1: the
# checkpoint file's hash for a freshly loaded model, a hash of the tensors once they change) to the
# settings, and so to the run's file name. Sampling is reproducible per problem: problem `p` draws
# from the seed `derive_seed(seed, p.id)`, so a run that was interrupted and resumed, or run with
# another batch size, produces exactly the samples of one uninterrupted run.
#
# Every record keeps the prompt it answered, and a record is reused only for that exact prompt, so
# a changed template is never served old responses. Two options serve later chapters: `prompts=`
# lets a strategy build its own prompts (chapter 4 sends the model's previous answer back to it as a
# chat turn), recorded under a `stage` name of their own, and `token_logprobs=True` also keeps every
# generated token and its log-probability, from which chapter 4 computes the model's confidence.
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
from collections.abc import Sequence
from pathlib import Path

from rlscratch.data import Problem
from rlscratch.generate import derive_seed, generate
from rlscratch.model import weights_fingerprint
from rlscratch.prompts import format_prompt, stop_strings
from rlscratch.results import results_dir
from rlscratch.verify import score_response


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """What a run is: its records are reused only for exactly these settings.

    `model` is a readable name; `weights` is what identifies the model: the SHA-256 of its weights
    (`rlscratch.model.weights_fingerprint`), filled in by `evaluate` when left empty, so a trained
    checkpoint never reuses the records of the model it started from. `stage` names records that must
    stay apart from the template's own runs: prompts built by a strategy (chapter 4's refinement rounds),
    or records that keep per-token log-probs."""
    model: str
    template: str = "chat"
    max_new_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    n: int = 1
    seed: int = 0
    weights: str | None = None
    stage: str = ""

    def key(self) -> dict:
        """The fields that identify the run; `stage` only when set, so runs recorded before it existed keep their names."""
        fields = dataclasses.asdict(self)
        if not fields["stage"]:
            del fields["stage"]
        return fields

    def run_name(self, dataset: str) -> str:
        digest = hashlib.sha256(json.dumps(self.key(), sort_keys=True).encode()).hexdigest()[:10]
        stage = f"-{self.stage}" if self.stage else ""
        return f"{dataset}-{self.template}{stage}-t{self.temperature}-n{self.n}-{digest}"


def grade_record(record: dict) -> dict:
    """(Re)compute a record's extracted answers, rules and correctness from its responses, with the
    book's one scoring rule (`rlscratch.verify.score_response`): a response cut off by the token limit
    only counts if it stated an answer; a fallback guess from it is recorded as no answer ("truncated")."""
    scores = [score_response(text, record["gold"], truncated=finish == "length")
              for text, finish in zip(record["responses"], record["finish"])]
    record.update(extracted=[s.answer for s in scores], rules=[s.rule for s in scores], correct=[s.correct for s in scores])
    return record


def _load_records(path: Path, *, rewrite: bool = True) -> dict[str, dict]:
    """The run's records, graded by the current verifier. If that changes any verdict (or drops a cut or
    repeated line), the file is rewritten, so the records on disk always agree with what the harness
    reports. Only the harness, which owns the file while it runs, rewrites; readers pass `rewrite=False`
    (a line being appended right now looks cut short, and a rewrite would lose it)."""
    records, stale = {}, False
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by an interruption: redo that problem
                stale = True
                continue
            before = (record.get("extracted"), record.get("rules"), record.get("correct"))
            stale |= record["id"] in records  # a problem redone for a new prompt: keep only its last record
            records[record["id"]] = grade_record(record)
            stale |= before != (record["extracted"], record["rules"], record["correct"])
    if rewrite and stale and records:
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records.values()), encoding="utf-8")
        os.replace(tmp, path)
    return records


def load_records(settings: EvalSettings, dataset: str, run_dir: Path | None = None) -> dict[str, dict]:
    """The stored records (by problem id) of the harness run with `settings` on `dataset`, graded by the
    current verifier; {} before it has run. Needs no model, so `settings.weights` must name the weights.
    Only reads: safe while the run is still generating (a line being written is skipped)."""
    if settings.weights is None:
        raise ValueError("settings.weights must name the weights (e.g. rlscratch.model.OFFLINE_SHA256)")
    path = Path(run_dir or results_dir() / "runs") / f"{settings.run_name(dataset)}.jsonl"
    return _load_records(path, rewrite=False)


# %% [markdown]
# Two checks before the harness itself: a record is graded from its raw responses (the second
# response below was cut off by the token limit, so its last number does not count), and a run file
# whose stored verdicts disagree with the current verifier is corrected when it is read.

# %%
record = grade_record({"id": "demo", "gold": "72", "finish": ["stop", "length"],
                       "responses": ["48 + 24 = 72, so \\boxed{72}", "First 48 / 2 = 24, then 48 + 24 = 72 and"]})
print(record["extracted"], record["rules"], record["correct"])
assert record["correct"] == [True, False] and record["rules"] == ["boxed", "truncated"]
demo_file = Path(tempfile.mkdtemp()) / "demo.jsonl"
demo_file.write_text(json.dumps(dict(record, correct=[False, True])) + "\n")  # verdicts of an older verifier
assert _load_records(demo_file)["demo"]["correct"] == [True, False]
assert json.loads(demo_file.read_text())["correct"] == [True, False]  # and the file now says so too

# %% [markdown]
# The harness: format, generate a batch, grade, append, repeat. (Its resume check needs the model,
# so it comes in a moment.)

# %%
#| export: evaluate
def _reusable(record: dict | None, prompt: str, token_logprobs: bool) -> bool:
    """Whether a stored record answers this prompt (with per-token log-probs, if they are wanted)."""
    return record is not None and record.get("prompt") == prompt and (not token_logprobs or "logprobs" in record)


def evaluate(model, tokenizer, problems: list[Problem], settings: EvalSettings, *, batch_size: int = 16,
             run_dir: Path | None = None, progress: bool = True, prompts: Sequence[str] | None = None,
             token_logprobs: bool = False) -> list[dict]:
    """Evaluate `problems`, resuming from (and appending to) the run's JSONL file. Returns records in order.

    Sampling is reproducible per problem: problem p draws from seed derive_seed(settings.seed, p.id), so an
    interrupted and resumed run, or one with another batch size, gives the same samples as a single run.
    A stored record is reused only for the prompt it answered. `prompts` (one per problem) replaces the
    template's prompts, for strategies that build their own; such a run needs a `settings.stage`.
    `token_logprobs` also records each sample's token ids and per-token log-probs (4 decimals)."""
    if not problems:
        raise ValueError("no problems to evaluate")
    datasets = {p.dataset for p in problems}
    if len(datasets) != 1:
        raise ValueError(f"one dataset per run, got {sorted(datasets)}")
    if prompts is None:
        prompts = [format_prompt(tokenizer, p.question, settings.template) for p in problems]
    elif len(prompts) != len(problems):
        raise ValueError(f"{len(prompts)} prompts for {len(problems)} problems")
    elif not settings.stage:
        raise ValueError("prompts of your own need a settings.stage, so they never mix with the template's records")
    prompt_of = {p.id: prompt for p, prompt in zip(problems, prompts)}
    if settings.weights is None:
        settings = dataclasses.replace(settings, weights=weights_fingerprint(model))
    run_dir = Path(run_dir or results_dir() / "runs")
    run_dir.mkdir(parents=True, exist_ok=True)
    name = settings.run_name(datasets.pop())
    path, meta = run_dir / f"{name}.jsonl", run_dir / f"{name}.settings.json"
    if meta.exists() and json.loads(meta.read_text()) != settings.key():
        raise ValueError(f"{meta} holds other settings; choose another run_dir")
    meta.write_text(json.dumps(settings.key(), indent=1))
    done = _load_records(path)
    todo = [p for p in problems if not _reusable(done.get(p.id), prompt_of[p.id], token_logprobs)]
    bar = None
    if progress and todo:
        from tqdm import tqdm  # a text bar: it stays readable in saved notebook outputs

        bar = tqdm(total=len(problems), initial=len(problems) - len(todo), desc=name, unit="problem")
    if todo and path.exists() and not path.read_text(encoding="utf-8").endswith("\n"):
        with open(path, "a", encoding="utf-8") as f:  # end a half-written line before appending
            f.write("\n")
    started = last = time.perf_counter()
    tokens_done = 0

    def save(k: int, samples: list) -> None:  # called by generate as soon as problem todo[k] is finished
        nonlocal last, tokens_done
        problem, now = todo[k], time.perf_counter()
        record = {
            "id": problem.id, "dataset": problem.dataset, "level": problem.level, "subject": problem.subject,
            "gold": problem.answer, "prompt": prompt_of[problem.id], "responses": [c.text for c in samples],
            "tokens": [len(c.token_ids) for c in samples], "finish": [c.finish_reason for c in samples],
            "mean_logprob": [sum(c.logprobs) / max(1, len(c.logprobs)) for c in samples],
            "seconds": now - last,  # wall-clock since the previous record: a call's records add up to its time
            # (a part of them sums to an estimate only: the first records also carry the ramp-up)
        }
        last = now
        if token_logprobs:
            record["token_ids"] = [c.token_ids for c in samples]
            record["logprobs"] = [[round(x, 4) for x in c.logprobs] for c in samples]
        record = done[problem.id] = grade_record(record)
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        tokens_done += sum(len(c.token_ids) for c in samples)
        if bar is not None:
            correct = sum(r["correct"][0] for r in done.values())
            bar.set_postfix(acc=f"{correct / len(done):.2f}", tok_s=f"{tokens_done / (now - started):.0f}")
            bar.update(1)

    if todo:
        seeds = None if settings.temperature == 0 else [derive_seed(settings.seed, p.id) for p in todo]
        generate(model, tokenizer, [prompt_of[p.id] for p in todo], max_new_tokens=settings.max_new_tokens,
                 temperature=settings.temperature, top_p=settings.top_p, n=settings.n,
                 stop=stop_strings(settings.template), seed=seeds, batch_size=batch_size, on_prompt_done=save)
    if bar is not None:
        bar.close()
    return [done[p.id] for p in problems]


# %% [markdown]
# Then the statistics. `summarize` turns records into the numbers we report, with a Wilson interval.
#
# **Comparing two runs on the same problems.** Chapter 3 compares prompts and sampling settings on the
# same problems, and there the right test is a **paired** one. Problems both runs solve, or both fail,
# say nothing about which run is better; only the *discordant* problems do: the ones the first run
# solves and the second does not (wins), and the reverse (losses). If the two runs were equally good,
# each discordant problem would be a fair coin between win and loss. The **exact McNemar test** is
# that sign test: the two-sided p-value is the probability, under fair coins, of a split at least as
# lopsided as the one observed, computed exactly from binomial coefficients,
#
# $$p = \min\Big(1,\ 2 \sum_{k=0}^{\min(w,\, l)} \binom{n}{k} \Big/ 2^n\Big), \qquad n = w + l,$$
#
# with $w$ wins and $l$ losses.
#
# A small p says the split would be surprising if the runs were equally good; a large p says the
# data cannot tell them apart, which is not the same as saying they are equal. With 13 discordant
# problems, 9 wins against 4 losses gives p ≈ 0.27: not evidence of a difference.

# %%
#| export: evaluate
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


def mcnemar_exact(wins: int, losses: int) -> float:
    """Two-sided exact McNemar test: a sign test on the discordant pairs of a paired comparison.

    `wins`: problems only the first run solved; `losses`: problems only the second solved. Returns the
    probability, if each discordant problem were a fair coin, of a split at least as uneven (1.0 when
    there is nothing to compare). Exact: binomial coefficients, no normal approximation."""
    if wins < 0 or losses < 0:
        raise ValueError(f"counts must be >= 0, got {wins} and {losses}")
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(wins, losses) + 1))
    return min(1.0, 2 * tail / 2 ** n)


def compare_paired(first: list[bool], second: list[bool]) -> dict:
    """Paired comparison of two runs on the same problems (True = solved): "wins" (only `first` solved),
    "losses" (only `second`), "both", "neither", and the exact McNemar p-value of wins against losses."""
    if len(first) != len(second):
        raise ValueError(f"paired runs need the same problems: {len(first)} vs {len(second)} results")
    pairs = [(bool(a), bool(b)) for a, b in zip(first, second)]
    wins, losses = pairs.count((True, False)), pairs.count((False, True))
    return {"n": len(pairs), "wins": wins, "losses": losses, "both": pairs.count((True, True)),
            "neither": pairs.count((False, False)), "p_value": mcnemar_exact(wins, losses)}


# %% [markdown]
# Checks with numbers worked by hand. Wilson: with 0 successes in 10 the interval is [0, 0.28], not
# the [0, 0] of the naive formula. McNemar: 5 wins and no loss gives 2 · (1/2)^5 = 0.0625 (five fair
# coins all landing one way, on either side); 9 against 4 gives 2 · (1 + 13 + 78 + 286 + 715) / 2^13
# = 2186 / 8192 ≈ 0.267; a tie is p = 1.

# %%
low, high = wilson_interval(0, 10)
print(f"Wilson 95% for 0/10: [{low:.3f}, {high:.3f}]; for 53/200: {[round(x, 3) for x in wilson_interval(53, 200)]}")
assert low < 1e-12 and abs(high - 0.2775) < 1e-3
for wins, losses in [(5, 0), (9, 4), (10, 3), (11, 2), (3, 3), (0, 0)]:
    print(f"{wins:2d} wins, {losses} losses: exact McNemar p = {mcnemar_exact(wins, losses):.4f}")
assert mcnemar_exact(5, 0) == 0.0625 and mcnemar_exact(0, 5) == 0.0625
assert mcnemar_exact(9, 4) == 2186 / 8192 and mcnemar_exact(3, 3) == 1.0 and mcnemar_exact(0, 0) == 1.0
paired = compare_paired([True, True, False, False, True], [True, False, True, False, False])
print(paired)
assert (paired["wins"], paired["losses"], paired["both"], paired["neither"]) == (2, 1, 1, 1)

# %% [markdown]
# Back to the labelled responses of section 4: each case is a pair (our verdict right or wrong,
# `math-verify`'s right or wrong), so the two verifiers can be compared with the same test. Keep in
# mind what the test can and cannot say here: the hard set was written while our verifier was built,
# so it measures how well each handles *these* forms, not forms nobody thought of.

# %%
if "math-verify" in verdicts:
    right = {name: [v == label for v, label in zip(verdicts[name], labels)] for name in verdicts}
    vs = compare_paired(right["ours"], right["math-verify"])
    print(f"{vs['n']} labelled cases: ours right and math-verify wrong on {vs['wins']}, the reverse on "
          f"{vs['losses']} (both right {vs['both']}, both wrong {vs['neither']}); exact McNemar p = {vs['p_value']:.2g}")


# %% [markdown]
# A resume check on two problems before the real run: evaluate once, cut the file in the middle of
# its last line as an interruption would, and evaluate again. Only the damaged record is redone.

# %%
from pathlib import Path

from rlscratch.generate import generate, pack_for_cpu
from rlscratch.model import load_model, weights_fingerprint

model, tokenizer = load_model(MODEL, device=DEVICE)
model = pack_for_cpu(model)  # chapter 1: identical outputs, faster decoding on a CPU (no-op elsewhere)
print("weights:", weights_fingerprint(model))  # part of every run's key
scratch = Path(tempfile.mkdtemp())
check = EvalSettings(model=MODEL, max_new_tokens=8)
first = evaluate(model, tokenizer, gsm8k[:2], check, run_dir=scratch, progress=False)
log = next(scratch.glob("*.jsonl"))
log.write_text(log.read_text()[:-40])  # the last record loses its end
second = evaluate(model, tokenizer, gsm8k[:2], check, run_dir=scratch, progress=False)
assert [r["responses"] for r in first] == [r["responses"] for r in second]
assert len(log.read_text().splitlines()) == 2  # the good record, and the damaged one redone
print("resume check passed:", [r["extracted"] for r in second])

# %% [markdown]
# Section 6 said we never evaluate the `plain` template: the instruct model was tuned on conversations
# in its chat format, and raw text is not one. What does it do with the bare question? The first eight
# GSM8K test problems as `plain` prompts, greedy, through the harness (so the run is recorded and graded
# like every other).

# %%
plain_run = evaluate(model, tokenizer, gsm8k[:8], EvalSettings(model=MODEL, template="plain", max_new_tokens=MAX_NEW_TOKENS),
                     batch_size=8, progress=False)
for r in plain_run:
    print(f"{r['id']:14} {r['tokens'][0]:4d} tokens, finish {r['finish'][0]:6}, answer {str(r['extracted'][0])[:12]:>12} "
          f"({'right' if r['correct'][0] else 'wrong'}, rule {r['rules'][0]})")
print(f"\nthe first response, from its start:\n{plain_run[0]['responses'][0][:600]}")

# %% [markdown]
# Without its chat format the model still answers: seven of the eight responses end on their own,
# each with a boxed number, and one runs into the 512-token limit. But it answers in the manner of its
# code training: six of the eight responses contain a Python program (the first, above, plans one
# before any arithmetic), and only one of the eight is right. Eight problems are far too few to compare it with the chat template; the point is only
# that raw text gives a different kind of reply, which is why the book always goes through the chat
# template.
#
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

def with_intervals(groups: dict) -> tuple[list[float], list[list[float]]]:
    """Accuracies and Wilson 95% error bars (below, above) of {name: {"n", "accuracy"}} groups."""
    acc = [g["accuracy"] for g in groups.values()]
    bounds = [wilson_interval(round(g["accuracy"] * g["n"]), g["n"]) for g in groups.values()]
    return acc, [[a - low for a, (low, _) in zip(acc, bounds)], [high - a for a, (_, high) in zip(acc, bounds)]]


fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
for ax, (name, s, label) in zip(axes[:2], [("GSM8K", baseline["gsm8k"], "solution steps"),
                                            ("MATH-500", baseline["math500"], "level")]):
    levels = s["by_level"]
    acc, err = with_intervals(levels)
    ax.bar([str(k) for k in levels], acc, yerr=err, capsize=3, color="C0")
    for i, k in enumerate(levels):
        ax.text(i, acc[i] + err[1][i] + 0.02, f"n={levels[k]['n']}", ha="center", fontsize=8)
    ax.set(title=f"{name}: accuracy by difficulty", xlabel=label, ylabel="accuracy (95% Wilson interval)", ylim=(0, 1.1))
subjects = baseline["math500"]["by_subject"]
acc, err = with_intervals(subjects)
axes[2].barh(list(subjects), acc, xerr=err, capsize=3, color="C1")
for i, k in enumerate(subjects):
    axes[2].text(acc[i] + err[1][i] + 0.02, i, f"n={subjects[k]['n']}", va="center", fontsize=8)
axes[2].set(title="MATH-500: accuracy by subject", xlabel="accuracy (95% Wilson interval)", ylabel="subject",
            xlim=(0, 1.1))
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
# Printed, a MATH response is hard to read: it is LaTeX. Rendered, it reads like the solution it
# tries to be (the first MATH response, whole; its gold answer is printed above it):

# %%
from IPython.display import Markdown, display


def as_markdown(text: str) -> str:
    """The model's LaTeX delimiters \\( \\) and \\[ \\] as the $ and $$ that notebook Markdown renders."""
    for old, new in (("\\[", "$$"), ("\\]", "$$"), ("\\(", "$"), ("\\)", "$")):
        text = text.replace(old, new)
    return text


shown = math_run[0]
print(f"gold {shown['gold']!r}; extracted {shown['extracted'][0]!r} by rule {shown['rules'][0]}; correct: {shown['correct'][0]}")
display(Markdown(as_markdown(shown["responses"][0])))

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
#
# The cell also compares the two gradings as paired runs. There are no labels here, so its counts are
# not wins and losses of right against wrong: the McNemar test only asks whether the two graders
# credit different numbers of responses by more than chance would explain.

# %%
if mv_parse is not None:
    disagreements, ours_all, theirs_all = [], [], []
    for r in gsm8k_run + math_run:
        try:
            theirs = bool(mv_verify(mv_parse(f"${r['gold']}$"), mv_parse(r["responses"][0])))
        except Exception:
            theirs = False
        ours_all.append(r["correct"][0])
        theirs_all.append(theirs)
        if theirs != r["correct"][0]:
            disagreements.append({"id": r["id"], "gold": r["gold"], "ours": r["extracted"][0], "rule": r["rules"][0],
                                  "finish": r["finish"][0], "ours_correct": r["correct"][0], "math_verify": theirs})
    credit = compare_paired(ours_all, theirs_all)
    print(f"agreement with math-verify on {credit['n']} real responses: {1 - len(disagreements) / credit['n']:.1%}; "
          f"accuracy by our grading {sum(ours_all) / credit['n']:.1%}, by math-verify's {sum(theirs_all) / credit['n']:.1%}")
    print(f"we credit {credit['wins']} responses that math-verify does not, it credits {credit['losses']} that we do "
          f"not: exact McNemar p = {credit['p_value']:.2g}")
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
    print(json.dumps({"base": table["base"]}, indent=1))  # this chapter's row; later chapters add theirs

# %% [markdown]
# ## Summary
#
# * `rlscratch.verify`: `extract`, `answers_match`, `score_response` (the one scoring rule for
#   evaluation and reward) and `grade` — extraction with named rules, normalization, a whitelist
#   parser, exact comparison (rationals, interval arithmetic, random points) of values, lists, sets,
#   intervals, relations and matrices, bounded in time on any thread;
# * `rlscratch.data`: GSM8K and MATH-500 as `Problem` records, from a local folder or the Hub;
# * `rlscratch.prompts`: the named templates;
# * `rlscratch.evaluate`: a resumable harness, `summarize` (Wilson intervals), and `compare_paired` /
#   `mcnemar_exact` for two runs on the same problems.
#
# Chapter 3 spends more compute at inference time — reasoning prompts, sampling, voting — and
# measures each gain against this baseline.
#
# ## Exercises
#
# Each solution is in a hidden cell below its exercise (click to expand it). Try first.
#
# **1. A reward for an unfinished thought.** Write a response that was cut off by the token limit in
# the middle of its reasoning, whose last number happens to equal the gold answer. Show that
# `score_response` credits it when told nothing, and not when told the response was truncated. Then
# find the extraction rule responsible.

# %% jupyter={"source_hidden": true} tags=["hide-cell"]
cut_off = ("The farm has 12 cows and 3 times as many chickens: 12 * 3 = 36 chickens. The cows have 12 * 4 = 48 legs "
           "and the chickens 36 * 2 = 72 legs, so all together 48 + 72")
# the question asked for the chickens' legs (72); the response was heading for all the legs (120), a wrong answer
for truncated in (False, True):
    print(f"truncated={truncated}: {score_response(cut_off, '72', truncated=truncated)}")
assert score_response(cut_off, "72").correct and not score_response(cut_off, "72", truncated=True).correct
print("rule:", extract(cut_off).rule)  # last_number: a fallback guess, which the truncated response may not use

# %% [markdown]
# **2. How lopsided must it be?** Chapter 3 compares two prompts on the same problems. Suppose 13
# problems are discordant. How many of the 13 must one prompt win for the exact McNemar p-value to
# fall below 0.05? And what is the smallest number of discordant problems for which even a clean
# sweep (all wins, no loss) reaches p < 0.05?

# %% jupyter={"source_hidden": true} tags=["hide-cell"]
needed = next(w for w in range(7, 14) if mcnemar_exact(w, 13 - w) < 0.05)  # the winning side: 7 of 13 or more
print(f"13 discordant problems: at least {needed} wins (p = {mcnemar_exact(needed, 13 - needed):.4f}); "
      f"{needed - 1} wins gives p = {mcnemar_exact(needed - 1, 14 - needed):.4f}")
sweep = next(n for n in range(1, 20) if mcnemar_exact(n, 0) < 0.05)
print(f"a clean sweep needs {sweep} discordant problems (p = {mcnemar_exact(sweep, 0):.4f}; "
      f"{sweep - 1} gives {mcnemar_exact(sweep - 1, 0):.4f})")
assert (needed, sweep) == (11, 6)

# %% [markdown]
# **3. How many problems?** The baseline's GSM8K accuracy was measured on a few hundred problems.
# How many problems would make the 95% Wilson interval ±3 points wide (half-width at most 0.03) at an
# accuracy of 27%? How does that number change at 50%?

# %% jupyter={"source_hidden": true} tags=["hide-cell"]
def problems_for(accuracy: float, half_width: float) -> int:
    n = 10
    while True:
        low, high = wilson_interval(round(accuracy * n), n)
        if (high - low) / 2 <= half_width:
            return n
        n += 10


for accuracy in (0.27, 0.5):
    print(f"accuracy {accuracy:.0%}: about {problems_for(accuracy, 0.03)} problems for +-3 points")
# the variance p(1 - p) is largest at 50%, so more problems are needed there

# %% [markdown]
# **4. Degrees.** A MATH answer key writes `\sin 30^\circ` where a model writes `\frac{1}{2}`. What does
# our verifier say, and why? Would treating every number under `\sin` as degrees be safe for a reward?

# %% jupyter={"source_hidden": true} tags=["hide-cell"]
print(normalize_answer("\\sin 30^\\circ"), "->", answers_match("\\frac{1}{2}", "\\sin 30^\\circ"))
assert not answers_match("\\frac{1}{2}", "\\sin 30^\\circ")
# Normalization drops the degree sign (so that 90^\circ matches 90), which leaves sin(30) in radians, about
# -0.988: not 1/2, so the pair is rejected, a false negative. Reading every angle as degrees would make
# sin(\pi/6), in radians, wrong instead; guessing the unit from the presence of \pi could accept a wrong
# answer. For a reward the safe fix keeps the degree sign inside trigonometric arguments and converts it
# there, and only there.
