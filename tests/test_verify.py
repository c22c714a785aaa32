import builtins
import gc
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

import rlscratch.verify as V
from rlscratch.verify import (Extraction, Score, answers_match, extract, extract_answer, grade, normalize_answer, parse_math,
                              score_response)


@pytest.mark.parametrize("text,expected", [
    ("so the answer is $\\boxed{72}$.", Extraction("72", "boxed")),
    ("\\boxed{1} then \\boxed{\\frac{\\sqrt{3}}{2}}", Extraction("\\frac{\\sqrt{3}}{2}", "boxed")),
    ("nested \\boxed{\\left\\{ 1, 2 \\right\\}} end", Extraction("\\left\\{ 1, 2 \\right\\}", "boxed")),
    ("\\fbox{7}", Extraction("7", "boxed")),
    ("it is \\boxed 5 indeed", Extraction("5", "boxed")),
    ("step 1\nstep 2\n#### 1,234\n", Extraction("1,234", "gsm8k")),
    ("Thus, the answer is 42. Done.", Extraction("42", "answer_is")),
    ("Final answer: $\\frac{3}{4}$", Extraction("\\frac{3}{4}", "answer_is")),
    ("48 + 24 = 72 clips", Extraction("72", "last_number")),
    ("so the value is \\(\\frac{3\\sqrt{3}}{4}\\).", Extraction("\\frac{3\\sqrt{3}}{4}", "last_latex")),
    ("\\[ 9 \\& 2 = \\sqrt{2} \\]", Extraction("\\sqrt{2}", "last_latex")),
    ("total: $29 \\times 2 = 58 \\text{ dollars}$", Extraction("58", "last_number")),  # text in the formula: not a bare value
    ("I have no idea", Extraction(None, "none")),
    ("unbalanced \\boxed{\\frac{1}{2", Extraction(None, "malformed_box")),  # not last_number "2": see chapter 02
])
def test_extraction_rules(text, expected):
    assert extract(text) == expected
    assert extract_answer(text) == expected.answer


@pytest.mark.parametrize("raw,normal", [
    ("\\$1,234.", "1234"), ("90^\\circ", "90"), ("\\dfrac{1}{2}", "\\frac{1}{2}"), ("\\text{Evelyn}", "Evelyn"),
    ("5\\text{ cm}", "5"), ("\u22127", "-7"), ("\\left( 1, 2 \\right)", "( 1, 2 )"), ("10\\%", "10%"),
    ("\\textbf{(B)}", "B"), ("1{,}000", "1000"), ("3\\!\\,000", "3000"), ("040_9", "40_9"), ("4210_{5}", "4210_5"),
])
def test_normalization(raw, normal):
    assert normalize_answer(raw) == normal


EQUIVALENT = [
    ("0.5", "\\frac{1}{2}"), ("\\tfrac{3}{4}", "0.75"), ("\\sqrt{117}", "3\\sqrt{13}"), ("9i+6", "6+9i"),
    ("2\\pi", "\\pi \\cdot 2"), ("x = 5", "5"), ("5", "x=5"), ("3, 1, 2", "1,2,3"), ("\\{3, 4\\}", "\\{4, 3\\}"),
    ("(1, -2)", "\\left(1,-2\\right)"), ("[0, \\infty)", "[0,\\infty)"), ("1 \\pm \\sqrt{2}", "1+\\sqrt2, 1-\\sqrt{2}"),
    ("y = 3x - 2", "2y = 6x - 4"), ("x^2-1", "(x-1)(x+1)"), ("25\\%", "0.25"), ("25\\%", "25"), ("1,000,000", "1000000"),
    ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix}1\\\\2\\end{pmatrix}"), ("\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt2}"),
    ("\\text{(A)}", "A"), ("Monday", "\\text{monday}"), ("4!", "24"), ("2^{10}", "1024"), ("-\\frac{\\pi}{6}", "-\\pi/6"),
    ("0.1 + 0.2", "0.3"), ("\\sqrt[3]{8}", "2"),
    ("\\mathbf{v} = \\begin{pmatrix} 1 \\\\ -2 \\end{pmatrix}", "\\begin{pmatrix}1\\\\-2\\end{pmatrix}"),
]
DIFFERENT = [
    ("0.33", "\\frac{1}{3}"), ("[1, 2]", "[1, 2)"), ("(1, 2)", "(2, 1)"), ("1, 2", "1, 2, 3"), ("x^2+1", "(x+1)^2"),
    ("6 - 9i", "6 + 9i"), ("71", "72"), ("\\pi", "3.14"), ("y = x", "y = 2x"), ("A", "B"), ("", "1"), ("5", ""),
    ("x = \\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix}2\\\\1\\end{pmatrix}"),
]


