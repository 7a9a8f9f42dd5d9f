"""Checks inside the GPU image that need no GPU (run by build_and_check_gpu_image.py):

    docker run --rm -i --entrypoint python talan-serve - < tests/docker/check_gpu_image.py

- the CUDA build of vLLM imports (its version, torch's CUDA version);
- the ``vllm.general_plugins`` entry point ``talan`` is installed, and vLLM's own plugin
  loader registers every ``Talan<Host>`` architecture;
- ``talan-serve --help`` runs;
- a prepared TALAN model folder (tiny random Qwen3 + TALAN/LoRA checkpoint, through
  ``prepare_model_dir``) names ``TalanQwen3ForCausalLM``, and vLLM's ``ModelRegistry``
  resolves it to the plugin's class (``resolve_model_cls``: imports the model module in
  this process, no device needed) and inspects it as a hybrid model with inner state
  (``inspect_model_cls``: vLLM's subprocess, with plugins loaded there too).

Prints one JSON object (the last line of stdout); exit status 0 when every check passed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HOSTS = ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM", "Qwen2ForCausalLM", "LlamaForCausalLM")
results: dict[str, dict] = {}


def check(name: str):
    def run(fn):
        try:
            detail = fn()
            results[name] = {"passed": True, "detail": detail}
        except Exception as error:  # noqa: BLE001 - every failure is a result here
            results[name] = {"passed": False, "detail": f"{type(error).__name__}: {error}",
                             "traceback": traceback.format_exc()[-3000:]}
        print(f"{'PASS' if results[name]['passed'] else 'FAIL'} {name}: "
              f"{results[name]['detail']}", file=sys.stderr, flush=True)
        return fn
    return run


@check("vllm_cuda_build")
def _():
    import torch
    import vllm

    assert vllm.__version__ == "0.33.0", vllm.__version__
    assert torch.version.cuda, f"torch {torch.__version__} is not a CUDA build"
    return {"vllm": vllm.__version__, "torch": torch.__version__, "cuda": torch.version.cuda,
            "cuda_available": torch.cuda.is_available()}


plugin_package: list[str] = []


@check("entry_point")
def _():
    from importlib.metadata import entry_points

    found = {e.name: e.value for e in entry_points(group="vllm.general_plugins")}
    assert "talan" in found, found
    assert found["talan"].startswith("talan_serve."), found["talan"]
    plugin_package.append(found["talan"].partition(":")[0])
    return found


@check("plugin_registers")
def _():
    from vllm import ModelRegistry
    from vllm.plugins import load_general_plugins

    load_general_plugins()  # what every vLLM process runs at start-up
    archs = set(ModelRegistry.get_supported_archs())
    wanted = {f"Talan{host}" for host in HOSTS}
    assert wanted <= archs, f"missing {sorted(wanted - archs)}"
    return sorted(wanted)


@check("cli_help")
def _():
    out = subprocess.run(["talan-serve", "--help"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-1000:]
    assert "--model" in out.stdout and "OpenAI-compatible" in out.stdout, out.stdout[:500]
    return out.stdout.splitlines()[0]


work = Path(tempfile.mkdtemp(prefix="talan-check-"))
prepared_arch: list[str] = []


@check("prepare_model_dir")
def _():
    from talan_serve.prepared import prepare_model_dir
    from talan_serve.testing import build_tiny_checkpoint, build_tiny_model

    host = build_tiny_model("qwen3", work / "tiny-qwen3")
    checkpoint = build_tiny_checkpoint(host, work / "tiny-talan")
    prepared = prepare_model_dir(checkpoint, work / "served", base_model_dir=host)
    record = json.loads((prepared.path / "config.json").read_text())
    prepared_arch.extend(record["architectures"])
    assert prepared_arch == ["TalanQwen3ForCausalLM"], prepared_arch
    return {"architectures": prepared_arch, "lora_rank": prepared.lora_rank}


def model_config() -> SimpleNamespace:
    """What resolve_model_cls/inspect_model_cls read from a ModelConfig (a real one asks
    the platform for device defaults): the default implementation and the HF config."""
    from transformers import AutoConfig

    return SimpleNamespace(model_impl="auto", runner_type="generate", convert_type="none",
                           hf_config=AutoConfig.from_pretrained(work / "served"))


@check("registry_resolves")
def _():
    from vllm import ModelRegistry
    from vllm.model_executor.models.qwen3 import Qwen3ForCausalLM

    assert prepared_arch, "no prepared folder"
    cls, arch = ModelRegistry.resolve_model_cls(prepared_arch, model_config())
    assert arch == "TalanQwen3ForCausalLM" and cls.__name__ == arch, (cls, arch)
    assert plugin_package and cls.__module__.startswith(plugin_package[0]), cls.__module__
    assert issubclass(cls, Qwen3ForCausalLM), cls.__mro__
    return f"{cls.__module__}.{cls.__qualname__}"


@check("registry_inspects")
def _():
    from vllm import ModelRegistry

    info, arch = ModelRegistry.inspect_model_cls(prepared_arch, model_config())
    flags = {name: getattr(info, name) for name in (
        "is_text_generation_model", "is_hybrid", "has_inner_state", "supports_lora")
        if hasattr(info, name)}
    assert arch == "TalanQwen3ForCausalLM" and all(flags.values()), (arch, flags)
    return flags


shutil.rmtree(work, ignore_errors=True)
print(json.dumps({"passed": all(r["passed"] for r in results.values()), "checks": results}))
sys.exit(0 if all(r["passed"] for r in results.values()) else 1)
