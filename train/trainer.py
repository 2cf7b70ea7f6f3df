"""transformers' Trainer with the evaluation a perplexity needs, and packed rows' tokens counted.

The Trainer's own evaluation loss is a mean of per-batch means: a short last batch weighs as
much as a full one, and the number moves with `eval_batch_size` (transformers#39241). Here it
is the mean negative log-likelihood per answer token over the whole set. It also runs under a
forked random state: iterating a DataLoader draws from torch's global generator, so how often
a run evaluated used to change the dropout masks it trained with.
"""

from __future__ import annotations

import torch
from transformers import Trainer

from train.collate import not_padding
from train.data import IGNORE_INDEX


class AdapterTrainer(Trainer):
    def _track_num_input_tokens(self, inputs):
        """Packed rows come without an attention mask, and the Trainer would then count the
        tokens unlike the pad id, leaving out every real end of turn where pad is EOS."""
        if "position_ids" in inputs and "attention_mask" not in inputs:
            inputs = {**inputs, "attention_mask": not_padding(inputs)}
        super()._track_num_input_tokens(inputs)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        """`{prefix}_loss`, logged as the Trainer's own evaluation is."""
        dataset = self.eval_dataset if eval_dataset is None else eval_dataset
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            loss = self._loss_per_answer_token(dataset)
        metrics = {f"{metric_key_prefix}_loss": loss}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(
            self.args, self.state, self.control, metrics
        )
        return metrics

    def _loss_per_answer_token(self, dataset) -> float:
        model, device = self.model, self.args.device
        training = model.training
        model.eval()
        total, count = 0.0, 0
        # autocast as training runs (bf16 on a GPU): the Trainer's own loop gets it from
        # accelerate's prepared model, which this one does not go through
        with torch.no_grad(), self.accelerator.autocast():
            for batch in self.get_eval_dataloader(dataset):
                batch = {key: value.to(device) for key, value in batch.items()}
                # the tokens the model's loss averages over: labels after the first position
                tokens = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
                if tokens:
                    total += float(model(**batch).loss) * tokens
                    count += tokens
        model.train(training)
        return total / count if count else float("nan")
