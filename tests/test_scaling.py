import pytest

from rlscratch.generate import generate
import itertools

from rlscratch.scaling import (answer_entropy, group_answers, majority_vote, pass_at_k, sample_diversity, vote_at_k,
                               vote_details)


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
    one = vote_at_k([record], 1)
    assert one["exact"] and one["maj"] == one["pass"] == pytest.approx(0.4)  # maj@1 = pass@1, no random subset
    assert full["exact"] and full["maj_by_problem"] == [0.0] and full["pass_by_problem"] == [1.0]
    with pytest.raises(ValueError):
        vote_at_k([record], 6)
    with pytest.raises(ValueError):
        vote_at_k([record], 0)


def _brute_force_maj(record, k):
    """maj@k of one record over every k-subset of its samples."""
    votes = [majority_vote([record["extracted"][i] for i in c], logprobs=[record["mean_logprob"][i] for i in c])
             for c in itertools.combinations(range(len(record["extracted"])), k)]
    return sum(v == record["gold"] for v in votes) / len(votes)


def test_vote_at_k_exact_and_sampled():
    answers = ["4", "5", "4", None, "5", "4", "6", "5", "4", "7"]  # 10 samples: 4 right, 3 of "5"
    record = {"id": "p", "gold": "4", "extracted": answers, "correct": [a == "4" for a in answers],
              "mean_logprob": [-0.1 * (i % 4) for i in range(10)], "tokens": list(range(10, 20))}
    other = {**record, "id": "q", "extracted": ["9"] * 10, "correct": [False] * 10}
    for k in (1, 9, 10):  # at most max(subsets, n) = 10 subsets: every one is voted on
        result = vote_at_k([record, other], k)
        assert result["exact"] and result["maj_by_problem"] == pytest.approx([_brute_force_maj(record, k), 0.0])
        assert result["maj"] == pytest.approx(_brute_force_maj(record, k) / 2)
    assert vote_at_k([record], 1)["maj"] == pytest.approx(0.4)
    # 252 subsets of 5: 200 random ones, an unbiased estimate, near the exact value (sd < 0.04)
    exact5 = _brute_force_maj(record, 5)
    sampled = vote_at_k([record], 5, subsets=200, seed=1)
    assert not sampled["exact"] and abs(sampled["maj"] - exact5) < 0.12
    assert sampled == vote_at_k([record], 5, subsets=200, seed=1)  # seeded
    assert vote_at_k([record], 5, subsets=252)["maj"] == pytest.approx(exact5)  # all 252: exact
    assert vote_at_k([record], 5)["tokens_per_problem"] == pytest.approx(5 * 14.5)


def test_vote_details_margins_and_first_k():
    record = {"id": "p", "gold": "4", "extracted": ["5", "4", "4", "5", "5", None, "4", "x"],
              "correct": [False, True, True, False, False, False, True, False],
              "mean_logprob": [-0.5, -0.1, -0.2, -0.5, -0.5, -2.0, -0.3, -1.0], "tokens": [10] * 8}
    full = vote_details(record)
    assert full["k"] == 8
    assert full["group_sizes"] == [3, 3, 1] and full["winner_votes"] == 3 and full["runner_up_votes"] == 3
    assert full["vote"] == "4" and full["correct"]  # a 3-3 tie: "4" (mean -0.2) is more confident than "5" (-0.5)
    assert full["correct_votes"] == 3 and full["no_answer"] == 1
    first5 = vote_details(record, 5)  # "5" x3 against "4" x2: the right answer is present but outvoted
    assert (first5["vote"], first5["correct"], first5["correct_votes"], first5["group_sizes"]) == ("5", False, 2, [3, 2])
    assert vote_details(record, 1)["runner_up_votes"] == 0
    with pytest.raises(ValueError):
        vote_details(record, 9)
    with pytest.raises(ValueError):
        vote_details(record, 0)


def test_sample_diversity_counts_length_cutoffs():
    records = [{"extracted": ["1", "2", None, "1"], "correct": [True, False, False, True], "tokens": [5, 5, 512, 6],
                "finish": ["stop", "stop", "length", "stop"]},
               {"extracted": ["3", "3"], "correct": [False, False], "tokens": [7, 9], "finish": ["length", "length"]}]
    d = sample_diversity(records)
    assert d["length_rate"] == pytest.approx((1 / 4 + 2 / 2) / 2)
    assert d["single_sample_accuracy"] == pytest.approx((2 / 4 + 0) / 2)
    assert d["distinct_answers"] == pytest.approx((2 + 1) / 2)


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
