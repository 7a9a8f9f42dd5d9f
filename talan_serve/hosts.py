"""The paper's four hosts as transformers configs (published shapes, no weights).

Used to size TALAN at its real host shape (README table, ``python -m talan_serve.hosts``)
and to build random-weight stand-ins of the same shape for GPU benchmarks.
"""

from __future__ import annotations

from typing import Any

import torch

from talan_serve.block import TalanBlock
from talan_serve.config import preset

_QWEN3_COMMON: dict[str, Any] = dict(vocab_size=151936, head_dim=128, tie_word_embeddings=False,
                                     max_position_embeddings=40960, rope_theta=1000000.0)

HOSTS: dict[str, tuple[str, str, dict[str, Any]]] = {
    # preset: (model id, config class, fields)
    "q32b": ("Qwen/Qwen3-32B", "Qwen3Config", dict(
        hidden_size=5120, num_hidden_layers=64, num_attention_heads=64, num_key_value_heads=8,
        intermediate_size=25600, **_QWEN3_COMMON)),
    "ds32b": ("deepseek-ai/DeepSeek-R1-Distill-Qwen-32B", "Qwen2Config", dict(
        hidden_size=5120, num_hidden_layers=64, num_attention_heads=40, num_key_value_heads=8,
        intermediate_size=27648, vocab_size=152064, tie_word_embeddings=False,
        max_position_embeddings=131072)),
    "q8b": ("Qwen/Qwen3-8B", "Qwen3Config", dict(
        hidden_size=4096, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
        intermediate_size=12288, **_QWEN3_COMMON)),
    "moe": ("Qwen/Qwen3-30B-A3B", "Qwen3MoeConfig", dict(
        hidden_size=2048, num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
        intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
        num_experts_per_tok=8, **_QWEN3_COMMON)),
}

# Table 6 of the paper: TALAN trainable parameters and their share of the backbone.
PAPER_TABLE_6 = {"q32b": (17e6, 0.0032), "ds32b": (6e6, 0.0011), "q8b": (9e6, 0.0030),
                 "moe": (12e6, 0.0020)}


def host_config(name: str) -> Any:
    import transformers

    _, cls, fields = HOSTS[name]
    return getattr(transformers, cls)(**fields)


def count_parameters(name: str) -> tuple[int, int]:
    """(TALAN parameters, backbone parameters) of a preset at its host's shape."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        backbone = AutoModelForCausalLM.from_config(host_config(name))
        talan = TalanBlock(preset(name))
    return (sum(p.numel() for p in talan.parameters()),
            sum(p.numel() for p in backbone.parameters()))


def markdown_table() -> str:
    rows = ["| preset | host | TALAN params | backbone params | share | paper (Table 6) |",
            "|---|---|---|---|---|---|"]
    for name, (model_id, _, _) in HOSTS.items():
        talan, backbone = count_parameters(name)
        paper_params, paper_share = PAPER_TABLE_6[name]
        rows.append(f"| {name} | {model_id} | {talan / 1e6:.2f}M | {backbone / 1e9:.2f}B | "
                    f"{100 * talan / backbone:.3f}% | {paper_params / 1e6:.0f}M "
                    f"({100 * paper_share:.2f}%) |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
