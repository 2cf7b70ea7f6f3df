"""What JSON-constrained decoding costs per engine step: guided batches against free ones.

    .venv/bin/python bench/guided.py [--batch 1 8 32] [--steps 16] [--repeats 3]

Same process, same SmolLM2 base (fp32), same prompts: a decode step with every row guided by a
JSON schema (llguidance fills each row's token bitmask, the sampler masks the logits) against
the same step with no row guided. The schema asks for a long string, so no request ends before
`--steps` tokens and every step has the whole batch. Runs alternate between the two modes;
medians of the decode steps are reported with their ratio, and the masking alone per step.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SCHEMA = {
    "type": "object",
    "properties": {"answer": {"type": "string", "minLength": 400}, "sure": {"type": "boolean"}},
    "required": ["answer", "sure"],
}
QUESTION = [{"role": "user", "content": "Describe the sea in JSON."}]


def decode_steps(llm, batch: int, steps: int, guided: bool) -> tuple[list[float], float]:
    """Seconds of each decode step (prefill excluded) and of the masking inside them."""
    from serve import SamplingParams

    fmt = {"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA}}
    params = SamplingParams(
        max_tokens=steps, temperature=0, ignore_eos=True, response_format=fmt if guided else None
    )
    engine = llm.engine
    prompt = llm.render_chat(QUESTION)
    for _ in range(batch):
        engine.add_request(prompt, params)
    guide, spent = engine.guided, [0.0]

    def timed(method):
        def run(*args):
            start = time.perf_counter()
            out = method(*args)
            spent[0] += time.perf_counter() - start
            return out

        return run

    guide.masks, guide.mask_ = timed(guide.masks), timed(guide.mask_)  # fill, then apply
    times = []
    try:
        while engine.has_unfinished:
            start = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - start)
    finally:
        del guide.masks, guide.mask_
    return times[1:], spent[0]  # the first step is the prefill


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from serve import LLM

    llm = LLM(quantization=None, num_kv_blocks=1024)
    decode_steps(llm, 1, 4, True)  # warm-up: llguidance's tokenizer view and the grammar
    print("batch  free step ms  guided step ms  ratio  masking ms/step  (medians)")
    for batch in args.batch:
        free, guided, masking = [], [], []
        for _ in range(args.repeats):
            free += decode_steps(llm, batch, args.steps, False)[0]
            times, spent = decode_steps(llm, batch, args.steps, True)
            guided += times
            masking.append(spent / (len(times) + 1))
        a, b = statistics.median(free), statistics.median(guided)
        print(
            f"{batch:5d}  {a * 1e3:12.1f}  {b * 1e3:14.1f}  {b / a:5.2f}  "
            f"{statistics.median(masking) * 1e3:15.2f}"
        )


if __name__ == "__main__":
    main()
