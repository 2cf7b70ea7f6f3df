"""The requests the engine holds and their outputs: made from a step's result (detokenized,
stop strings searched), kept in an outbox until the caller takes them."""

from __future__ import annotations

from serve.model_runner import RunnerOutput
from serve.outputs import RequestOutput, RequestState
from serve.sampler import Sampler
from serve.scheduler import Scheduler, SchedulerOutput
from serve.sequence import Sequence, Status


class OutputProcessor:
    def __init__(self, scheduler: Scheduler, sampler: Sampler):
        self.scheduler = scheduler
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

    def abort(self, request_id: str) -> bool:
        """End a request without an output; False if the engine does not hold it."""
        state = self.requests.pop(request_id, None)
        if state is None:
            return False
        self.scheduler.finish(state.seq, Status.FINISHED_ABORTED)
        self.sampler.forget(request_id)
        return True

    def fail(self, seq: Sequence, error: str) -> None:
        """End a request with `error` (finish reason "error") and output it."""
        state = self.requests.pop(seq.request_id)
        self.scheduler.finish(seq, Status.FINISHED_ERROR)
        self.sampler.forget(seq.request_id)
        state.error = error
        self._outbox.append(state.output(seq.adapter))

    def cut_by_failed_step(self) -> list[str]:
        """The requests a step that raised may have cut: those running, and those it finished
        before their last output was made (no step would make it). Waiting ones, and finished
        ones whose output is pending (the next step makes it), go on."""
        pending = {id(seq) for seq in self.pending[0].seqs} if self.pending else set()
        return [
            request_id
            for request_id, state in self.requests.items()
            if state.seq.status is Status.RUNNING
            or (state.seq.is_finished and id(state.seq) not in pending)
        ]

    def make(self) -> None:
        """The outputs of the pending step's result, into the outbox; ends sequences on stop
        strings and forgets finished requests."""
        if self.pending is None:
            return
        (plan, result), self.pending = self.pending, None
        for i, seq in enumerate(plan.seqs):
            state = self.requests.get(seq.request_id)
            if state is None or state.seq is not seq:  # aborted (its id perhaps reused since)
                continue
            state.update(result.logprobs[i], result.prompt_logprobs[i])
            if state.stopped_by_string:  # also when the stop came with the last token allowed
                self.scheduler.finish(seq, Status.FINISHED_STOPPED)
            if result.sampled[i] is not None or seq.is_finished:
                self._outbox.append(state.output(seq.adapter))
            if seq.is_finished:
                del self.requests[seq.request_id]
                self.sampler.forget(seq.request_id)

    def take(self) -> list[RequestOutput]:
        # Kept until taken: a step that fails after making them loses none.
        outputs, self._outbox = self._outbox, []
        return outputs
