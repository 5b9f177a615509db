"""Paged attention on plain PyTorch ops: write K/V by slot mapping, read them by block table.

Each layer's cache is a flat `(num_blocks * block_size, num_kv_heads, head_dim)` tensor. Once
per step the runner builds an `AttnStep` (shared by every layer): where each new token's K/V
goes, and for two groups of sequences (decodes, with one query each, and prefill chunks) the
padded block tables (keys are gathered a whole block at a time) and masks that turn the cache into dense keys for
`scaled_dot_product_attention`. On a CPU the decode group skips the gather: fused.py's
`decode_attention` reads each sequence's keys through its block table. Nothing here knows about
adapters or sampling.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from server.engine import fused


@dataclass(frozen=True)
class AttnGroup:
    """Sequences attended together: rows [row_start, row_end) of the step's tokens."""

    row_start: int
    row_end: int
    kv_index: torch.Tensor  # (num_seqs, max_blocks) block ids; padding repeats the sequence's own first block
    mask: torch.Tensor | None  # (num_seqs, 1, max_q, max_kv) bool, True = attend; None = causal
    lengths: torch.Tensor | None  # decodes: (num_seqs,) keys each (CPU int64), for fused.decode_attention
    q_index: torch.Tensor | None  # (num_seqs * max_q,) token rows (padded), None for decodes / one seq
    out_index: torch.Tensor | None  # (row_end - row_start,) padded rows holding the real tokens
    num_seqs: int
    max_q: int
    block_size: int


@dataclass(frozen=True)
class AttnStep:
    slot_mapping: torch.Tensor  # (num_tokens,) flat cache position of each new token
    decode: AttnGroup | None
    prefill: AttnGroup | None


