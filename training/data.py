"""Chat SFT data: JSONL -> token ids + labels with loss only on assistant tokens.

Every example is rendered with the tokenizer's own chat template. The assistant spans
are found by rendering the conversation up to each assistant turn (with the generation
prompt) and up to the end of that turn: the characters in between are the assistant's,
including its end-of-turn marker, so the model learns to stop. Labels are -100 elsewhere.
Examples longer than ``max_length`` are cut at the right and counted; an example left
with no assistant token is dropped and counted. Nothing is shortened silently.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from talan_serve.checkpoint import sha256_file

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


class DataError(ValueError):
    """A training file that cannot be read as chat SFT examples."""


@dataclass
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]

    @property
    def num_target_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


@dataclass
class TruncationReport:
    """What ``max_length`` did to the data set."""

    max_length: int
    examples: int = 0
    truncated: int = 0
    dropped_no_target: int = 0
    tokens_cut: int = 0
    longest: int = 0
    truncated_lines: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        record = dict(self.__dict__)
        record["truncated_lines"] = self.truncated_lines[:20]
        return record

    def summary(self) -> str:
        return (f"{self.examples} examples, longest {self.longest} tokens; max_length "
                f"{self.max_length}: {self.truncated} truncated ({self.tokens_cut} tokens cut), "
                f"{self.dropped_no_target} dropped (no assistant token left)")


def read_jsonl(path: str | Path) -> list[list[dict[str, str]]]:
    """Conversations from JSONL: ``messages`` lists, or ``prompt``/``completion`` pairs."""
    conversations = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{number}: not JSON: {err}") from None
            conversations.append(_to_messages(record, f"{path}:{number}"))
    if not conversations:
        raise DataError(f"{path}: no examples")
    return conversations


def _to_messages(record: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str) for m in messages
        ):
            raise DataError(f"{where}: 'messages' must be a list of {{role, content}} strings")
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{where}: no assistant message to learn from")
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    if isinstance(record.get("prompt"), str) and isinstance(record.get("completion"), str):
        return [{"role": "user", "content": record["prompt"]},
                {"role": "assistant", "content": record["completion"]}]
    raise DataError(f"{where}: needs 'messages' or 'prompt' + 'completion'")


def _render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt)


def assistant_spans(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[str, list[tuple]]:
    """The rendered text and the ``[start, end)`` character spans of assistant turns."""
    text = _render(tokenizer, messages, False)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:index], True) if index else ""
        through = _render(tokenizer, messages[: index + 1], False)
        start = _common_prefix(before, text)
        end = _common_prefix(through, text)
        if end <= start or message["content"].strip() not in text[start:end]:
            raise DataError(
                "cannot locate an assistant turn in the rendered chat template; the template "
                "must render earlier turns identically whatever follows them")
        spans.append((start, end))
    return text, spans


def _common_prefix(a: str, b: str) -> int:
    length = min(len(a), len(b))
    index = 0
    while index < length and a[index] == b[index]:
        index += 1
    return index


def tokenize_conversation(tokenizer: Any, messages: list[dict[str, str]]) -> TokenizedExample:
    """Token ids and labels (-100 outside assistant spans) of one whole conversation."""
    text, spans = assistant_spans(tokenizer, messages)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    labels = []
    for token, (start, end) in zip(encoded["input_ids"], encoded["offset_mapping"], strict=True):
        inside = any(s <= start < e for s, e in spans) and end > start
        labels.append(token if inside else IGNORE_INDEX)
    return TokenizedExample(list(encoded["input_ids"]), labels)


def tokenize_dataset(
    tokenizer: Any, conversations: list[list[dict[str, str]]], max_length: int
) -> tuple[list[TokenizedExample], TruncationReport]:
    report = TruncationReport(max_length=max_length)
    examples = []
    for line, messages in enumerate(conversations, start=1):
        example = tokenize_conversation(tokenizer, messages)
        report.examples += 1
        report.longest = max(report.longest, len(example.input_ids))
        if len(example.input_ids) > max_length:
            report.truncated += 1
            report.tokens_cut += len(example.input_ids) - max_length
            report.truncated_lines.append(line)
            example = TokenizedExample(example.input_ids[:max_length], example.labels[:max_length])
        if example.num_target_tokens == 0:
            report.dropped_no_target += 1
            continue
        examples.append(example)
    if report.truncated or report.dropped_no_target:
        logger.warning("truncation: %s", report.summary())
    else:
        logger.info("data: %s", report.summary())
    if not examples:
        raise DataError(f"no example keeps an assistant token at max_length {max_length}")
    return examples, report


def collate(examples: list[TokenizedExample], pad_id: int) -> dict[str, Tensor]:
    """Right-pad to the longest example of the micro-batch."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        ids[row, :n] = torch.tensor(example.input_ids)
        mask[row, :n] = 1
        labels[row, :n] = torch.tensor(example.labels)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@dataclass(frozen=True)
class SFTCollator:
    """The Trainer's ``data_collator``: ``collate`` with the tokenizer's pad id."""

    pad_id: int

    def __call__(self, examples: list[TokenizedExample]) -> dict[str, Tensor]:
        return collate(examples, self.pad_id)


def file_record(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    return {"path": os.fspath(path), "sha256": sha256_file(path), "bytes": path.stat().st_size}
