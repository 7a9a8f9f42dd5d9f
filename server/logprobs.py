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

    def __init__(self, k: int, tokenizer: Any, as_ids: bool = False) -> None:
        self.k = k
        self.tokenizer = tokenizer
        self.as_ids = as_ids
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
                top = {_name(token_id, text, self.as_ids): _clamp(chosen.logprob)}
                for tid, lp in _top(position, self.k):
                    top.setdefault(_name(tid, lp.text, self.as_ids), _clamp(lp.logprob))
                self.top_logprobs.append(top)
            self.tokens.append(_name(token_id, text, self.as_ids))
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


def _name(token_id: int, text: str, as_ids: bool) -> str:
    """A token as the response names it: its text, or ``token_id:ID``
    (``return_tokens_as_token_ids``)."""
    return f"token_id:{token_id}" if as_ids else text


def _entry(token_id: int, text: str, logprob: float, as_ids: bool) -> dict:
    return {"token": _name(token_id, text, as_ids), "logprob": _clamp(logprob),
            "bytes": list(text.encode("utf-8"))}


def chat_logprobs(
    token_ids: list[int], positions: list[PositionLogprobs], k: int, as_ids: bool = False
) -> list[dict]:
    content = []
    for token_id, position in zip(token_ids, positions, strict=True):
        chosen = position[token_id]
        entry = _entry(token_id, chosen.text, chosen.logprob, as_ids)
        entry["top_logprobs"] = [_entry(tid, lp.text, lp.logprob, as_ids)
                                 for tid, lp in _top(position, k)]
        content.append(entry)
    return content
