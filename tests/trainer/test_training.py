"""Training runs on the tiny base: the loss falls, and the adapter we write is what we trained.

PEFT is the reference: `PeftModel.from_pretrained` on a fresh base must give the same logits
as our trained model (LoRA on an fp32 base; QLoRA on the same NF4 quantization).
"""

from __future__ import annotations

import json

import pytest
import torch

from adapters.format import read_peft
from trainer.lora import LoraSpec
from trainer.model import quantize_nf4
from trainer.sft import TrainConfig, run

ROWS = [
    {"prompt": "Capital of France?", "completion": "Paris is the capital of France."},
    {"prompt": "Capital of Italy?", "completion": "Rome is the capital of Italy."},
    {
        "messages": [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": "Hello! How can I help you today?"},
            {"role": "user", "content": "Count to five."},
            {"role": "assistant", "content": "1 2 3 4 5"},
        ]
    },
    {"prompt": "Say the alphabet.", "completion": "abcdefghijklmnopqrstuvwxyz"},
    {"prompt": "Numbers?", "completion": "0 1 2 3 4 5 6 7 8 9"},
    {"prompt": "Be polite.", "completion": "Thank you, I will answer politely."},
]
PROBE = [{"role": "user", "content": "Capital of Italy?"}, {"role": "assistant", "content": "Rome is"}]


def _config(tmp_path, base, **overrides) -> TrainConfig:
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    params = dict(
        data=data,
        out=tmp_path / "adapter",
        base=str(base),
        epochs=12,
        lr=1e-2,
        batch_size=4,
        max_length=128,
        seed=0,
        progress=False,
        lora=LoraSpec(rank=4, alpha=8, dropout=0.0),
    )
    params.update(overrides)
    return TrainConfig(**params)


def _passes_upload_validation(out, info) -> None:
    """The files `--publish` sends pass the server's own upload checks against this base."""
    import shutil

    from adapters.validate import check_template, validate_adapter_dir

    staging = out.parent / "staging"
    staging.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors", "loraswap.json"):
        shutil.copy(out / name, staging / name)
    validated = validate_adapter_dir(staging, info, max_rank=64)
    check_template(validated.provenance, info, False)


def _probe_ids(recipe) -> torch.Tensor:
    return torch.tensor([recipe.template.render(PROBE, continue_final_message=True).ids])


def _peft_logits(base_dir, adapter_dir, ids, quantized: bool) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    if quantized:
        quantize_nf4(base)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_lora_training_lowers_loss_and_peft_loads_the_same_model(tmp_path, tiny_base_dir):
    eval_data = tmp_path / "eval.jsonl"
    eval_data.write_text("\n".join(json.dumps(r) for r in ROWS[:2]) + "\n")
    recipe, result = run(_config(tmp_path, tiny_base_dir, eval_data=eval_data), log=lambda *_: None)
    assert len(result.epoch_train_losses) == 12 and len(result.eval_losses) == 12
    # a random tiny model learns slowly; a clear, monotone-ish fall is what we ask for
    assert result.epoch_train_losses[-1] < 0.8 * result.epoch_train_losses[0]
    assert result.eval_losses[-1] < result.eval_losses[0]
    assert result.tokens_seen == 12 * recipe.train_data.num_tokens

    out = result.out
    assert (out / "loss_curve.png").stat().st_size > 1000
    provenance = json.loads((out / "loraswap.json").read_text())
    assert provenance["base_fingerprint"] == recipe.info.fingerprint
    assert provenance["chat_template_sha256"] == recipe.template.sha256 == recipe.info.template_sha256
    assert provenance["tokenizer_vocab_size"] == len(recipe.tokenizer)
    assert provenance["training_data_sha256"] == recipe.train_data.sha256
    assert provenance["hyperparameters"]["rank"] == 4 and provenance["hyperparameters"]["lr"] == 1e-2
    assert provenance["metrics"]["train_loss"] == pytest.approx(result.train_loss)
    assert provenance["metrics"]["eval_loss"] == pytest.approx(result.eval_loss)
    assert provenance["metrics"]["tokens_seen"] == result.tokens_seen

    weights = read_peft(out)
    assert len(weights.modules) == 2 * 7 and weights.max_rank == 4
    _passes_upload_validation(out, recipe.info)
    assert any(float(m.B.abs().max()) > 0 for m in weights.modules.values())  # it trained

    ids = _probe_ids(recipe)
    model = recipe.trainable.model.eval()
    with torch.no_grad():
        ours = model(input_ids=ids).logits
        base_logits = _peft_logits(tiny_base_dir, out, ids, quantized=False)
    torch.testing.assert_close(base_logits, ours, rtol=1e-4, atol=1e-4)


def test_qlora_trains_on_nf4_and_its_adapter_loads_in_peft(tmp_path, tiny_base_dir):
    import bitsandbytes as bnb

    targets = ("q_proj", "v_proj", "down_proj")
    config = _config(
        tmp_path,
        tiny_base_dir,
        qlora=True,
        lr=3e-2,
        lora=LoraSpec(rank=4, alpha=8, dropout=0.0, target_modules=targets),
    )
    recipe, result = run(config, log=lambda *_: None)
    layer = recipe.trainable.model.model.layers[0]
    assert isinstance(layer.self_attn.q_proj.base, bnb.nn.Linear4bit)
    assert isinstance(layer.self_attn.k_proj, bnb.nn.Linear4bit)  # untargeted layers are NF4 too
    assert layer.self_attn.q_proj.base.weight.quant_state.quant_type == "nf4"
    assert layer.self_attn.q_proj.base.weight.quant_state.blocksize == 64
    assert result.epoch_train_losses[-1] < 0.8 * result.epoch_train_losses[0]
    assert json.loads((result.out / "loraswap.json").read_text())["hyperparameters"]["qlora"] is True

    ids = _probe_ids(recipe)
    model = recipe.trainable.model.eval()
    with torch.no_grad():
        ours = model(input_ids=ids).logits
    # Same NF4 base + our adapter through PEFT's own bnb LoRA layer: the same model.
    torch.testing.assert_close(_peft_logits(tiny_base_dir, result.out, ids, quantized=True), ours, rtol=1e-4, atol=1e-4)
    # And it loads on the dense base too (the server may fold or serve it either way).
    dense = _peft_logits(tiny_base_dir, result.out, ids, quantized=False)
    assert dense.shape == ours.shape and torch.isfinite(dense).all()


def test_bf16_base_with_dropout_trains_fp32_adapters(tmp_path, tiny_base_dir):
    config = _config(tmp_path, tiny_base_dir, epochs=4, dtype="bfloat16", lora=LoraSpec(rank=4, alpha=8, dropout=0.1))
    recipe, result = run(config, log=lambda *_: None)
    wrapper = next(iter(recipe.trainable.wrappers.values()))
    assert wrapper.base.weight.dtype == torch.bfloat16 and wrapper.lora_A.dtype == torch.float32
    assert result.epoch_train_losses[-1] < result.epoch_train_losses[0]
    weights = read_peft(result.out)
    assert all(m.A.dtype == torch.float32 and torch.isfinite(m.B).all() for m in weights.modules.values())