@pytest.mark.parametrize("pred,gold", EQUIVALENT)
def test_equivalent(pred, gold):
    assert answers_match(pred, gold)
    assert answers_match(gold, pred)


@pytest.mark.parametrize("pred,gold", DIFFERENT)
def test_different(pred, gold):
    assert not answers_match(pred, gold)


def test_grade_end_to_end():
    assert grade("... so she sold $\\boxed{72}$ clips.", "72")
    assert grade("The answer is \\boxed{\\dfrac{1}{2}}.", "0.5", dataset="math")
    assert not grade("The answer is 71.", "72")
    with pytest.raises(ValueError):
        grade("x", "1", dataset="aime")


def test_never_evaluates_model_text(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("eval/exec called")

    monkeypatch.setattr(builtins, "eval", forbidden)
    monkeypatch.setattr(builtins, "exec", forbidden)
    assert not answers_match("__import__('os').system('echo pwned')", "0")
    assert answers_match("\\frac{2}{4}", "0.5")
    assert parse_math("().__class__.__bases__[0]") is None


PATHOLOGICAL = [
    "9^{9^{9^9}}", "10^{10^{10}}", "(10^{10})!", "2^{2^{2^{2^{2^{2}}}}}", "{" * 10_000, "}" * 10_000,
    "\\frac{" * 5000, "\\sqrt{" * 5000 + "2", "(" * 50_000 + "1" + ")" * 50_000, "1" * 100_000, "a" * 100_000,
    "\\boxed{" * 20_000, "x^" * 30_000 + "2", "1/" * 30_000 + "1", "-" * 100_000 + "1", "\\begin{pmatrix}" + "1&" * 20_000,
    "\x00\x01\ufffd", "1e999999", "9" * 99 + "^" + "9" * 99,
]


@pytest.mark.parametrize("text", PATHOLOGICAL, ids=range(len(PATHOLOGICAL)))
def test_pathological_inputs_return_promptly(text):
    t0 = time.perf_counter()
    grade(text, "2", dataset="math")
    answers_match(text, "2")
    answers_match(text, text[:200])
    extract(text)
    parse_math(text)
    assert time.perf_counter() - t0 < 5.0  # a generous bound: a hang or an exponential blow-up fails


def test_non_string_inputs():
    assert not answers_match(None, "1") and not answers_match(1, "1") and extract(None).answer is None


def test_agreement_with_math_verify():
    """math-verify (a test-only dependency) gives the same verdicts on the cases above."""
    mv = pytest.importorskip("math_verify")

    def theirs(pred, gold):
        try:
            return bool(mv.verify(mv.parse(f"${gold}$"), mv.parse(f"${pred}$")))
        except Exception:
            return False

    disagreements = {(p, g) for p, g in EQUIVALENT + DIFFERENT if p and g and theirs(p, g) != answers_match(p, g)}
    # On these hand-built cases the two verifiers agree everywhere (math-verify 0.9). Disagreements
    # on real model outputs are examined in chapter 02 and benchmarks/bench_verify.py.
    assert disagreements == set()


# Issue 9: every kind of answer form has a rule, and each rule has cases that must match and cases
# that must stay False. (prediction, gold, expected); checked in this direction (the gold decides
# e.g. the base of a numeral).
KINDS = {
    "exact values (no tolerance)": [
        ("1000001", "1000000", False), ("123456789012345679", "123456789012345678", False), ("2^{31}-1", "2^{31}", False),
        ("2^{64}", "2^{65}", False), ("2^{53}+1", "2^{53}", False), ("10^{-20}", "0", False), ("e^{-100}", "0", False),
        ("10^{-30}\\sqrt{2}", "0", False), ("1267650600228229401496703205377", "2^{100}", False),
        ("3^{200}\\sqrt{2}+1", "3^{200}\\sqrt{2}", False), ("\\frac{1}{3}+10^{-15}", "\\frac{1}{3}", False),
        ("1267650600228229401496703205376", "2^{100}", True), ("\\sqrt{3+2\\sqrt{2}}", "1+\\sqrt{2}", True),
        ("\\frac{\\sqrt{6}+\\sqrt{2}}{4}", "\\cos\\frac{\\pi}{12}", True), ("\\sin(\\pi)", "0", True), ("\\log_2 8", "3", True),
        ("\\log_2 9", "3", False), ("\\binom{10}{3}", "120", True), ("\\frac{22}{7}", "\\pi", False),
    ],
    "decimal approximations": [
        ("0.333333", "\\frac{1}{3}", True), ("0.6666666", "\\frac{2}{3}", True), ("3.14159", "\\pi", True),
        ("1.41421356", "\\sqrt{2}", True), ("0.333", "\\frac{1}{3}", False), ("3.14", "\\pi", False),
        ("0.666665", "\\frac{2}{3}", False), ("17.99999", "18", False), ("0.1 + 0.2", "0.3", True), ("1.5", "0.15", False),
    ],
    "bases": [
        ("61", "61_8", True), ("3012", "3012_{4}", True), ("040_9", "40_9", True), ("1010_2", "10", True),
        ("49", "61_8", False), ("62", "61_8", False), ("61_9", "61_8", False), ("10_2", "10", False),
    ],
    "units and words": [
        ("16", "16\\mbox{ feet}^2", True), ("5", "5\\textnormal{ km}", True), ("12 \\text{ square feet}", "12", True),
        ("3\\,\\mathrm{kg}", "3", True), ("20^\\circ\\text{C}", "20", True), ("45^\\circ", "45", True),
        ("9^{\\text{th}} \\text{ floor}", "9", True), ("16\\pi \\text{ square units}", "16\\pi", True),
        ("\\text{(B) Circle}", "\\text{(B)}", True), ("45 apples", "45", True), ("\\text{18 dollars}", "18", True),
        ("17 \\text{ feet}", "16", False), ("10^\\circ", "100", False), ("8^{\\text{th}}", "9", False),
        ("\\text{(B) Circle}", "(C)", False), ("18 \\text{ or } 20", "18", False), ("18 \\text{or 20}", "18", False),
    ],
    "numbers in other clothes": [
        ("3\\frac{1}{4}", "\\frac{13}{4}", True), ("\\frac{419}{8}", "52 \\frac{3}{8}", True), ("52\\frac38", "52.375", True),
        ("3 1/4", "3.25", True), ("-2\\frac{1}{2}", "-2.5", True), ("\\cfrac{1}{2}", "0.5", True),
        ("3.1e8", "3.1 \\times 10^{8}", True), ("4.7E-3", "0.0047", True), ("1,\\!000", "1000", True),
        ("11111111100", "11,\\! 111,\\! 111,\\! 100", True), ("\u221a2", "\\sqrt{2}", True), ("3\u221a5", "\\sqrt{45}", True),
        ("2\u03c0", "2\\pi", True), ("\u22125", "-5", True), ("3\\frac{1}{4}", "\\frac{3}{4}", False),
        ("2\\frac{\\pi}{3}", "\\frac{2\\pi}{3}", True), ("3.1e8", "3.1 \\times 10^{9}", False), ("10,\\!001", "10000", False),
        ("\u2212\u03c0", "\\pi", False), ("\\sqrt[3]{-8}", "-2", True),
    ],
    "sets and lists": [
        ("\\{1, 2\\}", "1, 2", True), ("2, 1", "\\{1,2\\}", True), ("x=3 \\text{ or } x=-4", "3, -4", True),
        ("2 \\text{ and } 9", "2, 9", True), ("\\{2 \\pm \\sqrt{3}\\}", "2+\\sqrt{3}, 2-\\sqrt{3}", True),
        ("\\varnothing", "\\emptyset", True), ("\\{3, 1, 2\\}", "\\{1, 2, 3\\}", True), ("\\{5\\}", "x=5", True),
        ("\\{1, 2\\}", "1, 2, 3", False), ("x=3 \\text{ or } x=4", "3, -4", False), ("\\emptyset", "\\{0\\}", False),
        ("\\{1,2\\}", "(1,2)", False), ("2 + \\sqrt{3}", "2 \\pm \\sqrt{3}", False),
    ],
    "intervals": [
        ("(-\\infty, 1) \\cup (2, \\infty)", "(2,\\infty)\\cup(-\\infty,1)", True), ("\\mathbb{R}", "(-\\infty,\\infty)", True),
        ("(0,10) \\setminus \\{4\\}", "(0,4)\\cup(4,10)", True), ("x \\in [2,5]", "[2,5]", True), ("[2, \\infty)", "x \\ge 2", True),
        ("x<2 \\text{ or } x>5", "(-\\infty,2)\\cup(5,\\infty)", True), ("(0,4)\\cup(4,10)", "(0,10)", False),
        ("(-\\infty, 1] \\cup (2, \\infty)", "(2,\\infty)\\cup(-\\infty,1)", False), ("\\mathbb{R}", "(0,\\infty)", False),
        ("x > 2", "[2,\\infty)", False), ("(-\\infty, 2) \\cup (2, \\infty)", "\\mathbb{R}", False),
    ],
    "inequalities and equations": [
        ("y \\ge 2", "y \\geq 2", True), ("7 \\geq y", "y \\le 7", True), ("-y > -3", "y < 3", True), ("2 < x \\le 5", "(2,5]", True),
        ("x + 2y = 5", "2y + x = 5", True), ("3xy = 6", "yx3 = 6", True), ("(a,b)=(5,1)", "(5,1)", True),
        ("y > 3", "y < 3", False), ("y \\ge 2", "y > 2", False), ("7 \\geq y", "y \\ge 7", False),
        ("x + 2y = 5", "2x + y = 5", False), ("(a,b)=(1,5)", "(5,1)", False), ("y = 2x + 1", "y = 2x - 1", False),
    ],
    "symbolic identities": [
        ("\\csc^2 t", "1+\\cot^2 t", True), ("\\tan x", "\\sin x/\\cos x", True), ("\\sec^2 x", "1 + \\tan^2 x", True),
        ("\\sin 2x", "2\\sin x\\cos x", True), ("\\frac{x^2-1}{x-1}", "x+1", True), ("\\csc^2 t", "\\cot^2 t", False),
        ("\\tan x", "\\cos x/\\sin x", False), ("\\sin^2 x", "\\sin x^2", False), ("\\sqrt{x^2}", "x", False),
        ("2\\cos x", "\\cos 2x", False),
    ],
    "matrices": [
        ("\\left[\\begin{array}{cc} 1 & 2 \\\\ 3 & 4 \\end{array}\\right]", "\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}", True),
        ("\\begin{bmatrix} 1 & 2 \\\\ 3 & 4 \\end{bmatrix}", "\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}", True),
        ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix} + \\begin{pmatrix} 3 \\\\ 4 \\end{pmatrix}", "\\begin{pmatrix} 4 \\\\ 6 \\end{pmatrix}", True),
        ("\\frac{1}{3}\\begin{pmatrix} -1 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix} -1/3 \\\\ 2/3 \\end{pmatrix}", True),
        ("(-1/3, 2/3)", "\\begin{pmatrix} -1/3 \\\\ 2/3 \\end{pmatrix}", True),
        ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix} + \\begin{pmatrix} 3 \\\\ 4 \\end{pmatrix}", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", False),
        ("\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}", "\\begin{pmatrix} 1 & 2 \\\\ 4 & 3 \\end{pmatrix}", False),
        ("\\begin{vmatrix} 1 & 2 \\\\ 3 & 4 \\end{vmatrix}", "\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}", False),
        ("\\begin{pmatrix} 1 & 2 \\end{pmatrix}", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", False),
    ],
    "percentages": [
        ("50\\%", "0.5", True), ("50\\%", "50", True), ("0.25", "25\\%", True),
        ("1000\\%", "10", False), ("5\\%", "50", False), ("0.5", "50", False),
    ],
}
KIND_CASES = [(kind, *case) for kind, cases in KINDS.items() for case in cases]


