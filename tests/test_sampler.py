"""The sampler's batched ops against plain references: the top-k/top-p filter (partial sort
with a whole-vocabulary fallback) and the inverse-CDF draw."""

from __future__ import annotations

import pytest
import torch

from serve.sampler import (
    CANDIDATES,
    TokenHistory,
    apply_penalties,
    apply_penalties_reference,
    draw,
    filter_top_k_top_p,
    token_logprobs,
)
from serve.sampling_params import SamplingParams
from serve.sequence import Sequence


def reference_filter(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """Row by row, a whole sort: keep the top k (k 0: all), then while the mass before a token,
    renormalized over those k, is below top_p (the first always stays)."""
    out = torch.full_like(logits, float("-inf"))
    for row, (k, p) in enumerate(zip(top_k, top_p, strict=True)):
        values, order = logits[row].sort(descending=True)
        k = k or len(values)
        probs = values[:k].softmax(-1)
        keep = k if p >= 1 else max(1, int(((probs.cumsum(-1) - probs) < p).sum()))
        out[row, order[:keep]] = values[:keep]
    return out


def test_top_k_and_top_p_keep_the_expected_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.1], [0.1, 0.6, 0.25, 0.05]]))
    kept = filter_top_k_top_p(logits, [2, 0], [1.0, 0.8])
    # row 0: the 2 most likely; row 1: 0.6 + 0.25 reaches 0.8, the rest is cut
    assert torch.isfinite(kept).tolist() == [[True, True, False, False], [False, True, True, False]]
    torch.testing.assert_close(kept[0, :2], logits[0, :2])


def test_a_top_p_that_underflows_float32_keeps_the_most_likely_token():
    logits = torch.log(torch.tensor([[0.2, 0.5, 0.3]]))
    kept = filter_top_k_top_p(logits, [0], [1e-300])
    assert torch.isfinite(kept).tolist() == [[False, True, False]]


@pytest.mark.parametrize("vocab", [CANDIDATES - 3, 3001])
def test_filter_equals_a_whole_sort_for_peaked_and_flat_rows(vocab):
    """Peaked rows end their nucleus among the candidates; flat rows (scale 0.1) reach past
    them and take the whole-vocabulary path; rows without limits pass through untouched."""
    gen = torch.Generator().manual_seed(vocab)
    settings = [(0, 0.9), (5, 1.0), (40, 0.7), (0, 1.0), (0, 0.99), (vocab + 9, 0.5), (1, 0.3)]
    rows = []
    for scale in (6.0, 0.1):
        rows += [torch.randn(vocab, generator=gen) * scale for _ in settings]
    logits = torch.stack(rows)
    top_k = [k for k, _ in settings] * 2
    top_p = [p for _, p in settings] * 2
    kept = filter_top_k_top_p(logits, top_k, top_p)
    expected = reference_filter(logits, top_k, top_p)
    assert torch.equal(torch.isfinite(kept), torch.isfinite(expected))
    assert torch.equal(kept[torch.isfinite(kept)], logits[torch.isfinite(expected)])
    if vocab > CANDIDATES:  # the flat nucleus rows did reach past the candidates
        assert torch.isfinite(kept[len(settings)]).sum() > CANDIDATES


def test_draw_follows_the_distribution_and_never_picks_a_zero():
    probs = torch.tensor([0.0, 0.5, 0.0, 0.25, 0.15, 0.1, 0.0])
    n = 40_000
    uniforms = torch.rand(n, generator=torch.Generator().manual_seed(0))
    tokens = draw(probs.expand(n, -1) * 3.0, uniforms)  # unnormalized rows are fine
    counts = torch.bincount(tokens, minlength=len(probs)).double() / n
    torch.testing.assert_close(counts, probs.double(), atol=0.01, rtol=0)
    assert counts[[0, 2, 6]].sum() == 0
    # the ends of [0, 1): the first and the last token that has mass
    edges = draw(probs.expand(2, -1), torch.tensor([0.0, 1.0 - 2**-24]))
    assert edges.tolist() == [1, 5]


