"""Multi-step arithmetic word problems with worked solutions: the demo's data.

Deterministic: the same seed writes byte-identical JSONL on every machine (only
``random.Random`` and string formatting are involved). Each example is a chat
(``messages``: user question, assistant worked solution ending in ``The answer is N.``)
plus its integer ``answer``. The held-out split never repeats a training question.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

NAMES = ["Ana", "Ben", "Chen", "Dana", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jo", "Kofi",
         "Lena", "Mo", "Nia", "Omar", "Pia", "Raj", "Sara", "Tom", "Uma", "Vik", "Wen"]
ITEMS = ["apples", "pencils", "marbles", "stickers", "cookies", "cards", "shells", "books",
         "stamps", "beads"]
SYSTEM_PROMPT = "Solve the problem step by step. End with 'The answer is N.'"
ANSWER_PATTERN = re.compile(r"answer is\s*\$?(-?\d+)")


@dataclass(frozen=True)
class Problem:
    question: str
    steps: list[str]
    answer: int

    def solution(self) -> str:
        lines = [f"Step {i}: {step}" for i, step in enumerate(self.steps, start=1)]
        return "\n".join(lines + [f"The answer is {self.answer}."])

    def to_record(self) -> dict:
        return {
            "messages": [
                {"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": self.question},
                {"role": "assistant", "content": self.solution()},
            ],
            "answer": self.answer,
        }


def _buy_and_give(rng: random.Random, name: str, item: str) -> Problem:
    a, b = rng.randint(5, 40), rng.randint(2, 30)
    c = rng.randint(1, a + b - 1)
    return Problem(
        f"{name} has {a} {item}. {name} buys {b} more and then gives {c} to a friend. "
        f"How many {item} does {name} have now?",
        [f"{a} + {b} = {a + b}.", f"{a + b} - {c} = {a + b - c}."], a + b - c)


def _boxes_then_eat(rng: random.Random, name: str, item: str) -> Problem:
    a, b = rng.randint(2, 9), rng.randint(2, 12)
    c = rng.randint(1, a * b - 1)
    return Problem(
        f"{name} buys {a} boxes of {item} with {b} {item} in each box. "
        f"{name} gives away {c} of them. How many {item} are left?",
        [f"{a} * {b} = {a * b}.", f"{a * b} - {c} = {a * b - c}."], a * b - c)


def _change(rng: random.Random, name: str, item: str) -> Problem:
    price, count = rng.randint(2, 9), rng.randint(2, 9)
    bill = rng.choice([50, 100]) if price * count > 20 else rng.choice([20, 50])
    cost = price * count
    return Problem(
        f"One of the {item} costs {price} dollars. {name} buys {count} of them and pays "
        f"with a {bill} dollar bill. How many dollars of change does {name} get?",
        [f"{count} * {price} = {cost}.", f"{bill} - {cost} = {bill - cost}."], bill - cost)


def _share_then_add(rng: random.Random, name: str, item: str) -> Problem:
    kids, each, extra = rng.randint(2, 9), rng.randint(2, 12), rng.randint(1, 15)
    total = kids * each
    return Problem(
        f"{name} shares {total} {item} equally among {kids} children. Then each child "
        f"finds {extra} more {item}. How many {item} does each child have now?",
        [f"{total} / {kids} = {each}.", f"{each} + {extra} = {each + extra}."], each + extra)


def _earn_then_spend(rng: random.Random, name: str, item: str) -> Problem:
    start, rate, days = rng.randint(1, 50), rng.randint(2, 12), rng.randint(2, 9)
    earned = rate * days
    spent = rng.randint(1, start + earned - 1)
    left = start + earned - spent
    return Problem(
        f"{name} has {start} dollars. {name} earns {rate} dollars a day for {days} days "
        f"and then spends {spent} dollars on {item}. How many dollars does {name} have now?",
        [f"{rate} * {days} = {earned}.", f"{start} + {earned} = {start + earned}.",
         f"{start + earned} - {spent} = {left}."], left)


def _two_groups(rng: random.Random, name: str, item: str) -> Problem:
    a, b, c, d = (rng.randint(2, 9) for _ in range(4))
    first, second = a * b, c * d
    return Problem(
        f"{name} has {a} bags with {b} {item} each and {c} bags with {d} {item} each. "
        f"How many {item} does {name} have in total?",
        [f"{a} * {b} = {first}.", f"{c} * {d} = {second}.",
         f"{first} + {second} = {first + second}."], first + second)


TEMPLATES: list[Callable[[random.Random, str, str], Problem]] = [
    _buy_and_give, _boxes_then_eat, _change, _share_then_add, _earn_then_spend, _two_groups,
]


def generate(count: int, seed: int, exclude: set[str] | None = None) -> list[Problem]:
    """``count`` distinct problems from ``seed``, none whose question is in ``exclude``."""
    rng = random.Random(seed)
    seen = set(exclude or ())
    problems: list[Problem] = []
    while len(problems) < count:
        template = TEMPLATES[len(problems) % len(TEMPLATES)]
        problem = template(rng, rng.choice(NAMES), rng.choice(ITEMS))
        if problem.question in seen:
            continue
        seen.add(problem.question)
        problems.append(problem)
    return problems


def heldout_path(train_file: str | Path) -> Path:
    """The held-out split that sits next to a generated training file."""
    train_file = Path(train_file)
    return train_file.with_name(train_file.name.replace("train", "heldout", 1)
                                if "train" in train_file.name
                                else f"heldout-{train_file.name}")


def write_splits(train_file: str | Path, n_train: int, n_heldout: int, seed: int) -> Path:
    """Write the training JSONL and its held-out sibling; returns the held-out path."""
    train = generate(n_train, seed)
    heldout = generate(n_heldout, seed + 1, exclude={p.question for p in train})
    out = heldout_path(train_file)
    Path(train_file).parent.mkdir(parents=True, exist_ok=True)
    for path, problems in ((Path(train_file), train), (out, heldout)):
        lines = [json.dumps(p.to_record(), sort_keys=True) for p in problems]
        path.write_text("\n".join(lines) + "\n")
    return out


def extract_answer(text: str) -> int | None:
    """The integer after 'answer is', else the last integer in the text."""
    match = ANSWER_PATTERN.search(text)
    if match:
        return int(match.group(1))
    numbers = re.findall(r"-?\d+", text)
    return int(numbers[-1]) if numbers else None
