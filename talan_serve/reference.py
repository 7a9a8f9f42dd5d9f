"""TALAN placed in a transformers model: the ground-truth forward for parity and training.

``attach_talan`` hooks one ``TalanBlock`` into a Llama / Qwen2 / Qwen3 / Qwen3-MoE host
(with or without a PEFT adapter). The decoder's forward pre-hook records, per call, which
tokens are real (the 2-D attention mask) and where the running state lives: with a KV
cache (``generate``), each sequence's state ``(N, D)`` is kept on the cache object, so
cached decoding equals recomputing the full sequence at every step.

Gradient checkpointing: a checkpointed decoder layer N replays its forward during
backward, after the decoder call (and so this placement's context) has ended, where the
``layer_N`` hook no longer applies TALAN. Leave layer N un-checkpointed (training does).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from talan_serve.block import TalanBlock
from talan_serve.config import TalanConfig
from talan_serve.trainable import apply_scope

_STATE_ATTR = "_talan_running_state"


@dataclass
class _CallContext:
    """What the current decoder call told the hooks: real-token mask and the state's home."""

    token_mask: Tensor | None
    cache: Any
    past_length: int


class TalanPlacement:
    """The hooks that run ``block`` at its connection point of one decoder.

    ``enabled = False`` is the off switch: the hidden states pass the connection point
    untouched and the running state is neither read nor written, which makes the host
    exactly the adapter-only model (``talan_disabled``; training's ``freeze_steps``).
    """

    def __init__(self, block: TalanBlock, decoder: nn.Module):
        self.block = block
        self.decoder = decoder
        self.enabled = True
        self.context: _CallContext | None = None
        self.recorders: list[list[float]] = []
        self.handles = [
            decoder.register_forward_pre_hook(self._enter, with_kwargs=True),
            decoder.register_forward_hook(self._leave, always_call=True),
        ]
        layer = block.config.layer_index
        if layer is not None:
            self.handles.append(decoder.layers[layer].register_forward_hook(self._after_layer))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    # --- hooks ------------------------------------------------------------------------------

    def _enter(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            raise TypeError("TALAN reference: call the decoder with keyword arguments")
        mask = kwargs.get("attention_mask")
        if mask is not None and (not isinstance(mask, Tensor) or mask.dim() != 2):
            raise ValueError(
                "TALAN reference needs a 2-D attention_mask (batch, total_length) to know "
                "which tokens are padding; got a prepared/4-D mask"
            )
        cache = kwargs.get("past_key_values")
        past_length = int(cache.get_seq_length()) if cache is not None else 0
        self.context = _CallContext(None, cache, past_length)

        input_ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
        seq_len = (input_ids if embeds is None else embeds).shape[1]
        if mask is not None:
            self.context.token_mask = mask[:, -seq_len:]

        if self.block.config.layer_index is None:
            if embeds is None:
                embeds = module.embed_tokens(input_ids)
            kwargs = {**kwargs, "input_ids": None, "inputs_embeds": self._apply(embeds)}
        return args, kwargs

    def _leave(self, module: nn.Module, args: tuple, output: Any) -> None:
        self.context = None

    def _after_layer(self, module: nn.Module, args: tuple, output: Any) -> Any:
        if self.context is None:
            return output
        if isinstance(output, tuple):
            return (self._apply(output[0]), *output[1:])
        return self._apply(output)

    # --- state --------------------------------------------------------------------------------

    def _apply(self, hidden: Tensor) -> Tensor:
        context = self.context
        if context is None or not self.enabled:
            return hidden
        state = None
        if context.cache is not None and context.past_length > 0:
            state = getattr(context.cache, _STATE_ATTR, None)
            if state is None:
                raise RuntimeError(
                    "TALAN reference: the KV cache holds earlier tokens but no TALAN state; "
                    "it was filled without TALAN (or with TALAN disabled), so it cannot resume"
                )
        out, new_state = self.block.forward_padded(hidden, context.token_mask, state)
        if context.cache is not None:
            setattr(context.cache, _STATE_ATTR, new_state)
        if self.recorders:
            self._record(hidden, out, context.token_mask)
        return out

    def _record(self, hidden: Tensor, out: Tensor, token_mask: Tensor | None) -> None:
        weight = 1.0 if token_mask is None else token_mask.unsqueeze(-1).float()
        delta = ((out.float() - hidden.float()) * weight).norm()
        ratio = float(delta / (hidden.float() * weight).norm().clamp_min(1e-30))
        for recorder in self.recorders:
            recorder.append(ratio)


def _base_model(model: nn.Module) -> nn.Module:
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _decoder(model: nn.Module) -> nn.Module:
    base = _base_model(model)
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else getattr(base, "model", None)
    if decoder is None or not hasattr(decoder, "layers") or not hasattr(decoder, "embed_tokens"):
        raise TypeError(
            f"TALAN reference: cannot find the decoder layers of {type(base).__name__}; "
            "supported hosts are Llama, Qwen2, Qwen3 and Qwen3-MoE causal LMs"
        )
    return decoder


def attach_talan(
    hf_model: nn.Module, config: TalanConfig, state_dict: dict[str, Tensor] | None = None
) -> TalanBlock:
    """Insert a TALAN block at ``config.connection_point`` of ``hf_model`` and return it.

    The block becomes the submodule ``talan`` of the (PEFT-unwrapped) host, so it moves
    with ``.to(device)`` and appears in its ``state_dict``. Weights are fp32 and the math
    runs in fp32 whatever the host's dtype. ``state_dict`` (block tensors) is loaded
    strictly; without it the block keeps its random initialisation.
    """
    base = _base_model(hf_model)
    if find_talan(hf_model) is not None:
        raise ValueError("TALAN reference: this model already has a TALAN block attached")
    host = base.config
    config.check_host(host.hidden_size, host.num_hidden_layers)
    decoder = _decoder(hf_model)
    block = TalanBlock(config)
    if state_dict is not None:
        block.load_state_dict(state_dict, strict=True)
    block.to(device=next(base.parameters()).device)
    apply_scope(block)
    base.add_module("talan", block)
    block.placement = TalanPlacement(block, decoder)
    return block


def find_talan(model: nn.Module) -> TalanBlock | None:
    """The TALAN block attached to ``model`` (PEFT-wrapped or not), if any."""
    return next((m for m in model.modules() if isinstance(m, TalanBlock)), None)


def detach_talan(model: nn.Module) -> None:
    block = find_talan(model)
    if block is None:
        return
    block.placement.remove()
    delattr(_base_model(model), "talan")


@contextlib.contextmanager
def talan_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """The off switch: inside, ``model`` computes exactly as without TALAN.

    Switch between whole requests, not in the middle of a cached generation: a disabled
    step neither reads nor advances the running state.
    """
    block = find_talan(model)
    if block is None:
        yield model
        return
    placement = block.placement
    previous, placement.enabled = placement.enabled, False
    try:
        yield model
    finally:
        placement.enabled = previous


@contextlib.contextmanager
def record_perturbation(model: nn.Module) -> Iterator[list[float]]:
    """P1: collect ``||X~ - X||_F / ||X||_F`` at the insertion point, one per forward call.

    Padding is left out of both norms.
    """
    block = find_talan(model)
    if block is None:
        raise ValueError("record_perturbation: the model has no TALAN block")
    ratios: list[float] = []
    block.placement.recorders.append(ratios)
    try:
        yield ratios
    finally:
        block.placement.recorders.remove(ratios)


def load_reference(
    model: str | Path,
    talan: str | Path | TalanConfig | None = None,
    adapter: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> tuple[nn.Module, Any]:
    """Load base model + PEFT adapter + TALAN as an eval-mode transformers model.

    Args:
        model: anything ``talan-serve --model`` takes: a registry name
            (``smollm2-talan-demo``: its base model and checkpoint), a checkpoint
            directory, a local HF model directory; or a hub id, where a hub is reachable.
        talan: a checkpoint directory (its adapter is used when ``adapter`` is None),
            a ``TalanConfig`` (random-initialised block), or None: the checkpoint that
            ``model`` names, if any.
        adapter: a PEFT adapter directory (LoRA / DoRA), or None.

    Returns:
        ``(model, tokenizer)``.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from talan_serve.base_models import resolve_base_model
    from talan_serve.checkpoint import load_checkpoint
    from talan_serve.registry import UnknownModelError, resolve_model

    try:
        resolved = resolve_model(model)
        model_dir, named_checkpoint = resolved.base_model, resolved.checkpoint
    except UnknownModelError:
        model_dir, named_checkpoint = resolve_base_model(model), None
    if talan is None:
        talan = named_checkpoint
    hf_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    config, state_dict = None, None
    if isinstance(talan, TalanConfig):
        config = talan
    elif talan is not None:
        host = hf_model.config
        checkpoint = load_checkpoint(
            talan, hidden_size=host.hidden_size, num_layers=host.num_hidden_layers
        )
        config, state_dict = checkpoint.config, checkpoint.state_dict
        if adapter is None:
            adapter = checkpoint.adapter_dir

    if adapter is not None:
        hf_model = PeftModel.from_pretrained(hf_model, str(adapter))
    if config is not None:
        attach_talan(hf_model, config, state_dict)
    hf_model.eval()
    return hf_model, tokenizer