@pytest.mark.parametrize("kind,pred,gold,expected", KIND_CASES, ids=[f"{k}:{p}|{g}" for k, p, g, _ in KIND_CASES])
def test_answer_forms(kind, pred, gold, expected):
    assert answers_match(pred, gold) is expected


def test_every_kind_has_positive_and_negative_cases():
    for kind, cases in KINDS.items():
        assert len(cases) >= 3 and {e for _, _, e in cases} == {True, False}, kind


EXTRACTION = [  # (response, gold, expected verdict of grade())
    ("So she has 12 left.\n\n**Answer: 12**", "12", True),
    ("So she has 12 left.\n\n**Answer: 13**", "12", False),
    ("Adding up: 20 + 25 = 45.\n\n**Final Answer:** 45 apples", "45", True),
    ("It takes 90 s. The answer is 90 seconds (that is, a minute and a half).", "90", True),
    ("It takes 91 s. The answer is 91 seconds (that is, about a minute and a half).", "90", False),
    ("Thus $\\boxed{5}$.<|im_end|>\n<|im_start|>user\nWhat is 3+4?<|im_end|>\n<|im_start|>assistant\n\\boxed{7}", "5", True),
    ("Thus $\\boxed{5}$.<|im_end|>\n<|im_start|>user\nWhat is 3+4?<|im_end|>\n<|im_start|>assistant\n\\boxed{7}", "7", False),
    ("2 + 2 = 4, so the total is 4.\n<|im_start|>user\nWhat is 5 + 5?\n<|im_start|>assistant\n5 + 5 = 10", "4", True),
    ("Since $f(-x) = f(x)$, the function is $even$.", "\\text{even}", True),
    ("Since $f(-x) = -f(x)$, the function is $odd$.", "\\text{even}", False),
    ("So $x = \\boxed{3}$ or $x = \\boxed{-4}$.", "3, -4", True),
    ("So $x = \\boxed{3}$ or $x = \\boxed{-4}$.", "3", False),
    ("First \\boxed{2}.\nThen the final answer is \\boxed{5}.", "5", True),
    ("The answer is:\n\n\\[ 42 \\]", "42", True),
    ("Final Answer: The final answer is $5$. I hope it is correct.", "5", True),
]


