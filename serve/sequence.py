"""A request as the engine tracks it: its tokens, how many have KV in the cache, its blocks."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from serve.sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"  # EOS, a stop token or a stop string
    FINISHED_LENGTH = "length"  # max_tokens or the context length
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"  # the engine could not serve it (RequestOutput.error says why)

    @property
    def finished(self) -> bool:
        return self not in (Status.WAITING, Status.RUNNING)


@dataclass(eq=False)
class Sequence:
    """One request. Every count is derived from `token_ids` and `num_computed_tokens`.

    There are no prefill and decode modes: the scheduler lets `num_computed_tokens` catch up
    with `num_tokens`, a chunk per step; a sequence samples when it has caught up.
    """

    request_id: str
    token_ids: list[int]  # prompt then output
    num_prompt_tokens: int
    params: SamplingParams
    adapter: str | None = None  # loaded adapter name; None for the base model
    adapter_uid: str | None = None  # name and version: the prefix-cache and slot key
    eos_token_ids: frozenset[int] = frozenset()
    max_model_len: int = 8192
    arrival_time: float = field(default_factory=time.monotonic)
    status: Status = Status.WAITING
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    num_cached_tokens: int = 0  # of the prompt, found in the prefix cache at admission
    num_passed: int = 0  # later sequences that took an adapter slot while it waited for one
    num_preemptions: int = 0  # times its blocks were taken back (it is then recomputed)
    block_table: list[int] = field(default_factory=list)  # KV block ids, in position order

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    @property
    def ended_on_stop_token(self) -> bool:
        """Whether its last token is the EOS or stop token that ended it (whose text is left
        out of the output unless `include_stop_str_in_output`, as in vLLM)."""
        if self.status is not Status.FINISHED_STOPPED or not self.num_output_tokens:
            return False
        return self._stops(self.token_ids[-1])

    def _stops(self, token_id: int) -> bool:
        """Whether sampling `token_id` ends the sequence (EOS unless ignored, a stop token)."""
        params = self.params
        is_eos = not params.ignore_eos and token_id in self.eos_token_ids
        return is_eos or token_id in params.stop_token_ids

    def append_token(self, token_id: int) -> None:
        """Add a sampled token and finish the sequence if it ends here."""
        self.token_ids.append(token_id)
        if self._stops(token_id):
            self.status = Status.FINISHED_STOPPED
        elif (
            self.num_output_tokens >= self.params.max_tokens
            or self.num_tokens >= self.max_model_len
        ):
            self.status = Status.FINISHED_LENGTH
