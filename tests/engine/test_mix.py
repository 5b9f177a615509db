"""Per-request adapter mixes in the engine: a `MixRef` is composed in the loader thread and runs as
one ordinary adapter. Greedy tokens of a mix equal those of the saved `cat` merge with the same
weights (fp32, tiny base), and a mix batched with single-adapter and base requests gives each its
solo tokens."""

from __future__ import annotations

import pytest

from adapters.format import read_peft, write_peft
from adapters.merge import MergeInput, merge_adapters
from server.engine.mixes import make_mix_ref, read_weights
from server.engine.slots import read_host_adapter
from server.engine.types import AdapterRef, MixRef, SamplingParams
from tests.engine.helpers import make_adapter
from tests.engine.test_engine_parity import PROMPTS, tiny_engine

GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def adapters(tiny_base_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("mix-adapters")
    return [
        make_adapter(root / "qv4", tiny_base_dir, 4, ("q_proj", "v_proj"), seed=21),
        make_adapter(root / "all8", tiny_base_dir, 8, seed=22),
        make_adapter(root / "mlp6", tiny_base_dir, 6, ("gate_proj", "up_proj", "down_proj"), seed=23),
    ]


def _saved_cat(parts: list[tuple[AdapterRef, float]], directory) -> AdapterRef:
    """The `cat` merge of `parts`, written as an ordinary PEFT adapter (the reference)."""
    inputs = [MergeInput(weights=read_peft(ref.path), weight=w, name=ref.id) for ref, w in parts]
    write_peft(merge_adapters(inputs, "cat").weights, directory)
    return AdapterRef(id=f"cat-{directory.name}", path=directory)


def test_mix_ref_is_named_by_content_and_weights(adapters):
    a, b, _ = adapters
    mix = make_mix_ref([(a, 0.7), (b, 0.3)])
    assert isinstance(mix, MixRef) and mix.id.startswith("mix:")
    assert make_mix_ref([(b, 0.3), (a, 0.7)]) == mix  # the same mix whatever the order
    assert make_mix_ref([(a, 0.7), (b, 0.31)]).id != mix.id
    assert [ref.id for ref, _ in mix.parts] == sorted([a.id, b.id])


def test_a_mix_reads_as_one_host_adapter_of_summed_rank(tiny_base_dir, adapters):
    import torch

    engine = tiny_engine(tiny_base_dir)
    mix = make_mix_ref([(adapters[0], 0.5), (adapters[1], -2.0)])
    host = read_host_adapter(mix, engine.slots.targets, engine.config.max_rank, torch.float32)
    assert host.id == mix.id
    assert host.max_rank == 4 + 8  # q/v carry both adapters' ranks
    weights = read_weights(mix)
    assert {path: m.scaling for path, m in weights.modules.items()} == dict.fromkeys(weights.modules, 1.0)


@pytest.mark.parametrize("count", [2, 3])
def test_mix_greedy_tokens_equal_the_saved_cat_merge(tiny_base_dir, adapters, tmp_path, count):
    parts = list(zip(adapters[:count], [0.7, -0.4, 1.3][:count]))
    mix = make_mix_ref(parts)
    cat = _saved_cat(parts, tmp_path / f"cat{count}")
    engine = tiny_engine(tiny_base_dir)
    prompts = PROMPTS[:3]
    got = engine.generate(prompts + prompts, [mix] * 3 + [cat] * 3, GREEDY)
    assert got[:3] == got[3:]
    base = engine.generate(prompts, None, GREEDY)
    assert got[:3] != base, "the mix does not change the output; the test proves nothing"
    assert engine.blocks.num_free == engine.blocks.num_blocks
    assert all(p == 0 for p in engine.slots.pins)


def test_a_mix_in_a_mixed_batch_gives_each_request_its_solo_tokens(tiny_base_dir, adapters):
    engine = tiny_engine(tiny_base_dir, max_loras=3)
    mix = make_mix_ref([(adapters[0], 0.8), (adapters[2], 1.5)])
    other = make_mix_ref([(adapters[1], 0.5), (adapters[2], -0.5)])
    requests = [
        (PROMPTS[0], mix),
        (PROMPTS[1], None),
        (PROMPTS[2], adapters[0]),
        (PROMPTS[3], mix),
        (PROMPTS[0], other),
        (PROMPTS[1], adapters[2]),
        (PROMPTS[2], None),
    ]
    batched = engine.generate([p for p, _ in requests], [a for _, a in requests], GREEDY)
    solo = [engine.generate([p], [a], GREEDY)[0] for p, a in requests]
    assert batched == solo
    # each target really differs from the others on the same prompt (else equality proves little)
    assert len({tuple(t) for t in engine.generate([PROMPTS[0]] * 3, [mix, other, None], GREEDY)}) == 3
    assert engine.slots.residency()[mix.id] in ("device", "host")
    assert engine.blocks.num_free == engine.blocks.num_blocks