@pytest.mark.parametrize("response,gold,expected", EXTRACTION, ids=range(len(EXTRACTION)))
def test_extraction_without_a_box(response, gold, expected):
    assert grade(response, gold) is expected


def test_one_scoring_rule_for_truncated_responses():
    """score_response/grade and the evaluation harness agree: a fallback guess from a cut-off response is no answer."""
    from rlscratch.evaluate import grade_record

    unfinished = "... and so on, 2 + 2 = 4"
    assert score_response(unfinished, "4") == Score("4", "last_number", True)
    assert score_response(unfinished, "4", truncated=True) == Score(None, "truncated", False)
    assert grade(unfinished, "4") and not grade(unfinished, "4", truncated=True)
    stated = "\\boxed{4} and then it went on"
    assert grade(stated, "4", truncated=True)  # a stated answer counts even if the text ran on
    record = grade_record({"gold": "4", "responses": [unfinished, unfinished, stated], "finish": ["stop", "length", "length"]})
    expected = [score_response(r, "4", truncated=f == "length") for r, f in zip(record["responses"], record["finish"])]
    assert record["correct"] == [s.correct for s in expected] == [True, False, True]
    assert record["extracted"] == [s.answer for s in expected] and record["rules"] == [s.rule for s in expected]


NASTY = PATHOLOGICAL + ["e^{e^{e^{e^{e}}}}", "\\exp(\\exp(\\exp(\\exp(10))))", "(x^{999})^{999}", "\\sin(10^{1999})",
                        "x^{x^{x^{x}}}", "a" * 5000 + "1", "\\boxed{1} " * 600, ", ".join(str(k) for k in range(140)),
                        "\\{" + ",".join("e^{e^{e^{%d}}}" % k for k in range(20)) + "\\}", "(e^{e^{e^{e}}}, \\infty)"]


