"""Load test of the REST server: many concurrent streaming openai clients on loopback.

    .venv/bin/python bench/load.py [--clients 64] [--duration 60] [--adapters 4]

Starts `loraplex serve` (a real uvicorn, in its own process) on the shipped serve config with
random rank-16 adapters in place of the trained ones, then runs `--clients` asyncio clients
that each send streaming chat requests back to back (model: the base or one of the adapters,
round robin; questions from the demo data) until `--duration` seconds have passed; requests
still in flight then are awaited. Reports completed requests/s, generated tokens/s, time to
first token and inter-token latency percentiles as the clients see them, the count of 5xx
answers (must be zero) and the server's peak resident memory (VmHWM).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CONFIG = ROOT / "configs/serve/smollm2-135m_nf4_cpu.yaml"


@dataclass
class Tally:
    ttft: list[float] = field(default_factory=list)  # seconds, one per request
    itl: list[float] = field(default_factory=list)  # seconds, between content chunks
    completed: int = 0
    completion_tokens: int = 0
    server_errors: int = 0  # 5xx
    other_errors: list[str] = field(default_factory=list)


def questions() -> list[str]:
    lines = (ROOT / "configs/data/country-facts.jsonl").read_text().splitlines()[:200]
    found = []
    for line in lines:
        record = json.loads(line)
        user = [m for m in record.get("messages", []) if m.get("role") == "user"]
        if user:
            found.append(user[0]["content"])
    return found or ["What is the capital of Norway?"]


async def client_loop(client, models, prompts, max_tokens, stop_at, tally, rng):
    import openai

    while time.monotonic() < stop_at:
        model = models[rng.randrange(len(models))]
        messages = [{"role": "user", "content": rng.choice(prompts)}]
        sent = time.monotonic()
        last = None
        try:
            stream = await client.chat.completions.create(
                model=model,
                messages=messages,
                max_tokens=rng.randint(max_tokens // 4, max_tokens),
                temperature=0.7,
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"ignore_eos": True},
            )
            async for chunk in stream:
                if chunk.usage is not None:
                    tally.completion_tokens += chunk.usage.completion_tokens
                if chunk.choices and chunk.choices[0].delta.content:
                    at = time.monotonic()
                    if last is None:
                        tally.ttft.append(at - sent)
                    else:
                        tally.itl.append(at - last)
                    last = at
            tally.completed += 1
        except openai.APIStatusError as error:
            if error.status_code >= 500:
                tally.server_errors += 1
            else:
                tally.other_errors.append(f"{error.status_code}: {error.message[:200]}")
        except openai.APIError as error:  # an error event mid-stream (timeout, failed step)
            tally.server_errors += 1
            tally.other_errors.append(f"stream: {error.message[:200]}")


def percentiles(values: list[float]) -> dict[str, float]:
    if len(values) < 2:
        return {"p50": float("nan"), "p90": float("nan"), "p99": float("nan")}
    q = statistics.quantiles(values, n=100)
    return {"p50": statistics.median(values), "p90": q[89], "p99": q[98]}


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def write_config(args, folder: Path) -> Path:
    """The shipped serve config with random adapters in place of the trained ones."""
    from bench.throughput import write_random_adapters
    from registry.base_model import resolve_base_model
    from registry.home import setup_environment

    base = resolve_base_model(args.base_model, setup_environment())
    adapters = write_random_adapters(base.path, folder / "adapters", args.adapters, rank=16)
    config = yaml.safe_load(CONFIG.read_text())
    config["adapters"] = {f"adapter-{i}": str(path) for i, path in enumerate(adapters)}
    config["base_model"] = str(base.path) if "/" in args.base_model else args.base_model
    config["quantization"] = args.quantization
    config["audit"] = {"path": str(folder / "audit.jsonl")}
    path = folder / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


async def run_clients(args, url: str, models: list[str]) -> tuple[Tally, float]:
    import httpx
    import openai

    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
    client = openai.AsyncOpenAI(
        base_url=f"{url}/v1",
        api_key="unused",
        max_retries=0,
        timeout=600,
        http_client=httpx.AsyncClient(limits=limits, timeout=600),
    )
    tally, prompts = Tally(), questions()
    start = time.monotonic()
    stop_at = start + args.duration
    await asyncio.gather(
        *(
            client_loop(client, models, prompts, args.max_tokens, stop_at, tally, random.Random(i))
            for i in range(args.clients)
        )
    )
    return tally, time.monotonic() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--duration", type=float, default=60, help="seconds of new requests")
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--base-model", default="smollm2-135m-instruct")
    parser.add_argument("--quantization", default="nf4", choices=["nf4", "fp4", "none"])
    args = parser.parse_args()

    from serve.server_process import served

    with tempfile.TemporaryDirectory() as tmp:
        config = write_config(args, Path(tmp))
        with served(config, Path(tmp) / "server.log") as (url, pid):
            with urllib.request.urlopen(f"{url}/v1/models") as response:
                listed = json.loads(response.read())["data"]
            models = [m["id"] for m in listed if m.get("loaded", True)]
            tally, wall = asyncio.run(run_clients(args, url, models))
            rss = peak_rss_mb(pid)

    result = {
        "clients": args.clients,
        "new_requests_for_s": args.duration,
        "wall_s_with_drain": round(wall, 1),  # the rates below are over this
        "models": len(models),
        "completed": tally.completed,
        "requests_per_s": round(tally.completed / wall, 2),
        "tokens_per_s": round(tally.completion_tokens / wall, 1),
        "ttft_s": {k: round(v, 3) for k, v in percentiles(tally.ttft).items()},
        "itl_ms": {k: round(v * 1000, 1) for k, v in percentiles(tally.itl).items()},
        "server_errors_5xx": tally.server_errors,
        "other_errors": len(tally.other_errors),
        "server_peak_rss_mb": round(rss),
        "cpus": os.cpu_count(),
    }
    for error in tally.other_errors[:5]:
        print("error:", error, file=sys.stderr)
    print(json.dumps(result, indent=2))
    if tally.server_errors:
        raise SystemExit(f"{tally.server_errors} requests got a 5xx")


if __name__ == "__main__":
    main()
