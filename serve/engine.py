"""The engine: requests in, one step at a time, outputs out.

plan = scheduler.schedule()          # who computes how many tokens, which adapter slots
forward = runner.launch(plan)        # one forward pass over all of them, queued on the device
result = runner.sample(plan, forward)  # the next tokens (the host waits for the device here)
scheduler.update(plan, result)       # advance, finish, free
"""

from __future__ import annotations

import itertools
import logging
import operator
import time
from collections.abc import Callable
from pathlib import Path

import torch

from registry.base_model import resolve_base_model, tokenizer_digests
from registry.errors import AdapterError, UsageError
from registry.home import setup_environment
from serve.adapter_catalog import AdapterCatalog, AdapterInfo
from serve.adapter_pool import AdapterPool
from serve.block_allocator import BlockAllocator
from serve.config import EngineConfig
from serve.guided import GuidedDecoding
from serve.kernels import use_triton
from serve.kv_budget import (
    CPU_KV_CACHE_BYTES,
    blocks_of,
    kv_block_bytes,
    measure_kv_bytes,
    worst_case_plan,
)
from serve.llama import LlamaModel
from serve.lora_slots import LoraSlots
from serve.lora_weights import LoraWeights
from serve.model_runner import ModelRunner
from serve.output_processor import OutputProcessor
from serve.outputs import RequestOutput, RequestState
from serve.prompts import text_prompt_ids
from serve.sampler import Sampler
from serve.sampling_params import SamplingParams
from serve.scheduler import Scheduler, SchedulerOutput
from serve.sequence import Sequence, Status
from serve.warmup import warmup_plans

