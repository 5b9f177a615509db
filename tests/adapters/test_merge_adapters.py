"""merge_adapters end to end: exactness of `cat`, the SVD step, PEFT loading, provenance checks.

Adapters are random LoRAs on the tiny base with different ranks, alphas (one rsLoRA) and module
sets. The reference for "loads in PEFT" is the tiny base with `weight += expected delta` written
into each linear layer by hand: PEFT's logits on our merged directory must equal it.
"""

from __future__ import annotations

import pytest
import torch

from adapters.format import LoraModule, LoraWeights, module_scaling, peft_config, read_peft, write_peft
from adapters.merge import IncompatibleAdapters, MergeError, MergeInput, merge_adapters

TINY_SHAPES = {"q_proj": (64, 64), "v_proj": (32, 64), "down_proj": (64, 128), "up_proj": (128, 64)}  # (out, in)


def random_adapter(seed: int, rank: int, alpha: float, paths: list[str], use_rslora: bool = False) -> LoraWeights:
    g = torch.Generator().manual_seed(seed)
    config = peft_config(rank, alpha, sorted({p.rsplit(".", 1)[-1] for p in paths}), use_rslora=use_rslora)
    modules = {}
    for path in paths:
        out_f, in_f = TINY_SHAPES[path.rsplit(".", 1)[-1]]
        A = torch.randn(rank, in_f, generator=g) * 0.2  # (r, in)
        B = torch.randn(out_f, rank, generator=g) * 0.2  # (out, r)
        modules[path] = LoraModule(A=A, B=B, scaling=module_scaling(config, path, rank))
    return LoraWeights(config=config, modules=modules)


def attn(layer, proj):
    return f"model.layers.{layer}.self_attn.{proj}"


def mlp(layer, proj):
    return f"model.layers.{layer}.mlp.{proj}"


@pytest.fixture(scope="module")
def inputs():
    first = random_adapter(1, 4, 8, [attn(0, "q_proj"), attn(1, "q_proj"), attn(0, "v_proj"), attn(1, "v_proj")])
    second = random_adapter(2, 8, 4, [attn(0, "q_proj"), attn(1, "q_proj"), mlp(1, "down_proj")], use_rslora=True)
    return [MergeInput(first, 0.6, None, "first"), MergeInput(second, 1.5, None, "second")]


def weighted_sum(inputs, path):
    return sum(i.weight * i.weights.modules[path].delta() for i in inputs if path in i.weights.modules)


@pytest.fixture(scope="module")
def tiny_model(tiny_base_dir):
    from transformers import AutoModelForCausalLM

    def load():
        return AutoModelForCausalLM.from_pretrained(tiny_base_dir, dtype=torch.float32).eval()

    return load


# PEFT targets down_proj in every layer, but only layer 1's is in the adapter: layer 0's is created
# with B = 0 (a zero delta, which the logit comparisons check) and PEFT warns about the missing keys.
peft_missing_keys = pytest.mark.filterwarnings("ignore:Found missing adapter keys")

IDS = torch.tensor([[1, 10, 57, 200, 33, 91, 5, 2, 140, 17]])


def logits_with_deltas(tiny_model, deltas: dict[str, torch.Tensor]) -> torch.Tensor:
    model = tiny_model()
    with torch.no_grad():
        for path, delta in deltas.items():
            model.get_submodule(path).weight += delta
        return model(IDS).logits


def peft_logits(tiny_model, adapter_dir) -> torch.Tensor:
    from peft import PeftModel

    model = PeftModel.from_pretrained(tiny_model(), str(adapter_dir)).eval()
    with torch.no_grad():
        return model(IDS).logits


def test_cat_is_exactly_the_weighted_sum_of_deltas(inputs):
    result = merge_adapters(inputs, "cat")
    paths = sorted(set(inputs[0].weights.modules) | set(inputs[1].weights.modules))
    assert sorted(result.weights.modules) == paths
    for path in paths:
        merged = result.weights.modules[path]
        torch.testing.assert_close(merged.delta(), weighted_sum(inputs, path), rtol=0, atol=1e-6)
    assert result.weights.modules[attn(0, "q_proj")].rank == 12  # ranks concatenate
    assert result.weights.modules[attn(0, "v_proj")].rank == 4
    assert result.svd_errors == {}