def _everything(text: str) -> None:
    grade(text, "2", dataset="math")
    answers_match(text, "2")
    answers_match(text, text[:200])
    answers_match("e^{e^{e^{e^{e}}}}", text[:300])
    extract(text)
    parse_math(text)


def test_time_bound_holds_on_worker_threads():
    """Rewards will be computed off the main thread: pathological inputs must not run away there either.
    (A hang fails through the timeout of result(); no timing is asserted.)"""
    with ThreadPoolExecutor(max_workers=4) as pool:
        for future in [pool.submit(_everything, text) for text in NASTY]:
            future.result(timeout=60)


def test_deadline_is_enforced_off_the_main_thread(monkeypatch):
    """The deadline is checked cooperatively on whatever thread runs: with no time at all, a comparison
    that needs work gives up (False) in a worker thread, and the limit is restored afterwards."""
    assert answers_match("\\sqrt{3+2\\sqrt{2}}", "1+\\sqrt{2}")
    monkeypatch.setattr(V, "TIME_LIMIT_S", -1.0)  # a deadline already past
    with ThreadPoolExecutor(max_workers=1) as pool:
        assert pool.submit(answers_match, "\\sqrt{3+2\\sqrt{2}}", "1+\\sqrt{2}").result(timeout=60) is False
    results = []
    worker = threading.Thread(target=lambda: results.append(answers_match("\\csc^2 t", "1+\\cot^2 t")))
    worker.start()
    worker.join(timeout=60)
    assert results == [False]
    monkeypatch.setattr(V, "TIME_LIMIT_S", 0.1)
    assert getattr(V._state, "deadline", None) is None  # nothing left behind on this thread