log = logging.getLogger(__name__)


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.device = torch.device(
            ("cuda" if torch.cuda.is_available() else "cpu")
            if config.device == "auto"
            else config.device
        )
        if self.device.type == "cuda" and not torch.cuda.is_available():  # before any loading
            raise UsageError(
                f"device: {config.device!r}, but torch finds no CUDA device here "
                "(use 'auto' or 'cpu')"
            )
        self.home = setup_environment()
        self.base = resolve_base_model(config.base_model, self.home)
        dtype_name = config.dtype
        if dtype_name == "auto":
            dtype_name = "bfloat16" if self.device.type == "cuda" else "float32"
        dtype = getattr(torch, dtype_name)
        triton = use_triton(self.device, config.kernels)  # kernels: attention, LoRA, 4-bit
        if config.cuda_graphs and not triton:
            raise UsageError("cuda_graphs: needs the Triton kernels (kernels 'auto' on CUDA)")

        from transformers import AutoTokenizer, GenerationConfig

        self.tokenizer = AutoTokenizer.from_pretrained(self.base.path)
        self.model = LlamaModel(
            self.base.path,
            dtype=dtype,
            device=self.device,
            quantization=config.quantization,
            double_quant=config.double_quant,
            keep_quantized=(
                self.device.type == "cuda"
                if config.keep_quantized is None
                else config.keep_quantized
            ),
            max_model_len=config.max_model_len,
            use_triton=triton,
        )
        self.eos_token_ids = _eos_ids(self.base.path, self.tokenizer, GenerationConfig)

        shape = self.model.shape
        self.pool = AdapterPool(
            shape, config.max_loras, config.max_lora_rank, config.max_cpu_loras, dtype, self.device
        )
        self.guided = GuidedDecoding(self.tokenizer, shape.vocab_size, self.eos_token_ids)
        self.sampler = Sampler(self.device, config.seed, self.guided)
        self.runner = ModelRunner(
            self.model,
            config.block_size,
            self.pool,
            self.sampler,
            cuda_graphs=config.cuda_graphs,
            max_num_seqs=config.max_num_seqs,
        )
        self.num_blocks = self._num_kv_blocks(kv_block_bytes(shape, config.block_size, dtype))
        self.runner.allocate_kv_cache(self.num_blocks)
        # A lone sequence must always fit in the pool, or preemption could never help it.
        self.max_model_len = min(self.model.max_model_len, self.num_blocks * config.block_size)
        self._context_set_by = (  # named where a prompt is too long for it
            "max_model_len"
            if self.max_model_len == config.max_model_len
            else f"the model's {shape.context_limit}"
            if self.max_model_len == shape.max_context
            else "the KV pool's size"
        )
        self.warmup_seconds = self._warm_up() if config.warmup and triton else 0.0

        self.allocator = BlockAllocator(
            self.num_blocks, config.block_size, config.enable_prefix_caching
        )
        self.slots = LoraSlots(config.max_loras)
        self.catalog = AdapterCatalog(
            self.pool,
            self.slots,
            self.base.fingerprint,
            tokenizer_digests(self.tokenizer),
            config.tracking_uri,
            self.home,
        )
        self.scheduler = Scheduler(
            self.allocator, self.slots, config.max_num_seqs, config.max_num_batched_tokens
        )
        self.outputs = OutputProcessor(self.sampler)
        self.num_aborted = 0  # requests aborted before they finished
        self._ids = itertools.count()
        # Outputs of a step made during the next one's forward pass: on CUDA, where it runs
        # while the host works; on CPU it would only delay every output by a step.
        self.overlap_outputs = (
            self.device.type == "cuda" if config.overlap_outputs is None else config.overlap_outputs
        )

    def _num_kv_blocks(self, block_bytes: int) -> int:
        """As configured; on CUDA by default, what the GPU has left after the largest step."""
        config = self.config
        if config.num_kv_blocks is not None:
            return config.num_kv_blocks
        if config.kv_cache_memory_gb is not None:
            size = int(config.kv_cache_memory_gb * 2**30)
        elif self.device.type == "cuda":
            size = measure_kv_bytes(self.device, config.gpu_memory_utilization, self._profile)
        else:
            size = CPU_KV_CACHE_BYTES
        return max(1, size // block_bytes)

    def _profile(self) -> int:
        """Run the largest step the scheduler can plan, over a scratch pool it then frees;
        returns the pool's bytes."""
        config = self.config
        plan = worst_case_plan(
            config.max_num_batched_tokens,
            config.max_num_seqs,
            config.block_size,
            self.model.max_model_len,
            lora_slot=0,  # every module's LoRA runs (slots start as zeros)
        )
        self.runner.allocate_kv_cache(blocks_of(plan), graphs=False)  # an eager step
        self.runner.execute(plan)
        for seq in plan.seqs:
            self.sampler.forget(seq.request_id)
        scratch = self.runner.kv_cache.nbytes
        self.runner.free_kv_cache()
        return scratch

    def _warm_up(self) -> float:
        """Compile the kernels over scratch steps before any request; returns the seconds."""
        config = self.config
        t0 = time.perf_counter()
        plans = warmup_plans(
            config.max_num_seqs,
            config.max_num_batched_tokens,
            self.max_model_len,
            config.max_loras,
            config.block_size,
            scratch_block=self.num_blocks,
        )
        self.runner.warm_up(plans)
        seconds = time.perf_counter() - t0
        log.info("compiled the kernels over %d warm-up steps in %.1f s", len(plans), seconds)
        return seconds

    # -- adapters ----------------------------------------------------------------------------

    def load_adapter(self, name: str, source: str) -> AdapterInfo:
        """Load (or replace) adapter `name` from a registry REF or a PEFT folder.

        Requests already running keep the version they started with.
        """
        return self.install_adapter(self.catalog.read(name, source))

    def read_adapter(self, name: str, source: str) -> tuple[AdapterInfo, LoraWeights]:
        """The slow half of loading (`AdapterCatalog.read`): touches no engine state."""
        return self.catalog.read(name, source)

    def install_adapter(self, loaded: tuple[AdapterInfo, LoraWeights]) -> AdapterInfo:
        """The quick half: make a read adapter available to new requests."""
        info = self.catalog.install(loaded)
        self._drop_unused_adapters()
        return info

    def unload_adapter(self, name: str) -> None:
        self.catalog.unload(name)
        self._drop_unused_adapters()

    def _drop_unused_adapters(self) -> None:
        """Versions no name serves and no request holds leave the pool: a server that loads
        new versions for weeks would otherwise keep a record of each (one replaced while
        requests still run on it goes at a later load or unload)."""
        live = {info.uid for info in self.catalog.by_name.values()}
        live |= {state.seq.adapter_uid for state in self.requests.values()}
        self.pool.retain(live)

    @property
    def adapters(self) -> dict[str, AdapterInfo]:
        """The loaded adapters by the name requests call them."""
        return self.catalog.by_name

    # -- requests ----------------------------------------------------------------------------

    @property
    def requests(self) -> dict[str, RequestState]:
        """The requests held, by id: from `add_request` until their last output is made."""
        return self.outputs.requests

    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        adapter: str | None = None,
        request_id: str | None = None,
        adapter_uid: str | None = None,
    ) -> str:
        """Queue a request; returns its id. Bad input raises before anything is queued.

        `adapter_uid` (an `AdapterInfo.uid` read earlier) pins the adapter's version, so that
        the choices of one reply run on one version even if `adapter` is replaced or unloaded
        meanwhile."""
        params = params or SamplingParams()
        if request_id is None:  # the next free one: a caller may have taken "req-N" itself
            request_id = next(i for i in map("req-{}".format, self._ids) if i not in self.requests)
        if request_id in self.requests:
            raise UsageError(f"request id {request_id!r} is already in use")
        uid = self.catalog.uid_of(adapter, adapter_uid)
        if isinstance(prompt, str):
            prompt_ids = text_prompt_ids(self.tokenizer, prompt)
        else:
            try:  # token ids: ints (numpy's too), never floats or strings
                prompt_ids = [operator.index(t) for t in prompt]
            except TypeError:
                raise UsageError("prompt token ids must be integers", param="prompt") from None
        if not prompt_ids:
            raise UsageError("prompt is empty", param="prompt")
        if len(prompt_ids) >= self.max_model_len:
            raise UsageError(
                f"prompt has {len(prompt_ids)} tokens; the context length is "
                f"{self.max_model_len} (set by {self._context_set_by}), with room for at least "
                "one output token",
                param="prompt",
            )
        vocab = self.model.shape.vocab_size
        if any(not 0 <= t < vocab for t in prompt_ids):
            raise UsageError("prompt holds token ids outside the vocabulary", param="prompt")
        if any(t >= vocab for t, _ in params.logit_bias):
            message = f"logit_bias holds token ids outside the vocabulary of {vocab}"
            raise UsageError(message, param="logit_bias")
        if params.response_format is not None:  # last check: it holds state for the request
            self.guided.start(request_id, params.response_format)
        seq = Sequence(
            request_id,
            prompt_ids,
            len(prompt_ids),
            params,
            adapter=adapter,
            adapter_uid=uid,
            eos_token_ids=self.eos_token_ids,
            max_model_len=self.max_model_len,
        )
        self.outputs.add(RequestState(seq, self.tokenizer))
        self.scheduler.add(seq)
        return request_id

    def abort(self, request_id: str) -> RequestOutput | None:
        """End a request now: its last output (finish reason "abort", with what it generated).
        None where there is none of that id, or it finished and its last output is still to
        come (with overlapped outputs, from the next step)."""
        state = self.requests.get(request_id)
        if state is None or (state.seq.is_finished and self.outputs.output_due(state.seq)):
            return None
        return self._end(request_id)

    def abort_cut(self) -> list[str]:
        """After a step raised: end the requests it may have cut (see
        `OutputProcessor.cut_by_failed_step`) and return their ids."""
        cut = self.outputs.cut_by_failed_step()
        for request_id in cut:
            try:
                self._end(request_id)
            except Exception:  # its own output fails again (a bug): released all the same
                log.exception("request %s: its last output failed; released without it", request_id)
        return cut

    def _end(self, request_id: str) -> RequestOutput:
        state = self.requests[request_id]
        unfinished = not state.seq.is_finished  # else its finish reason stands
        try:
            self.outputs.abort(request_id)  # forgets it, its text caught up
        finally:  # released even where catching up fails (a bug in its output)
            self.scheduler.finish(state.seq, Status.FINISHED_ABORTED)
            if unfinished:
                self.num_aborted += 1
        return state.output()

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished or self.outputs.has_outputs

    def step(
        self, deliver: Callable[[list[RequestOutput]], None] | None = None
    ) -> list[RequestOutput]:
        """Run one iteration; outputs of the requests that produced a token or finished.

        With `overlap_outputs` they are the previous step's: made (detokenized, stop strings
        searched) while the device computes this step's forward pass, which the host would
        otherwise wait on. A stop string found then ends its sequence a step late: the token
        computed for it meanwhile is dropped. `deliver`, if given, gets the outputs as soon as
        they are made (a server streams them before the step ends) and the step returns none.
        """
        plan = self.scheduler.schedule()
        try:
            if plan.lora_loads:
                plan = self._without_unreadable_adapters(plan)
            forward = None if plan.is_empty else self.runner.launch(plan)
            if forward is None:  # nothing launched, its copies neither (all its requests failed)
                self.slots.unfill(slot for slot, _ in plan.lora_loads)
        except BaseException:
            # The plan's copies into slots may not have happened: no slot may claim them.
            self.slots.unfill(slot for slot, _ in plan.lora_loads)
            raise
        self._make_outputs()  # the last step's when overlapping, while the device computes
        if forward is not None:
            if deliver is not None and (made := self.outputs.take()):
                deliver(made)
            result = self.runner.sample(plan, forward)
            self.scheduler.update(plan, result.sampled)
            for seq, token in zip(plan.seqs, result.sampled, strict=True):
                if token is not None and self.guided.finished(seq):  # the JSON is complete
                    self.scheduler.finish(seq, Status.FINISHED_STOPPED)
            self.outputs.pending = (plan, result)
            if not self.overlap_outputs:
                self._make_outputs()
        made = self.outputs.take()
        if deliver is None:
            return made
        if made:
            deliver(made)
        return []

    def _make_outputs(self) -> None:
        """The pending step's outputs, its sequences that stop strings ended finished first;
        a request whose own output fails ends with the error, the others go on."""
        stopped, failed = self.outputs.read()
        for seq in stopped:
            self.scheduler.finish(seq, Status.FINISHED_STOPPED)
        for seq in failed + self.outputs.make():
            self.scheduler.finish(seq, Status.FINISHED_ERROR)

    def _without_unreadable_adapters(self, plan: SchedulerOutput) -> SchedulerOutput:
        """The plan without the sequences of adapters the host tier evicted and cannot read
        back (their folder deleted or rewritten since): those requests end with the error,
        the others run."""
        failed = {}
        for _, uid in plan.lora_loads:
            try:
                self.pool.weights(uid)  # read back into the host tier now, if evicted
            except AdapterError as error:
                failed[uid] = error
            except Exception as error:  # the disk's, or the reader's own: this adapter's alone
                failed[uid] = AdapterError(f"adapter {uid!r}: cannot read it back: {error!r}")
        if not failed:
            return plan
        for error in failed.values():  # whole here: a server's client is told less
            log.error("%s; its requests end", error)
        self.slots.unfill(slot for slot, uid in plan.lora_loads if uid in failed)
        for seq in [*plan.seqs, *self.scheduler.waiting]:
            if seq.adapter_uid in failed:
                self.scheduler.finish(seq, Status.FINISHED_ERROR)
                self.outputs.fail(seq, failed[seq.adapter_uid])
        keep = [i for i, seq in enumerate(plan.seqs) if seq.adapter_uid not in failed]
        return SchedulerOutput(
            seqs=[plan.seqs[i] for i in keep],
            num_new_tokens=[plan.num_new_tokens[i] for i in keep],
            lora_slots=[plan.lora_slots[i] for i in keep],
            lora_loads=[(slot, uid) for slot, uid in plan.lora_loads if uid not in failed],
            preempted=plan.preempted,
        )

    # -- stats -------------------------------------------------------------------------------

    @property
    def stats(self) -> dict[str, float]:
        a, s = self.allocator, self.scheduler
        return {
            "running": len(s.running),
            "waiting": len(s.waiting),
            "kv_blocks_used": a.num_used_blocks,
            "kv_blocks_total": a.num_blocks,
            "prefix_cache_hit_blocks": s.prefix_hit_blocks,
            "prefix_cache_query_blocks": s.prefix_query_blocks,
            "preemptions": s.num_preemptions,
            "requests_aborted": self.num_aborted,
            "adapter_slot_loads": self.slots.loads,
            "adapter_slot_hits": self.slots.hits,
            "adapter_slot_evictions": self.slots.evictions,
            "adapter_host_evictions": self.pool.host_evictions,
        }


def _eos_ids(path: Path, tokenizer, generation_config_cls) -> frozenset[int]:
    ids = set()
    try:
        eos = generation_config_cls.from_pretrained(path).eos_token_id
        ids.update([eos] if isinstance(eos, int) else eos or [])
    except OSError:
        pass
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)
