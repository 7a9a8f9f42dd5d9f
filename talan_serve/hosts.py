"""The host architectures TALAN sits in: one table, from which each engine derives its names.

A host is the transformer a TALAN block is placed in, named by its Hugging Face class
(``Qwen3ForCausalLM``). Its TALAN twin is ``Talan<Host>``: the architecture a prepared
folder's ``config.json`` names (``talan_serve.prepared``) and every engine plugin
registers, on top of the engine's own class for the host. vLLM and SGLang keep those
classes in modules of the same name (``vllm.model_executor.models.qwen3``,
``sglang.srt.models.qwen3``), so a plugin derives its host modules from this table with
``host_modules(package)``. Adding a host is one line here (if the engines support it).
"""

from __future__ import annotations

# Host architecture -> the module name that holds it in each engine's model package.
HOSTS: dict[str, str] = {
    "Qwen3ForCausalLM": "qwen3",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "Qwen2ForCausalLM": "qwen2",
    "LlamaForCausalLM": "llama",
}


def talan_architecture(host_architecture: str) -> str:
    """The TALAN twin's architecture name for a host's (``Qwen3ForCausalLM`` ->
    ``TalanQwen3ForCausalLM``)."""
    return f"Talan{host_architecture}"


TALAN_ARCHITECTURES: tuple[str, ...] = tuple(talan_architecture(host) for host in HOSTS)


def host_of(architecture: str) -> str | None:
    """The host architecture of a TALAN twin's name; None for any other name."""
    host = architecture.removeprefix("Talan")
    return host if host != architecture and host in HOSTS else None


def host_modules(package: str) -> dict[str, str]:
    """Host architecture -> its module in an engine's model ``package``."""
    return {host: f"{package}.{module}" for host, module in HOSTS.items()}