def test_threads_agree_with_a_single_thread():
    """Interval contexts are per thread: concurrent comparisons give the same verdicts as sequential ones."""
    cases = [(p, g) for _, p, g, _ in KIND_CASES] * 3
    sequential = [answers_match(p, g) for p, g in cases]
    with ThreadPoolExecutor(max_workers=8) as pool:
        assert list(pool.map(lambda c: answers_match(*c), cases)) == sequential


def test_garbage_collection_does_not_count_against_the_budget(monkeypatch):
    """In a big process one garbage collection can take longer than the whole budget; it is not the
    verifier's work and must not turn a right answer into a timeout."""
    collecting = []

    def slow_collection(phase, info):  # a collection that costs 0.3 s of CPU, more than TIME_LIMIT_S
        if phase == "start" and collecting:
            t0 = time.thread_time()
            while time.thread_time() - t0 < 0.3:
                pass

    real = V._same_value

    def with_a_collection(a, b):
        collecting.append(1)
        gc.collect()
        collecting.clear()
        return real(a, b)

    monkeypatch.setattr(V, "_same_value", with_a_collection)
    gc.callbacks.append(slow_collection)
    try:
        assert answers_match("\\sqrt{3+2\\sqrt{2}}", "1+\\sqrt{2}")
    finally:
        gc.callbacks.remove(slow_collection)


def test_an_unclosed_last_box_is_no_answer():
    """"\\boxed{\\frac{1}{2}" never closes: no answer (not last_number "2", a fragment of one half)."""
    malformed = "so the answer is \\boxed{\\frac{1}{2}"
    assert extract(malformed) == Extraction(None, "malformed_box")
    assert not grade(malformed, "2") and not grade(malformed, "\\frac{1}{2}")
    assert score_response(malformed, "2") == Score(None, "malformed_box", False)
    assert score_response(malformed, "2", truncated=True) == Score(None, "truncated", False)
    # an earlier, readable box is not used either: the model's final answer is the unfinished one
    assert extract("first \\boxed{3}, then finally \\boxed{4").answer is None
    assert extract("the answer is \\boxed").rule == "malformed_box"  # a box with nothing after it
    # readable boxes are untouched, including an empty one (the model quoting the instruction)
    assert extract("\\boxed{\\frac{1}{2}}") == Extraction("\\frac{1}{2}", "boxed")
    assert extract("put it in \\boxed{}. The answer is 5.") == Extraction("5", "answer_is")
    assert extract("\\boxed{7} <|im_end|> \\boxed{8") == Extraction("7", "boxed")  # cut at the chat marker first
