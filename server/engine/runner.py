"""The model runner: one scheduled batch in, one sampled token per finishing sequence out.

Per step it builds, once, every index the 30-odd layers share — token ids, positions and their
rotary rows, the slot mapping and paged-attention gather indices, the LoRA routing — then runs
the model under `torch.inference_mode()` and hands the last-position logits to the sampler.
Decodes are packed before prefill chunks so attention sees two regular groups. The runner knows
nothing about queues, residency policy or text.
"""

from __future__ import annotations

import torch

from server.engine.attention import build_attn_step
from server.engine.lora import build_lora_step
from server.engine.model import CausalLM, StepContext, rope_tables
from server.engine.sampler import SampledToken, Sampler
from server.engine.scheduler import Batch
from server.engine.slots import SlotTable


class ModelRunner:
    def __init__(
        self,
        model: CausalLM,
        block_size: int,
        max_model_len: int,
        device: torch.device,
        dtype: torch.dtype,
        sampler: Sampler,
        slot_table: SlotTable,
    ):
        self.model = model
        self.block_size = block_size
        self.device, self.dtype = device, dtype
        self.sampler = sampler
        cos, sin = rope_tables(model.spec, max_model_len, dtype)
        self.cos, self.sin = cos.to(device), sin.to(device)
        self.slot_table = slot_table  # a version of all slot contents, kept by the adapter slots

    @torch.inference_mode()
    def run(self, batch: Batch, fold_slot: int | None = None) -> list[SampledToken | None]:
        """Returns, per batch entry, the sampled token (None for a prefill chunk that does not end)."""
        if batch.fresh_blocks:
            self.zero_blocks(batch.fresh_blocks)
        if batch.copies:
            self.copy_rows(batch.copies)
        order = sorted(range(len(batch.entries)), key=lambda i: batch.entries[i].num_new != 1)
        entries = [batch.entries[i] for i in order]
        num_decodes = sum(1 for e in entries if e.num_new == 1)
        ids: list[int] = []
        positions: list[int] = []
        token_slots: list[int] = []
        logit_rows: list[int] = []
        for e in entries:
            ids += e.seq.token_ids(e.start, e.start + e.num_new)
            positions += range(e.start, e.start + e.num_new)
            token_slots += [e.seq.slot] * e.num_new
            if e.samples:
                logit_rows.append(len(ids) - 1)
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)
        ctx = StepContext(
            cos=self.cos[pos].unsqueeze(1),  # (T, 1, D)
            sin=self.sin[pos].unsqueeze(1),
            attn=build_attn_step(
                [(e.seq.block_table, e.start, e.num_new) for e in entries], self.block_size, num_decodes, self.device
            ),
            lora=build_lora_step(token_slots, self.slot_table.version, self.device, self.dtype, fold_slot),
        )
        if not logit_rows:
            self.model(
                torch.tensor(ids, device=self.device), ctx, torch.tensor([0], device=self.device)
            )  # fills the KV cache only
            return [None] * len(entries)
        self.sampler.prefetch([e.seq for e in entries if e.samples])  # grammar masks overlap the forward
        logits = self.model(torch.tensor(ids, device=self.device), ctx, torch.tensor(logit_rows, device=self.device))
        sampled = self.sampler.sample(logits, [e.seq for e in entries if e.samples])
        it = iter(sampled)
        out: list[SampledToken | None] = [None] * len(entries)
        for j, e in enumerate(entries):
            if e.samples:
                out[order[j]] = next(it)
        return out

    def copy_rows(self, copies: list[tuple[int, int, int]]) -> None:
        """Copy on write: the first `rows` K/V rows of block `src` into block `dst`, every layer."""
        for layer in self.model.model.layers:
            attn = layer.self_attn
            for cache in (attn.k_cache, attn.v_cache):
                blocks = cache.view(-1, self.block_size, *cache.shape[1:])  # (num_blocks, block_size, heads, dim)
                for src, dst, rows in copies:
                    blocks[dst, :rows] = blocks[src, :rows]

    def zero_blocks(self, blocks: list[int]) -> None:
        """Clear newly allocated KV blocks in every layer, so no stale value is ever read."""
        index = torch.tensor(blocks, dtype=torch.long, device=self.device)
        for layer in self.model.model.layers:
            attn = layer.self_attn
            for cache in (attn.k_cache, attn.v_cache):
                cache.view(-1, self.block_size, *cache.shape[1:]).index_fill_(0, index, 0)
