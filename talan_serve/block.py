"""The TALAN block: summarize -> remix -> writeback, pure torch, no model knowledge.

One implementation serves every caller. Tokens arrive *packed*: ``hidden`` is
``(num_tokens, d)`` holding one or more sequences back to back, ``cu_seqlens`` marks
where each starts, and ``initial_state`` carries each sequence's running summary
``(N, D)`` from earlier calls (a previous chunk or decode step). A whole padded batch,
a chunked prefill, a mixed prefill/decode engine batch and one decode step are all this
one call with different metadata; docs/design.md ("The block") gives the math.

All of it is tensor ops with shapes fixed by the inputs: no host synchronisation, no
Python loop over sequences, no data-dependent branches, so engines can capture it in
CUDA graphs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from talan_serve.config import TalanConfig


def _f32(tensor: Tensor) -> Tensor:
    # The side path runs in fp32 whatever dtype the host casts the module to. Engines keep
    # the block in fp32, and there this is no op at all: at decode sizes each dispatched
    # op costs more than its arithmetic (bench/results/vllm_step_parts_cpu.md).
    return tensor if tensor.dtype == torch.float32 else tensor.float()


@dataclass(frozen=True)
class Entries:
    """Which entry of a stacked block each token runs (``talan_serve.stacks``).

    ``index``: ``(n,)`` each token's entry in the stack; ``slot_mask``: ``(n, T)`` the
    slots of that entry's adapter (its own T, the rest padding that never receives mass).
    """

    index: Tensor
    tokens: Tensor  # (n,) arange, to pick each token's own entry out of all of them
    slot_mask: Tensor


def _param(param: Tensor, entries: Entries | None) -> Tensor:
    """A parameter as the tokens see it: itself, or each token's entry's ``(n, ...)``."""
    return _f32(param) if entries is None else _f32(param).index_select(0, entries.index)


def _linear(layer: nn.Linear, x: Tensor, entries: Entries | None = None) -> Tensor:
    if entries is None:
        bias = None if layer.bias is None else _f32(layer.bias)
        return F.linear(x, _f32(layer.weight), bias)
    # Stacked (A, out, in): every adapter's output in one matmul, then each token's own.
    # At decode sizes one op over A adapters costs less than A ops (dispatch-bound).
    weight = _f32(layer.weight)
    stacks, out = weight.shape[0], weight.shape[1]
    every = F.linear(x, weight.reshape(stacks * out, -1))
    if x.dim() == 2:
        own = every.view(x.shape[0], stacks, out)[entries.tokens, entries.index]
    else:
        own = every.view(*x.shape[:2], stacks, out)[entries.tokens, :, entries.index]
    if layer.bias is None:
        return own
    bias = _param(layer.bias, entries)
    return own + (bias if x.dim() == 2 else bias.unsqueeze(1))


def _select_slots(stacked: Tensor, entries: Entries) -> Tensor:
    """``(n, A * T)`` per-slot values of every adapter -> each token's own ``(n, T)``."""
    return stacked.view(stacked.shape[0], -1, entries.slot_mask.shape[1])[entries.tokens,
                                                                        entries.index]


# The running summary's dtype, whatever the host's: a sum over the whole context.
STATE_DTYPE = torch.float32


def empty_state(config: TalanConfig, num_seqs: int, device: torch.device | str | None = None):
    """Running summaries of ``num_seqs`` fresh sequences: ``(num_seqs, *config.state_shape)``.

    ``state[..., :d]`` is the running numerator N and ``state[..., d]`` the running mass D.
    """
    return torch.zeros(num_seqs, *config.state_shape, dtype=STATE_DTYPE, device=device)


