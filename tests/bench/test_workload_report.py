"""The benchmark's building blocks: a deterministic workload, honest target verdicts, written files."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from adapters.base import LINEAR_MODULES, BaseInfo
from adapters.format import read_peft
from bench.hf_baseline import left_pad, linear_layers, load_hf_model
from bench.report import Measure, Report, Target
from bench.workload import DELTA_RATIO, RANK, chat_prompts, round_robin, write_adapters


def test_adapters_are_deterministic_distinct_and_sized(tiny_base_dir, tmp_path):
    first = write_adapters(tiny_base_dir, tmp_path / "one", 2)
    again = write_adapters(tiny_base_dir, tmp_path / "two", 2)
    a, b, a2 = (read_peft(d) for d in (first[0], first[1], again[0]))
    info = BaseInfo.from_dir(tiny_base_dir, with_fingerprint=False)
    assert set(a.modules) == set(info.all_module_paths())
    assert a.target_modules == sorted(LINEAR_MODULES) and a.max_rank == RANK
    with safe_open(str(tiny_base_dir / "model.safetensors"), framework="pt") as handle:
        for path, module in a.modules.items():
            assert torch.equal(module.A, a2.modules[path].A) and torch.equal(module.B, a2.modules[path].B)
            assert not torch.equal(module.B, b.modules[path].B)
            ratio = module.delta().norm() / handle.get_tensor(f"{path}.weight").float().norm()
            assert ratio == pytest.approx(DELTA_RATIO, rel=1e-3)


def test_prompts_equal_the_tokenizers_own_chat_template(tiny_base_dir):
    from transformers import AutoTokenizer

    from bench.workload import QUESTIONS

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_base_dir))
    prompts = chat_prompts(tiny_base_dir, 3)
    for prompt, question in zip(prompts, QUESTIONS):
        expected = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=True, return_dict=False
        )
        assert prompt == list(expected)


def test_round_robin_assignment():
    prompts = [[1], [2], [3]]
    assert [r.adapter for r in round_robin(prompts, 2)] == [0, 1, 0]
    assert [r.adapter for r in round_robin(prompts, None)] == [None] * 3
    many = round_robin(prompts, 5, count=5)
    assert [r.adapter for r in many] == [0, 1, 2, 3, 4] and many[4].prompt_ids == (2,)


def test_left_pad_keeps_prompts_right_aligned():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_matmul_bound_covers_every_linear_weight(tiny_base_dir):
    model = load_hf_model(tiny_base_dir, "none", torch.float32)
    layers = linear_layers(model)
    assert len(layers) == model.config.num_hidden_layers * len(LINEAR_MODULES) + 1
    assert layers[-1] is model.lm_head and layers[0] is model.model.layers[0].self_attn.q_proj


def test_target_verdicts():
    values = {"a": 60.0, "b": 100.0, "e": 40.0, "zero": 0.0}
    assert Target("t", "a", 0.5, "b").evaluate(values) == (0.6, "met")
    assert Target("t", "a", 0.85, "b").evaluate(values) == (0.6, "not met")
    assert Target("t", "e", 50.0, kind="max").evaluate(values) == (40.0, "met")
    assert Target("t", "e", 30.0, kind="max").evaluate(values) == (40.0, "not met")
    assert Target("t", "a", 1.0, "missing").evaluate(values) == (None, "n/a")
    assert Target("t", "a", 1.0, "zero").evaluate(values) == (None, "n/a")
    assert Target("t", "missing", 1.0, kind="max").evaluate(values) == (None, "n/a")


def test_report_table_json_and_png(tmp_path):
    report = Report("demo", targets=[Target("speed", "a", 2.0, "b"), Target("load", "e", 50.0, kind="max")])
    report.add(Measure("a", "fast", 30.0, "tok/s"))
    report.add(Measure("b", "slow", 10.0, "tok/s"))
    report.add(Measure("e", "load", 70.0, "ms", "n=3"))
    table = report.table()
    assert "(a)/(b) >= 2" in table and "met" in table and "not met" in table
    json_path, png_path = report.write("demo", tmp_path)
    data = json.loads(json_path.read_text())
    assert [t["verdict"] for t in data["targets"]] == ["met", "not met"]
    assert data["targets"][0]["observed"] == pytest.approx(3.0)
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
