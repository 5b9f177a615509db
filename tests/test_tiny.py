from transformers import AutoModelForCausalLM, AutoTokenizer


def test_tiny_base_loads_and_generates(tiny_base_dir):
    tok = AutoTokenizer.from_pretrained(tiny_base_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_base_dir)
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "Hello"}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == ids["input_ids"].shape[1] + 5
    assert tok.convert_tokens_to_ids("<|im_end|>") == 2
