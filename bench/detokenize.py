"""Streaming text out of tokens: the windowed decode of serve/outputs.py against decoding the
whole output at every step (what it did before), in one process.

    .venv/bin/python bench/detokenize.py [--lengths 64 512 2048]

Per sequence and step, the engine turns the new token into text. Decoding all output tokens
each time costs O(length) a step, O(length²) a request; a window of the last few tokens costs
the same at any length. SmolLM2's tokenizer, outputs cut from the demo data's answers.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def whole_decode(tokenizer, output: list[int]) -> str:
    """The baseline: the whole output decoded after each token."""
    text = ""
    for n in range(1, len(output) + 1):
        text = tokenizer.decode(output[:n], skip_special_tokens=True)
    return text


def windowed_decode(tokenizer, output: list[int]) -> str:
    from serve.outputs import RequestState
    from serve.sampling_params import SamplingParams
    from serve.sequence import Sequence

    seq = Sequence("r", [1], 1, SamplingParams(max_tokens=len(output), ignore_eos=True))
    state = RequestState(seq, tokenizer)
    for token in output:
        seq.append_token(token)
        state.update(None, [])
    return state.text


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 512, 2048])
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from registry.base_model import resolve_base_model
    from registry.home import setup_environment
    from train.demo_data import construction_faq

    base = resolve_base_model("smollm2-135m-instruct", setup_environment())
    tokenizer = AutoTokenizer.from_pretrained(base.path)
    corpus = " ".join(r["output"] for r in construction_faq())
    ids = tokenizer(corpus, add_special_tokens=False)["input_ids"]
    print(f"{'tokens':>6}  {'whole us/step':>13}  {'window us/step':>14}  {'ratio':>7}")
    for length in args.lengths:
        output = ids[:length]
        timings = {}
        for name, fn in (("whole", whole_decode), ("window", windowed_decode)):
            fn(tokenizer, output[:8])  # warm-up: imports, first calls
            t0 = time.perf_counter()
            text = fn(tokenizer, output)
            timings[name] = (time.perf_counter() - t0) / length * 1e6
            assert text == tokenizer.decode(output, skip_special_tokens=True), name
        ratio = timings["whole"] / timings["window"]
        print(f"{length:6d}  {timings['whole']:13.1f}  {timings['window']:14.1f}  {ratio:6.1f}x")


if __name__ == "__main__":
    main()
