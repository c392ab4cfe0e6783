"""Response formats and verifiers for the arithmetic tasks: shared by sft, distill, grpo, eval."""

from __future__ import annotations

import re

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
_ANSWER_RE = re.compile(r"answer is\s*(-?\d[\d,]*)")


def format_answer(answer: int | str) -> str:
    """The final-answer sentence every response ends with."""
    return f"The answer is {answer}."


def format_reasoning(reasoning: str, answer: int | str) -> str:
    """A chain-of-thought response: reasoning in think tags, then the answer sentence."""
    return f"{THINK_OPEN}{reasoning}{THINK_CLOSE} {format_answer(answer)}"


def extract_answer(text: str) -> int | None:
    """Return the integer after the last "answer is" in ``text``, or None if there is none."""
    matches = _ANSWER_RE.findall(text)
    if not matches:
        return None
    try:
        return int(matches[-1].replace(",", ""))
    except ValueError:
        return None


def is_correct(text: str, answer: int | str) -> bool:
    """True when the extracted answer equals ``answer``."""
    got = extract_answer(text)
    return got is not None and str(got) == str(answer).strip()


def has_reasoning_format(text: str) -> bool:
    """True when ``text`` has a non-empty think block followed by an answer sentence."""
    start = text.find(THINK_OPEN)
    end = text.find(THINK_CLOSE, start + len(THINK_OPEN))
    if start < 0 or end < 0 or not text[start + len(THINK_OPEN) : end].strip():
        return False
    return extract_answer(text[end:]) is not None
