"""The native kernels (server/engine/fused.py) against the eager ops they replace, and the
model with them against the model without them."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from server.engine import attention as attention_module
from server.engine import fused
from server.engine.attention import build_attn_step
from server.engine.lora import MultiLoraLinear, build_lora_step
from server.engine.sampler import Sampler
from server.engine.types import SamplingParams
from tests.engine.helpers import make_adapter
from tests.engine.test_engine_parity import GREEDY, PROMPTS, tiny_engine
from tests.engine.test_sampling_params import seq

DTYPES = [torch.float32, torch.bfloat16]


def ulps_bf16(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in bf16 units in the last place (both tensors bf16, same signs)."""
    ai, bi = a.view(torch.int16).to(torch.int32), b.view(torch.int16).to(torch.int32)
    return int((ai - bi).abs().max())


def close(got: torch.Tensor, want: torch.Tensor) -> None:
    if got.dtype == torch.bfloat16:
        # float32 sums in another order may round the other way: one bf16 ulp at most
        assert ulps_bf16(got, want) <= 1
        assert (got != want).float().mean() < 0.01
    else:
        torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-6)


def test_the_kernels_build_where_there_is_a_compiler():
    if shutil.which("cc") is None:
        pytest.skip("no C compiler: the eager path is the only one")
    assert fused.enabled(), "cc exists, so the native kernels must build and load"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 5, 33])
