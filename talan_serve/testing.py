"""Tiny random-weight hosts and checkpoints for tests and benchmarks (no hub needed).

The hosts use the real transformers architectures (Qwen3, Qwen3-MoE, Llama, Qwen2) at a
few layers and head_dim 32 (the smallest head size vLLM's CPU attention takes), with a
byte-level BPE tokenizer trained offline on generated text and a ChatML chat template.
``qwen3-thinking`` is the Qwen3 host made Qwen3-style in its tokenizer too: Qwen3's added
tokens for thinking and tool calls (``<think>``, ``</think>``, ``<tool_call>``,
``</tool_call>``, not special, as in Qwen3) and Qwen3's own chat template (reasoning,
``enable_thinking``, tools).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch

from talan_serve.config import TalanConfig

# ChatML, rendering tools and tool calls as Qwen's templates do (hermes format).
CHAT_TEMPLATE = (
    "{% if tools %}{{ '<|im_start|>system\n' }}"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\n\n' }}{% endif %}"
    "{{ '# Tools\n\nYou may call one or more functions. Function signatures within <tools>'"
    " + '</tools> XML tags:\n<tools>' }}"
    "{% for tool in tools %}{{ '\n' + (tool | tojson) }}{% endfor %}"
    "{{ '\n</tools>\n\nFor each function call, return a json object with the function name '"
    " + 'and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n'"
    " + '{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call>'"
    " + '<|im_end|>\n' }}{% endif %}"
    "{% for message in messages %}"
    "{% if tools and loop.first and message['role'] == 'system' %}"
    "{% elif message['role'] == 'assistant' and message.get('tool_calls') %}"
    "{{ '<|im_start|>assistant\n' + (message['content'] or '') }}"
    "{% for call in message['tool_calls'] %}{{ '<tool_call>\n{\"name\": \"'"
    " + call['function']['name'] + '\", \"arguments\": '"
    " + (call['function']['arguments'] | tojson) + '}\n</tool_call>' }}{% endfor %}"
    "{{ '<|im_end|>\n' }}"
    "{% elif message['role'] == 'tool' %}"
    "{{ '<|im_start|>user\n<tool_response>\n' + message['content'] + '\n</tool_response>'"
    " + '<|im_end|>\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Qwen3's chat template (Qwen/Qwen3-8B): ChatML, tools in the hermes format, an assistant
# turn's reasoning in <think> blocks (kept for the turns after the last user query), and
# enable_thinking=false writing an empty think block into the generation prompt.
QWEN3_CHAT_TEMPLATE = (
    "{%- if tools %}{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}"
    "{{- \"# Tools\\n\\nYou may call one or more functions to assist with the user query."
    "\\n\\nYou are provided with function signatures within <tools></tools> XML tags:"
    "\\n<tools>\" }}"
    "{%- for tool in tools %}{{- \"\\n\" }}{{- tool | tojson }}{%- endfor %}"
    "{{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name "
    "and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": "
    "<function-name>, \\\"arguments\\\": <args-json-object>}\\n</tool_call><|im_end|>\\n\" }}"
    "{%- else %}{%- if messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}"
    "{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}"
    "{%- for message in messages[::-1] %}{%- set index = (messages|length - 1) - loop.index0 %}"
    "{%- if ns.multi_step_tool and message.role == 'user' and message.content is string and "
    "not(message.content.startswith('<tool_response>') and "
    "message.content.endswith('</tool_response>')) %}"
    "{%- set ns.multi_step_tool = false %}{%- set ns.last_query_index = index %}"
    "{%- endif %}{%- endfor %}"
    "{%- for message in messages %}"
    "{%- if message.content is string %}{%- set content = message.content %}"
    "{%- else %}{%- set content = '' %}{%- endif %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}"
    "{%- elif message.role == 'assistant' %}{%- set reasoning_content = '' %}"
    "{%- if message.reasoning_content is string %}"
    "{%- set reasoning_content = message.reasoning_content %}"
    "{%- else %}{%- if '</think>' in content %}"
    "{%- set reasoning_content = content.split('</think>')[0].rstrip('\\n')"
    ".split('<think>')[-1].lstrip('\\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}"
    "{%- endif %}{%- endif %}"
    "{%- if loop.index0 > ns.last_query_index %}"
    "{%- if loop.last or (not loop.last and reasoning_content) %}"
    "{{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n')"
    " + '\\n</think>\\n\\n' + content.lstrip('\\n') }}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + content }}{%- endif %}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + content }}{%- endif %}"
    "{%- if message.tool_calls %}{%- for tool_call in message.tool_calls %}"
    "{%- if (loop.first and content) or (not loop.first) %}{{- '\\n' }}{%- endif %}"
    "{%- if tool_call.function %}{%- set tool_call = tool_call.function %}{%- endif %}"
    "{{- '<tool_call>\\n{\"name\": \"' }}{{- tool_call.name }}{{- '\", \"arguments\": ' }}"
    "{%- if tool_call.arguments is string %}{{- tool_call.arguments }}"
    "{%- else %}{{- tool_call.arguments | tojson }}{%- endif %}"
    "{{- '}\\n</tool_call>' }}{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if loop.first or (messages[loop.index0 - 1].role != 'tool') %}"
    "{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' }}{{- content }}{{- '\\n</tool_response>' }}"
    "{%- if loop.last or (messages[loop.index0 + 1].role != 'tool') %}"
    "{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Qwen3's added tokens that are not special: they stay in decoded text, where reasoning
# and tool-call parsers read them.
QWEN3_ADDED_TOKENS = ["<think>", "</think>", "<tool_call>", "</tool_call>"]
VOCAB_SIZE = 512
# The Qwen3 host with Qwen3's thinking and tool-call tokens and Qwen3's chat template (the
# plain "qwen3" host keeps the ChatML template, which the other tests' prompts rely on).
THINKING_HOST = "qwen3-thinking"

_WORDS = (
    "the a of to and in is it you that he was for on are with as his they be at one have "
    "this from or had by word but what some we can out other were all there when up use "
    "your how said an each she which do their time if will way about many then them write "
    "would like so these her long make thing see him two has look more day could go come "
    "number sound no most people my over know water than call first who may down side been "
    "now find any new work part take get place made live where after back little only round "
    "man year came show every good me give our under name very through just form sentence "
    "great think say help low line differ turn cause much mean before move right boy old "
    "too same tell does set three want air well also play small end put home read hand port "
    "large spell add even land here must big high such follow act why ask men change went "
    "light kind off need house picture try us again animal point mother world near build "
    "self earth father question answer plus minus times equals apples sum total solve"
).split()


def _corpus(seed: int, lines: int = 3000) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 16))]
        if rng.random() < 0.5:
            words.insert(rng.randint(0, len(words)), str(rng.randint(0, 999)))
        sentence = " ".join(words).capitalize() + rng.choice([".", "?", "!", ","])
        out.append(sentence)
    return out


def build_tokenizer(out_dir: Path, seed: int = 0, qwen3: bool = False) -> Any:
    """A byte-level BPE tokenizer with ChatML specials, trained on generated text;
    ``qwen3``: also Qwen3's added tokens and chat template (the vocabulary keeps its size)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - (len(QWEN3_ADDED_TOKENS) if qwen3 else 0),
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
    )
    fast.chat_template = CHAT_TEMPLATE
    if qwen3:
        fast.add_tokens(QWEN3_ADDED_TOKENS)
        fast.chat_template = QWEN3_CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    return fast


