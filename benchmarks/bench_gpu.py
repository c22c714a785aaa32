"""CUDA correctness and speed of the engine and a training step, at the real Qwen2.5 shapes.

    python benchmarks/bench_gpu.py                 # on a CUDA machine: 0.5B and 1.5B shapes
    python benchmarks/bench_gpu.py --smoke         # tiny shapes, on CPU if no GPU (checks the script)

The weights are random (the real checkpoints cannot travel to the GPU machines this book was tested
on), which is fine for what is measured here: parity with `transformers` on the same weights,
KV-cache decoding against full recomputation, and speed, which depends on shapes, not values.

* parity: our logits vs `transformers`' Qwen2ForCausalLM holding the same tensors (float32, then bf16);
* decoding: greedy tokens from `generate` (KV cache, left-padded batch) equal greedy tokens from
  re-running the full sequence (float32);
* generation tokens/s: `generate` vs `transformers`' `generate`, 256 new tokens, EOS ignored;
* training: forward + backward + AdamW step (float32 master weights, bf16 autocast), our chunked
  completion log-probs vs `transformers`' full logits + log_softmax, tokens/s and peak GPU memory.
Results: benchmarks/results/bench_gpu.json (with the GPU's name).
"""
from __future__ import annotations

import argparse
import datetime
import json
import tempfile
import time
from pathlib import Path

import torch

from rlscratch.model import Qwen2Config, Qwen2Model, describe_hardware, hf_reference, tiny_config

SHAPES = {
    # Qwen2.5-0.5B(-Instruct) with an untied head, like the offline GGUF; 1.5B as published (tied).
    "qwen2.5-0.5b": Qwen2Config(tie_word_embeddings=False),
    "qwen2.5-1.5b": Qwen2Config(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True),
}


