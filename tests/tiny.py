"""A tiny Llama-family model and tokenizer, built in-process, saved as a real HF directory.

Every CPU test that needs "a base" but not the real default's behaviour uses this: a 2-layer
Llama with random weights (seeded) and a byte-level BPE tokenizer trained on a few sentences,
with the same ChatML special tokens and chat template as SmolLM2.
"""

from __future__ import annotations

from pathlib import Path

import torch

CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# ChatML with Hermes / Qwen2.5-style tools: the definitions as JSON in the system turn, and calls
# written as `<tool_call>\n{"name": ..., "arguments": ...}\n</tool_call>` (plain text, no special tokens).
HERMES_TOOLS_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}{% else %}You are a helpful AI assistant.{% endif %}"
    "\n\n# Tools\n\n<tools>{% for tool in tools %}{{ '\n' }}{{ tool | tojson }}{% endfor %}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}'
    "\n</tool_call><|im_end|>\n"
    "{% elif messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant.<|im_end|>\n' }}"
    "{% endif %}"
    "{% for message in messages %}{% if tools and loop.first and message['role'] == 'system' %}"
    "{% elif message['role'] == 'assistant' and message.tool_calls %}<|im_start|>assistant\n"
    "{% if message.content %}{{ message.content }}\n{% endif %}{% for call in message.tool_calls %}"
    '<tool_call>\n{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}'
    "\n</tool_call>{% endfor %}<|im_end|>\n"
    "{% elif message['role'] == 'tool' %}"
    "<|im_start|>user\n<tool_response>\n{{ message['content'] }}\n</tool_response><|im_end|>\n"
    "{% else %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "You are a helpful AI assistant. Hello! How can I help you today?",
    "system user assistant: answer the question briefly and politely.",
    "Numbers 0 1 2 3 4 5 6 7 8 9 and punctuation , . ; : ! ? ' \" ( ) [ ] { } < > | / \\ - _ = +",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ",
]


def build_tokenizer(vocab_size: int = 384):
    """A byte-level BPE PreTrainedTokenizerFast with ChatML specials and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|im_end|>",
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def tiny_config(vocab_size: int, **overrides):
    from transformers import LlamaConfig

    tokens = dict(bos_token_id=1, eos_token_id=2, pad_token_id=2)
    params = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        **tokens,
    )
    params.update(overrides)
    return LlamaConfig(**params)


def build_tiny_base(directory: Path, seed: int = 0, **config_overrides) -> Path:
    """Write a tiny random Llama + tokenizer as an HF directory (safetensors) and return it."""
    from transformers import LlamaForCausalLM

    directory = Path(directory)
    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    config = tiny_config(len(tokenizer), **config_overrides)
    model = LlamaForCausalLM(config).eval()
    # Random init is std 0.02: scale up so logits are peaked and greedy decoding is stable
    # (ties between near-equal logits would make greedy comparisons flaky).
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def with_chat_template(base_dir: Path, directory: Path, template: str) -> Path:
    """A copy of the tiny base at `directory` whose tokenizer carries `template` (same weights)."""
    import json
    import shutil

    directory = Path(directory)
    shutil.copytree(base_dir, directory)
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("chat_template", None)
    config_path.write_text(json.dumps(config))
    (directory / "chat_template.jinja").write_text(template)
    return directory
