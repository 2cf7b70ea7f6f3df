"""Executes a scheduler plan: one forward pass over every scheduled token, then sampling.

The runner owns the tensors (weights, the K/V pool, adapter slots) and never the queues.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from serve.adapter_pool import AdapterPool
from serve.attention import AttentionMetadata, build_attention_metadata
from serve.cuda_graph import DecodeGraphs
from serve.guided import GuidedMasks
from serve.llama import LlamaModel
from serve.lora_ops import LoraBatch
from serve.sampler import Sampler, TokenLogprobs, token_logprobs
from serve.scheduler import SchedulerOutput

log = logging.getLogger(__name__)


@dataclass
class ForwardContext:
    """Per-step metadata the layers read, passed explicitly (no globals)."""

    attention: AttentionMetadata  # positions, cache slots, block tables of the step
    lora: LoraBatch | None  # how LoRA applies this step; None when no sequence has an adapter


@dataclass
class Forward:
    """A step's forward pass, queued on the device."""

    hidden: torch.Tensor  # [tokens, hidden] last hidden states of the step's tokens
    computed: list[int]  # tokens each plan sequence had computed before the step
    masks: GuidedMasks | None  # grammar masks of the sequences it samples, if any is guided


@dataclass
class RunnerOutput:
    sampled: list[int | None]  # next token of each plan sequence that caught up; None otherwise
    logprobs: list[TokenLogprobs | None]  # of the sampled token, when the request asked
    # prompt tokens scored this step: (position, logprobs) per plan sequence that asked
    prompt_logprobs: list[list[tuple[int, TokenLogprobs]]]


