"""Batches for the Trainer: rows padded to the longest, packed rows without an attention mask.

transformers builds a block-diagonal causal mask from `position_ids` only when no attention
mask comes with them, and no KV cache (the Trainer turns the model's off:
`TrainingArguments.use_cache`): a packed row's positions restart at each of its examples,
so its examples stay apart (masking_utils.find_packed_sequence_indices).
"""

from __future__ import annotations

import torch
from transformers import DataCollatorForSeq2Seq

from train.data import IGNORE_INDEX


class RowCollator:
    """Pads a batch of rows: plain ones as DataCollatorForSeq2Seq does, packed ones (rows with
    `position_ids`) with their positions and no attention mask."""

    def __init__(self, tokenizer):
        self.plain = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX)
        self.pad_id = tokenizer.pad_token_id

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        if "position_ids" not in rows[0]:
            return self.plain(rows)
        width = max(len(r["input_ids"]) for r in rows)

        def padded(key: str, fill) -> torch.Tensor:  # [rows, width]
            return torch.tensor([list(r[key]) + fill(width - len(r[key])) for r in rows])

        return {
            "input_ids": padded("input_ids", lambda n: [self.pad_id] * n),
            "labels": padded("labels", lambda n: [IGNORE_INDEX] * n),
            # each padding token a segment of its own, which nothing reads
            "position_ids": padded("position_ids", lambda n: [0] * n),
        }


def not_padding(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[rows, width] bool: the tokens of packed rows but their padding. Every example has two
    tokens at least (one to predict from, one to predict), so a row's last example ends at
    its last position above 0, and what follows is padding."""
    positions = batch["position_ids"]
    width = positions.shape[1]
    columns = torch.arange(width, device=positions.device)
    last = torch.where(positions > 0, columns, -1).max(dim=1, keepdim=True).values
    return columns <= last
