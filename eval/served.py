"""The gate's models asked through a running server: `loraplex gate ... --server URL`.

What production serves is then what is gated: the server's base, quantization and kernels.
The server must score prompts (completions with `echo` and `logprobs`) and load candidate and
baseline by registry reference on first use, as `loraplex serve` does on the same registry.
Its base is the model it lists without a parent.
"""

from __future__ import annotations

import asyncio

from registry.errors import UsageError
from registry.store import AdapterVersion
from serve.prompts import text_prompt_ids


class ServedModels:
    """Models named by their gate role, asked as `served[role]` (None: the server's base)."""

    def __init__(
        self,
        url: str,
        api_key: str | None,
        tokenizer,
        served: dict[str, AdapterVersion],
        concurrency: int = 8,
    ):
        url = url.rstrip("/")
        self.url = url if url.endswith("/v1") else f"{url}/v1"
        self.api_key = api_key or "unused"
        self.tokenizer = tokenizer  # the base's, to encode prompts as the server would
        self.versions = served
        self.served = {role: v.ref for role, v in served.items()}
        self.concurrency = concurrency
        self._checked = False

    def prompt_logprobs(self, prompts, models):
        async def score(client, prompt, model):
            reply = await client.completions.create(
                model=model, prompt=prompt, max_tokens=1, temperature=0, echo=True, logprobs=0
            )
            if reply.usage.prompt_tokens != len(prompt) or not reply.choices[0].logprobs:
                raise UsageError(
                    f"server {self.url} did not score the prompt's {len(prompt)} tokens "
                    "(completions with echo and logprobs)"
                )
            return reply.choices[0].logprobs.token_logprobs[: len(prompt)]

        calls = [(score, prompt, model) for prompt, model in zip(prompts, models, strict=True)]
        return self._run(calls, "scoring prompts")

    def answers(self, conversations, max_tokens, models):
        async def answer(client, messages, model):
            reply = await client.chat.completions.create(
                model=model, messages=messages, max_tokens=max_tokens, temperature=0
            )
            return reply.choices[0].message.content or ""

        calls = [(answer, c, m) for c, m in zip(conversations, models, strict=True)]
        return self._run(calls, "answering")

    def _run(self, calls: list[tuple], desc: str) -> list:
        """Each (coroutine function, input, role) with the client and the role's served name,
        `concurrency` at a time; results in order. A refusal is a usage error naming it."""
        import openai
        from tqdm import tqdm

        async def main():
            async with openai.AsyncOpenAI(base_url=self.url, api_key=self.api_key) as client:
                names = {**self.served, None: await self._base(client)}
                if not self._checked:
                    await self._check_versions(client)
                    self._checked = True
                limit = asyncio.Semaphore(self.concurrency)
                with tqdm(total=len(calls), desc=desc, unit="request") as bar:

                    async def one(fn, value, role):
                        async with limit:
                            result = await fn(client, value, names[role])
                        bar.update(1)
                        return result

                    return await asyncio.gather(*(one(*call) for call in calls))

        try:
            return asyncio.run(main())
        except openai.APIConnectionError as error:
            raise UsageError(f"server {self.url}: cannot connect ({error})") from None
        except openai.APIStatusError as error:
            raise UsageError(f"server {self.url}: {error.status_code} {error.message}") from None

    async def _check_versions(self, client) -> None:
        """Refuse a server on another registry: what it loads under each reference must be
        the version the gate's registry holds (its number and the hash of its data)."""
        prompt = text_prompt_ids(self.tokenizer, "a")
        for role, ref in self.served.items():
            await client.completions.create(model=ref, prompt=prompt, max_tokens=1)  # loads it
            entry = (await client.models.retrieve(ref)).model_dump()
            version = self.versions[role]
            served = (entry.get("version"), entry.get("data_hash"))
            expected = (version.version, version.tags.get("data_hash"))
            if served != expected:
                raise UsageError(
                    f"server {self.url} serves {ref} as version {served[0]} trained on data "
                    f"{served[1]}, but the gate's registry holds version {expected[0]} trained "
                    f"on {expected[1]}: point the server and the gate at the same registry"
                )

    async def _base(self, client) -> str:
        listed = await client.models.list()
        bases = [m.id for m in listed.data if getattr(m, "parent", None) is None]
        if len(bases) != 1:
            raise UsageError(f"server {self.url}: cannot tell its base model among {bases}")
        return bases[0]