@pytest.mark.parametrize("seed", range(4))
def test_batched_penalties_equal_the_row_by_row_reference(seed):
    """Rows with every penalty, one of them, none at all, and no output yet, in one batch."""
    g = torch.Generator().manual_seed(seed)
    vocab = 97
    options = [
        {"frequency_penalty": 0.5, "presence_penalty": 0.25, "repetition_penalty": 1.3},
        {"repetition_penalty": 0.8},
        {},
        {"frequency_penalty": -1.0},
        {"presence_penalty": 2.0, "repetition_penalty": 1.1},
    ]
    seqs = []
    for i in range(12):
        prompt = torch.randint(vocab, (int(torch.randint(1, 30, (1,), generator=g)),), generator=g)
        output = torch.randint(vocab, (int(torch.randint(0, 40, (1,), generator=g)),), generator=g)
        params = SamplingParams(**options[i % len(options)])
        tokens = prompt.tolist() + output.tolist()
        seqs.append(Sequence(f"r{i}", tokens, len(prompt), params))
    logits = torch.randn(len(seqs), vocab, generator=g) * 3
    before = logits.clone()
    out = apply_penalties(logits, seqs)
    torch.testing.assert_close(out, apply_penalties_reference(logits, seqs), rtol=0, atol=0)
    assert torch.equal(logits, before)  # out of place
    assert not torch.equal(out, before)


def test_repetition_applies_before_frequency_and_presence_as_in_vllm():
    params = SamplingParams(repetition_penalty=2, frequency_penalty=0.5, presence_penalty=1)
    seq = Sequence("r", [1, 3, 0, 0, 2], 2, params)  # prompt [1, 3], output [0, 0, 2]
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, 3.0]])
    # 0: 2 / 2 - (0.5 * 2 + 1); 1: 1 / 2; 2: 0.5 / 2 - (0.5 + 1); 3: -1 * 2; 4: unseen
    expected = torch.tensor([[-1.0, 0.5, -1.25, -2.0, 3.0]])
    for penalize in (apply_penalties, apply_penalties_reference):
        torch.testing.assert_close(penalize(logits, [seq]), expected, rtol=0, atol=0)


def test_penalties_from_the_token_history_follow_sequences_as_they_grow():
    """The sampler's history keeps each request's tokens across steps, copying only the new
    ones (its buffers grow past their first size here); a new request under an id already
    seen starts afresh. Every step's penalties equal the reference's."""
    g = torch.Generator().manual_seed(0)
    vocab = 50
    params = SamplingParams(frequency_penalty=0.5, presence_penalty=0.25, repetition_penalty=1.3)
    seqs = [
        Sequence(f"r{i}", torch.randint(vocab, (n,), generator=g).tolist(), n, params)
        for i, n in enumerate([3, 70, 1])
    ]
    history = TokenHistory()
    for step in range(100):
        if step == 60:  # r1 ends, and a new request takes its id
            history.forget("r1")
            seqs[1] = Sequence("r1", [7, 7, 8], 3, params)
        if step == 80:  # a new request under r0's id that was never forgotten, longer
            prompt = torch.randint(vocab, (90,), generator=g).tolist()
            seqs[0] = Sequence("r0", prompt, 90, params)
        logits = torch.randn(len(seqs), vocab, generator=g)
        out = apply_penalties(logits, seqs, history)
        torch.testing.assert_close(out, apply_penalties_reference(logits, seqs), rtol=0, atol=0)
        for seq in seqs:
            seq.token_ids.append(int(torch.randint(vocab, (1,), generator=g)))
    assert set(history) == {"r0", "r1", "r2"}
    assert history.tokens(seqs[1]).tolist() == seqs[1].token_ids


def test_token_logprobs_of_a_batch_are_each_rows_own():
    g = torch.Generator().manual_seed(0)
    logprobs = torch.randn(5, 50, generator=g).log_softmax(-1)
    tokens, n = [3, 49, 0, 7, 7], [0, 1, 3, 5, 0]
    scored = token_logprobs(logprobs, tokens, n)
    for row, (lp, token, k) in enumerate(zip(scored, tokens, n, strict=True)):
        assert lp.token_id == token
        assert lp.logprob == pytest.approx(float(logprobs[row, token]))
        values, ids = logprobs[row].topk(k) if k else (torch.empty(0), torch.empty(0))
        assert [t for t, _ in lp.top] == ids.tolist()
        assert [v for _, v in lp.top] == pytest.approx(values.tolist())
    assert token_logprobs(logprobs[:0], [], []) == []
