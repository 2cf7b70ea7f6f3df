"""LoRA adapters in two tiers: host memory (LRU, `max_cpu_loras`) and `max_loras` device slots.

An adapter is validated and read once from its PEFT folder into host memory
(`serve.lora_weights`); the scheduler decides which slot it occupies (`LoraSlots`) and the
runner copies it in with `load_slot`.
Slots hold every layer's A and B of each target module, zero-padded to `max_lora_rank`.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch

from registry.errors import AdapterError
from serve.llama import FUSED_GROUPS, LORA_MODULES, ModelShape
from serve.lora_ops import LoraBatch, lora_gathered, lora_gathered_shared, lora_segments
from serve.lora_weights import LoraWeights, read_peft_lora

# Modules that read the same input: their A live stacked along the rank, so that one shrink
# matmul serves them all (`lora_gathered_shared`); each module's A is a view of its rows.
SHARED_INPUT = tuple(group for group in FUSED_GROUPS if len(group) > 1)


class AdapterPool:
    def __init__(
        self,
        shape: ModelShape,
        max_loras: int,
        max_rank: int,
        max_cpu_loras: int,
        dtype: torch.dtype,
        device,
    ):
        self.shape = shape
        self.max_rank = max_rank
        self.max_cpu_loras = max_cpu_loras
        self.dtype = dtype
        self.device = torch.device(device)
        L = shape.num_layers
        self.A, self.B = {}, {}
        # modules -> [layers, slots, modules · max_rank, in] A of modules sharing their input
        self.A_shared = {}
        for group in SHARED_INPUT:
            fan_in = shape.lora_dims(group[0])[0]
            stacked = torch.zeros(
                L, max_loras, len(group) * max_rank, fan_in, dtype=dtype, device=device
            )
            self.A_shared[group] = stacked
            for j, m in enumerate(group):
                self.A[m] = stacked[:, :, j * max_rank : (j + 1) * max_rank]
        for m in LORA_MODULES:
            fan_in, fan_out = shape.lora_dims(m)
            if m not in self.A:
                self.A[m] = torch.zeros(L, max_loras, max_rank, fan_in, dtype=dtype, device=device)
            # scale · lora_Bᵀ: the expand matrix, laid out so that slots flatten without a copy
            self.B[m] = torch.zeros(L, max_loras, max_rank, fan_out, dtype=dtype, device=device)
        # Host-side per (module, layer, slot): the slot's rank there (0: not targeted).
        self.ranks = {m: [[0] * max_loras for _ in range(L)] for m in LORA_MODULES}
        # The same on the device, [layers, slots] int32 per module, for the Triton kernel;
        # modules sharing their input as views of one [layers, modules, slots] table
        self.rank_table_shared = {
            group: torch.zeros(L, len(group), max_loras, dtype=torch.int32, device=device)
            for group in SHARED_INPUT
        }
        self.rank_table = {}
        for group, table in self.rank_table_shared.items():
            for j, m in enumerate(group):
                self.rank_table[m] = table[:, j]
        for m in LORA_MODULES:
            if m not in self.rank_table:
                self.rank_table[m] = torch.zeros(L, max_loras, dtype=torch.int32, device=device)
        self.host: OrderedDict[str, LoraWeights] = OrderedDict()
        self.origin: dict[str, tuple[Path, str]] = {}  # uid -> its folder and content_stamp
        self.host_evictions = 0

    def keep(self, weights: LoraWeights) -> None:
        """Hold a read adapter in host memory (least recently used ones leave first)."""
        self.origin[weights.uid] = (weights.path, weights.stamp)
        self.host[weights.uid] = weights
        self.host.move_to_end(weights.uid)
        while len(self.host) > self.max_cpu_loras:
            self.host.popitem(last=False)
            self.host_evictions += 1

    def retain(self, uids: set[str]) -> None:
        """Forget every adapter but `uids`: their host copies and what reads them back."""
        for uid in [u for u in self.origin if u not in uids]:
            del self.origin[uid]
            self.host.pop(uid, None)

    def weights(self, uid: str) -> LoraWeights:
        """Host copy of an adapter, read again from its folder if it was evicted: refused if
        the folder changed since (the uid, and the prefix cache under it, mean what was read)."""
        if uid in self.host:
            self.host.move_to_end(uid)
            return self.host[uid]
        path, stamp = self.origin[uid]
        try:
            weights = self.read(path, uid)
        except OSError as error:
            message = f"adapter {uid!r}: {path} could not be read again ({error})"
            raise AdapterError(message) from None
        if weights.stamp != stamp:
            raise AdapterError(
                f"adapter {uid!r}: {path} changed on disk since it was loaded; load it again"
            )
        self.keep(weights)
        return weights

    def read(self, path: Path, uid: str) -> LoraWeights:
        """Read an adapter folder into the host tier's layout (touches no pool state)."""
        pin = self.device.type == "cuda"  # page-locked: asynchronous, faster copies to slots
        return read_peft_lora(path, uid, self.shape, self.max_rank, self.dtype, pin)

    def load_slot(self, slot: int, uid: str) -> None:
        """Copy an adapter into a device slot, replacing whatever was there: per module, its
        A and B in one copy each, and zeros past its rank. Queued, on a GPU: the host goes on."""
        weights = self.weights(uid)
        for m in LORA_MODULES:
            A, B = self.A[m][:, slot], self.B[m][:, slot]  # [layers, max_rank, in / out]
            r = weights.A[m].shape[1] if m in weights.A else 0
            if r:
                A[:, :r].copy_(weights.A[m], non_blocking=True)
                B[:, :r].copy_(weights.B[m], non_blocking=True)
            A[:, r:].zero_()
            B[:, r:].zero_()
            column = weights.ranks.get(m, [0] * self.shape.num_layers)
            for layer, rank in enumerate(column):
                self.ranks[m][layer][slot] = rank
            # From page-locked memory on a GPU: a copy from pageable memory would make the host
            # wait for the A and B copies queued above before it could launch the step.
            pinned = torch.tensor(column, dtype=torch.int32, pin_memory=self.device.type == "cuda")
            self.rank_table[m][:, slot].copy_(pinned, non_blocking=True)

    def apply_modules(
        self,
        ys: list[torch.Tensor],
        x: torch.Tensor,
        layer: int,
        modules: tuple[str, ...],
        batch: LoraBatch,
    ) -> None:
        """`apply` for each of `modules`, all reading x; one shared shrink when they can."""
        if modules in self.A_shared and batch.segment_table is not None:  # the Triton kernel
            from serve.kernels.lora_sgmv import lora_sgmv_shared

            lora_sgmv_shared(
                ys,
                x,
                self.A_shared[modules][layer],
                [self.B[m][layer] for m in modules],
                batch.segment_table,
                batch.max_segment_len,
                self.rank_table_shared[modules][layer],
            )
            return
        if modules in self.A_shared and batch.chunk_tokens is not None:
            B = [self.B[m][layer] for m in modules]
            lora_gathered_shared(ys, x, self.A_shared[modules][layer], B, batch)
            return
        for y, m in zip(ys, modules, strict=True):
            self.apply(y, x, layer, m, batch)

    def apply(
        self, y: torch.Tensor, x: torch.Tensor, layer: int, module: str, batch: LoraBatch
    ) -> None:
        A, B = self.A[module][layer], self.B[module][layer]
        if batch.segment_table is not None:  # built for the Triton kernel (CUDA)
            from serve.kernels.lora_sgmv import lora_sgmv

            ranks = self.rank_table[module][layer]
            lora_sgmv(y, x, A, B, batch.segment_table, batch.max_segment_len, ranks)
        elif batch.chunk_tokens is not None:
            lora_gathered(y, x, A, B, batch)
        else:
            lora_segments(y, x, A, B, self.ranks[module][layer], batch.segments)
