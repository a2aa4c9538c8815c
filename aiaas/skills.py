"""Skills the project teaches its chat model: generated conversations and their exact scorer.

A skill is a function of a seeded :class:`random.Random` that returns one conversation, OpenAI-
style ``messages`` whose last turn is the assistant's answer. The same ``(skill, rows, seed)``
gives the same conversations on every machine: Python's ``random.Random`` sequence for an
integer seed is part of its documented compatibility promise.

``iso-dates`` is the one shipped here: a date written out in words (``March 5, 2021``,
``5 March 2021``, ``the 5th of March 2021``), alone or inside a sentence, answered with exactly
``2021-03-05``. SmolLM2-135M-Instruct, asked plainly, answers with a sentence or a wrong date;
a LoRA adapter learns it in a few minutes on 2 CPUs (figures in ``configs/data/iso_dates.yaml``).
"""

from __future__ import annotations

import calendar
import random
from collections.abc import Callable

#: One chat message: ``{"role": "user", "content": "..."}``.
Message = dict[str, str]

MONTHS = [calendar.month_name[number] for number in range(1, 13)]

_ASKS = (
    "Write {date} as YYYY-MM-DD.",
    "What is {date} in ISO 8601 format (YYYY-MM-DD)?",
    "Convert this date to YYYY-MM-DD: {date}",
    "{sentence} Give the date as YYYY-MM-DD.",
    "{sentence} Which date is that, in YYYY-MM-DD form?",
)
_SENTENCES = (
    "The meeting was moved to {date}.",
    "Our office reopened on {date} after the renovation.",
    "She was born on {date}.",
    "The contract ends on {date}.",
    "The package arrived on {date}, two days late.",
    "We signed the lease on {date}.",
    "The festival starts on {date} this year.",
    "His last day at work was {date}.",
)


def _ordinal(day: int) -> str:
    suffix = "th" if 11 <= day % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
    return f"{day}{suffix}"


def _iso_dates(rng: random.Random) -> list[Message]:
    year = rng.randint(1950, 2049)
    month = rng.randint(1, 12)
    day = rng.randint(1, calendar.monthrange(year, month)[1])
    name = MONTHS[month - 1]
    written = rng.choice(
        (
            f"{name} {day}, {year}",
            f"{day} {name} {year}",
            f"the {_ordinal(day)} of {name} {year}",
            f"{name} {_ordinal(day)}, {year}",
        )
    )
    ask = rng.choice(_ASKS)
    sentence = rng.choice(_SENTENCES).format(date=written)
    question = ask.format(date=written, sentence=sentence[0].upper() + sentence[1:])
    return [
        {"role": "user", "content": question},
        {"role": "assistant", "content": f"{year:04d}-{month:02d}-{day:02d}"},
    ]


#: Skill name → the function that makes one conversation of it.
SKILLS: dict[str, Callable[[random.Random], list[Message]]] = {"iso-dates": _iso_dates}


def generate(skill: str, rows: int, seed: int) -> list[list[Message]]:
    """``rows`` conversations of a skill, the same ones for the same seed.

    Raises:
        KeyError: No skill of that name (configs check names against :data:`SKILLS`).
    """
    make = SKILLS[skill]
    rng = random.Random(f"{skill}:{seed}")
    return [make(rng) for _ in range(rows)]


def exact_match(prediction: str, target: str) -> bool:
    """True when the answer is the target, up to whitespace (runs collapse, ends are trimmed)."""
    return " ".join(prediction.split()) == " ".join(target.split())
