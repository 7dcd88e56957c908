#!/usr/bin/env python3
"""Write the demo's data under recipes/data/general/ (committed; rerun to regenerate identically).

    corpus.txt        what the demo base is pre-trained on (`make demo` does it once, then caches it)
    heldout.txt       held-out paragraphs of the same kind: `peftcli eval` measures forgetting on them
    skill_train.jsonl the new skill LoRA teaches: asked in a chat which day or month comes after
    skill_eval.jsonl  another, answer in a sentence ("What follows May?" -> "After May comes June.");
                      each eval question pairs a fact and a phrasing never seen together in training

A tiny model on 2 CPU cores can only learn a small language in seconds, so this is one: short
paragraphs about people, animals, places, weather, days and months, drawn from a fixed grammar with
a fixed seed. It stands for "general ability", and it includes the order of the days and months
("First May, then June, then July."), which the base learns as text. What it never sees is a
question about that order: the skill the demo teaches is answering one, in a chat, from what the
base already knows, and the demo checks how much of the general text each method still predicts.
The held-out paragraphs come from another seed, so none of them is a paragraph the base saw.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from make_demo_data import DAYS, MONTHS, build, facts  # scripts/ is on the path when run as a script

PEOPLE = [
    "the farmer",
    "a child",
    "my sister",
    "the old teacher",
    "our neighbour",
    "the baker",
    "a sailor",
    "the doctor",
]
ANIMALS = ["the dog", "a black cat", "the horse", "two birds", "the old goat", "a small fox", "the cows", "a duck"]
PLACES = ["the market", "the river", "the garden", "the school", "the forest", "the harbour", "the hill", "the village"]
THINGS = ["a basket of apples", "some bread", "a red kite", "the letters", "warm soup", "a map", "fresh fish", "a lamp"]
WEATHER = [
    "it rained all morning",
    "the sun was bright",
    "a cold wind blew",
    "snow covered the roads",
    "fog hid the hills",
]
FEELINGS = ["happy", "tired", "hungry", "quiet", "busy", "cheerful", "cold", "sleepy"]
VERBS = ["carried", "found", "bought", "painted", "shared", "cooked", "lost", "mended"]
MOVES = ["walked to", "ran to", "rode to", "sailed to", "hurried to", "wandered to"]
SEASONS = {"winter": MONTHS[:2] + MONTHS[11:], "spring": MONTHS[2:5], "summer": MONTHS[5:8], "autumn": MONTHS[8:11]}


def sentence(rng: random.Random) -> str:
    person, animal, place = rng.choice(PEOPLE), rng.choice(ANIMALS), rng.choice(PLACES)
    season = rng.choice(list(SEASONS))
    templates = [
        f"On {rng.choice(DAYS)} {person} {rng.choice(MOVES)} {place}.",
        f"{person.capitalize()} {rng.choice(VERBS)} {rng.choice(THINGS)} for {rng.choice(PEOPLE)}.",
        f"In {rng.choice(MONTHS)} {rng.choice(WEATHER)}, so {person} stayed near {place}.",
        f"{animal.capitalize()} slept by {place} until {person} came home.",
        f"After the long day {person} felt {rng.choice(FEELINGS)} and sat by the fire.",
        f"{rng.choice(WEATHER).capitalize()}, and {animal} hid under the table.",
        f"In {season} the days are {'short' if season == 'winter' else 'long'} and {place} is {rng.choice(FEELINGS)}.",
        f"{rng.choice(SEASONS[season])} is a month of {season}.",
        f"Every {rng.choice(DAYS)} {person} and {rng.choice(PEOPLE)} meet at {place}.",
        f"{person.capitalize()} saw {animal} near {place} and smiled.",
        # What the skill will ask about, as plain text: the order of the days and of the months. Twice
        # as often as the other sentences, so that a base pre-trained for seconds has learned it.
        _run(rng, DAYS),
        _run(rng, MONTHS),
        _run(rng, DAYS),
        _run(rng, MONTHS),
    ]
    return rng.choice(templates)


def _run(rng: random.Random, cycle: list[str]) -> str:
    """A few days or months in their order, from anywhere in the cycle."""
    start, count = rng.randrange(len(cycle)), rng.randint(3, 6)
    names = [cycle[(start + k) % len(cycle)] for k in range(count)]
    return rng.choice(
        [
            f"{', '.join(names[:-1])} and {names[-1]}.",
            f"First {names[0]}, then {', then '.join(names[1:])}.",
            f"After {names[0]} comes {names[1]}.",
        ]
    )


def paragraph(rng: random.Random) -> str:
    return " ".join(sentence(rng) for _ in range(rng.randint(3, 5)))


def exchange(rng: random.Random) -> tuple[str, str]:
    person, animal, place, day = rng.choice(PEOPLE), rng.choice(ANIMALS), rng.choice(PLACES), rng.choice(DAYS)
    month, feeling = rng.choice(MONTHS), rng.choice(FEELINGS)
    return rng.choice(
        [
            (f"Where did {person} go on {day}?", f"On {day} {person} {rng.choice(MOVES)} {place}."),
            (f"Tell me about {animal}.", f"{animal.capitalize()} slept by {place} until {person} came home."),
            (f"What was the weather in {month}?", f"In {month} {rng.choice(WEATHER)}."),
            (f"How did {person} feel?", f"After the long day {person} felt {feeling}."),
            (f"What did {person} buy?", f"{person.capitalize()} bought {rng.choice(THINGS)} at {place}."),
        ]
    )


def conversation(rng: random.Random) -> str:
    """A short chat in the demo model's ChatML, as plain text: the base learns to answer in turns and
    to end a reply with <|im_end|> (its EOS, which training appends after the last reply), so the
    new skill does not have to teach it the chat format as well."""
    system = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n" if rng.random() < 0.5 else ""
    turns = []
    for _ in range(rng.randint(1, 2)):
        question, answer = exchange(rng)
        turns.append(f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n{answer}")
    return system + "<|im_end|>\n".join(turns)


# The skill (recipes/demo.yaml): which day or month comes after another, asked in a chat in one of
# eight ways and answered in the sentence the base read as text ("After May comes June."). What LoRA
# teaches is the step from a question to that knowledge, not the knowledge itself.
SKILL_SYSTEM = "You are a concise assistant. Answer in one sentence."
SKILL_ASK = {
    "after": [
        "What comes after {x}?",
        "Which one follows {x}?",
        "Name the one after {x}.",
        "After {x} comes?",
        "What follows {x}?",
        "Tell me what comes after {x}.",
        "And after {x}?",
        "Which comes next after {x}?",
    ]
}


def skill_rows() -> tuple[list[dict], list[dict]]:
    """Every (fact, phrasing) pair; one phrasing of each fact is held out for eval."""
    asked = [(kind, slots, f"After {slots['x']} comes {answer}.") for kind, slots, answer in facts() if kind == "after"]
    return build(all_facts=asked, system=SKILL_SYSTEM, eval_rows=len(asked), ask=SKILL_ASK)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    print(f"wrote {len(rows)} rows to {path}")


def write(path: Path, paragraphs: int, seed: int, chats: float = 0.0) -> None:
    """`paragraphs` examples, blank-line separated; a share `chats` of them conversations."""
    rng = random.Random(seed)
    pieces = [conversation(rng) if rng.random() < chats else paragraph(rng) for _ in range(paragraphs)]
    path.write_text("\n\n".join(pieces) + "\n", encoding="utf-8")
    print(f"wrote {paragraphs} paragraphs ({path.stat().st_size / 1024:.0f} KB) to {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parent.parent / "recipes" / "data" / "general"
    )
    parser.add_argument("--paragraphs", type=int, default=600)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    write(args.out / "corpus.txt", args.paragraphs, seed=1, chats=0.3)
    write(args.out / "heldout.txt", 40, seed=2)
    train, held_out = skill_rows()
    write_jsonl(args.out / "skill_train.jsonl", train)
    write_jsonl(args.out / "skill_eval.jsonl", held_out)


if __name__ == "__main__":
    main()
