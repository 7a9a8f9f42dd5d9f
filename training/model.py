"""Build what one run trains: base model + PEFT adapter (+ TALAN block from the core).

Order matters for the matched-init protocol (paper, Appendix J):
1. load the base model;
2. ``torch.manual_seed(seed)`` right before ``get_peft_model``: the adapter's init
   depends on the seed only, not on whether TALAN is present;
3. attach TALAN *after* the adapter, inside ``torch.random.fork_rng`` with its own seed:
   its random init consumes no draw from the global RNG that dropout uses later, and
   PEFT never sees its linears (``target_modules: all-linear`` would otherwise wrap them);
4. re-apply TALAN's trainability scope (PEFT froze everything that is not an adapter).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from talan_serve.block import TalanBlock
from talan_serve.config import TalanConfig
from talan_serve.reference import attach_talan
from talan_serve.trainable import apply_scope
from training.recipe import Recipe


@dataclass
class TrainModel:
    model: nn.Module           # the PEFT model (TALAN attached inside it when present)
    tokenizer: Any
    block: TalanBlock | None
    talan_config: TalanConfig | None
    base_model_dir: str
    device: torch.device
    compute_dtype: torch.dtype


def pick_device(local_rank: int = 0) -> torch.device:
    """This process's device: its own GPU under a multi-process launch, else the CPU."""
    return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """bf16 where the hardware has it (CUDA with bf16), fp32 otherwise (CPU)."""
    has_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if precision == "bf16" and not has_bf16:
        raise RuntimeError("schedule.precision is bf16 but this device has no bf16 support; "
                           "use 'auto' or 'fp32'")
    if precision == "auto":
        return torch.bfloat16 if has_bf16 else torch.float32
    return torch.bfloat16 if precision == "bf16" else torch.float32


def peft_config(recipe: Recipe) -> Any:
    from peft import LoraConfig, TaskType

    adapter = recipe.adapter
    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=adapter.r,
        lora_alpha=adapter.alpha,
        lora_dropout=adapter.dropout,
        target_modules=list(adapter.target_modules),
        bias=adapter.bias,
        use_dora=adapter.type == "dora",
        use_rslora=adapter.type == "rslora",
    )


def build(recipe: Recipe, device: torch.device | None = None) -> TrainModel:
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from talan_serve.base_models import resolve_base_model

    device = device or pick_device()
    dtype = resolve_precision(recipe.schedule.precision, device)
    model_dir = str(resolve_base_model(recipe.base_model))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    # Frozen base weights in the compute dtype; trainable adapter/TALAN weights stay fp32.
    # On a GPU, load straight onto it (a 32B host must not pass through host RAM first).
    placement = {"device_map": {"": device}} if device.type == "cuda" else {}
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, **placement).to(device)
    base.config.use_cache = False

    torch.manual_seed(recipe.seed)  # matched init: the adapter draws from here only
    if device.type == "cuda":
        torch.cuda.manual_seed_all(recipe.seed)
    model = get_peft_model(base, peft_config(recipe))
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.float()

    block, talan_config = None, None
    if recipe.talan is not None:
        talan_config = recipe.talan.resolve(base.config.hidden_size)
        init_seed = recipe.seed if recipe.talan.init_seed is None else recipe.talan.init_seed
        devices = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(init_seed)
            block = attach_talan(model, talan_config)
        apply_scope(block)  # PEFT's freeze would otherwise win

    if recipe.schedule.gradient_checkpointing:
        enable_gradient_checkpointing(model, talan_config)
    return TrainModel(model, tokenizer, block, talan_config, model_dir, device, dtype)


def enable_gradient_checkpointing(model: nn.Module, talan_config: TalanConfig | None) -> None:
    """Checkpoint every decoder layer except the one TALAN hooks.

    TALAN's ``layer_N`` placement is a forward hook on decoder layer N; a checkpointed
    layer replays its forward in backward, after the decoder call has ended, where the
    hook no longer applies TALAN. Leaving that one layer un-checkpointed keeps the hook
    outside the replay (cost: one layer's activations).
    """
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    if talan_config is not None and talan_config.layer_index is not None:
        decoder = model.get_base_model().get_decoder()
        decoder.layers[talan_config.layer_index].gradient_checkpointing = False


def lora_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors (what matched init compares), detached copies on CPU."""
    return {name: p.detach().cpu().clone() for name, p in model.named_parameters()
            if "lora_" in name}


def talan_state(block: TalanBlock | None) -> dict[str, torch.Tensor]:
    if block is None:
        return {}
    return {name: t.detach().cpu().clone() for name, t in block.state_dict().items()}


def count_parameters(model: nn.Module, block: TalanBlock | None) -> dict[str, int]:
    talan_ids = {id(p) for p in block.parameters()} if block is not None else set()
    counts = {"total": 0, "trainable": 0, "adapter_trainable": 0, "talan": 0,
              "talan_trainable": 0}
    for p in model.parameters():
        counts["total"] += p.numel()
        if id(p) in talan_ids:
            counts["talan"] += p.numel()
            counts["talan_trainable"] += p.numel() if p.requires_grad else 0
        elif p.requires_grad:
            counts["adapter_trainable"] += p.numel()
        counts["trainable"] += p.numel() if p.requires_grad else 0
    return counts
