"""Deterministic synthetic corpus: seeded prose stories, arithmetic problems, preference pairs.

Everything here is a pure function of the seed; no randomness comes from the environment.
Stories are yielded one at a time (`iter_stories`), so a large corpus is never held whole.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from dataclasses import dataclass

from openrelease.data.tasks import format_reasoning

NAMES = (
    "Ada",
    "Ben",
    "Cleo",
    "Dev",
    "Elif",
    "Finn",
    "Gia",
    "Hugo",
    "Iris",
    "Jon",
    "Kai",
    "Lena",
    "Milo",
    "Nora",
    "Omar",
    "Pia",
    "Quinn",
    "Rosa",
    "Sami",
    "Tess",
)
ANIMALS = ("fox", "owl", "rabbit", "bear", "otter", "heron", "mouse", "wolf", "deer", "crow")
ADJECTIVES = (
    "brave",
    "quiet",
    "curious",
    "kind",
    "clever",
    "sleepy",
    "tiny",
    "proud",
    "gentle",
    "restless",
)
PLACES = (
    "the old forest",
    "a river town",
    "the high hills",
    "a windy harbour",
    "the green valley",
    "a busy market",
    "the snowy pass",
    "a small island",
)
OBJECTS = (
    "a lantern",
    "a map",
    "a red kite",
    "a silver key",
    "a wooden flute",
    "a basket of pears",
    "a lost letter",
    "a warm blanket",
)
FEELINGS = ("happy", "worried", "surprised", "tired", "hopeful", "proud", "calm")
ITEMS = ("apples", "books", "coins", "shells", "stamps", "marbles", "pencils", "cookies")

_OPENINGS = (
    "Once upon a time, {name} the {adj} {animal} lived in {place}.",
    "In {place} there was a {adj} {animal} called {name}.",
    "Long ago, {name}, a {adj} {animal}, set out from {place}.",
)
_MIDDLES = (
    "One morning {name} found {obj} near the path.",
    "{name} walked for many hours and felt {feeling}.",
    "A friend asked {name} to help carry {obj}.",
    "The wind grew cold, so {name} looked for shelter.",
    "{name} shared {obj} with the other animals.",
    "At noon {name} stopped by the water and rested.",
    "Nobody in {place} had ever seen {obj} like that.",
)
_ENDINGS = (
    "In the end, {name} went home {feeling} and a little wiser.",
    "From that day on, everyone in {place} remembered the {adj} {animal}.",
    "And so {name} learned that small kindnesses matter.",
)


def _rng(seed: int, label: str) -> random.Random:
    digest = hashlib.sha256(f"{seed}:{label}".encode()).digest()
    return random.Random(int.from_bytes(digest[:16], "big"))


def iter_stories(seed: int, count: int) -> Iterator[str]:
    """Yield ``count`` short prose stories, one at a time; the same seed gives the same stories."""
    rng = _rng(seed, "stories")
    for _ in range(count):
        slots = {
            "name": rng.choice(NAMES),
            "animal": rng.choice(ANIMALS),
            "adj": rng.choice(ADJECTIVES),
            "place": rng.choice(PLACES),
            "obj": rng.choice(OBJECTS),
            "feeling": rng.choice(FEELINGS),
        }
        middle = rng.sample(_MIDDLES, k=rng.randint(2, 4))
        sentences = [rng.choice(_OPENINGS), *middle, rng.choice(_ENDINGS)]
        yield " ".join(s.format(**slots) for s in sentences)


def generate_stories(seed: int, count: int) -> list[str]:
    """The stories of `iter_stories` as a list (the data stage streams them instead)."""
    return list(iter_stories(seed, count))


@dataclass(frozen=True)
class Problem:
    """An arithmetic word problem with a verifiable integer answer and a worked solution."""

    prompt: str
    reasoning: str
    answer: int


def _make_problem(rng: random.Random, max_operand: int) -> Problem:
    name = rng.choice(NAMES)
    item = rng.choice(ITEMS)
    a = rng.randint(2, max_operand)
    b = rng.randint(1, max_operand)
    match rng.randrange(4):
        case 0:
            prompt = f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have?"
            reasoning = (
                f"{name} starts with {a} {item}. Getting {b} more gives {a} + {b} = {a + b}."
            )
            answer = a + b
        case 1:
            a, b = max(a, b), min(a, b)
            prompt = f"{name} has {a} {item} and gives away {b}. How many {item} are left?"
            reasoning = (
                f"{name} starts with {a} {item}. Giving away {b} leaves {a} - {b} = {a - b}."
            )
            answer = a - b
        case 2:
            b = b % 12 + 1
            prompt = f"{name} buys {b} bags with {a} {item} in each. How many {item} in total?"
            reasoning = f"There are {b} bags of {a} {item}, so {b} * {a} = {a * b}."
            answer = a * b
        case _:
            c = rng.randint(1, max_operand)
            prompt = f"What is {a} + {b} - {c}?"
            reasoning = f"First {a} + {b} = {a + b}. Then {a + b} - {c} = {a + b - c}."
            answer = a + b - c
    return Problem(prompt=prompt, reasoning=reasoning, answer=answer)


def generate_problems(seed: int, count: int, *, max_operand: int) -> list[Problem]:
    """Return ``count`` distinct problems (distinct prompts); the same seed gives the same list."""
    rng = _rng(seed, "problems")
    seen: set[str] = set()
    problems: list[Problem] = []
    attempts = 0
    while len(problems) < count:
        attempts += 1
        if attempts > 20 * count + 1000:
            raise ValueError(
                f"cannot generate {count} distinct problems with max_operand {max_operand}; "
                "raise data.synthetic.max_operand or lower num_problems"
            )
        problem = _make_problem(rng, max_operand)
        if problem.prompt not in seen:
            seen.add(problem.prompt)
            problems.append(problem)
    return problems


@dataclass(frozen=True)
class PreferencePair:
    """A preference pair: the same prompt with a preferred and a dispreferred response."""

    prompt: str
    chosen: str
    rejected: str


def _wrong_answer(rng: random.Random, answer: int) -> int:
    """A plausible wrong result: off by 1 to 3 (never negative when the answer is not)."""
    offsets = [d for d in (-3, -2, -1, 1, 2, 3) if answer + d >= 0 or answer < 0]
    return answer + rng.choice(offsets)


def preference_pairs(seed: int, problems: list[Problem], *, label: str) -> list[PreferencePair]:
    """One pair per problem: its correct worked answer (chosen) and an incorrect one (rejected).

    The incorrect answer repeats the correct worked solution but concludes with a wrong answer
    (off by 1 to 3), so the two responses differ only in the final answer: preferring the chosen
    one means answering what the work shows. Seeded by ``seed`` and ``label``.
    """
    rng = _rng(seed, f"preference:{label}")
    return [
        PreferencePair(
            prompt=p.prompt,
            chosen=format_reasoning(p.reasoning, p.answer),
            rejected=format_reasoning(p.reasoning, _wrong_answer(rng, p.answer)),
        )
        for p in problems
    ]