@peft_missing_keys
def test_cat_loads_in_peft_as_base_plus_weighted_sum(inputs, tiny_model, tmp_path):
    result = merge_adapters(inputs, "cat")
    write_peft(result.weights, tmp_path / "cat", result.provenance)
    expected = logits_with_deltas(tiny_model, {p: weighted_sum(inputs, p) for p in result.weights.modules})
    base = logits_with_deltas(tiny_model, {})
    got = peft_logits(tiny_model, tmp_path / "cat")
    assert (expected - base).abs().max() > 0.05  # the adapters really move the logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@peft_missing_keys
@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties", "dare_linear", "dare_ties"])
def test_svd_merges_load_in_peft_with_the_merged_delta(inputs, tiny_model, tmp_path, method):
    result = merge_adapters(inputs, method, density=0.6, seed=3)
    write_peft(result.weights, tmp_path / method, result.provenance)
    # our own reader reproduces scaling 1 for every module, whatever rank_pattern says
    back = read_peft(tmp_path / method)
    for path, module in result.weights.modules.items():
        assert back.modules[path].scaling == 1.0
        torch.testing.assert_close(back.modules[path].delta(), module.delta(), rtol=0, atol=0)
    expected = logits_with_deltas(tiny_model, {p: m.delta() for p, m in result.weights.modules.items()})
    torch.testing.assert_close(peft_logits(tiny_model, tmp_path / method), expected, rtol=1e-4, atol=1e-4)


def test_linear_at_default_rank_is_lossless(inputs):
    result = merge_adapters(inputs, "linear")
    for path, module in result.weights.modules.items():
        assert result.svd_errors[path] < 1e-5
        torch.testing.assert_close(module.delta(), weighted_sum(inputs, path), rtol=0, atol=1e-5)
    # default rank per module: the sum of the ranks of the inputs adapting it
    assert result.weights.modules[attn(0, "q_proj")].rank == 12
    assert result.weights.modules[mlp(1, "down_proj")].rank == 8
    capped = merge_adapters(inputs, "linear", max_rank=6)
    assert capped.weights.modules[attn(0, "q_proj")].rank == 6
    assert capped.svd_errors[attn(0, "q_proj")] > 1e-3


def test_requested_rank_and_its_eckart_young_error(inputs):
    result = merge_adapters(inputs, "ties", rank=3, density=0.5)
    for module in result.weights.modules.values():
        assert module.rank == 3
    path = attn(1, "q_proj")
    full = merge_adapters(inputs, "ties", rank=64, density=0.5).weights.modules[path].delta()
    sigma = torch.linalg.svdvals(full.double())
    bound = float((sigma[3:] ** 2).sum().sqrt() / (sigma**2).sum().sqrt())
    assert result.svd_errors[path] == pytest.approx(bound, rel=1e-4)


def test_dare_is_seeded_per_module(inputs):
    a = merge_adapters(inputs, "dare_linear", seed=5, density=0.5)
    b = merge_adapters(inputs, "dare_linear", seed=5, density=0.5)
    c = merge_adapters(inputs, "dare_linear", seed=6, density=0.5)
    path = attn(0, "q_proj")
    assert torch.equal(a.weights.modules[path].delta(), b.weights.modules[path].delta())
    assert not torch.equal(a.weights.modules[path].delta(), c.weights.modules[path].delta())


def test_merge_provenance_records_the_recipe(inputs):
    result = merge_adapters(inputs, "dare_ties", density=0.7, rank=5, seed=11)
    info = result.provenance["merge"]
    assert info["method"] == "dare_ties" and info["density"] == 0.7 and info["seed"] == 11 and info["rank"] == 5
    assert [(i["name"], i["weight"]) for i in info["inputs"]] == [("first", 0.6), ("second", 1.5)]
    assert info["svd_errors"] == result.svd_errors and len(result.svd_errors) == 5


def with_provenance(inputs, *provenances):
    return [MergeInput(i.weights, i.weight, p, i.name) for i, p in zip(inputs, provenances)]


