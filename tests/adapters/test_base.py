"""The default base: `loraswap base` prints a directory HF loads, which answers like SmolLM2 should."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from adapters.base import BaseInfo, BaseNotFound, resolve_base
from adapters.base_cli import main


def test_loraswap_base_prints_a_directory_that_answers_paris(capsys, default_base_dir):
    assert main([]) == 0
    path = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert path == default_base_dir and (path / "model.safetensors").is_file()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def test_base_info_matches_the_model_it_describes(default_base_dir):
    info = BaseInfo.from_dir(default_base_dir)
    model = AutoModelForCausalLM.from_pretrained(default_base_dir, dtype=torch.float32)
    for path, (in_features, out_features) in info.all_module_paths().items():
        layer = model.get_submodule(path)
        assert (layer.in_features, layer.out_features) == (in_features, out_features), path
    assert info.num_layers == model.config.num_hidden_layers == 30
    assert len(info.fingerprint) == 64 and info.fingerprint == BaseInfo.from_dir(default_base_dir).fingerprint
    assert info.template_sha256 and "<|im_start|>" in info.chat_template


def test_a_base_path_must_be_a_model_directory(tmp_path):
    with pytest.raises(BaseNotFound, match="config.json"):
        resolve_base(str(tmp_path))
