#!/usr/bin/env python3
"""Write the tests' chat dataset under recipes/data/ (committed; rerun to regenerate identically).
The demo's own data (general text, and the skill it teaches) comes from scripts/make_demo_corpus.py.

The task is a small "calendar and counting assistant": what day or month comes before/after
another, and small sums. The facts are few, so a tiny model learns them in a minute on CPU. Each fact is asked in
several phrasings; the eval split holds out one (fact, phrasing) pair for some facts, so every eval
question combines a fact and a phrasing the model has seen, but never together: a better eval loss
means it learned the facts, not the sentences.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
]
NUMBERS = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
]
SYSTEM = "You are a concise assistant. Answer with one word."

# Phrasings per question kind.
ASK = {
    "after": ["What comes after {x}?", "Which one follows {x}?", "Name the one after {x}.", "After {x} comes?"],
    "before": ["What comes before {x}?", "Which one precedes {x}?", "Name the one before {x}.", "Before {x} comes?"],
    "sum": ["What is {a} plus {b}?", "Add {a} and {b}.", "Sum of {a} and {b}?", "{a} plus {b} makes?"],
}


def facts():
    for cycle in (DAYS, MONTHS):
        for i, name in enumerate(cycle):
            yield "after", {"x": name}, cycle[(i + 1) % len(cycle)]
            yield "before", {"x": name}, cycle[(i - 1) % len(cycle)]
    for a in range(10):
        for b in range(10):
            if a + b < len(NUMBERS):
                yield "sum", {"a": NUMBERS[a], "b": NUMBERS[b]}, NUMBERS[a + b]


def build(
    seed: int = 0,
    eval_rows: int = 64,
    all_facts: list | None = None,
    system: str = SYSTEM,
    ask: dict[str, list[str]] | None = None,
) -> tuple[list[dict], list[dict]]:
    """Every (fact, phrasing) pair as a row; for `eval_rows` facts one pair is held out for eval."""
    rng = random.Random(seed)
    all_facts = list(facts()) if all_facts is None else all_facts
    tested = set(rng.sample(range(len(all_facts)), eval_rows))
    train, held_out = [], []
    for index, (kind, slots, answer) in enumerate(all_facts):
        phrasings = (ask or ASK)[kind]
        held = rng.randrange(len(phrasings)) if index in tested else None
        for number, phrasing in enumerate(phrasings):
            question = phrasing.format(**slots)
            if number == held:
                held_out.append(row(question, answer, system=rng.random() < 0.5, prompt=system))
            else:
                train.append(row(question, answer, system=rng.random() < 0.5, prompt=system))
    rng.shuffle(train)
    rng.shuffle(held_out)
    return train, held_out


def row(question: str, answer: str, system: bool, prompt: str = SYSTEM) -> dict:
    messages = [{"role": "system", "content": prompt}] if system else []
    messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return {"messages": messages}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "recipes" / "data")
    args = parser.parse_args()
    train, held_out = build()
    args.out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("demo_train.jsonl", train), ("demo_eval.jsonl", held_out)):
        with (args.out / name).open("w", encoding="utf-8") as handle:
            for item in rows:
                handle.write(json.dumps(item) + "\n")
        print(f"wrote {len(rows)} rows to {args.out / name}")


if __name__ == "__main__":
    main()
