"""Engine logprobs to OpenAI's two logprob formats (completions and chat)."""

from __future__ import annotations

from typing import Any

from server.backends.base import PositionLogprobs

# JSON has no -inf; OpenAI-compatible servers clamp (as vLLM's does).
FLOOR = -9999.0


def _clamp(value: float) -> float:
    return value if value > FLOOR else FLOOR


def _top(position: PositionLogprobs, k: int) -> list[tuple[int, Any]]:
    ranked = [(tid, lp) for tid, lp in position.items() if lp.rank is not None and lp.rank <= k]
    ranked.sort(key=lambda item: item[1].rank)
    return ranked[:k]


class CompletionLogprobBuilder:
    """Accumulates the ``logprobs`` object of one completion choice."""

    def __init__(self, k: int, tokenizer: Any) -> None:
        self.k = k
        self.tokenizer = tokenizer
        self.tokens: list[str] = []
        self.token_logprobs: list[float | None] = []
        self.top_logprobs: list[dict[str, float] | None] = []
        self.text_offset: list[int] = []
        self._offset = 0

    def add(self, token_ids: list[int], positions: list[PositionLogprobs | None]) -> None:
        for token_id, position in zip(token_ids, positions, strict=True):
            if position is None or token_id not in position:
                # The first prompt token: nothing predicts it.
                text = self.tokenizer.decode([token_id])
                self.token_logprobs.append(None)
                self.top_logprobs.append(None)
            else:
                chosen = position[token_id]
                text = chosen.text
                self.token_logprobs.append(_clamp(chosen.logprob))
                # The sampled token plus the top k, keyed by text (OpenAI's format).
                top = {text: _clamp(chosen.logprob)}
                for _, lp in _top(position, self.k):
                    top.setdefault(lp.text, _clamp(lp.logprob))
                self.top_logprobs.append(top)
            self.tokens.append(text)
            self.text_offset.append(self._offset)
            self._offset += len(text)

    def take(self) -> dict:
        """The entries added so far (streaming sends each chunk's own entries)."""
        out = self.dump()
        self.tokens, self.token_logprobs, self.top_logprobs, self.text_offset = [], [], [], []
        return out

    def dump(self) -> dict:
        return {
            "tokens": self.tokens,
            "token_logprobs": self.token_logprobs,
            "top_logprobs": self.top_logprobs,
            "text_offset": self.text_offset,
        }


def _entry(text: str, logprob: float) -> dict:
    return {"token": text, "logprob": _clamp(logprob), "bytes": list(text.encode("utf-8"))}


def chat_logprobs(
    token_ids: list[int], positions: list[PositionLogprobs], k: int
) -> list[dict]:
    content = []
    for token_id, position in zip(token_ids, positions, strict=True):
        chosen = position[token_id]
        entry = _entry(chosen.text, chosen.logprob)
        entry["top_logprobs"] = [_entry(lp.text, lp.logprob) for _, lp in _top(position, k)]
        content.append(entry)
    return content