class ModelRunner:
    def __init__(
        self,
        model: LlamaModel,
        block_size: int,
        pool: AdapterPool,
        sampler: Sampler,
        *,
        cuda_graphs: bool = False,
        max_num_seqs: int = 1,
    ):
        self.model = model
        self.block_size = block_size
        self.pool = pool
        self.sampler = sampler
        self.cuda_graphs = cuda_graphs
        self.max_num_seqs = max_num_seqs
        self.kv_cache: torch.Tensor | None = None  # allocate_kv_cache() sizes it
        self.graphs: DecodeGraphs | None = None

    def allocate_kv_cache(self, num_blocks: int, graphs: bool = True) -> None:
        """A zeroed K/V pool of `num_blocks` blocks, replacing any before it (with the decode
        graphs, which keep its address; `graphs` False: none, as for a profile run)."""
        s = self.model.shape
        self.free_kv_cache()  # before the new pool is allocated
        # [layers, K/V, slots, kv_heads, head_dim]; slot = block * block_size + offset. One
        # block past the allocator's is scratch: padding rows of a decode graph write there.
        self.kv_cache = torch.zeros(
            s.num_layers,
            2,
            (num_blocks + 1) * self.block_size,
            s.num_kv_heads,
            s.head_dim,
            dtype=self.model.dtype,
            device=self.model.device,
        )
        if self.cuda_graphs and graphs:
            self.graphs = DecodeGraphs(
                self._forward,
                self.model.device,
                self.block_size,
                num_blocks,
                self.model.max_model_len,
                self.max_num_seqs,
            )
            if self.graphs.capture:
                t0 = time.perf_counter()
                self.graphs.capture_all(with_lora=True)
                log.info(
                    "captured %d decode CUDA graphs in %.1f s",
                    len(self.graphs.steps),
                    time.perf_counter() - t0,
                )

    def free_kv_cache(self) -> None:
        self.kv_cache = self.graphs = None

    def _forward(self, ids: torch.Tensor, attention: AttentionMetadata, lora: LoraBatch | None):
        ctx = ForwardContext(attention, lora)
        return self.model.forward(ids, ctx, self.kv_cache, self.pool)

    def execute(self, plan: SchedulerOutput) -> RunnerOutput:
        return self.sample(plan, self.launch(plan))

    @torch.inference_mode()
    def launch(self, plan: SchedulerOutput) -> Forward:
        """Queue the step's forward pass on the device; returns without waiting for it."""
        seqs, new = plan.seqs, plan.num_new_tokens
        computed = [s.num_computed_tokens for s in seqs]
        ids = [
            t for s, c, n in zip(seqs, computed, new, strict=True) for t in s.token_ids[c : c + n]
        ]
        # Adapter copies are queued last before the forward: the inputs' copies from pageable
        # memory would make the host wait for them (milliseconds) before launching anything.
        if self.graphs is not None and self.graphs.fits(new):
            tables = [s.block_table for s in seqs]
            prepared = self.graphs.prepare(ids, tables, computed, plan.lora_slots)
            self._load_slots(plan)
            hidden = self.graphs.replay(*prepared)
        else:
            inputs = self._eager_inputs(plan, ids, computed)
            self._load_slots(plan)
            hidden = self._forward(*inputs)
        # While the device computes: the host's share of sampling (grammar masks).
        ready = [s for s, c, n in zip(seqs, computed, new, strict=True) if c + n == s.num_tokens]
        return Forward(hidden, computed, self.sampler.prepare(ready))

    def warm_up(self, plans: list[SchedulerOutput]) -> None:
        """Run the forward passes of `plans` (serve.warmup: steps over the scratch block) and
        wait for them; their results are dropped, nothing else in the pool is written."""
        for plan in plans:
            self.launch(plan)
        if self.model.device.type == "cuda":
            torch.cuda.synchronize(self.model.device)

    def _load_slots(self, plan: SchedulerOutput) -> None:
        for slot, uid in plan.lora_loads:
            self.pool.load_slot(slot, uid)

    @torch.inference_mode()
    def sample(self, plan: SchedulerOutput, forward: Forward) -> RunnerOutput:
        """The next token of each sequence that caught up, and the logprobs asked for. A
        sequence that finished since the forward pass (a stop string found meanwhile) gets
        none."""
        seqs, new, device = plan.seqs, plan.num_new_tokens, self.model.device
        hidden, computed = forward.hidden, forward.computed
        ends = torch.tensor(new).cumsum(0) - 1  # last token of each sequence in the batch
        samples = [
            i
            for i, s in enumerate(seqs)
            if computed[i] + new[i] == s.num_tokens and not s.is_finished
        ]
        sampled: list[int | None] = [None] * len(seqs)
        logprobs: list[TokenLogprobs | None] = [None] * len(seqs)
        if samples:
            logits = self.model.logits(hidden.index_select(0, ends[samples].to(device)))
            tokens, chosen = self.sampler(logits, [seqs[i] for i in samples], forward.masks)
            for i, token, lp in zip(samples, tokens, chosen, strict=True):
                sampled[i], logprobs[i] = token, lp
        return RunnerOutput(sampled, logprobs, self._prompt_logprobs(plan, computed, hidden))

    def _eager_inputs(self, plan: SchedulerOutput, ids: list[int], computed: list[int]):
        """The forward pass's inputs for the model as it is: any mix of prefill chunks and
        decodes."""
        seqs, new, device = plan.seqs, plan.num_new_tokens, self.model.device
        kernels = self.model.use_triton  # the kernels read compact tables, not padded batches
        attention = build_attention_metadata(
            [s.block_table for s in seqs],
            computed,
            new,
            self.block_size,
            device,
            padded_groups=not kernels,
        )
        lora = LoraBatch.build(plan.lora_slots, new, device, kernel=kernels)
        return torch.tensor(ids, device=device), attention, lora

    def _prompt_logprobs(self, plan, computed, hidden) -> list[list[tuple[int, TokenLogprobs]]]:
        """Log-probability of each prompt token after the first, for requests that ask.

        The hidden state at position p scores the token at p + 1.
        """
        out: list[list[tuple[int, TokenLogprobs]]] = []
        start = 0
        for seq, c, n in zip(plan.seqs, computed, plan.num_new_tokens, strict=True):
            scored = []
            wanted = seq.params.prompt_logprobs
            # positions c .. last-1 score a prompt token
            last = min(c + n, seq.num_prompt_tokens - 1)
            if wanted is not None and last > c and not seq.is_finished:
                logprobs = self.model.logits(hidden[start : start + last - c]).log_softmax(-1)
                targets = seq.token_ids[c + 1 : last + 1]
                scored = list(
                    enumerate(token_logprobs(logprobs, targets, [wanted] * len(targets)), c + 1)
                )
            out.append(scored)
            start += n
        return out