def tiny_host_config(arch: str, vocab_size: int) -> Any:
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config, Qwen3MoeConfig

    common: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        initializer_range=0.08,
        tie_word_embeddings=False,
        eos_token_id=2,
        pad_token_id=0,
        bos_token_id=None,
        dtype="float32",
    )
    if arch == "qwen3":
        return Qwen3Config(head_dim=32, **common)
    if arch == "qwen3_moe":
        return Qwen3MoeConfig(
            head_dim=32, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
            decoder_sparse_step=1, norm_topk_prob=True, **common,
        )
    if arch == "llama":
        return LlamaConfig(head_dim=32, **common)
    if arch == "qwen2":
        return Qwen2Config(**common)
    raise ValueError(f"unknown tiny architecture {arch!r}; use qwen3, qwen3_moe, llama or qwen2")


TINY_ARCHS = ("qwen3", "qwen3_moe", "llama", "qwen2")


def build_tiny_model(arch: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny random-weight HF model + tokenizer to ``out_dir`` (cached if present);
    ``arch`` ``THINKING_HOST``: the Qwen3 host with Qwen3's tokens and chat template."""
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    thinking = arch == THINKING_HOST
    tokenizer = build_tokenizer(out, seed, qwen3=thinking)
    config = tiny_host_config("qwen3" if thinking else arch,
                              vocab_size=max(VOCAB_SIZE, len(tokenizer)))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.eos_token_id = config.eos_token_id
    model.save_pretrained(out)
    return out


def tiny_talan_config(hidden_size: int = 128, **overrides: Any) -> TalanConfig:
    """A small TALAN config with a visible effect (alpha large enough to change logits)."""
    fields: dict[str, Any] = dict(
        hidden_size=hidden_size, connection_point="layer_1", n_themes=3, mixer_dim=32,
        num_heads=4, alpha=0.5,
    )
    fields.update(overrides)
    return TalanConfig(**fields)


def randomize_gate(block: torch.nn.Module, seed: int = 0) -> None:
    """Give the learned gate non-zero u, b (as after training), so tests exercise them."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in block.writeback.named_parameters():
            if name in ("gate_proj", "gate_bias"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)


def build_tiny_checkpoint(
    model_dir: str | Path,
    out_dir: str | Path,
    lora: bool = True,
    talan: bool = True,
    seed: int = 0,
    use_dora: bool = False,
    **talan_overrides: Any,
) -> Path:
    """A TALAN(+LoRA) checkpoint for ``model_dir`` with random, non-trivial weights.

    The LoRA B matrices are random (PEFT's default zero init would make LoRA a no-op,
    hiding adapter bugs).
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from talan_serve.checkpoint import save_checkpoint
    from talan_serve.reference import attach_talan

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    torch.manual_seed(seed)
    block = None
    if talan:
        config = tiny_talan_config(model.config.hidden_size, **talan_overrides)
        block = attach_talan(model, config)
        randomize_gate(block, seed)
    peft_model = None
    if lora:
        lora_config = LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
            init_lora_weights=False, use_dora=use_dora,
        )
        peft_model = get_peft_model(model, lora_config)
    return save_checkpoint(out_dir, str(model_dir), block=block, peft_model=peft_model)


