"""Chat rendering, assistant-only labels, truncation reports, the arithmetic generator."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from training import arithmetic
from training.data import (
    IGNORE_INDEX,
    DataError,
    collate,
    read_jsonl,
    tokenize_conversation,
    tokenize_dataset,
)


@pytest.fixture(scope="module")
def tokenizer(tiny_qwen3: Path):
    return AutoTokenizer.from_pretrained(tiny_qwen3)


def _labelled_text(tokenizer, example) -> str:
    return tokenizer.decode([t for t in example.labels if t != IGNORE_INDEX])


def test_loss_only_on_assistant_tokens(tokenizer) -> None:
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "one two"},
        {"role": "assistant", "content": "two one"},
        {"role": "user", "content": "red blue"},
        {"role": "assistant", "content": "blue red"},
    ]
    example = tokenize_conversation(tokenizer, messages)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    assert tokenizer.decode(example.input_ids) == full
    # Both assistant turns, each with its end-of-turn marker, and nothing else.
    assert _labelled_text(tokenizer, example) == "two one<|im_end|>\nblue red<|im_end|>\n"
    first_target = next(i for i, t in enumerate(example.labels) if t != IGNORE_INDEX)
    assert tokenizer.decode(example.input_ids[:first_target]).endswith(
        "<|im_start|>assistant\n")


def test_prompt_completion_is_a_chat_turn(tmp_path: Path, tokenizer) -> None:
    path = tmp_path / "pc.jsonl"
    path.write_text(json.dumps({"prompt": "one two", "completion": "two one"}) + "\n")
    (messages,) = read_jsonl(path)
    assert messages == [{"role": "user", "content": "one two"},
                        {"role": "assistant", "content": "two one"}]
    example = tokenize_conversation(tokenizer, messages)
    assert _labelled_text(tokenizer, example) == "two one<|im_end|>\n"


def test_bad_lines_name_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n{not json\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not JSON"):
        read_jsonl(path)
    path.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    with pytest.raises(DataError, match="no assistant message"):
        read_jsonl(path)


def test_truncation_is_counted_not_silent(tokenizer, caplog) -> None:
    short = [{"role": "user", "content": "one"}, {"role": "assistant", "content": "two"}]
    long_answer = [{"role": "user", "content": "one"},
                   {"role": "assistant", "content": " ".join(["green"] * 40)}]
    long_prompt = [{"role": "user", "content": " ".join(["red"] * 60)},
                   {"role": "assistant", "content": "two"}]
    prompt_len = len(tokenize_conversation(tokenizer, long_answer[:1] + [
        {"role": "assistant", "content": ""}]).input_ids)
    max_length = prompt_len + 5
    with caplog.at_level("WARNING"):
        examples, report = tokenize_dataset(tokenizer, [short, long_answer, long_prompt],
                                            max_length)
    assert (report.examples, report.truncated, report.dropped_no_target) == (3, 2, 1)
    assert report.truncated_lines == [2, 3]
    assert len(examples) == 2 and len(examples[1].input_ids) == max_length
    assert report.tokens_cut == (
        len(tokenize_conversation(tokenizer, long_answer).input_ids)
        + len(tokenize_conversation(tokenizer, long_prompt).input_ids) - 2 * max_length)
    assert "2 truncated" in caplog.text and "1 dropped" in caplog.text


def test_collate_pads_right_and_masks_the_padding(tokenizer) -> None:
    chats = [[{"role": "user", "content": w}, {"role": "assistant", "content": w}]
             for w in ("one", "two three four five")]
    examples, _ = tokenize_dataset(tokenizer, chats, 64)
    batch = collate(examples, pad_id=0)
    n0, width = len(examples[0].input_ids), batch["input_ids"].shape[1]
    assert width == len(examples[1].input_ids) > n0
    assert batch["attention_mask"][0].tolist() == [1] * n0 + [0] * (width - n0)
    assert batch["input_ids"][0, :n0].tolist() == examples[0].input_ids
    assert (batch["input_ids"][0, n0:] == 0).all()
    assert (batch["labels"][0, n0:] == IGNORE_INDEX).all()
    assert batch["labels"][1].tolist() == examples[1].labels


def test_arithmetic_splits_are_deterministic_and_disjoint(tmp_path: Path) -> None:
    a = arithmetic.write_splits(tmp_path / "a" / "train.jsonl", 300, 50, seed=5)
    arithmetic.write_splits(tmp_path / "b" / "train.jsonl", 300, 50, seed=5)
    assert a.name == "heldout.jsonl"
    for name in ("train.jsonl", "heldout.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    train = [json.loads(x) for x in (tmp_path / "a" / "train.jsonl").read_text().splitlines()]
    held = [json.loads(x) for x in a.read_text().splitlines()]
    assert len(train) == 300 and len(held) == 50
    questions = {r["messages"][1]["content"] for r in train}
    assert not questions & {r["messages"][1]["content"] for r in held}
    for record in train + held:
        solution = record["messages"][-1]["content"]
        # Every worked step is true arithmetic, and the last line states the answer.
        for line in solution.splitlines()[:-1]:
            expression, result = line.split(": ", 1)[1].rstrip(".").split(" = ")
            assert eval(expression) == int(result)  # noqa: S307 - our own generated text
        assert solution.endswith(f"The answer is {record['answer']}.")
        assert arithmetic.extract_answer(solution) == record["answer"]


def test_extract_answer() -> None:
    assert arithmetic.extract_answer("Step 1: 2 + 2 = 4.\nThe answer is 4.") == 4
    assert arithmetic.extract_answer("so the answer is -3") == -3
    assert arithmetic.extract_answer("I think 12 then 15") == 15
    assert arithmetic.extract_answer("no idea") is None