def _block_index(
    block_tables: list[list[int]], lengths: list[int], block_size: int, device
) -> tuple[torch.Tensor, int]:
    """(num_seqs, max_blocks) padded block tables covering each sequence's first `length` tokens,
    and the padded key length max_blocks * block_size. Keys are gathered whole blocks at a time
    (far fewer, larger copies than per-token rows); masks hide the positions past each length.
    Padding repeats the sequence's own first block, never another sequence's: a masked score is
    still multiplied into the PV product, and 0 * NaN would carry another row's values in."""
    max_blocks = -(-max(lengths) // block_size)
    table = [bt[:max_blocks] + bt[:1] * (max_blocks - len(bt[:max_blocks])) for bt in block_tables]
    return torch.tensor(table, dtype=torch.long, device=device), max_blocks * block_size


def build_attn_step(entries: list[tuple[list[int], int, int]], block_size: int, num_decodes: int, device) -> AttnStep:
    """Args:
    entries: per sequence (block_table, start position, number of new tokens), decodes first.
    num_decodes: how many leading entries have exactly one new token.
    """
    slots = []
    for table, start, n in entries:
        for p in range(start, start + n):
            slots.append(table[p // block_size] * block_size + p % block_size)
    slot_mapping = torch.tensor(slots, dtype=torch.long, device=device)
    decode = prefill = None
    if num_decodes:
        dec = entries[:num_decodes]
        lengths = [start + 1 for _, start, _ in dec]
        kv, max_kv = _block_index([t for t, _, _ in dec], lengths, block_size, device)
        mask = None
        if min(lengths) != max_kv or max(lengths) != max_kv:
            mask = (torch.arange(max_kv, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None])[
                :, None, None, :
            ]  # (B, 1, 1, L)
        decode = AttnGroup(0, num_decodes, kv, mask, torch.tensor(lengths), None, None, num_decodes, 1, block_size)
    if len(entries) > num_decodes:
        prefill = _prefill_group(entries[num_decodes:], num_decodes, block_size, device)
    return AttnStep(slot_mapping, decode, prefill)


def _prefill_group(pre, row_start: int, block_size: int, device) -> AttnGroup:
    q_lens = [n for _, _, n in pre]
    starts = [s for _, s, _ in pre]
    kv_lens = [s + n for s, n in zip(starts, q_lens)]
    kv, max_kv = _block_index([t for t, _, _ in pre], kv_lens, block_size, device)
    max_q = max(q_lens)
    row_end = row_start + sum(q_lens)
    if len(pre) == 1 and starts[0] == 0:
        # SDPA's causal mask is top-left aligned: query i sees keys <= i, so the padding of the
        # last block (keys >= q_len) is never seen either.
        return AttnGroup(row_start, row_end, kv, None, None, None, None, 1, max_q, block_size)
    q_pos = torch.arange(max_q)[None, :, None]  # (1, Q, 1)
    k_pos = torch.arange(max_kv)[None, None, :]  # (1, 1, L)
    start_t = torch.tensor(starts)[:, None, None]
    qlen_t = torch.tensor(q_lens)[:, None, None]
    mask = (k_pos <= start_t + q_pos) & (q_pos < qlen_t)  # (B, Q, L)
    mask[:, :, 0] |= True  # padded query rows attend to something, so no NaN appears
    q_index = out_index = None
    if len(pre) > 1:
        rows, outs, offset = [], [], row_start
        for b, n in enumerate(q_lens):
            rows += list(range(offset, offset + n)) + [offset] * (max_q - n)
            outs += [b * max_q + i for i in range(n)]
            offset += n
        q_index = torch.tensor(rows, dtype=torch.long, device=device)
        out_index = torch.tensor(outs, dtype=torch.long, device=device)
    return AttnGroup(
        row_start, row_end, kv, mask[:, None].to(device), None, q_index, out_index, len(pre), max_q, block_size
    )


def paged_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, step: AttnStep
) -> torch.Tensor:
    """Store this step's K/V, then attend. q (T, H, D), k/v (T, KV, D) -> (T, H, D)."""
    k_cache.index_copy_(0, step.slot_mapping, k)
    v_cache.index_copy_(0, step.slot_mapping, v)
    if step.prefill is None:
        assert step.decode is not None  # a step has decodes, a prefill, or both
        return _attend(q, k_cache, v_cache, step.decode)
    if step.decode is None:
        return _attend(q, k_cache, v_cache, step.prefill)
    d = step.decode.row_end
    return torch.cat([_attend(q[:d], k_cache, v_cache, step.decode), _attend(q[d:], k_cache, v_cache, step.prefill)])


def _attend(q: torch.Tensor, k_cache, v_cache, g: AttnGroup) -> torch.Tensor:
    """q holds exactly the group's rows. Returns (rows, H, D)."""
    if g.lengths is not None and g.kv_index.device.type == "cpu":
        out = fused.decode_attention(q, k_cache, v_cache, g.kv_index, g.lengths, g.block_size)
        if out is not None:
            return out  # read through the block table, no gathered copy (fused.py)
    blocked = (-1, g.block_size, *k_cache.shape[1:])  # (num_blocks, block_size, KV, D)
    padded = (g.num_seqs, -1, *k_cache.shape[1:])  # (B, max_blocks * block_size, KV, D)
    # index_select over the flat block ids copies whole blocks; advanced indexing with the 2-D
    # table (aten::index) ran 2.6x (fp32) to 11x (bf16) slower and was ~16 % of a batch-16 step
    blocks = g.kv_index.view(-1)  # (B * max_blocks,)
    keys = k_cache.view(blocked).index_select(0, blocks).view(padded).transpose(1, 2)  # (B, KV, L, D)
    values = v_cache.view(blocked).index_select(0, blocks).view(padded).transpose(1, 2)
    if g.max_q == 1 and g.q_index is None and g.num_seqs == q.shape[0]:
        qb = q.unsqueeze(2)  # (B, H, 1, D)
        out = F.scaled_dot_product_attention(qb, keys, values, attn_mask=g.mask, enable_gqa=True)
        return out.squeeze(2)
    if g.q_index is None:  # one sequence
        qb = q.transpose(0, 1).unsqueeze(0)  # (1, H, Q, D)
        out = F.scaled_dot_product_attention(
            qb, keys, values, attn_mask=g.mask, is_causal=g.mask is None, enable_gqa=True
        )
        return out[0].transpose(0, 1)  # (Q, H, D)
    rel = g.q_index - g.row_start
    qb = q[rel].view(g.num_seqs, g.max_q, *q.shape[1:]).transpose(1, 2)  # (B, H, Q, D)
    out = F.scaled_dot_product_attention(qb, keys, values, attn_mask=g.mask, enable_gqa=True)
    out = out.transpose(1, 2).reshape(g.num_seqs * g.max_q, *q.shape[1:])  # (B*Q, H, D)
    return out[g.out_index]
