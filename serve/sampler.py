"""From the logits of each sequence's last token to its next token, batched over the step.

`logit_bias` is added first; then rows with a `response_format` lose the tokens their grammar
forbids (greedy and sampled rows both obey it, whatever the bias); then penalties, then greedy
rows by argmax; the others by temperature, top-k,
top-p and a draw from the request's own generator when it set a seed. Log-probabilities are those
of the model's distribution (before the grammar, penalties and temperature), as OpenAI reports
them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from serve.guided import GuidedDecoding, GuidedMasks
from serve.sequence import Sequence


@dataclass
class TokenLogprobs:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # the n most likely tokens and their logprobs, best first


def apply_penalties(
    logits: torch.Tensor, seqs: list[Sequence], history: TokenHistory | None = None
) -> torch.Tensor:
    """CTRL repetition penalty on prompt and generated tokens, then OpenAI frequency/presence
    penalties on generated tokens (vLLM's order), for the whole batch at once (out of place):

        x = logits[r, t] / repetition[r] if logits[r, t] > 0 else logits[r, t] · repetition[r]
                                                                         for t seen in r
        logits[r, t] = x - (frequency[r] · count[r, t] + presence[r])    for t generated in r

    Each touches only the (row, token) pairs it changes, in one gather and one scatter per
    penalty: `apply_penalties_reference` runs a handful of ops per row, each a kernel launch on
    a GPU. logits: [rows, vocab], one row per sequence. `history`: the sequences' tokens kept
    as arrays across steps (None: read from their lists, O(tokens) of Python each call).
    """
    if not any(s.params.has_penalties for s in seqs):
        return logits
    logits = logits.clone()
    vocab = logits.shape[1]
    column = functools.partial(torch.tensor, dtype=logits.dtype, device=logits.device)
    tokens_of = history.tokens if history is not None else _token_array
    none = np.empty(0, dtype=np.int64)
    penalized = [s.params.has_penalties for s in seqs]
    tokens = [tokens_of(s) if p else none for s, p in zip(seqs, penalized, strict=True)]
    repeated = [
        t if s.params.repetition_penalty != 1 else none for s, t in zip(seqs, tokens, strict=True)
    ]
    row, token, _ = _pairs(repeated, vocab, logits.device)
    if row.numel():
        repetition = column([s.params.repetition_penalty for s in seqs])[row]
        values = logits[row, token]
        logits[row, token] = torch.where(values > 0, values / repetition, values * repetition)
    outputs = [t[s.num_prompt_tokens :] for s, t in zip(seqs, tokens, strict=True)]
    row, token, count = _pairs(outputs, vocab, logits.device)
    if row.numel():
        frequency = column([s.params.frequency_penalty for s in seqs])
        presence = column([s.params.presence_penalty for s in seqs])
        count = count.to(logits.dtype)
        logits[row, token] -= frequency[row] * count + presence[row]
    return logits


def _token_array(seq: Sequence) -> np.ndarray:
    return np.asarray(seq.token_ids, dtype=np.int64)


def _pairs(tokens: list[np.ndarray], vocab: int, device):
    """Each distinct (row, token id) of `tokens[row]` and how often it occurs: three [pairs]
    tensors on `device`, made distinct there."""
    lengths = [len(t) for t in tokens]
    rows = np.repeat(np.arange(len(tokens)), lengths)
    keys = torch.from_numpy(rows * vocab + np.concatenate(tokens)).to(device)
    keys, counts = torch.unique(keys, return_counts=True)
    return keys // vocab, keys % vocab, counts


class TokenHistory:
    """Each request's token ids as an int64 array, kept in step with its `Sequence` by copying
    only the tokens added since it was last asked: the lists cost O(tokens) of Python every
    step (at 64 rows of 1,536 tokens, 4.4 ms of host time as a tensor, against 0.03 ms to
    join these arrays: a one-off measurement on a 2-core CPU; `bench/penalties.py` times the
    whole op both ways)."""

    def __init__(self):
        # request id -> (its sequence, buffer, tokens of it filled)
        self._arrays: dict[str, tuple[Sequence, np.ndarray, int]] = {}

    def tokens(self, seq: Sequence) -> np.ndarray:
        """seq.token_ids as an array: a view, valid until the next call for the request."""
        n = seq.num_tokens
        known, buffer, filled = self._arrays.get(seq.request_id, (None, None, 0))
        if known is not seq:  # a new request under a reused id: start again
            buffer, filled = None, 0
        if buffer is None or n > len(buffer):  # room for twice as many: appends stay O(1)
            grown = np.empty(max(64, 2 * n), dtype=np.int64)
            if filled:
                grown[:filled] = buffer[:filled]
            buffer = grown
        buffer[filled:n] = seq.token_ids[filled:n]
        self._arrays[seq.request_id] = (seq, buffer, n)
        return buffer[:n]

    def forget(self, request_id: str) -> None:
        self._arrays.pop(request_id, None)

    def __iter__(self):  # the request ids it holds tokens of
        return iter(self._arrays)


def apply_penalties_reference(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """`apply_penalties` row by row: the plain definition the tests compare it with."""
    logits = logits.clone()
    vocab = logits.shape[1]
    for row, seq in enumerate(seqs):
        p = seq.params
        if not p.has_penalties:
            continue
        if p.repetition_penalty != 1:
            seen = torch.tensor(sorted(set(seq.token_ids)), dtype=torch.long, device=logits.device)
            values = logits[row, seen]
            logits[row, seen] = torch.where(
                values > 0, values / p.repetition_penalty, values * p.repetition_penalty
            )
        output = torch.tensor(seq.output_token_ids, dtype=torch.long, device=logits.device)
        counts = torch.bincount(output, minlength=vocab)[:vocab].to(logits.dtype)
        logits[row] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0)
    return logits


def apply_logit_bias(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """OpenAI's logit_bias: logits[row, token] += bias for each request's pairs (out of place)."""
    rows, tokens, bias = zip(
        *((row, t, b) for row, seq in enumerate(seqs) for t, b in seq.params.logit_bias),
        strict=True,
    )
    index = (torch.tensor(rows, device=logits.device), torch.tensor(tokens, device=logits.device))
    values = torch.tensor(bias, dtype=logits.dtype, device=logits.device)
    return logits.index_put(index, values, accumulate=True)


# A top-p nucleus is looked for among each row's most likely tokens first: a partial sort of
# this many is ~20x cheaper than sorting a 49k vocabulary, and real nuclei are far smaller.
CANDIDATES = 256


def _outside(sorted_logits, top_k, top_p, log_total):
    """drop[r, j]: the j-th most likely token of row r is outside its top-k or top-p nucleus;
    covered[r]: the row's nucleus ends within these tokens (so `drop` is the whole answer).

    sorted_logits: [rows, width], descending; log_total: [rows] logsumexp over the vocabulary.
    The nucleus is taken after top-k, over the probabilities renormalized to the top k."""
    rank = torch.arange(sorted_logits.shape[1], device=sorted_logits.device)[None, :]
    limited = top_k > 0
    drop = limited[:, None] & (rank >= top_k[:, None])
    kept = sorted_logits.masked_fill(drop, float("-inf"))
    probs = (kept - torch.where(limited, kept.logsumexp(-1), log_total)[:, None]).exp()
    mass = probs.cumsum(dim=-1)
    # Keep a token while the mass before it is below top_p; the first token always stays,
    # even for a top_p that rounds to 0 in float32.
    drop |= ((mass - probs) >= top_p[:, None]) & (rank > 0) & (top_p < 1)[:, None]
    covered = limited | (top_p >= 1) | (mass[:, -1] >= top_p)
    return drop, covered


def filter_top_k_top_p(logits: torch.Tensor, top_k: list[int], top_p: list[float]):
    """Mask (to -inf) tokens outside each row's top-k and top-p nucleus. top_k 0: no limit.

    Rows are partially sorted to their CANDIDATES (or top_k) most likely tokens; only rows whose
    nucleus reaches past those are sorted whole. The limits come as host lists: the partial
    sort's width is then known without waiting on the device."""
    vocab = logits.shape[1]
    width = min(vocab, max(CANDIDATES, *top_k))
    top_k = torch.tensor(top_k, device=logits.device)
    top_p = torch.tensor(top_p, dtype=torch.float32, device=logits.device)
    log_total = logits.logsumexp(dim=-1)
    values, order = logits.topk(width, dim=-1)
    drop, covered = _outside(values, top_k, top_p, log_total)
    out = torch.full_like(logits, float("-inf"))
    out.scatter_(1, order, values.masked_fill(drop, float("-inf")))
    if not bool(covered.all()):
        rows = (~covered).nonzero()[:, 0]
        values, order = logits[rows].sort(dim=-1, descending=True)
        drop, _ = _outside(values, top_k[rows], top_p[rows], log_total[rows])
        out[rows] = out[rows].scatter(1, order, values.masked_fill(drop, float("-inf")))
    unlimited = ((top_k == 0) | (top_k >= vocab)) & (top_p >= 1)
    return torch.where(unlimited[:, None], logits, out)


def draw(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """token[r] = the first t with cdf[r, t] > u[r] · cdf[r, -1] (inverse-CDF sampling).

    probs: [rows, vocab], each row's distribution (unnormalized is fine); uniforms: [rows] in
    [0, 1). One random number per row instead of a vocabulary's worth: on CPU, drawing 49k
    random numbers costs 1 ms, as much as torch.multinomial over them. Tokens of zero
    probability are never drawn: the cdf does not rise at them."""
    cdf = probs.cumsum(dim=-1, dtype=torch.float64)  # fp64: the tail of 128k tokens stays exact
    target = (uniforms.to(torch.float64) * cdf[:, -1])[:, None]
    return torch.searchsorted(cdf, target, right=True)[:, 0].clamp_max(probs.shape[1] - 1)


class Sampler:
    def __init__(self, device, seed: int = 0, guided: GuidedDecoding | None = None):
        self.device = device
        self.guided = guided  # grammar state of requests with a response_format
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self._seeded: dict[str, np.random.Generator] = {}  # request id -> its own generator
        self.history = TokenHistory()  # tokens of requests with penalties

    def forget(self, request_id: str) -> None:
        self._seeded.pop(request_id, None)
        self.history.forget(request_id)
        if self.guided is not None:
            self.guided.forget(request_id)

    def prepare(self, seqs: list[Sequence]) -> GuidedMasks | None:
        """What sampling `seqs` needs that no logits do (their grammars' masks): the runner
        asks while the device computes the forward pass."""
        if self.guided is None or not any(s.params.response_format is not None for s in seqs):
            return None
        return self.guided.masks(seqs)

    def __call__(
        self, logits: torch.Tensor, seqs: list[Sequence], masks: GuidedMasks | None = None
    ):
        """logits: [rows, vocab] fp32, the runner's own: guided rows are masked in place.
        `masks`: from `prepare` (for these sequences or more); None: prepared here.
        Returns (token per row, TokenLogprobs or None per row)."""
        masks = masks or self.prepare(seqs)
        wanted = [s.params.logprobs for s in seqs]
        logprobs = logits.log_softmax(dim=-1) if any(n is not None for n in wanted) else None
        if any(s.params.logit_bias for s in seqs):
            logits = apply_logit_bias(logits, seqs)  # before the grammar, which must win
        if masks is not None:
            self.guided.mask_(logits, seqs, masks)
        if any(s.params.has_penalties for s in seqs):
            logits = apply_penalties(logits, seqs, self.history)
        tokens = logits.argmax(dim=-1)
        random_rows = [i for i, s in enumerate(seqs) if not s.params.greedy]
        if random_rows:
            rows = torch.tensor(random_rows, device=logits.device)
            params = [seqs[i].params for i in random_rows]
            temps = torch.tensor([p.temperature for p in params], device=logits.device)
            scaled = logits[rows] / temps[:, None]
            if any(p.top_k or p.top_p < 1 for p in params):
                scaled = filter_top_k_top_p(
                    scaled, [p.top_k for p in params], [p.top_p for p in params]
                )
            uniforms = self._uniforms([seqs[i] for i in random_rows])
            tokens[rows] = draw(scaled.softmax(dim=-1), uniforms)
        tokens = tokens.tolist()
        rows = [i for i, n in enumerate(wanted) if n is not None]
        scored = iter(
            token_logprobs(logprobs[rows], [tokens[i] for i in rows], [wanted[i] for i in rows])
            if rows
            else []
        )
        return tokens, [None if n is None else next(scored) for n in wanted]

    def _uniforms(self, seqs: list[Sequence]) -> torch.Tensor:
        """One uniform in [0, 1) per sequence: from its own generator when it set a seed (so
        its draws do not depend on the batch), else from the engine's, in one call. [rows]

        Seeded generators live on the host: a seeded row's draw launches no kernel, and a seed
        gives the same uniforms on any device.
        """
        uniforms = torch.empty(len(seqs), device=self.device)
        shared = [row for row, seq in enumerate(seqs) if seq.params.seed is None]
        if shared:
            uniforms[shared] = torch.rand(len(shared), generator=self.generator, device=self.device)
        seeded = [row for row, seq in enumerate(seqs) if seq.params.seed is not None]
        if seeded:
            draws = [self._seeded_generator(seqs[row]).random(dtype=np.float32) for row in seeded]
            uniforms[seeded] = torch.tensor(draws).to(self.device)
        return uniforms

    def _seeded_generator(self, seq: Sequence) -> np.random.Generator:
        # numpy's PCG64 takes the whole 64-bit seed; torch's CPU generator keeps 32 bits of
        # it, so seeds 7 and 7 + 2**32 drew the same tokens.
        generator = self._seeded.get(seq.request_id)
        if generator is None:
            generator = np.random.Generator(np.random.PCG64(seq.params.seed % 2**64))
            self._seeded[seq.request_id] = generator
        return generator


def token_logprobs(logprobs: torch.Tensor, tokens: list[int], n: list[int]) -> list[TokenLogprobs]:
    """Row i: the logprob of tokens[i] and the n[i] most likely tokens with theirs, from
    logprobs [rows, vocab]. One gather and one top-k for all rows, three copies to the host in
    all (a GPU would wait on three per row: per prompt token, for prompt logprobs)."""
    if not tokens:
        return []
    index = torch.tensor(tokens, device=logprobs.device)
    chosen = logprobs.gather(1, index[:, None])[:, 0].tolist()
    values, ids = logprobs.topk(max(n))
    values, ids = values.tolist(), ids.tolist()
    return [
        TokenLogprobs(
            tokens[r], chosen[r], list(zip(ids[r][: n[r]], values[r][: n[r]], strict=True))
        )
        for r in range(len(tokens))
    ]