def test_shared_base_and_template_are_kept(inputs):
    same = {"base_fingerprint": "f" * 64, "chat_template_sha256": "c" * 64}
    result = merge_adapters(with_provenance(inputs, same, None), "cat")
    assert result.provenance["base_fingerprint"] == "f" * 64
    assert result.provenance["chat_template_sha256"] == "c" * 64


def test_different_base_fingerprints_are_refused(inputs):
    a = {"base_fingerprint": "a" * 64, "chat_template_sha256": "c" * 64}
    b = {"base_fingerprint": "b" * 64, "chat_template_sha256": "c" * 64}
    with pytest.raises(IncompatibleAdapters, match="base model fingerprint") as info:
        merge_adapters(with_provenance(inputs, a, b), "linear")
    assert "first=aaaa" in str(info.value) and "second=bbbb" in str(info.value)
    assert "chat-template" not in str(info.value)
    twins = [MergeInput(i.weights, 1.0, p, "adapter") for i, p in zip(inputs, (a, b))]
    with pytest.raises(IncompatibleAdapters, match="adapter=aaaa.*adapter=bbbb"):  # same names, both listed
        merge_adapters(twins, "cat")


def test_different_chat_templates_are_refused(inputs):
    a = {"base_fingerprint": "f" * 64, "chat_template_sha256": "1" * 64}
    b = {"base_fingerprint": "f" * 64, "chat_template_sha256": "2" * 64}
    with pytest.raises(IncompatibleAdapters, match="chat-template sha256") as info:
        merge_adapters(with_provenance(inputs, a, b), "cat")
    assert "fingerprint" not in str(info.value)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(method="mean"), "unknown merge method"),
        (dict(method="ties", density=0.0), "density"),
        (dict(method="ties", density=1.5), "density"),
        (dict(method="linear", rank=65), "rank"),
        (dict(method="cat", max_rank=10), "cat needs rank 12"),
        (dict(method="linear", weights=[float("nan"), 1.0]), "finite"),
    ],
)
def test_bad_requests_are_refused(inputs, kwargs, message):
    weights = kwargs.pop("weights", None)
    if weights is not None:
        inputs = [MergeInput(i.weights, w, i.provenance, i.name) for i, w in zip(inputs, weights)]
    with pytest.raises(MergeError, match=message):
        merge_adapters(inputs, **kwargs)


def test_mismatched_shapes_are_refused(inputs):
    odd = random_adapter(3, 4, 8, [attn(0, "q_proj")])
    odd.modules[attn(0, "q_proj")] = LoraModule(A=torch.zeros(4, 32), B=torch.zeros(64, 4), scaling=2.0)
    with pytest.raises(MergeError, match="shape"):
        merge_adapters([inputs[0], MergeInput(odd, 1.0, None, "odd")], "linear")


@pytest.mark.parametrize("method", ["cat", "ties"])
def test_merged_adapters_pass_the_servers_validation(inputs, tiny_base_dir, tmp_path, method):
    from adapters.base import BaseInfo
    from adapters.validate import validate_adapter_dir

    base = BaseInfo.from_dir(tiny_base_dir)
    identity = {"base_fingerprint": base.fingerprint, "chat_template_sha256": base.template_sha256}
    result = merge_adapters(with_provenance(inputs, identity, identity), method, density=0.5)
    write_peft(result.weights, tmp_path / method, result.provenance)
    validated = validate_adapter_dir(tmp_path / method, base)
    assert validated.provenance.base_fingerprint == base.fingerprint
    assert validated.provenance.merge["method"] == method
    for path, module in result.weights.modules.items():
        torch.testing.assert_close(validated.weights.modules[path].delta(), module.delta(), rtol=0, atol=0)


def test_merge_errors_carry_the_api_envelope(inputs):
    a = {"base_fingerprint": "a" * 64}
    b = {"base_fingerprint": "b" * 64}
    with pytest.raises(IncompatibleAdapters) as refused:
        merge_adapters(with_provenance(inputs, a, b), "cat")
    assert refused.value.status == 422 and refused.value.envelope()["error"]["code"] == "incompatible_adapters"
    with pytest.raises(MergeError) as bad:
        merge_adapters(inputs, "average")
    assert bad.value.status == 400 and bad.value.envelope()["error"]["code"] == "invalid_merge"
