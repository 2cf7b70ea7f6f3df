"""Sampling one step's tokens on the CPU: the sampler against the previous way, in one process.

    .venv/bin/python bench/sampler.py [--rows 32 64] [--threads N]

The logits are SmolLM2-135M-Instruct's own, over its 49k vocabulary, at the first 8 decode
steps of chat prompts from the demo data (real distributions matter: the nucleus of a peaked
row ends among the sampler's candidates, a flat one's does not). The baseline is what the
sampler did before: a whole sort of every row for top-k/top-p and one torch.multinomial per
row; now a partial sort, a whole sort only for rows whose nucleus reaches past it, and one
uniform per row through the cdf (serve/sampler.py).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SETTINGS = {  # name -> SamplingParams options, as clients send them
    "temperature 1": {"temperature": 1.0},
    "T 0.7, top_p 0.9": {"temperature": 0.7, "top_p": 0.9},
    "T 1, top_p 0.95": {"temperature": 1.0, "top_p": 0.95},
    "top_k 50": {"temperature": 0.8, "top_k": 50},
}


def baseline_sample(logits, params, generator):
    """The sampler's random rows before: whole sorts and a multinomial per row."""
    import torch

    temps = torch.tensor([p.temperature for p in params])
    scaled = logits / temps[:, None]
    if any(p.top_k or p.top_p < 1 for p in params):
        top_k = torch.tensor([p.top_k for p in params])
        top_p = torch.tensor([p.top_p for p in params])
        vocab = scaled.shape[1]
        sorted_logits, order = scaled.sort(dim=-1, descending=True)
        rank = torch.arange(vocab)[None, :]
        drop = rank >= torch.where(top_k > 0, top_k, vocab)[:, None]
        probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
        drop |= ((probs.cumsum(dim=-1) - probs) >= top_p[:, None]) & (rank > 0)
        scaled = scaled.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = scaled.softmax(dim=-1)
    return [int(torch.multinomial(row, 1, generator=generator)[0]) for row in probs]


def decode_logits(rows: int, steps: int = 8):
    """[steps, rows, vocab]: SmolLM2's logits at each of the first decode steps."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from registry.base_model import resolve_base_model
    from registry.home import setup_environment
    from train.demo_data import construction_faq, country_facts

    base = resolve_base_model("smollm2-135m-instruct", setup_environment())
    tokenizer = AutoTokenizer.from_pretrained(base.path, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(base.path, dtype=torch.float32).eval()
    questions = [r["instruction"] for r in construction_faq()]
    questions += [r["messages"][0]["content"] for r in country_facts()]
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
        )
        for q in questions[::7][:rows]
    ]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(
            **batch,
            max_new_tokens=steps,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    return torch.stack(out.logits).float()


def median_ms(fn, batches, repeats: int) -> float:
    fn(batches[0])  # warm-up
    times = []
    for _ in range(repeats):
        for logits in batches:
            t0 = time.perf_counter()
            fn(logits)
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()

    import torch

    from serve.sampling_params import SamplingParams

    if args.threads:
        torch.set_num_threads(args.threads)
    logits = decode_logits(max(args.rows))
    print(f"SmolLM2 decode logits {tuple(logits.shape)}, {torch.get_num_threads()} threads")
    print(
        f"{'rows':>4}  {'setting':<18} {'before ms':>9} {'now ms':>8} {'ratio':>7}  past candidates"
    )
    for rows in args.rows:
        batches = list(logits[:, :rows])
        for name, options in SETTINGS.items():
            before, now, past = compare(batches, SamplingParams(**options), args.repeats)
            print(f"{rows:4d}  {name:<18} {before:9.1f} {now:8.1f} {before / now:6.2f}x  {past}")


def compare(batches, params, repeats: int) -> tuple[float, float, str]:
    """Median ms per step before and now, and how many rows' nucleus held more than the
    sampler's candidates (those rows take the whole sort)."""
    import torch

    from serve.sampler import CANDIDATES, Sampler, filter_top_k_top_p
    from serve.sequence import Sequence

    rows = batches[0].shape[0]
    seqs = [Sequence(f"r{i}", [0], 1, params) for i in range(rows)]
    sampler = Sampler("cpu", seed=0)
    generator = torch.Generator().manual_seed(0)
    before = median_ms(lambda x: baseline_sample(x, [params] * rows, generator), batches, repeats)
    now = median_ms(lambda x: sampler(x.clone(), seqs), batches, repeats)
    if not (params.top_k or params.top_p < 1):
        return before, now, "-"
    past = 0
    for logits in batches:
        kept = filter_top_k_top_p(
            logits / params.temperature,
            [params.top_k] * rows,
            [params.top_p] * rows,
        )
        past += int((torch.isfinite(kept).sum(-1) > CANDIDATES).sum())
    return before, now, f"{past} of {rows * len(batches)}"


if __name__ == "__main__":
    main()
