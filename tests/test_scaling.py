import pytest

from rlscratch.generate import generate
from rlscratch.scaling import answer_entropy, group_answers, majority_vote, pass_at_k, vote_at_k


def test_equivalent_spellings_are_one_vote():
    assert majority_vote(["0.5", "3", "\\frac{1}{2}", "3", "1/2"]) == "0.5"
    assert majority_vote(["x = 4", "4", "5"]) == "x = 4"
    # a list and a set with the same elements are one answer (braces or none, any order); a tuple is not
    assert [sorted(g) for g in group_answers(["1, 2", "\\{2, 1\\}", "2,1", "3", "(1, 2)"])] == [[0, 1, 2], [3], [4]]


def test_missing_answers_never_win():
    assert majority_vote([None, None, None, "7"]) == "7"
    assert majority_vote([None, "", "  "]) is None
    assert majority_vote([]) is None
    assert group_answers([None, None]) == []


def test_tie_breaks_are_deterministic():
    assert majority_vote(["2", "3"]) == "2"  # first seen
    assert majority_vote(["3", "2"]) == "3"
    assert majority_vote(["2", "3"], logprobs=[-1.0, -0.1]) == "3"  # more confident group
    assert majority_vote(["2", "3", "2", "3"], logprobs=[-0.5, -0.1, -0.5, -0.3]) == "3"  # mean -0.2 beats -0.5
    assert majority_vote(["2", "2", "3"], logprobs=[-5.0, -5.0, -0.01]) == "2"  # size first
    for _ in range(3):
        assert majority_vote(["a", "b", "c"], logprobs=[-1, -1, -1]) == "a"


def test_entropy_and_pass_at_k():
    assert answer_entropy(["1", "1.0", "1"]) == 0.0
    assert abs(answer_entropy(["1", "2", "3", "4"]) - 2.0) < 1e-9
    assert abs(answer_entropy(["1", None]) - 1.0) < 1e-9
    assert pass_at_k(10, 0, 5) == 0.0 and pass_at_k(10, 10, 1) == 1.0
    assert abs(pass_at_k(10, 3, 1) - 0.3) < 1e-12
    assert pass_at_k(10, 8, 5) == 1.0  # fewer than 5 wrong samples: any 5 contain a right one


def test_vote_at_k():
    record = {"id": "p", "gold": "4", "extracted": ["4", "5", "4", "5", "5"], "correct": [True, False, True, False, False],
              "mean_logprob": [-0.1] * 5, "tokens": [10] * 5}
    full = vote_at_k([record], 5)
    assert full["maj"] == 0.0 and full["pass"] == 1.0 and full["tokens_per_problem"] == 50
    assert vote_at_k([record], 1)["maj"] == pytest.approx(0.4, abs=0.31)  # a 10-subset estimate of 2/5
    with pytest.raises(ValueError):
        vote_at_k([record], 6)


def test_sampling_reproducible_under_seed(tiny_model, tokenizer):
    prompt = ["What is 3 + 4?"]
    a = generate(tiny_model, tokenizer, prompt, max_new_tokens=6, temperature=0.9, top_p=0.95, n=4, seed=11)
    b = generate(tiny_model, tokenizer, prompt, max_new_tokens=6, temperature=0.9, top_p=0.95, n=4, seed=11)
    assert [x.token_ids for x in a] == [x.token_ids for x in b]
    assert len({tuple(x.token_ids) for x in a}) > 1  # the samples differ from each other


def test_bootstrap_interval_over_problems():
    from rlscratch.scaling import bootstrap_interval

    solved = [1.0] * 100 + [0.0] * 100  # 200 problems, half solved
    low, high = bootstrap_interval(solved, seed=3)
    assert (low, high) == bootstrap_interval(solved, seed=3)  # seeded: reproducible
    assert low < 0.5 < high and 0.05 < (high - low) / 2 < 0.09  # about 1.96 * sqrt(0.25 / 200) = 0.069
    narrow = bootstrap_interval(solved, level=0.5, seed=3)
    assert low <= narrow[0] < narrow[1] <= high
    assert bootstrap_interval([0.7] * 30) == pytest.approx((0.7, 0.7))  # no spread, no width
    # two problems, one solved: resampled means are 0, 1/2, 1 with probabilities 1/4, 1/2, 1/4
    assert bootstrap_interval([0.0, 1.0], seed=0) == (0.0, 1.0)
    assert bootstrap_interval([0.0, 1.0], level=0.4, seed=0) == (0.5, 0.5)
    with pytest.raises(ValueError):
        bootstrap_interval([])
    with pytest.raises(ValueError):
        bootstrap_interval([1.0], level=1.0)
