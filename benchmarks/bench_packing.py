"""One GRPO step's scoring, side by side: each answer in its own row vs answers packed after their prompt.

    python benchmarks/bench_packing.py            # the real offline model, 4 questions x 8 answers
    python benchmarks/bench_packing.py --smoke    # tiny random model, seconds (checks the script)

The workload is chapter 6's step on GSM8K: 4 training questions (real prompts, chat template and
`step_by_step` instruction) with 8 answers each, answer lengths drawn uniformly from 120-300 tokens
(the run's answers averaged about 230 with a 300 cap; the tokens themselves do not change the cost).
Both layouts score the same 32 answers in micro-batches of 4, with the run's float32 master weights,
bf16 autocast where the CPU computes it natively, and the model prepared as the training loop prepares
it (`pack_for_cpu`: oneDNN-packed weights in the passes without gradients):

* separate: chapter 5's `sequence_logprobs` on `completion_batch` rows (prompt + answer, left-padded);
* packed: chapter 6's `answer_logprobs` on `pack_answers` micro-batches (each prompt once per micro-batch).

Timed: the reference pass (forward, no gradients) and the policy pass (forward + backward of the
advantage-weighted log-probs, what `update_step` does before the optimizer) for all 8 micro-batches;
the layouts alternate for --rounds rounds and each keeps its best time. Also reported: how far the two
layouts' log-probs differ (float rounding only: in bf16 the two layouts' matrix shapes round differently). Results: benchmarks/results/bench_packing.json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import random
import time
from pathlib import Path

import torch

from rlscratch.generate import pack_for_cpu
from rlscratch.grpo import completion_batch, sequence_logprobs
from rlscratch.model import OFFLINE_MODEL, describe_hardware, load_model, resolve_dtype
from rlscratch.prompts import format_prompt
from rlscratch.train import Rollout, answer_logprobs, micro_batches, make_config


def workload(tokenizer, questions: list[str], group_size: int, lengths: tuple[int, int], seed: int = 0):
    rng = random.Random(seed)
    rollouts = []
    for q in questions:
        prompt = tokenizer.encode(format_prompt(tokenizer, q, "step_by_step"), add_special_tokens=False)
        for _ in range(group_size):
            answer = [rng.randrange(1000, 30000) for _ in range(rng.randint(*lengths))]
            rollouts.append(Rollout(prompt, answer, [-1.0] * len(answer), rng.choice([-1.0, 1.0]), True))
    return rollouts


def separate_batches(rollouts, size: int):
    out = []
    for start in range(0, len(rollouts), size):
        part = rollouts[start:start + size]
        b = completion_batch([r.prompt_ids for r in part], [r.completion_ids for r in part], pad_id=0)
        out.append((b, torch.tensor([r.advantage for r in part])))
    return out


def run_layout(model, layout: str, separate, packed, autocast, grad: bool) -> tuple[float, list[torch.Tensor]]:
    """Seconds for all micro-batches, and their log-probs (answer after answer, flattened)."""
    values = []
    t0 = time.perf_counter()
    for (b, adv), mb in zip(separate, packed):
        with torch.set_grad_enabled(grad), autocast():
            if layout == "separate":
                logp = sequence_logprobs(model, b.input_ids, b.attention_mask, b.completion_mask)
                mask = b.completion_mask
            else:
                logp, _ = answer_logprobs(model, mb)
                mask = mb.completion_mask
            loss = -(logp * adv[:, None]).sum() / mask.sum()
        if grad:
            loss.backward()
        values.append(logp.detach()[mask.bool()])
    return time.perf_counter() - t0, values


def setup(smoke: bool):
    """The benchmark's model (prepared as in training) and workload: (model, rollouts, separate micro-batches,
    packed micro-batches, autocast context factory, whether bf16 is used)."""
    from rlscratch.data import load_gsm8k

    if smoke:
        model, tokenizer = load_model("tiny-random", dtype=torch.float32)
        lengths, questions = (5, 20), ["What is 2 + 3?", "Tom has 4 apples and eats one. How many are left?"]
    else:
        model, tokenizer = load_model(OFFLINE_MODEL, dtype=torch.float32)
        lengths, questions = (120, 300), [p.question for p in load_gsm8k("train", limit=4)]
    pack_for_cpu(model)
    bf16 = resolve_dtype("auto") == torch.bfloat16 and not smoke
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)  # noqa: E731
    rollouts = workload(tokenizer, questions, 8, lengths)
    cfg = make_config("grpo", "gsm8k", micro_batch_size=4)
    return model, rollouts, separate_batches(rollouts, 4), micro_batches(rollouts, cfg, pad_id=0), autocast, bf16


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny random model, a few tokens")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    model, rollouts, separate, packed, autocast, bf16 = setup(args.smoke)
    positions = {"separate": sum(b.input_ids.numel() for b, _ in separate),
                 "packed": sum(mb.input_ids.numel() for mb in packed)}
    best: dict[str, dict[str, float]] = {k: {"reference": float("inf"), "policy": float("inf")} for k in positions}
    values = {}
    for _ in range(args.rounds):
        for layout in positions:
            t_ref, values[layout] = run_layout(model, layout, separate, packed, autocast, grad=False)
            model.zero_grad(set_to_none=True)
            t_pol, _ = run_layout(model, layout, separate, packed, autocast, grad=True)
            best[layout]["reference"] = min(best[layout]["reference"], t_ref)
            best[layout]["policy"] = min(best[layout]["policy"], t_pol)
            print(f"{layout:8} reference {t_ref:7.1f} s  policy {t_pol:7.1f} s  ({positions[layout]} token positions)",
                  flush=True)
    gaps = torch.cat([(a - b).abs() for a, b in zip(values["separate"], values["packed"])])
    result = {
        "machine": describe_hardware(), "date": datetime.date.today().isoformat(),
        "model": "tiny-random" if args.smoke else OFFLINE_MODEL, "compute": "bf16 autocast" if bf16 else "float32",
        "answers": len(rollouts), "micro_batch_size": 4,
        "answer_tokens": sum(len(r.completion_ids) for r in rollouts),
        "prompt_tokens": [len(rollouts[i].prompt_ids) for i in range(0, len(rollouts), 8)],
        "token_positions": positions, "seconds": best,
        "speedup_reference": best["separate"]["reference"] / best["packed"]["reference"],
        "speedup_policy": best["separate"]["policy"] / best["packed"]["policy"],
        "logprob_difference": {"max_abs": gaps.max().item(), "mean_abs": gaps.mean().item(),
                               "mean_abs_logprob": torch.cat(values["packed"]).abs().mean().item()},
    }
    print(json.dumps(result, indent=1))
    if not args.smoke or args.out:
        out = Path(args.out or Path(__file__).parent / "results" / "bench_packing.json")
        out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
