"""The paper's four audited configurations, one row each.

This is the one table that names them: the model registry (``q8b-talan`` → base model,
checkpoint folder, recipe), the training recipes (``talan: {preset: q8b}`` → TALAN
config and base model), and the benchmarks (host shapes for random-weight runs) read it.
A row holds the host's published shape (no weights), the TALAN config at the host's
width (Table 1 and Appendix C) and the paper's Table 6 size for checking.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from talan_serve.config import TalanConfig, TalanConfigError

_QWEN3_COMMON: dict[str, Any] = dict(vocab_size=151936, head_dim=128, tie_word_embeddings=False,
                                     max_position_embeddings=40960, rope_theta=1000000.0)


@dataclass(frozen=True)
class PaperConfig:
    """One audited configuration.

    Attributes:
        key: the TALAN preset name (``q8b``), as recipes and Appendix C name it.
        base_model: the host's hub id.
        host_class: the transformers config class of the host.
        host_fields: the host's published shape.
        talan: ``TalanConfig`` fields at the host's width. The paper does not publish
            the mixer width r; these values reproduce its Table 6 parameter counts.
        paper_talan_params: Table 6: TALAN's trainable parameters.
        paper_share: Table 6: their share of the backbone.
    """

    key: str
    base_model: str
    host_class: str
    host_fields: dict[str, Any] = field(repr=False)
    talan: dict[str, Any] = field(repr=False)
    paper_talan_params: float
    paper_share: float

    @property
    def model_name(self) -> str:
        """The registry name ``talan-serve --model`` takes."""
        return f"{self.key}-talan"

    @property
    def recipe(self) -> str:
        """The training recipe, relative to the repository root."""
        return f"training/recipes/{self.model_name}.yaml"

    def host_config(self) -> Any:
        import transformers

        return getattr(transformers, self.host_class)(**self.host_fields)


PAPER_CONFIGS: dict[str, PaperConfig] = {
    row.key: row
    for row in (
        PaperConfig(
            "q32b", "Qwen/Qwen3-32B", "Qwen3Config",
            dict(hidden_size=5120, num_hidden_layers=64, num_attention_heads=64,
                 num_key_value_heads=8, intermediate_size=25600, **_QWEN3_COMMON),
            dict(clustering_method="attention", n_themes=2, network_type="multihead_local",
                 integration_type="learned_gate", gate_type="vector", alpha=0.008,
                 freeze_steps=0, connection_point="layer_12", hidden_size=5120,
                 mixer_dim=1664, num_heads=8, trainable="all", grad_scale=500.0),
            17e6, 0.0032),
        PaperConfig(
            "ds32b", "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B", "Qwen2Config",
            dict(hidden_size=5120, num_hidden_layers=64, num_attention_heads=40,
                 num_key_value_heads=8, intermediate_size=27648, vocab_size=152064,
                 tie_word_embeddings=False, max_position_embeddings=131072),
            dict(clustering_method="attention", n_themes=2, network_type="cross_attn",
                 integration_type="learned_gate", gate_type="vector", alpha=0.001,
                 freeze_steps=0, connection_point="embedding", hidden_size=5120,
                 mixer_dim=288, num_heads=8, trainable="all", grad_scale=500.0),
            6e6, 0.0011),
        PaperConfig(
            "q8b", "Qwen/Qwen3-8B", "Qwen3Config",
            dict(hidden_size=4096, num_hidden_layers=36, num_attention_heads=32,
                 num_key_value_heads=8, intermediate_size=12288, **_QWEN3_COMMON),
            dict(clustering_method="attention", n_themes=2, network_type="per_token_mix",
                 integration_type="learned_gate", gate_type="vector", alpha=0.0015,
                 freeze_steps=0, connection_point="layer_4", hidden_size=4096,
                 mixer_dim=736, num_heads=8, trainable="all", grad_scale=1000.0,
                 activate_steps=20),
            9e6, 0.0030),
        PaperConfig(
            "moe", "Qwen/Qwen3-30B-A3B", "Qwen3MoeConfig",
            dict(hidden_size=2048, num_hidden_layers=48, num_attention_heads=32,
                 num_key_value_heads=4, intermediate_size=6144, moe_intermediate_size=768,
                 num_experts=128, num_experts_per_tok=8, **_QWEN3_COMMON),
            dict(clustering_method="soft_mos", n_themes=6, network_type="multihead_local",
                 integration_type="learned_gate", gate_type="scalar", alpha=0.008,
                 freeze_steps=35, connection_point="embedding", hidden_size=2048,
                 mixer_dim=1952, num_heads=8, trainable="frozen", grad_scale=1.0),
            12e6, 0.0020),
    )
}

# The TALAN configs alone, by preset name (a view of the table above).
PRESETS: dict[str, dict[str, Any]] = {key: row.talan for key, row in PAPER_CONFIGS.items()}


def paper_config(name: str) -> PaperConfig:
    try:
        return PAPER_CONFIGS[name]
    except KeyError:
        raise TalanConfigError(
            f"unknown TALAN preset {name!r}; known presets: {', '.join(PAPER_CONFIGS)}"
        ) from None


def preset(name: str, **overrides: Any) -> TalanConfig:
    """One of the paper's audited TALAN configs, optionally with fields overridden."""
    return TalanConfig(**{**paper_config(name).talan, **overrides})


def host_config(name: str) -> Any:
    """The transformers config of a preset's host (published shape, no weights)."""
    return paper_config(name).host_config()


def count_parameters(name: str) -> tuple[int, int]:
    """(TALAN parameters, backbone parameters) of a preset at its host's shape."""
    import torch
    from transformers import AutoModelForCausalLM

    from talan_serve.block import TalanBlock

    with torch.device("meta"):
        backbone = AutoModelForCausalLM.from_config(host_config(name))
        talan = TalanBlock(preset(name))
    return (sum(p.numel() for p in talan.parameters()),
            sum(p.numel() for p in backbone.parameters()))


def markdown_table() -> str:
    rows = ["| preset | host | TALAN params | backbone params | share | paper (Table 6) |",
            "|---|---|---|---|---|---|"]
    for name, row in PAPER_CONFIGS.items():
        talan, backbone = count_parameters(name)
        rows.append(f"| {name} | {row.base_model} | {talan / 1e6:.2f}M | "
                    f"{backbone / 1e9:.2f}B | {100 * talan / backbone:.3f}% | "
                    f"{row.paper_talan_params / 1e6:.0f}M ({100 * row.paper_share:.2f}%) |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
