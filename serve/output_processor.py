"""The requests the engine holds and their outputs: made from a step's result (detokenized,
stop strings searched), kept in an outbox until the caller takes them.

It never touches the scheduler: the engine ends the sequences it names (stop strings found,
aborts), then has their outputs made; a request whose own output fails gets its error output
here, and the engine ends its sequence after."""

from __future__ import annotations

import logging

from serve.model_runner import RunnerOutput
from serve.outputs import RequestOutput, RequestState
from serve.sampler import Sampler
from serve.scheduler import SchedulerOutput
from serve.sequence import Sequence, Status

log = logging.getLogger(__name__)


class OutputProcessor:
    def __init__(self, sampler: Sampler):
        self.sampler = sampler
        self.requests: dict[str, RequestState] = {}  # by request id, until finished and output
        self.pending: tuple[SchedulerOutput, RunnerOutput] | None = None  # outputs not yet made
        self._outbox: list[RequestOutput] = []  # outputs made, not yet taken

    @property
    def has_outputs(self) -> bool:
        """Outputs still to make or to take."""
        return self.pending is not None or bool(self._outbox)

    def add(self, state: RequestState) -> None:
        self.requests[state.seq.request_id] = state

    def abort(self, request_id: str) -> None:
        """Forget a request, to end it without a step's output, its state caught up with the
        pending step's result for it (the text and logprob of the token that step sampled),
        so that the state's output holds all it generated."""
        state = self.forget(request_id)
        if state is not None and (row := self._due_row(state.seq)) is not None:
            result = self.pending[1]
            state.update(result.logprobs[row], result.prompt_logprobs[row])

    def forget(self, request_id: str) -> RequestState | None:
        """Drop a request's state and its sampler state; the state (None if not held)."""
        self.sampler.forget(request_id)
        return self.requests.pop(request_id, None)

    def output_due(self, seq: Sequence) -> bool:
        """Whether the pending step has a result of `seq` still to output."""
        return self._due_row(seq) is not None

    def _due_row(self, seq: Sequence) -> int | None:
        if self.pending is None:
            return None
        return next((i for i, s in enumerate(self.pending[0].seqs) if s is seq), None)

    def fail(self, seq: Sequence, error: Exception) -> None:
        """Output a request the engine ends with `error` (finish reason "error")."""
        state = self.forget(seq.request_id)
        self._outbox.append(state.failed_output(error))

    def _failed(self, state: RequestState, error: Exception) -> Sequence:
        """A request whose own output failed (a bug of ours in detokenizing, stop strings or
        logprobs of its tokens) ends alone with the error; the step's others go on."""
        log.error("request %s: its output failed; ended", state.seq.request_id, exc_info=error)
        self.fail(state.seq, error)
        return state.seq

    def cut_by_failed_step(self) -> list[str]:
        """The requests a step that raised may have cut: those running, and those it finished
        before their last output was made (no step would make it). Waiting ones, and finished
        ones whose output is pending (the next step makes it), go on."""
        return [
            request_id
            for request_id, state in self.requests.items()
            if state.seq.status is Status.RUNNING
            or (state.seq.is_finished and not self.output_due(state.seq))
        ]

    def read(self) -> tuple[list[Sequence], list[Sequence]]:
        """Detokenize the pending step's result and search its stop strings. Returns, for the
        engine to finish before `make`, the sequences a stop string ended (also with the last
        token allowed) and those whose own output failed (their error output made)."""
        if self.pending is None:
            return [], []
        plan, result = self.pending
        stopped, failed = [], []
        for i, state in self._held(plan):
            try:
                state.update(result.logprobs[i], result.prompt_logprobs[i])
            except Exception as error:
                failed.append(self._failed(state, error))
                continue
            if state.stopped_by_string:
                stopped.append(state.seq)
        return stopped, failed

    def make(self) -> list[Sequence]:
        """The outputs of the pending step's result, once `read`, into the outbox; forgets
        finished requests. Returns those whose own output failed, for the engine to finish."""
        if self.pending is None:
            return []
        (plan, result), self.pending = self.pending, None
        failed = []
        for i, state in self._held(plan):
            seq = state.seq
            if result.sampled[i] is not None or seq.is_finished:
                try:
                    output = state.output()
                except Exception as error:
                    failed.append(self._failed(state, error))
                    continue
                self._outbox.append(output)
            if seq.is_finished:
                self.forget(seq.request_id)
        return failed

    def _held(self, plan: SchedulerOutput):
        """(row, request state) of the plan's sequences whose requests are still held."""
        for i, seq in enumerate(plan.seqs):
            state = self.requests.get(seq.request_id)
            if state is not None and state.seq is seq:  # else aborted (its id perhaps reused)
                yield i, state

    def take(self) -> list[RequestOutput]:
        # Kept until taken: a step that fails after making them loses none.
        outputs, self._outbox = self._outbox, []
        return outputs