def reseal_checkpoint(path: str | Path) -> Path:
    """Record the current checksum of every file a checkpoint's manifest lists (after a
    test or a benchmark edits its files on purpose)."""
    import json

    from talan_serve.checkpoint import MANIFEST_NAME, sha256_file

    root = Path(path)
    manifest = json.loads((root / MANIFEST_NAME).read_text())
    manifest["files"] = {name: sha256_file(root / name) for name in manifest["files"]
                         if (root / name).is_file()}
    (root / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return root


def reweight_checkpoint(source: str | Path, out_dir: str | Path, seed: int,
                        scale: float = 0.5) -> Path:
    """A copy of a checkpoint with other random weights of the same shapes and about the
    same size (each tensor plus ``scale`` times its own spread of Gaussian noise): another
    adapter of the same kind, without loading the base model."""
    import shutil

    from safetensors.torch import load_file, save_file

    from talan_serve.checkpoint import ADAPTER_FILES, WEIGHTS_NAME

    out = Path(out_dir)
    shutil.copytree(source, out)
    generator = torch.Generator().manual_seed(seed)
    for name in (WEIGHTS_NAME, ADAPTER_FILES[1]):
        file = out / name
        if not file.is_file():
            continue
        tensors = load_file(str(file))
        for key, tensor in tensors.items():
            spread = float(tensor.float().std()) if tensor.numel() > 1 else 0.0
            spread = spread or float(tensor.float().abs().mean()) or 0.01
            noise = torch.randn(tensor.shape, generator=generator) * spread * scale
            tensors[key] = (tensor.float() + noise).to(tensor.dtype).contiguous()
        save_file(tensors, str(file), metadata={"format": "pt"})
        file.chmod(0o644)
    return reseal_checkpoint(out)
