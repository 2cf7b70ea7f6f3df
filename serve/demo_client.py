"""Start `loraplex serve`, ask adapters one question each with the openai client, stop it.

    python -m serve.demo_client configs/serve/X.yaml "ADAPTER=QUESTION" ...

The last step of `make demo`: the trained adapters answering over the OpenAI API.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from serve.server_process import served


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path, help="serve YAML")
    parser.add_argument("questions", nargs="+", help="ADAPTER=QUESTION")
    parser.add_argument("--max-tokens", type=int, default=96)
    args = parser.parse_args()
    asked = []
    for item in args.questions:
        model, sep, question = item.partition("=")
        if not sep:
            parser.error(f"{item!r}: expected ADAPTER=QUESTION")
        asked.append((model, question))

    import openai

    with tempfile.TemporaryDirectory() as tmp, served(args.config, Path(tmp) / "log") as (url, _):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
        print(f"loraplex serve is up at {url}/v1")
        for model, question in asked:
            reply = client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": question}],
                max_tokens=args.max_tokens,
                temperature=0,
            )
            print(f"\n[{model}] {question}\n{reply.choices[0].message.content}")


if __name__ == "__main__":
    main()
