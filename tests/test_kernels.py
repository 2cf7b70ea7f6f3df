"""The Triton kernels against the plain-torch reference ops, on fresh random inputs of awkward
sizes (odd token counts, block sizes, head dims and fan-ins, mixed ranks, empty segments).

On CUDA they run compiled; without it, on CPU through Triton's interpreter. The interpreter
is chosen when a kernel is defined (`@triton.jit` reads TRITON_INTERPRET), so the variable is
set here, before the kernel modules are imported; serving never imports them on CPU.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

from registry.errors import UsageError  # noqa: E402
from serve.attention import build_attention_metadata, paged_attention  # noqa: E402
from serve.kernels import lora_sgmv as sgmv_module  # noqa: E402
from serve.kernels import paged_attention as attention_module  # noqa: E402
from serve.kernels import use_triton  # noqa: E402
from serve.kernels.lora_sgmv import lora_sgmv, lora_sgmv_shared  # noqa: E402
from serve.kernels.nf4_matmul import nf4_dequantize, nf4_matmul  # noqa: E402
from serve.kernels.paged_attention import paged_attention_triton  # noqa: E402
from serve.linear import Linear4bit, PackedLinear4bit, quantize_4bit  # noqa: E402
from serve.llama import LORA_MODULES  # noqa: E402
from serve.lora_ops import LoraBatch, lora_reference  # noqa: E402
from tests.helpers import PROJECT, tiny_engine_args  # noqa: E402

pytestmark = pytest.mark.triton
DEVICE = "cuda" if CUDA else "cpu"
# The interpreter multiplies bf16 wrongly (fp16 is right); CUDA runs bf16 as served.
HALF = torch.bfloat16 if CUDA else torch.float16


def _attention_case(gen, lengths, computed, kv_heads, group, dim, block_size, dtype):
    """A pool with each sequence's blocks scattered over it, its cached context filled, and
    this step's q, k, v: what a runner step hands attention."""
    heads = kv_heads * group
    blocks_per_seq = [-(-(c + n) // block_size) for c, n in zip(computed, lengths, strict=True)]
    num_blocks = sum(blocks_per_seq) + 3  # spare blocks: tables need not start at 0
    order = torch.randperm(num_blocks, generator=gen).tolist()
    tables, used = [], 0
    for count in blocks_per_seq:
        tables.append(order[used : used + count])
        used += count
    slots = num_blocks * block_size
    k_cache = torch.randn(slots, kv_heads, dim, generator=gen).to(dtype)
    v_cache = torch.randn(slots, kv_heads, dim, generator=gen).to(dtype)
    tokens = sum(lengths)
    q = torch.randn(tokens, heads, dim, generator=gen).to(dtype)
    k = torch.randn(tokens, kv_heads, dim, generator=gen).to(dtype)
    v = torch.randn(tokens, kv_heads, dim, generator=gen).to(dtype)
    return tables, [t.to(DEVICE) for t in (q, k, v, k_cache, v_cache)]


@pytest.mark.parametrize(
    ("computed", "new", "kv_heads", "group", "dim", "block_size"),
    [
        ([0, 7, 13], [5, 1, 1], 2, 1, 24, 5),  # a prompt and two decodes, MHA
        ([3, 0, 21, 9], [1, 19, 1, 6], 1, 3, 40, 3),  # GQA 3, chunked prefill after a context
        ([0, 30, 2, 8, 17], [1, 1, 1, 1, 1], 2, 3, 16, 7),  # decodes only
        ([4, 0], [20, 3], 3, 1, 16, 16),  # a chunk of more tokens than one program takes
    ],
    ids=["mixed-mha", "chunked-gqa3", "decode-gqa3", "long-chunk"],
)
def test_paged_attention_kernel_equals_the_reference(
    computed, new, kv_heads, group, dim, block_size
):
    gen = torch.Generator().manual_seed(sum(computed) + sum(new))
    tables, (q, k, v, k_cache, v_cache) = _attention_case(
        gen, new, computed, kv_heads, group, dim, block_size, torch.float32
    )
    ref_meta = build_attention_metadata(tables, computed, new, block_size, DEVICE)
    meta = build_attention_metadata(tables, computed, new, block_size, DEVICE, padded_groups=False)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    expected = paged_attention(q, k, v, ref_k, ref_v, ref_meta, scale=dim**-0.5)
    # key tiles of 16: several per sequence, so the online softmax is exercised
    out = paged_attention_triton(q, k, v, k_cache, v_cache, meta, scale=dim**-0.5, block_n=16)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v)  # the step's K/V written


@pytest.mark.parametrize("splits", [2, 3, 8])
def test_decode_attention_split_over_keys_equals_the_reference(splits):
    """Flash-decoding: each sequence's keys shared by `splits` programs, merged after; with
    short contexts some splits get no key at all (they must weigh nothing)."""
    computed, new, block_size, dim = [40, 5, 0, 70], [1, 1, 1, 1], 4, 24
    gen = torch.Generator().manual_seed(splits)
    tables, tensors = _attention_case(gen, new, computed, 2, 3, dim, block_size, torch.float32)
    q, k, v, k_cache, v_cache = tensors
    ref_meta = build_attention_metadata(tables, computed, new, block_size, DEVICE)
    meta = build_attention_metadata(tables, computed, new, block_size, DEVICE, padded_groups=False)
    assert meta.max_context_len == 71
    expected = paged_attention(q, k, v, k_cache.clone(), v_cache.clone(), ref_meta, dim**-0.5)
    out = paged_attention_triton(
        q, k, v, k_cache, v_cache, meta, scale=dim**-0.5, block_n=16, splits=splits
    )
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


def test_paged_attention_kernel_takes_a_query_whose_head_dim_is_strided():
    """The kernels store along the head dim at stride 1: the output must be laid out so
    whatever q's strides (here heads innermost), not copy them."""
    computed, new, block_size, dim = [5, 0], [1, 7], 4, 16
    gen = torch.Generator().manual_seed(3)
    tables, (q, k, v, k_cache, v_cache) = _attention_case(
        gen, new, computed, 2, 2, dim, block_size, torch.float32
    )
    ref_meta = build_attention_metadata(tables, computed, new, block_size, DEVICE)
    meta = build_attention_metadata(tables, computed, new, block_size, DEVICE, padded_groups=False)
    expected = paged_attention(q, k, v, k_cache.clone(), v_cache.clone(), ref_meta, dim**-0.5)
    heads_inner = q.transpose(1, 2).contiguous().transpose(1, 2)  # same values, strides (H·D, 1, H)
    assert heads_inner.stride(-1) != 1
    out = paged_attention_triton(heads_inner, k, v, k_cache, v_cache, meta, scale=dim**-0.5)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


def test_paged_attention_kernel_in_half_precision_stays_close_to_fp32():
    computed, new, block_size, dim = [5, 0, 11], [1, 9, 4], 4, 32
    gen = torch.Generator().manual_seed(7)
    tables, tensors = _attention_case(gen, new, computed, 2, 3, dim, block_size, torch.float32)
    meta = build_attention_metadata(tables, computed, new, block_size, DEVICE)
    expected = paged_attention(*tensors, meta, scale=dim**-0.5)
    half = [t.to(HALF) for t in tensors]
    out = paged_attention_triton(*half, meta, scale=dim**-0.5, block_n=16)
    assert out.dtype == HALF
    torch.testing.assert_close(out.float(), expected, rtol=3e-2, atol=3e-2)


def _adapters(gen, ranks, max_rank, fan_in, fan_out, dtype):
    """A, B as the adapter pool stores them: zero beyond each slot's rank (0: not targeted)."""
    A = torch.zeros(len(ranks), max_rank, fan_in)
    B = torch.zeros(len(ranks), max_rank, fan_out)
    for s, r in enumerate(ranks):
        A[s, :r] = torch.randn(r, fan_in, generator=gen)
        B[s, :r] = torch.randn(r, fan_out, generator=gen) * 0.1
    return A.to(DEVICE, dtype), B.to(DEVICE, dtype)


@pytest.mark.parametrize(
    ("ranks", "max_rank", "seq_slots", "seq_tokens", "fan_in", "fan_out", "knobs"),
    [
        # decodes over five adapters of mixed ranks, base rows between them
        ([16, 4, 0, 7, 1], 16, [-1, 0, 0, 1, 2, 3, 4, -1], [1] * 8, 37, 23, {"split_k": 1}),
        # prefill chunks, a zero-token sequence and a run longer than one program's tile
        ([3, 8, 5], 8, [2, 0, 1, 1, -1, 0], [40, 3, 0, 5, 2, 1], 150, 150, {"split_k": 1}),
        # the reduction over fan-in shared by three programs (atomic adds)
        ([1, 2, 3, 4, 5, 6], 6, [5, 3, 1, 0, 4, 2], [2, 1, 3, 1, 1, 2], 200, 19, {"split_k": 3}),
        # rank 32: a rank tile wider than the minimum
        ([32, 17], 32, [1, -1, 0], [3, 4, 2], 64, 48, {"split_k": 1}),
        # the expand's tile as the tune section sweeps it: wider than the default, the last
        # one partly past the output, at 8 warps
        ([4, 9], 16, [0, 1, 0], [1, 1, 1], 40, 300, {"block_n": 256, "num_warps": 8}),
        # ranks past one program's rows: tiled over programs in the shrink (with a split
        # reduction), looped over in the expand; a slot of rank 7 leaves later tiles idle
        (
            [40, 7, 0, 23],
            40,
            [3, 0, -1, 1, 2],
            [2, 1, 1, 5, 1],
            70,
            33,
            {"block_r": 16, "split_k": 2},
        ),
    ],
    ids=[
        "decode-mixed-ranks",
        "prefill-empty-segment",
        "split-k",
        "rank-32",
        "expand-tile",
        "rank-tiles",
    ],
)
def test_lora_sgmv_kernel_equals_the_per_token_reference(
    ranks, max_rank, seq_slots, seq_tokens, fan_in, fan_out, knobs
):
    gen = torch.Generator().manual_seed(len(ranks) * 100 + fan_in)
    A, B = _adapters(gen, ranks, max_rank, fan_in, fan_out, torch.float32)
    tokens = sum(seq_tokens)
    slot_of_token = torch.repeat_interleave(torch.tensor(seq_slots), torch.tensor(seq_tokens))
    x = torch.randn(tokens, fan_in, generator=gen).to(DEVICE)
    # y is a column split of a wider output, as the fused q/k/v projection hands it over
    fused = torch.randn(tokens, fan_out + 5, generator=gen).to(DEVICE)
    y = fused[:, 5:]
    expected = lora_reference(y, x, A, B, slot_of_token.to(DEVICE))
    untouched = fused[:, :5].clone()

    batch = LoraBatch.build(seq_slots, seq_tokens, DEVICE, kernel=True)
    table, longest = batch.segment_table, batch.max_segment_len
    rank_of = torch.tensor(ranks, dtype=torch.int32, device=DEVICE)
    lora_sgmv(y, x, A, B, table, longest, rank_of, **knobs)
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(fused[:, :5], untouched)
    base = (slot_of_token == -1).to(DEVICE)
    assert torch.equal(y[base], expected[base])  # base-only rows exactly as they were


def test_lora_sgmv_kernel_in_half_precision_stays_close_to_fp32():
    gen = torch.Generator().manual_seed(3)
    A, B = _adapters(gen, [16, 5, 9], 16, 96, 80, torch.float32)
    seq_slots, seq_tokens = [0, 2, -1, 1], [7, 1, 2, 18]
    slot_of_token = torch.repeat_interleave(torch.tensor(seq_slots), torch.tensor(seq_tokens))
    x = torch.randn(len(slot_of_token), 96, generator=gen).to(DEVICE)
    y = torch.randn(len(slot_of_token), 80, generator=gen).to(DEVICE)
    expected = lora_reference(y, x, A, B, slot_of_token.to(DEVICE))
    batch = LoraBatch.build(seq_slots, seq_tokens, DEVICE, kernel=True)
    y_half = y.to(HALF)
    lora_sgmv(
        y_half, x.to(HALF), A.to(HALF), B.to(HALF), batch.segment_table, batch.max_segment_len
    )
    torch.testing.assert_close(y_half.float(), expected, rtol=3e-2, atol=5e-2)


def test_lora_sgmv_kernel_reads_each_slot_only_up_to_its_rank():
    gen = torch.Generator().manual_seed(11)
    ranks = [2, 0, 5]
    A, B = _adapters(gen, ranks, 8, 33, 21, torch.float32)
    # Rows beyond a slot's rank hold stale values (say, of a larger adapter evicted before).
    stale_A, stale_B = A.clone(), B.clone()
    for s, r in enumerate(ranks):
        stale_A[s, r:] = 7.0
        stale_B[s, r:] = -3.0
    seq_slots, seq_tokens = [1, 0, 2, 1], [3, 2, 4, 1]
    slot_of_token = torch.repeat_interleave(torch.tensor(seq_slots), torch.tensor(seq_tokens))
    x = torch.randn(len(slot_of_token), 33, generator=gen).to(DEVICE)
    y = torch.randn(len(slot_of_token), 21, generator=gen).to(DEVICE)
    expected = lora_reference(y, x, A, B, slot_of_token.to(DEVICE))
    batch = LoraBatch.build(seq_slots, seq_tokens, DEVICE, kernel=True)
    rank_of = torch.tensor(ranks, dtype=torch.int32, device=DEVICE)
    lora_sgmv(y, x, stale_A, stale_B, batch.segment_table, batch.max_segment_len, rank_of)
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("knobs", [{}, {"block_r": 16}], ids=["one-tile", "tiles-cut-a-module"])
def test_shared_shrink_kernel_equals_each_module_against_the_reference(knobs):
    """q/k/v in one shrink over their stacked A: each module up to its own rank per slot
    (rows past it hold stale values), a module an adapter skips (rank 0) untouched. With
    16-row tiles the second program's rows start inside the second module's."""
    gen = torch.Generator().manual_seed(17)
    max_rank, fan_in, widths = 8, 40, (24, 8, 8)
    ranks = [[8, 3, 0], [2, 0, 5], [8, 1, 1]]  # module -> rank of slots 0..2
    A, Bs = [], []
    for module, width in enumerate(widths):
        a, b = _adapters(gen, ranks[module], max_rank, fan_in, width, torch.float32)
        A.append(a)
        Bs.append(b)
    stacked = torch.cat(A, dim=1)  # [slots, 3 * max_rank, in]
    stale, stale_Bs = stacked.clone(), [b.clone() for b in Bs]
    for module in range(3):
        for slot, r in enumerate(ranks[module]):
            stale[slot, module * max_rank + r : (module + 1) * max_rank] = 5.0
            stale_Bs[module][slot, r:] = -3.0
    seq_slots, seq_tokens = [2, 0, -1, 1, 0], [3, 1, 2, 17, 1]
    slot_of_token = torch.repeat_interleave(torch.tensor(seq_slots), torch.tensor(seq_tokens))
    x = torch.randn(len(slot_of_token), fan_in, generator=gen).to(DEVICE)
    fused = torch.randn(len(slot_of_token), sum(widths), generator=gen).to(DEVICE)
    ys = list(fused.split(widths, dim=1))  # column views, as the stacked projection gives
    expected = [
        lora_reference(y, x, a, b, slot_of_token.to(DEVICE))
        for y, a, b in zip(ys, A, Bs, strict=True)
    ]
    batch = LoraBatch.build(seq_slots, seq_tokens, DEVICE, kernel=True)
    table = torch.tensor(ranks, dtype=torch.int32, device=DEVICE)
    lora_sgmv_shared(
        ys, x, stale, stale_Bs, batch.segment_table, batch.max_segment_len, table, **knobs
    )
    for y, e in zip(ys, expected, strict=True):
        torch.testing.assert_close(y, e, rtol=1e-4, atol=1e-4)


def test_a_batch_without_adapters_launches_nothing(monkeypatch):
    assert LoraBatch.build([-1, -1, -1], [4, 1, 1], DEVICE, kernel=True) is None

    def no_launch(*_, **__):
        raise AssertionError("a kernel was launched")

    monkeypatch.setattr(sgmv_module, "_shrink_kernel", no_launch)
    monkeypatch.setattr(sgmv_module, "_expand_kernel", no_launch)
    y = torch.randn(3, 8, device=DEVICE)
    before = y.clone()
    empty = torch.zeros(0, 3, dtype=torch.int32, device=DEVICE)
    A, B = torch.randn(2, 4, 6, device=DEVICE), torch.randn(2, 4, 8, device=DEVICE)
    lora_sgmv(y, torch.randn(3, 6, device=DEVICE), A, B, empty, 0)
    assert torch.equal(y, before)


def _dequantized(packed, state):
    import bitsandbytes.functional as bnbf

    return bnbf.dequantize_4bit(packed, state).float()


@pytest.mark.parametrize(
    ("rows", "out_features", "in_features", "quant_type", "double_quant", "split_k"),
    [
        (1, 40, 128, "nf4", True, 1),  # a decode row, double-quantized scales
        (37, 100, 192, "nf4", False, 1),  # several row tiles, features not a tile multiple
        (5, 24, 130, "fp4", True, 1),  # rows of 130: 64-blocks straddle rows
        (19, 72, 512, "nf4", True, 3),  # the reduction shared by three programs (atomics)
    ],
    ids=["decode", "row-tiles", "fp4-straddling-blocks", "split-k"],
)
def test_nf4_matmul_kernel_equals_dequantize_then_matmul(
    rows, out_features, in_features, quant_type, double_quant, split_k
):
    gen = torch.Generator().manual_seed(rows * 1000 + in_features)
    weight = torch.randn(out_features, in_features, generator=gen).to(DEVICE)
    packed, state = quantize_4bit(weight, quant_type, double_quant)
    bias = torch.randn(out_features, generator=gen).to(DEVICE)
    x = torch.randn(rows, in_features, generator=gen).to(DEVICE)
    expected = x @ _dequantized(packed, state).T + bias
    scales = PackedLinear4bit([weight], [None], quant_type, double_quant, torch.float32).absmax
    code = state.code.to(DEVICE, torch.float32)
    out = nf4_matmul(
        x, packed.flatten(), scales, code, out_features, bias, block_k=64, split_k=split_k
    )
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


def test_nf4_matmul_kernel_of_no_rows_is_an_empty_output():
    weight = torch.randn(40, 128, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    linear = PackedLinear4bit([weight], [None], "nf4", True, torch.float32)
    assert linear(torch.zeros(0, 128, device=DEVICE)).shape == (0, 40)


def test_nf4_matmul_kernel_in_half_precision_stays_close_to_fp32():
    gen = torch.Generator().manual_seed(5)
    weight = torch.randn(48, 256, generator=gen).to(DEVICE)
    packed, state = quantize_4bit(weight, "nf4", True)
    x = torch.randn(9, 256, generator=gen).to(DEVICE)
    expected = x @ _dequantized(packed, state).T
    linear = PackedLinear4bit([weight], [None], "nf4", True, HALF)
    out = linear(x.to(HALF))
    assert out.dtype == HALF
    torch.testing.assert_close(out.float(), expected, rtol=3e-2, atol=1e-1)


@pytest.mark.parametrize("dtype", [torch.float32, HALF], ids=["fp32", "half"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_nf4_dequantize_kernel_gives_bitsandbytes_weights_to_the_bit(quant_type, dtype):
    gen = torch.Generator().manual_seed(13)
    weight = torch.randn(37, 130, generator=gen).to(DEVICE, dtype)  # blocks straddle rows
    packed, state = quantize_4bit(weight, quant_type, True)
    linear = PackedLinear4bit([weight], [None], quant_type, True, dtype)
    dense = nf4_dequantize(linear.packed, linear.absmax, linear.code, 37, dtype)
    assert dense.dtype == dtype and dense.shape == (37, 130)
    import bitsandbytes.functional as bnbf

    assert torch.equal(dense, bnbf.dequantize_4bit(packed, state).to(dtype))


def test_prefill_sized_inputs_dequantize_then_multiply(monkeypatch):
    import serve.linear

    gen = torch.Generator().manual_seed(21)
    weights = [torch.randn(64, 128, generator=gen).to(DEVICE) for _ in range(2)]
    linear = PackedLinear4bit(weights, [None, None], "nf4", True, torch.float32)
    x = torch.randn(9, 128, generator=gen).to(DEVICE)
    fused = linear(x)
    monkeypatch.setattr(serve.linear, "DEQUANTIZE_ABOVE_ROWS", 8)
    monkeypatch.setattr(linear, "_matmul", None)  # must not be called past the threshold
    torch.testing.assert_close(linear(x), fused, rtol=1e-4, atol=1e-4)


def test_stacked_4bit_modules_equal_each_module_through_bitsandbytes():
    """q/k/v as one stacked weight: the same output as three bitsandbytes matmuls, since each
    module keeps its own quantization (scales and all)."""
    gen = torch.Generator().manual_seed(8)
    widths = (64, 32, 32)
    weights = [torch.randn(w, 64, generator=gen).to(DEVICE) for w in widths]
    biases = [None, torch.randn(32, generator=gen).to(DEVICE), None]
    x = torch.randn(6, 64, generator=gen).to(DEVICE)
    stacked = PackedLinear4bit(weights, biases, "nf4", True, torch.float32)
    one_by_one = [
        Linear4bit(w, b, "nf4", True, torch.float32)(x)
        for w, b in zip(weights, biases, strict=True)
    ]
    torch.testing.assert_close(stacked(x), torch.cat(one_by_one, dim=1), rtol=1e-4, atol=1e-4)


def test_4bit_weights_that_cannot_be_stacked_are_refused():
    odd_blocks = [torch.randn(3, 10), torch.randn(4, 10)]  # 30 weights: a block spans both
    with pytest.raises(ValueError, match=r"4-bit weights \[\(3, 10\), \(4, 10\)\] cannot"):
        PackedLinear4bit(odd_blocks, [None, None], "nf4", True, torch.float32)
    with pytest.raises(ValueError, match="K must be even"):
        nf4_matmul(
            torch.randn(2, 3), torch.zeros(3, dtype=torch.uint8), torch.ones(1), torch.ones(16), 2
        )


def _compiled_run(script: str, *args: str, **env: str) -> str:
    """stdout of `script args` in a process of its own without the interpreter (whose kernels this
    process holds), so that Triton's compiler sees real kernels."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | env
    result = subprocess.run(
        [sys.executable, script, *args], capture_output=True, text=True, cwd=PROJECT, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_a_server_compiles_each_kernel_a_bounded_number_of_times_all_at_start():
    """Over the step shapes a Llama-3-8B server plans (`tests/kernel_variants.py`: every batch
    to 64 at contexts to 8,192, every chunk to 300 tokens and more to 2,048, chunks beside
    1-63 decodes on their own adapters), each kernel compiles at most once per tile choice:
    splits are powers of two, and the sizes that change every step (token count, block-table
    width) are not specialized on. Before that the NF4 matmul alone compiled 21 times over a
    sparser sweep, attention 10, their merge 7. The engine's start-up warm-up
    (`serve.warmup`) asks for every one of them, and for none a server never would."""
    import json

    report = json.loads(_compiled_run("tests/kernel_variants.py"))
    assert report["compiles"] == {
        "_nf4_matmul_kernel": 9,  # BLOCK_M 16 / 32 / 64 x SPLIT_K 1 / 2 / 4
        "_dequantize_kernel": 1,  # past 256 rows: dequantized once, then cuBLAS
        "_paged_attention_kernel": 7,  # decode at 1, 2, 4, 8, 16 and 32 splits; prefill
        "_combine_kernel": 5,  # the decode splits past 1
        # q/k/v, gate/up and o or down (3, 2, 1 modules) x BLOCK_M 16 / 32 x SPLIT_K: the
        # (BLOCK_M, SPLIT_K) 16: 8; 32: 8, 4, 2, 1 the segments x tiles of a step ask
        "_shrink_kernel": 15,
        "_expand_kernel": 2,  # BLOCK_M 16 / 32
    }
    assert report["missing"] == [] and report["extra"] == []
    assert report["warmup_steps"] < 200  # seconds at most, on a GPU, when compiled before


@pytest.mark.skipif(CUDA, reason="on CUDA the other tests compile the kernels for the device")
def test_every_kernel_compiles_for_hopper_as_the_engine_launches_it():
    """The real toolchain (Triton to PTX to ptxas, no GPU needed) over each wrapper's
    launches at Llama-3-8B shapes, LoRA at ranks 16 and 64, in bf16 (served) and fp32
    (whose tiles take twice the registers; fp16 compiles as bf16 does): what the
    interpreter lets through may not compile. Shared memory must fit an H100 block
    (227 KiB), no register may spill, and the 16-bit matmuls must use the tensor cores
    (fp32 ones multiply in full fp32, without)."""
    import json

    output = _compiled_run(
        "tests/kernels_sm90.py", "bfloat16", "float32", TRITON_DEFAULT_FP_FUSION="1"
    )
    launches = [json.loads(line) for line in output.splitlines()]
    kernels = [
        "_nf4_matmul_kernel",
        "_dequantize_kernel",
        "_shrink_kernel",
        "_expand_kernel",
        "_paged_attention_kernel",
        "_combine_kernel",
    ]
    for dtype in ("bfloat16", "float32"):
        compiled = {launch["kernel"] for launch in launches if launch["dtype"] == dtype}
        assert sorted(compiled) == sorted(kernels), dtype
    for launch in launches:
        assert launch["shared_bytes"] <= 227 * 1024, launch
        assert launch["spill_bytes"] == 0, launch  # registers spilled to local memory
        matmul = launch["kernel"] not in ("_dequantize_kernel", "_combine_kernel")
        if matmul and launch["dtype"] == "bfloat16":
            assert launch["mma"] in ("mma", "wgmma"), launch


def test_kernel_compiles_counts_what_triton_compiles_and_restores_its_hook():
    """What the GPU tests and benchmark count compiles with: Triton's post-compile hook (which
    a compile calls with the kernel's name; the interpreter compiles nothing)."""
    from triton import knobs

    from serve.kernels import kernel_compiles

    def compile_of(name):
        fn = type("JitFunctionInfo", (), {"name": name})()
        knobs.runtime.jit_post_compile_hook(
            key="", repr="", fn=fn, compile={}, is_manual_warmup=False, already_compiled=False
        )

    earlier = []
    knobs.runtime.jit_post_compile_hook = lambda *, fn, **_: earlier.append(fn.name)
    try:
        with kernel_compiles() as compiled:
            compile_of("_shrink_kernel")
            compile_of("_shrink_kernel")
            compile_of("_combine_kernel")
        assert compiled == {"_shrink_kernel": 2, "_combine_kernel": 1}
        assert earlier == ["_shrink_kernel", "_shrink_kernel", "_combine_kernel"]  # still called
        compile_of("_expand_kernel")  # after the block: the earlier hook alone
        assert compiled == {"_shrink_kernel": 2, "_combine_kernel": 1}
        assert earlier[-1] == "_expand_kernel"
    finally:
        knobs.runtime.jit_post_compile_hook = None


def test_kernels_are_chosen_only_on_cuda():
    assert use_triton("cpu", "auto") is False
    assert use_triton("cpu", "reference") is False
    with pytest.raises(UsageError, match="kernels: 'triton' needs a CUDA device"):
        use_triton("cpu", "triton")
    with pytest.raises(UsageError, match="kernels: 'fast' is not one of"):
        use_triton("cpu", "fast")
    if CUDA:
        assert use_triton("cuda", "auto") is True
        assert use_triton("cuda", "reference") is False


@pytest.mark.skipif(CUDA, reason="on CUDA, torch or bitsandbytes may import triton")
def test_importing_the_engine_does_not_import_triton_on_cpu():
    code = "import sys, serve, serve.engine; print('triton' in sys.modules)"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=PROJECT, env=env
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def _kernel_engine_args(tiny_base, **overrides) -> dict:
    """The engine tests' LLM(...) arguments: the tiny base in fp32 on DEVICE, packed 4-bit
    weights where quantized, a 32-block pool and an 8-token step budget (chunked prefill)."""
    args = {"keep_quantized": True, "device": DEVICE, "dtype": "float32", "num_kv_blocks": 32}
    return tiny_engine_args(tiny_base, max_num_batched_tokens=8, **args) | overrides


@pytest.mark.parametrize("quantization", [None, "nf4"], ids=["dense", "nf4"])
def test_engine_through_the_kernels_generates_the_reference_tokens(
    quantization, tiny_base, tmp_path, monkeypatch
):
    """The wiring: compact metadata from the runner, the model's attention, the pool's LoRA
    and the 4-bit base (stacked q/k/v and gate/up against bitsandbytes one module at a time)
    all through the kernels, with chunked prefill (8-token budget) and three adapters."""
    import serve.engine
    from serve import LLM, SamplingParams
    from tests.helpers import make_lora

    if not CUDA:  # "auto" picks the kernels on CUDA only; here they run interpreted
        monkeypatch.setattr(serve.engine, "use_triton", lambda _, mode: mode != "reference")
        # and decode steps split their keys as few sequences on a GPU would
        monkeypatch.setattr(attention_module, "decode_splits", lambda *_: 3)
    folders = {
        "qv": make_lora(
            tiny_base, tmp_path / "qv", rank=8, targets=["q_proj", "v_proj"], b_scale=1.0
        ),
        "mlp": make_lora(
            tiny_base, tmp_path / "mlp", rank=3, targets=["gate_proj", "down_proj"], seed=1
        ),
        "all": make_lora(
            tiny_base,
            tmp_path / "all",
            rank=5,
            targets=LORA_MODULES,
            seed=2,
        ),
    }
    prompts = [[1, 50, 60, 70, 80, 90, 91, 92, 93, 94, 95], [1, 5, 6], [1, 300, 301, 302, 303]]
    adapters = ["qv", None, "all", "mlp"]
    # logprobs too: the tiny random model repeats its token, so the tokens alone would not
    # show a decode step that went wrong
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True, logprobs=2)
    variants = {
        "reference": {"kernels": "reference"},
        "kernels": {"kernels": "auto", "warmup": False},  # (its own test: interpreted, slow)
        # decode steps padded into static buffers (captured as CUDA graphs on CUDA)
        "graphs": {"kernels": "auto", "cuda_graphs": True, "warmup": False},
    }
    outputs = {}
    for label, options in variants.items():
        llm = LLM(**_kernel_engine_args(tiny_base, quantization=quantization, **options))
        kernels = label != "reference"
        assert llm.engine.model.use_triton is kernels
        layer = llm.engine.model.layers[0]
        linear = layer.linears[layer.group_of["q_proj"]]
        assert isinstance(linear, PackedLinear4bit) is (kernels and bool(quantization))
        for name, folder in folders.items():
            llm.load_adapter(name, str(folder))
        batch = [prompts[i % 3] for i in range(4)]
        outputs[label] = [
            llm.generate(batch, params, adapters=adapters),
            llm.generate(prompts, params),  # no adapter at all
        ]

    def tokens(label):
        return [[o.token_ids for o in outs] for outs in outputs[label]]

    def logprobs(label):
        return torch.tensor(
            [lp.logprob for outs in outputs[label] for o in outs for lp in o.logprobs]
        )

    for label in ("kernels", "graphs"):
        assert tokens(label) == tokens("reference"), label
        torch.testing.assert_close(logprobs(label), logprobs("reference"), rtol=1e-4, atol=1e-4)
    # the adapters matter, so a path that dropped them would show
    with_adapters, without = outputs["reference"]
    assert [o.logprobs[-1].logprob for o in with_adapters[:3]] != pytest.approx(
        [o.logprobs[-1].logprob for o in without]
    )
    # four sequences with adapters, and three without them padded to four, went through
    assert {(4, True), (4, False)} <= set(llm.engine.runner.graphs.steps)


def test_engine_in_half_precision_scores_alike_through_kernels_and_graphs(
    tiny_base, tmp_path, monkeypatch
):
    """The GPU runs bf16 (fp16 here: the interpreter has no bf16): every kernel and the decode
    graphs take half-precision inputs from the engine, and score each token (teacher-forced,
    as greedy tokens may part on near-ties) within half precision of the plain ops."""
    import serve.engine
    from serve import LLM, SamplingParams
    from tests.helpers import make_lora

    if not CUDA:
        monkeypatch.setattr(serve.engine, "use_triton", lambda _, mode: mode != "reference")
    folder = make_lora(tiny_base, tmp_path / "all", rank=5, targets=LORA_MODULES, b_scale=1.0)
    prompts = [[1, *range(50, 61)], [1, 5, 6], [1, *range(300, 305)]]
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, prompt_logprobs=0)
    scored = {}
    for label, options in {
        "reference": {"kernels": "reference"},
        "graphs": {"kernels": "auto", "cuda_graphs": True, "warmup": False},
    }.items():
        half = str(HALF).removeprefix("torch.")
        llm = LLM(**_kernel_engine_args(tiny_base, quantization="nf4", dtype=half, **options))
        llm.load_adapter("all", str(folder))
        outs = llm.generate(prompts, params, adapters=["all", None, "all"])
        assert all(len(o.token_ids) == 4 for o in outs)
        scored[label] = torch.tensor([lp.logprob for o in outs for lp in o.prompt_logprobs[1:]])
    torch.testing.assert_close(scored["graphs"], scored["reference"], rtol=2e-2, atol=5e-2)


def test_warmup_runs_every_kernel_over_the_scratch_block_alone(tiny_base, tmp_path, monkeypatch):
    """The start-up warm-up (`serve.warmup`) runs each of its plans through the kernels, and
    their K/V go to the scratch block alone: the pool's blocks stay zero and free, and the
    engine then generates exactly what one started without it does."""
    import serve.engine
    from serve import LLM, SamplingParams
    from serve.kernels import lora_sgmv as lora_module
    from serve.kernels import nf4_matmul as nf4_module
    from serve.model_runner import ModelRunner
    from tests.helpers import make_lora

    if not CUDA:
        monkeypatch.setattr(serve.engine, "use_triton", lambda _, mode: mode != "reference")
    calls = []
    for module, name in [
        (attention_module, "paged_attention_triton"),
        (nf4_module, "nf4_matmul"),
        (lora_module, "lora_sgmv_shared"),
        (lora_module, "lora_sgmv"),
    ]:
        real = getattr(module, name)
        spy = lambda *a, _real=real, _name=name, **kw: calls.append(_name) or _real(*a, **kw)  # noqa: E731
        monkeypatch.setattr(module, name, spy)
    plans = []
    launch = ModelRunner.launch
    monkeypatch.setattr(ModelRunner, "launch", lambda self, p: plans.append(p) or launch(self, p))
    folder = make_lora(tiny_base, tmp_path / "all", rank=5, targets=LORA_MODULES, b_scale=1.0)
    prompts = [[1, *range(50, 61)], [1, 5, 6], [1, *range(300, 305)]]
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, logprobs=1)
    outputs = {}
    for warmup in (True, False):
        llm = LLM(**_kernel_engine_args(tiny_base, quantization="nf4", warmup=warmup))
        engine = llm.engine
        if warmup:
            expected = serve.engine.warmup_plans(32, 8, engine.max_model_len, 8, 4, 32)
            assert [p.num_new_tokens for p in plans] == [p.num_new_tokens for p in expected]
            assert {"paged_attention_triton", "nf4_matmul", "lora_sgmv_shared", "lora_sgmv"} == set(
                calls
            )
            assert {s.block_table[0] for p in plans for s in p.seqs} == {engine.num_blocks}
            scratch = engine.num_blocks * 4  # the first slot of the scratch block
            assert engine.runner.kv_cache[:, :, :scratch].count_nonzero() == 0
            assert engine.runner.kv_cache[:, :, scratch:].count_nonzero() > 0
            assert engine.allocator.num_free_blocks == engine.num_blocks
        else:
            assert plans == [] and engine.warmup_seconds == 0
        llm.load_adapter("all", str(folder))
        outputs[warmup] = llm.generate(prompts, params, adapters=["all", None, "all"])
        plans.clear()
    warm, cold = (
        [(o.token_ids, [lp.logprob for lp in o.logprobs]) for o in outputs[w]]
        for w in (True, False)
    )
    assert warm == cold


def test_decode_graph_step_pads_into_static_buffers():
    """What the graph reads: the step's rows, then padding rows that write K/V only to the
    scratch block, attend to one key and have no adapter; the segment table past the step's
    segments is empty. Off CUDA the forward runs eagerly on those buffers."""
    from serve.cuda_graph import DecodeGraphs, batch_sizes

    seen = []

    def forward(ids, attention, lora):
        seen.append((ids.clone(), attention, None if lora is None else lora.segment_table.clone()))
        return torch.arange(len(ids), dtype=torch.float32)[:, None] * torch.ones(1, 3)

    scratch, block_size = 9, 4
    graphs = DecodeGraphs(forward, torch.device("cpu"), block_size, scratch, 40, max_seqs=12)
    assert graphs.sizes == batch_sizes(12) == [1, 2, 4, 8, 12]
    assert graphs.fits([1] * 12) and not graphs.fits([1] * 13) and not graphs.fits([1, 2])

    tables = [[3, 5], [0], [7, 1, 2]]
    computed = [6, 2, 9]  # positions of this step's tokens
    hidden = graphs.run([11, 12, 13], tables, computed, lora_slots=[2, 2, -1])
    assert torch.equal(hidden, torch.arange(3.0)[:, None] * torch.ones(1, 3))
    ids, meta, segments = seen[-1]
    assert ids.tolist() == [11, 12, 13, 0]
    assert meta.positions.tolist() == [6, 2, 9, 0]
    assert meta.slot_mapping.tolist() == [5 * 4 + 2, 0 * 4 + 2, 2 * 4 + 1, scratch * 4]
    assert meta.context_lens.tolist() == [7, 3, 10, 1]
    assert meta.query_start.tolist() == [0, 1, 2, 3, 4]
    assert meta.block_tables[3, 0] == scratch and meta.block_tables[0, :2].tolist() == [3, 5]
    assert meta.block_tables.shape == (4, 10)  # room for the longest sequence: 40 / 4 blocks
    assert segments.tolist() == [[0, 2, 2], [0, 0, 0], [0, 0, 0], [0, 0, 0]]

    # The same buffers again: nothing of the step before shows through
    graphs.run([14, 15, 16], [[8], [6], [4]], [1, 0, 2], lora_slots=[-1, 0, -1])
    ids, meta, segments = seen[-1]
    assert ids.tolist() == [14, 15, 16, 0] and meta.positions.tolist() == [1, 0, 2, 0]
    assert meta.slot_mapping.tolist() == [8 * 4 + 1, 6 * 4, 4 * 4 + 2, scratch * 4]
    assert meta.context_lens.tolist() == [2, 1, 3, 1]
    assert segments.tolist() == [[1, 2, 0], [0, 0, 0], [0, 0, 0], [0, 0, 0]]

    graphs.run([21, 22], [[4], [6]], [0, 1], lora_slots=[-1, -1])  # no adapter: no LoRA
    assert seen[-1][2] is None
    assert set(graphs.steps) == {(4, True), (2, False)}
    graphs.capture_all(with_lora=True)  # what a CUDA engine does at start
    assert set(graphs.steps) == {(n, lora) for n in graphs.sizes for lora in (False, True)}


def test_cuda_graphs_need_the_kernels(tiny_base):
    from serve import LLM

    with pytest.raises(UsageError, match="cuda_graphs: needs the Triton kernels"):
        LLM(**tiny_engine_args(tiny_base, device="cpu", cuda_graphs=True))