def random_model(cfg: Qwen2Config, device: str, seed: int = 0) -> Qwen2Model:
    """A float32 model with small random weights (std 0.02, norms at 1), on `device`."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen2Model(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0) if "norm" in name else p.normal_(0, 0.02)
            else:
                p.normal_(0, 0.02)
    return model.eval()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def best_time(fn, device: str, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


class IdTokenizer:
    """The little of a tokenizer `generate` needs when prompts are token ids and EOS is ignored."""

    eos_token_id = 0
    pad_token_id = 0
    all_special_ids: list[int] = []

    def convert_tokens_to_ids(self, token):
        return None

    def decode(self, ids, skip_special_tokens=False):
        return ""

    def batch_decode(self, rows, skip_special_tokens=False):
        return ["" for _ in rows]


def parity(cfg: Qwen2Config, device: str) -> dict:
    model = random_model(cfg, device)
    hf = hf_reference(model).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (2, 48), generator=g).to(device)
    mask = torch.ones_like(ids)
    mask[0, :9] = 0  # a left-padded row
    out = {}
    with torch.no_grad():
        for dtype in (torch.float32, torch.bfloat16):
            model.to(dtype)
            ours = model(ids, attention_mask=mask).float()
            theirs = hf(input_ids=ids, attention_mask=mask).logits.float()
            valid = mask.bool()
            diff = (ours - theirs)[valid].abs().max().item()
            scale = theirs[valid].abs().max().item()
            out[str(dtype)[6:]] = {"max_abs_diff": diff, "max_abs_logit": scale}
    return out


def decode_check(cfg: Qwen2Config, device: str, tokenizer) -> dict:
    from rlscratch.generate import generate, generate_without_cache

    model = random_model(cfg, device)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(1, cfg.vocab_size, (n,), generator=g).tolist() for n in (5, 17, 11)]
    cached = generate(model, tokenizer, prompts, max_new_tokens=24, ignore_eos=True, batch_size=8)
    with torch.no_grad():
        full = [generate_without_cache(model, p, 24) for p in prompts]
    agree = [c.token_ids == f for c, f in zip(cached, full)]
    return {"rows": len(prompts), "rows_equal": sum(agree)}


def generation_speed(cfg: Qwen2Config, device: str, tokenizer, batches: list[int], new_tokens: int,
                     repeats: int) -> list[dict]:
    from rlscratch.generate import generate

    model = random_model(cfg, device).to(torch.bfloat16)
    hf = hf_reference(model).eval()
    g = torch.Generator().manual_seed(3)
    rows = []
    for batch in batches:
        prompts = [torch.randint(1, cfg.vocab_size, (64,), generator=g).tolist() for _ in range(batch)]
        ids = torch.tensor(prompts, device=device)

        def ours():
            generate(model, tokenizer, prompts, max_new_tokens=new_tokens, ignore_eos=True, batch_size=batch)

        def theirs():
            with torch.no_grad():
                hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                            min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)

        ours(), theirs()  # warm-up
        t_ours, t_hf = best_time(ours, device, repeats), best_time(theirs, device, repeats)
        rows.append({"batch": batch, "rlscratch_tok_s": batch * new_tokens / t_ours,
                     "transformers_tok_s": batch * new_tokens / t_hf, "ratio": t_hf / t_ours})
    return rows


def training_speed(cfg: Qwen2Config, device: str, batch: int, prompt: int, completion: int, repeats: int) -> list[dict]:
    from rlscratch.grpo import sequence_logprobs

    rows = []
    for engine in ("rlscratch", "transformers"):
        model = random_model(cfg, device).train()
        net = hf_reference(model).train() if engine == "transformers" else model
        optimizer = torch.optim.AdamW(net.parameters(), lr=1e-6)
        g = torch.Generator().manual_seed(4)
        ids = torch.randint(0, cfg.vocab_size, (batch, prompt + completion), generator=g).to(device)
        attention = torch.ones_like(ids)
        attention[: batch // 2, : prompt // 4] = 0
        done = torch.zeros_like(ids, dtype=torch.bool)
        done[:, prompt:] = True
        advantages = torch.randn(batch, generator=g).to(device)

        def step():
            with torch.autocast(device.split(":")[0], dtype=torch.bfloat16):
                if engine == "transformers":
                    logits = net(input_ids=ids, attention_mask=attention).logits[:, :-1]
                    logp = torch.log_softmax(logits.float(), -1).gather(-1, ids[:, 1:, None])[..., 0]
                    mask = done[:, 1:]
                else:
                    logp, mask = sequence_logprobs(net, ids, attention, done), done
            loss = -(torch.where(mask, logp.float(), 0.0) * advantages[:, None]).sum() / mask.sum()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        step()
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        seconds = best_time(step, device, repeats)
        peak = torch.cuda.max_memory_allocated() / 1e9 if device.startswith("cuda") else float("nan")
        rows.append({"engine": engine, "tokens_per_s": batch * (prompt + completion) / seconds,
                     "peak_GB": peak, "seconds": seconds})
        del model, net, optimizer
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, few tokens (runs on CPU too)")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--batches", default="1,16,64")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--train-batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", help="results file (default: benchmarks/results/bench_gpu.json; with --smoke a "
                        "temporary file, so a smoke run never overwrites measured results)")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if not args.smoke and device == "cpu":
        raise SystemExit("bench_gpu.py needs a CUDA device (use --smoke to check the script on a CPU)")
    shapes = {"tiny": tiny_config()} if args.smoke else {k: SHAPES[k] for k in args.shapes.split(",")}
    batches = [1, 2] if args.smoke else [int(b) for b in args.batches.split(",")]
    new_tokens = 4 if args.smoke else args.new_tokens
    repeats = 1 if args.smoke else args.repeats
    if args.out is None:
        args.out = (tempfile.mkdtemp() + "/bench_gpu_smoke.json" if args.smoke
                    else str(Path(__file__).parent / "results" / "bench_gpu.json"))
    tokenizer = IdTokenizer()
    report = {"date": datetime.date.today().isoformat(), "hardware": describe_hardware(),
              "torch": torch.__version__, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
              "shapes": {}}
    for name, cfg in shapes.items():
        print(f"== {name}", flush=True)
        r = {"parity": parity(cfg, device)}
        print("parity", r["parity"], flush=True)
        r["decode"] = decode_check(cfg, device, tokenizer)
        print("decode", r["decode"], flush=True)
        r["generation"] = generation_speed(cfg, device, tokenizer, batches, new_tokens, repeats)
        for row in r["generation"]:
            print("generate", row, flush=True)
        prompt, completion = (8, 8) if args.smoke else (128, 256)
        r["training"] = training_speed(cfg, device, 2 if args.smoke else args.train_batch, prompt, completion, repeats)
        for row in r["training"]:
            print("train", row, flush=True)
        report["shapes"][name] = r
        save(report, Path(args.out))


def save(report: dict, out: Path) -> None:
    """Write the report, keeping other shapes measured earlier on the same device (one shape per call is fine)."""
    if out.exists():
        old = json.loads(out.read_text())
        if old.get("device") == report["device"]:
            report["shapes"] = {**old.get("shapes", {}), **report["shapes"]}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print("wrote", out, flush=True)


if __name__ == "__main__":
    main()