def test_add_rms_norm_matches_add_then_rms_norm(dtype, rows):
    if not fused.enabled():
        pytest.skip("native kernels unavailable")
    torch.manual_seed(rows)
    x = torch.randn(rows, 576, dtype=dtype) * 3
    delta = torch.randn(rows, 576, dtype=dtype)
    weight = torch.rand(576, dtype=dtype) + 0.5
    want_sum = x + delta
    want = F.rms_norm(want_sum, weight.shape, weight, 1e-5)
    got_sum, got = fused.add_rms_norm(x.clone(), delta, weight, 1e-5)
    assert torch.equal(got_sum, want_sum)  # one rounding of one add: exact
    close(got, want)
    _, alone = fused.add_rms_norm(x.clone(), None, weight, 1e-5)  # no residual to add
    close(alone, F.rms_norm(x, weight.shape, weight, 1e-5))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_matches_the_eager_rotation_on_strided_views(dtype):
    if not fused.enabled():
        pytest.skip("native kernels unavailable")
    torch.manual_seed(0)
    T, H, KV, D = 7, 9, 3, 64
    qkv = torch.randn(T, (H + 2 * KV) * D, dtype=dtype)
    cos, sin = torch.randn(T, 1, D, dtype=dtype), torch.randn(T, 1, D, dtype=dtype)
    k = qkv[:, H * D :].view(T, 2, KV, D).unbind(1)[0]  # not contiguous: as the model's k
    want = torch.addcmul(k * cos, k.roll(D // 2, dims=-1), sin)
    got = fused.rope(k, cos, sin)
    assert got.data_ptr() == k.data_ptr()  # rotated in place
    close(got, want)
    assert torch.equal(qkv[:, H * D + KV * D :].view(T, KV, D), qkv[:, H * D + KV * D :].view(T, KV, D))


@pytest.mark.parametrize("vocab", [49152, 1000, 7])
def test_argmax_finite_flags_every_kind_of_bad_row(vocab):
    if not fused.enabled():
        pytest.skip("native kernels unavailable")
    torch.manual_seed(vocab)
    logits = torch.randn(6, vocab)
    logits[1, vocab // 2] = float("nan")
    logits[2, vocab - 1] = float("inf")
    logits[3, 0] = float("-inf")
    logits[4, :] = 0.0  # ties: the first index wins, as torch.argmax
    logits[5, vocab - 1] = 50.0  # the maximum in the tail past the last full lane group
    index, finite = fused.argmax_finite(logits)
    assert finite == [True, False, False, False, True, True]
    want = logits.argmax(dim=-1).tolist()
    assert [index[i] for i in (0, 4, 5)] == [want[i] for i in (0, 4, 5)]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_engine_with_kernels_generates_what_it_does_without(tiny_base_dir, tmp_path, dtype):
    """Prefill and decodes, base and adapter rows in one batch: the same tokens either way."""
    if not fused.enabled():
        pytest.skip("native kernels unavailable")
    adapter = make_adapter(tmp_path / "all8", tiny_base_dir, 8, seed=5)
    mixed = [None, adapter, None, adapter]

    def generate(native_kernels: bool):
        engine = tiny_engine(tiny_base_dir, dtype=dtype, native_kernels=native_kernels)
        try:
            assert fused.enabled() == native_kernels
            return engine.generate(PROMPTS[: len(mixed)], mixed, GREEDY)
        finally:
            engine.close()

    without = generate(False)
    with_kernels = generate(True)
    assert with_kernels == without


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("slots", [[1, 1, 1], [0, 1, 2, 1, 3, 0, 2, 2, 2], [2] * 40, [0, 0, 3]])
# (80, 24): a 32-wide block of x and a tail, columns narrower than a 64-wide block;
# (101, 130): three 32-wide blocks and a tail of 5, two 64-wide column blocks and a tail of 2
@pytest.mark.parametrize("in_features,out_part", [(80, 24), (101, 130)])
@pytest.mark.parametrize("slot_dtype", DTYPES)
def test_lora_sgmv_matches_the_eager_grouped_path(dtype, slots, in_features, out_part, slot_dtype, eager):
    """Fused k/v parts, slots of different ranks, base rows, a rank-0 slot, more tokens than a chunk;
    float32 or bf16 slots (the kernel widens bf16 in registers, the eager path by `.to`)."""
    if not fused.enabled():
        pytest.skip("native kernels unavailable")
    torch.manual_seed(len(slots))
    base = torch.nn.Linear(in_features, 2 * out_part, bias=False).to(dtype)
    layer = MultiLoraLinear(base, in_features, [("k", out_part), ("v", out_part)], 4, 8, dtype, "cpu", slot_dtype)
    assert layer.A.dtype == layer.Bt.dtype == slot_dtype
    for slot, rank in ((1, 4), (2, 8), (3, 0)):
        if rank:
            k = (torch.randn(rank, in_features), torch.randn(rank, out_part), 0.5)
            v = (torch.randn(rank, in_features), torch.randn(rank, out_part), 2.0)
            layer.load_slot(slot, {"k": k, "v": v})
    x = torch.randn(len(slots), in_features, dtype=dtype)
    step = build_lora_step(slots, 1, "cpu", dtype)
    with torch.inference_mode():
        got = layer(x, step)
        with eager:
            want = layer(x, step)
    scale = float(want.abs().max())
    if dtype == torch.bfloat16:  # float32 sums in another order, then one bf16 rounding: 1 ulp
        # (relative 2^-7), or, where base + update cancel towards zero, the sums' own error
        torch.testing.assert_close(got.float(), want.float(), rtol=2**-7, atol=1e-5 * scale)
        assert (got != want).float().mean() < 0.01
    else:  # float32 sums in another order: errors scale with the largest sum, not each value
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * scale)
    base_rows = [i for i, s in enumerate(slots) if s in (0, 3)]
    with torch.inference_mode():
        assert torch.equal(got[base_rows], base(x)[base_rows])  # untouched by any adapter


def test_greedy_under_min_tokens_takes_the_runner_up_only_where_eos_led(eager):
    """The sampler reuses the fused argmax and redoes only rows whose winner min_tokens masks."""
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    logits[0, 2] = 9.0  # EOS leads: masked below min_tokens
    logits[1, 7] = 9.0  # another token leads: kept
    held = [seq(SamplingParams(temperature=0, min_tokens=3, max_tokens=5)) for _ in range(3)]
    out = [t.token_id for t in Sampler(seed=0).sample(logits, held)]
    assert out == logits.masked_fill(torch.arange(50) == 2, float("-inf")).argmax(dim=-1).tolist()
    assert out[1] == 7
    with eager:
        assert [t.token_id for t in Sampler(seed=0).sample(logits, held)] == out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [64, 24])  # 16 keys and columns at a time; a head size that is not
def test_decode_attention_reads_the_block_table_as_sdpa_reads_the_gather(dtype, D, eager):
    """Grouped-query heads, lengths that end mid-block and mid-16 keys, shared and scattered blocks."""
    if not fused.enabled():
        pytest.skip("native kernels unavailable")
    torch.manual_seed(0)
    H, KV, bs, blocks = 6, 2, 4, 40
    k_cache = torch.randn(blocks * bs, KV, D, dtype=dtype)
    v_cache = torch.randn(blocks * bs, KV, D, dtype=dtype)
    tables = [[5, 9, 1], [2], [7, 3, 30, 31, 11], [5, 9]]  # the first and last share two blocks
    starts = [9, 0, 17, 6]  # each decode's position: it sees start + 1 keys
    q = torch.randn(len(tables), H, D, dtype=dtype)
    step = build_attn_step([(t, s, 1) for t, s in zip(tables, starts)], bs, len(tables), "cpu")
    assert step.decode is not None and step.decode.lengths is not None
    got = fused.decode_attention(q, k_cache, v_cache, step.decode.kv_index, step.decode.lengths, bs)
    assert got is not None
    with eager:
        want = attention_module._attend(q, k_cache, v_cache, step.decode)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
