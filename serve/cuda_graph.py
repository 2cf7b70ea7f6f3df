"""Decode steps replayed as CUDA graphs, one per padded batch size (and with or without LoRA).

A step where every sequence computes one token launches some 25 kernels per layer; on a GPU
their host-side launch cost exceeds the step's memory traffic (bench/gpu_notes.md). A graph
records the launches once and replays them in one call. It replays fixed shapes at fixed
addresses, so a step is padded to the next captured batch size and its inputs are copied into
static buffers the graph reads: token ids, positions, cache slots, block tables, context
lengths and the LoRA segment table. A padding row is a one-token sequence without an adapter
whose K/V goes to a scratch block no sequence owns, and which attends to that alone.

Capture needs the Triton kernels (the reference ops build host-side masks per step). Off
CUDA, `DecodeGraphs` runs the same padded step eagerly: that is how the padding is tested.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable

import torch

from serve.attention import AttentionMetadata, build_attention_metadata
from serve.lora_ops import LoraBatch, segments_of


def batch_sizes(max_num_seqs: int) -> list[int]:
    """The captured sizes: 1, 2, 4, then every multiple of 8 up to max_num_seqs (and it)."""
    sizes = [b for b in (1, 2, 4) if b < max_num_seqs]
    sizes += list(range(8, max_num_seqs, 8))
    return [*sizes, max_num_seqs]


class _Staged:
    """Tensors of the given shapes packed in one device buffer, with a page-locked host twin
    of the same layout (on CUDA): `send` moves them all in one copy the host need not wait for.

    From pageable memory each of a step's six inputs would be a copy that blocks the host
    until the device has finished the step before (bench/gpu_notes.md, v8)."""

    def __init__(self, shapes: list[tuple[int, ...]], dtype: torch.dtype, device):
        size = sum(math.prod(shape) for shape in shapes)
        cuda = torch.device(device).type == "cuda"
        self.host = torch.zeros(size, dtype=dtype, pin_memory=cuda)
        self.device = torch.zeros(size, dtype=dtype, device=device)
        self.host_views = _views(self.host, shapes)
        self.device_views = _views(self.device, shapes)
        self.sent = torch.cuda.Event() if cuda else None  # the last send's copy

    def write(self) -> list[torch.Tensor]:
        """The host views, once the last send has read them."""
        if self.sent is not None:
            self.sent.synchronize()
        return self.host_views

    def send(self) -> None:
        self.device.copy_(self.host, non_blocking=True)
        if self.sent is not None:
            self.sent.record()


def _views(flat: torch.Tensor, shapes: list[tuple[int, ...]]) -> list[torch.Tensor]:
    parts = flat.split([math.prod(shape) for shape in shapes])
    return [part.view(shape) for part, shape in zip(parts, shapes, strict=True)]


class _StaticStep:
    """The inputs and output of one captured size: the graph reads and writes only these.

    The inputs are views of two staged buffers: int64 (token ids, positions, cache slots)
    and int32 (block tables, context lengths, the LoRA segment table)."""

    def __init__(self, size: int, width: int, block_size: int, device, with_lora: bool):
        self.longs = _Staged([(size,)] * 3, torch.long, device)
        int_shapes = [(size, width), (size,)] + ([(size, 3)] if with_lora else [])
        self.ints = _Staged(int_shapes, torch.int32, device)
        self.ids, positions, slot_mapping = self.longs.device_views
        block_tables, context_lens, *segment_table = self.ints.device_views
        self.attention = AttentionMetadata(
            positions=positions,
            slot_mapping=slot_mapping,
            groups=None,
            block_size=block_size,
            block_tables=block_tables,
            query_start=torch.arange(size + 1, dtype=torch.int32, device=device),
            context_lens=context_lens,
            max_query_len=1,
            # the kernel's split over keys is fixed at capture: for the longest sequence
            max_context_len=width * block_size,
        )
        # Every segment may hold all rows, so the kernel's grid covers the largest; segments
        # past the step's are empty (start = end) and their programs return at once.
        self.lora = (
            LoraBatch([], segment_table=segment_table[0], max_segment_len=size)
            if with_lora
            else None
        )
        self.graph = None
        self.hidden = None  # [size, hidden], written by each replay


class DecodeGraphs:
    """Runs one-token-per-sequence steps through captured graphs (eagerly off CUDA).

    forward(ids, attention, lora) -> hidden: the model's forward pass over the runner's
    K/V pool and adapter slots, whose addresses the graphs keep."""

    def __init__(
        self,
        forward: Callable[[torch.Tensor, AttentionMetadata, LoraBatch | None], torch.Tensor],
        device: torch.device,
        block_size: int,
        scratch_block: int,
        max_model_len: int,
        max_seqs: int,
    ):
        self.forward, self.device = forward, device
        self.block_size, self.scratch_block = block_size, scratch_block
        self.width = -(-max_model_len // block_size)  # blocks of the longest sequence
        self.sizes = batch_sizes(max_seqs)
        self.capture = device.type == "cuda"
        # one memory pool for all graphs: they never run at the same time
        self.memory_pool = torch.cuda.graph_pool_handle() if self.capture else None
        self.steps: dict[tuple[int, bool], _StaticStep] = {}

    def fits(self, num_new_tokens: list[int]) -> bool:
        """Whether a step of these new tokens per sequence runs here: one token each."""
        return 0 < len(num_new_tokens) <= self.sizes[-1] and all(n == 1 for n in num_new_tokens)

    def run(self, ids, block_tables, computed, lora_slots) -> torch.Tensor:
        """Hidden states [len(ids), hidden] of a step computing token ids[i] at position
        computed[i] of sequence i (at most the largest size); lora_slots: each sequence's
        adapter slot, -1 for none (all -1 or None: the graph without LoRA)."""
        return self.replay(*self.prepare(ids, block_tables, computed, lora_slots))

    def prepare(self, ids, block_tables, computed, lora_slots) -> tuple[_StaticStep, int]:
        """`run`'s first half: copy the step's inputs into its graph's buffers. Returns the
        graph's step and the number of real rows, for `replay`."""
        n = len(ids)
        size = self.sizes[bisect.bisect_left(self.sizes, n)]
        pad = size - n
        segments = segments_of([*lora_slots, *[-1] * pad], [1] * size) if lora_slots else []
        step = self._step(size, bool(segments))
        host = build_attention_metadata(
            [*block_tables, *[[self.scratch_block]] * pad],
            [*computed, *[0] * pad],
            [1] * size,
            self.block_size,
            "cpu",
            padded_groups=False,
        )
        ids_h, positions, slot_mapping = step.longs.write()
        ids_h.numpy()[:] = [*ids, *[0] * pad]
        positions.copy_(host.positions)
        slot_mapping.copy_(host.slot_mapping)
        block_tables, context_lens, *segment_table = step.ints.write()
        block_tables[:, : host.block_tables.shape[1]].copy_(host.block_tables)
        context_lens.copy_(host.context_lens)
        if segment_table:
            segment_table[0].zero_()
            segment_table[0][: len(segments)] = torch.tensor(segments, dtype=torch.int32)
        step.longs.send()
        step.ints.send()
        return step, n

    def replay(self, step: _StaticStep, n: int) -> torch.Tensor:
        """`run`'s second half: the graph over the inputs `prepare` copied."""
        if step.graph is not None:
            step.graph.replay()
        else:
            step.hidden = self._forward(step)
        return step.hidden[:n]

    def capture_all(self, with_lora: bool) -> None:
        """Capture every size now, without LoRA and (`with_lora`) with it, as vLLM does at
        start: no step while serving pays a capture and the compiles it triggers (a first
        batch of 24 sequences would otherwise stall every request in it)."""
        for size in self.sizes:
            for lora in (False, True) if with_lora else (False,):
                self._step(size, lora)

    def _step(self, size: int, with_lora: bool) -> _StaticStep:
        key = (size, with_lora)
        if key not in self.steps:
            step = _StaticStep(size, self.width, self.block_size, self.device, with_lora)
            # the buffers start as padding rows: the runs below touch only the scratch block
            _, _, slot_mapping = step.longs.write()
            slot_mapping.fill_(self.scratch_block * self.block_size)
            block_tables, context_lens, *_ = step.ints.write()
            block_tables.fill_(self.scratch_block)
            context_lens.fill_(1)
            step.longs.send()
            step.ints.send()
            if self.capture:
                self._capture(step)
            self.steps[key] = step
        return self.steps[key]

    def _capture(self, step: _StaticStep) -> None:
        # Warm up on a side stream first: Triton compiles and the allocator settles outside
        # the capture, as torch.cuda.graphs asks.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._forward(step)
        torch.cuda.current_stream().wait_stream(stream)
        step.graph = torch.cuda.CUDAGraph()
        # thread_local: a server thread may touch CUDA (reading an adapter) meanwhile
        with torch.cuda.graph(step.graph, pool=self.memory_pool, capture_error_mode="thread_local"):
            step.hidden = self._forward(step)

    def _forward(self, step: _StaticStep) -> torch.Tensor:
        return self.forward(step.ids, step.attention, step.lora)