def sequence_index(cu_seqlens: Tensor, num_tokens: int) -> Tensor:
    """Which sequence each packed token belongs to, from cumulative sequence lengths."""
    positions = torch.arange(num_tokens, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return torch.searchsorted(cu_seqlens[1:].contiguous(), positions, right=True)


def running_summary(
    hidden: Tensor,
    assignments: Tensor,
    cu_seqlens: Tensor | None,
    initial_state: Tensor,
    eps: float,
) -> tuple[Tensor, Tensor]:
    """Causal per-sequence slot summaries ``z`` and each sequence's final state.

    Args:
        hidden: ``(num_tokens, d)`` fp32, packed sequences.
        assignments: ``(num_tokens, T)`` fp32 soft assignments A; zero rows contribute nothing.
        cu_seqlens: ``(B + 1,)`` int64 offsets of each sequence in the packed tokens, or
            None for a decode step: one token per sequence (``B = num_tokens``).
        initial_state: ``(B, T, d + 1)`` fp32 state carried in from earlier tokens.

    Returns:
        ``z``: ``(num_tokens, T, d)`` summaries of each token's own prefix, and the
        ``(B, T, d + 1)`` state after each sequence's last token.
    """
    num_tokens, dim = hidden.shape
    weighted = assignments.unsqueeze(-1)
    if cu_seqlens is None:
        # A decode step: the same recurrence with a scan of length one. N and D apart, as
        # building [x; 1] costs a pad that is dearer at this size than the extra op.
        numerator = torch.addcmul(initial_state[..., :dim], weighted, hidden.unsqueeze(1))
        mass = initial_state[..., dim:] + weighted
        return numerator / (mass + eps), torch.cat([numerator, mass], dim=-1)
    # A [x; 1] outer product per slot: (A x, A) in one op.
    contributions = weighted * F.pad(hidden, (0, 1), value=1.0).unsqueeze(1)
    # One scan over all packed tokens, then subtract the scan at each sequence start.
    # fp64 makes that subtraction exact enough at any batch size (fp32 would lose digits
    # to the other sequences' sums) without a host sync or a Python loop over sequences.
    scan = torch.cat(
        [contributions.new_zeros((1, *contributions.shape[1:]), dtype=torch.float64),
         contributions.double().cumsum(dim=0)]
    )
    seq_of_token = sequence_index(cu_seqlens, num_tokens)
    prefix = (scan[1:] - scan[cu_seqlens[seq_of_token]]).float() + initial_state[seq_of_token]
    final_state = initial_state + (scan[cu_seqlens[1:]] - scan[cu_seqlens[:-1]]).float()
    summaries = prefix[..., :dim] / (prefix[..., dim:] + eps)
    return summaries, final_state


class Summarize(nn.Module):
    """Soft assignment of each token over T slots (``attention`` or ``soft_mos``)."""

    def __init__(self, config: TalanConfig):
        super().__init__()
        self.method = config.clustering_method
        d, t = config.hidden_size, config.n_themes
        if self.method == "attention":
            self.slot_queries = nn.Parameter(torch.randn(t, d))
            self.scale = 1.0 / math.sqrt(d)
        else:
            r = config.mixer_dim
            self.projection = nn.Linear(d, r, bias=False)
            self.slot_queries = nn.Parameter(torch.randn(t, r))
            self.slot_prior = nn.Parameter(torch.zeros(t))
            self.scale = 1.0 / math.sqrt(r)

    def forward(self, hidden: Tensor, entries: Entries | None = None) -> Tensor:
        queries = _f32(self.slot_queries)
        if entries is not None:
            queries = queries.reshape(-1, queries.shape[-1])  # (A * T, .): every adapter's
        if self.method == "attention":
            logits = F.linear(hidden, queries)
            if entries is not None:
                logits = _select_slots(logits, entries)
            logits = logits * self.scale
        else:
            projected = _linear(self.projection, hidden, entries)
            scores = F.linear(projected, queries)
            if entries is not None:
                scores = _select_slots(scores, entries)
            logits = torch.add(_param(self.slot_prior, entries), scores, alpha=self.scale)
        if entries is not None:
            # A stacked adapter's padding slots: exactly zero assignment, so never any mass.
            logits = logits.masked_fill(~entries.slot_mask, float("-inf"))
        return torch.softmax(logits, dim=-1)


class MultiheadLocalMixer(nn.Module):
    """Token attends over its own T slots in a shared r-dim space (one U for both)."""

    def __init__(self, config: TalanConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.down = nn.Linear(config.hidden_size, config.mixer_dim, bias=False)
        self.up = nn.Linear(config.mixer_dim, config.hidden_size, bias=False)

    def forward(self, hidden: Tensor, summaries: Tensor, assignments: Tensor,
                entries: Entries | None = None) -> Tensor:
        n, t, _ = summaries.shape
        query = _linear(self.down, hidden, entries).view(n, self.num_heads, -1)
        slots = _linear(self.down, summaries, entries).view(n, t, self.num_heads, -1)
        return self.up_project(_attend(query, slots, slots, entries), entries)

    def up_project(self, mixed: Tensor, entries: Entries | None = None) -> Tensor:
        return _linear(self.up, mixed.reshape(mixed.shape[0], -1), entries)


class CrossAttnMixer(nn.Module):
    """Token queries and slot keys/values through separate projections."""

    def __init__(self, config: TalanConfig):
        super().__init__()
        d, r = config.hidden_size, config.mixer_dim
        self.query = nn.Linear(d, r, bias=False)
        self.key = nn.Linear(d, r, bias=False)
        self.value = nn.Linear(d, r, bias=False)
        self.out = nn.Linear(r, d, bias=False)

    def forward(self, hidden: Tensor, summaries: Tensor, assignments: Tensor,
                entries: Entries | None = None) -> Tensor:
        query = _linear(self.query, hidden, entries).unsqueeze(1)
        keys = _linear(self.key, summaries, entries).unsqueeze(2)
        values = _linear(self.value, summaries, entries).unsqueeze(2)
        return _linear(self.out, _attend(query, keys, values, entries).squeeze(1), entries)


class GatedCrossAttnMixer(CrossAttnMixer):
    """cross_attn output H0 times a rank-r sigmoid gate of ``[X; H0]``."""

    def __init__(self, config: TalanConfig):
        super().__init__(config)
        d, r = config.hidden_size, config.mixer_dim
        self.gate_down = nn.Linear(2 * d, r, bias=False)
        self.gate_up = nn.Linear(r, d, bias=True)

    def forward(self, hidden: Tensor, summaries: Tensor, assignments: Tensor,
                entries: Entries | None = None) -> Tensor:
        attended = super().forward(hidden, summaries, assignments, entries)
        gate_input = torch.cat([hidden, attended], dim=-1)
        gate = torch.sigmoid(_linear(self.gate_up, _linear(self.gate_down, gate_input, entries),
                                     entries))
        return gate * attended


class PerTokenMixer(nn.Module):
    """MLP over ``[X_i; sum_t A[i,t] z[i,t]]``, 2d -> r -> d."""

    def __init__(self, config: TalanConfig):
        super().__init__()
        d, r = config.hidden_size, config.mixer_dim
        self.fc_in = nn.Linear(2 * d, r)
        self.fc_out = nn.Linear(r, d)

    def forward(self, hidden: Tensor, summaries: Tensor, assignments: Tensor,
                entries: Entries | None = None) -> Tensor:
        mixed_summary = (assignments.unsqueeze(-1) * summaries).sum(dim=1)
        inner = F.gelu(_linear(self.fc_in, torch.cat([hidden, mixed_summary], dim=-1), entries))
        return _linear(self.fc_out, inner, entries)


def _attend(query: Tensor, keys: Tensor, values: Tensor, entries: Entries | None = None) -> Tensor:
    """Per-token attention over its own slots: query (n, h, c), keys/values (n, T, h, c)."""
    # Broadcast products, not einsum: a token meets only T slots, and einsum's permutes
    # and batched matmul dispatch more ops than the arithmetic is worth.
    scores = (keys * query.unsqueeze(1)).sum(-1) * (1.0 / math.sqrt(query.shape[-1]))
    if entries is not None:
        scores = scores.masked_fill(~entries.slot_mask.unsqueeze(-1), float("-inf"))
    weights = torch.softmax(scores, dim=1)
    return (weights.unsqueeze(-1) * values).sum(1)


MIXERS: dict[str, type[nn.Module]] = {
    "multihead_local": MultiheadLocalMixer,
    "cross_attn": CrossAttnMixer,
    "gated_cross_attn": GatedCrossAttnMixer,
    "per_token_mix": PerTokenMixer,
}


class Writeback(nn.Module):
    """``direct``: alpha * H; ``learned_gate``: v * 2 sigmoid(u.[X;H] + b) * H.

    Holds exactly the parameters that ``trainable="gate_only"`` trains and that the
    gradient scale leaves alone (alpha and the gate).
    """

    def __init__(self, config: TalanConfig):
        super().__init__()
        self.integration = config.integration_type
        d = config.hidden_size
        if self.integration == "direct":
            self.alpha = nn.Parameter(torch.tensor(config.alpha))
        else:
            width = d if config.gate_type == "vector" else 1
            self.gate_value = nn.Parameter(torch.full((width,), config.alpha))
            self.gate_proj = nn.Parameter(torch.zeros(2 * d))
            self.gate_bias = nn.Parameter(torch.zeros(()))

    def forward(self, hidden: Tensor, perturbation: Tensor,
                entries: Entries | None = None) -> Tensor:
        """The additive update ``X~ - X``."""
        if self.integration == "direct":
            alpha = _param(self.alpha, entries)
            return (alpha if entries is None else alpha.unsqueeze(-1)) * perturbation
        gate_input = torch.cat([hidden, perturbation], dim=-1)
        if entries is None:
            modulation = torch.mv(gate_input, _f32(self.gate_proj))
        else:
            modulation = (gate_input * _param(self.gate_proj, entries)).sum(-1)
        modulation = 2.0 * torch.sigmoid(modulation + _param(self.gate_bias, entries))
        return _param(self.gate_value, entries) * modulation.unsqueeze(-1) * perturbation


class TalanBlock(nn.Module):
    """``X~ = writeback(remix(summarize(X)))`` with the causal running summary.

    The block always acts; the off switch belongs to whoever places it (the reference's
    ``TalanPlacement.enabled``, an engine's per-request switch). A stacked block
    (``talan_serve.stacks``) is this class with a leading entry dimension on every
    parameter and a ``slot_mask`` buffer; ``perturbation(..., entries=...)`` runs it.
    """

    def __init__(self, config: TalanConfig):
        super().__init__()
        self.config = config
        self.summarize = Summarize(config)
        self.mixer = MIXERS[config.network_type](config)
        self.writeback = Writeback(config)

    def perturbation(
        self,
        hidden: Tensor,
        cu_seqlens: Tensor | None,
        initial_state: Tensor | None = None,
        token_weight: Tensor | None = None,
        entries: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """fp32 ``X~ - X`` for packed tokens, and each sequence's state after them.

        Args:
            hidden: ``(num_tokens, d)`` residual stream, any float dtype.
            cu_seqlens: ``(B + 1,)`` offsets of the packed sequences (int64), or None for
                a decode step (one token per sequence, each continuing ``initial_state``).
            initial_state: ``(B, T, d + 1)`` carried state; None for fresh sequences.
            token_weight: ``(num_tokens,)`` 1 for real tokens, 0 for padding, which then
                contributes nothing to any summary.
            entries: a stacked block's (``talan_serve.stacks``) ``(num_tokens,)`` entry per
                token.
        """
        if torch.is_autocast_enabled(hidden.device.type):
            with torch.autocast(device_type=hidden.device.type, enabled=False):
                return self._perturbation(hidden, cu_seqlens, initial_state, token_weight,
                                          entries)
        return self._perturbation(hidden, cu_seqlens, initial_state, token_weight, entries)

    def _perturbation(
        self,
        hidden: Tensor,
        cu_seqlens: Tensor | None,
        initial_state: Tensor | None,
        token_weight: Tensor | None,
        entries: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        x = _f32(hidden)
        if initial_state is None:
            num_seqs = x.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1
            initial_state = empty_state(self.config, num_seqs, x.device)
        selected = None
        if entries is not None:
            selected = Entries(entries, torch.arange(entries.shape[0], device=entries.device),
                               self.slot_mask.index_select(0, entries))
        assignments = self.summarize(x, selected)
        if token_weight is not None:
            assignments = assignments * token_weight.to(assignments.dtype).unsqueeze(-1)
        summaries, state = running_summary(
            x, assignments, cu_seqlens, initial_state, self.config.eps
        )
        return self.writeback(x, self.mixer(x, summaries, assignments, selected), selected), state

    def forward(
        self,
        hidden: Tensor,
        cu_seqlens: Tensor | None,
        initial_state: Tensor | None = None,
        token_weight: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Packed ``X~`` in ``hidden``'s dtype and the new state (see ``perturbation``)."""
        delta, state = self.perturbation(hidden, cu_seqlens, initial_state, token_weight)
        return hidden + delta.to(hidden.dtype), state

    def forward_padded(
        self,
        hidden: Tensor,
        attention_mask: Tensor | None = None,
        initial_state: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """``(B, S, d)`` batch; ``attention_mask`` ``(B, S)`` zero where padded."""
        batch, seq_len, dim = hidden.shape
        cu_seqlens = torch.arange(batch + 1, device=hidden.device, dtype=torch.long) * seq_len
        weight = None if attention_mask is None else attention_mask.reshape(-1)
        out, state = self.forward(hidden.reshape(-1, dim), cu_seqlens, initial_state, weight)
        return out.view(batch, seq_len, dim), state
