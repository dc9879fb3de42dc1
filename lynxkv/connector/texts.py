"""Long contexts for the real model, generated from a seed.

We may not ship other people's texts, so benchmarks and demos use a generated
operations report of a fictional cooperative: depots, managers, deliveries, stock,
inspections, with numbers, names, places and dates. One sentence (the *needle*) holds
a fact that appears nowhere else, and :class:`Document` carries a question about it and
the expected answer, so a demo can check that the model read the context.

Pure Python: the same seed gives the same text in every process (``random.Random``
only; nothing depends on ``hash()`` or set order).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Document", "approx_tokens", "make_document"]

# fmt: off
# (the formatter would put every word on a line of its own)
_FIRST = (
    "Amara", "Bruno", "Celia", "Dmitri", "Elena", "Farid", "Greta", "Hugo", "Ines", "Jonas",
    "Keiko", "Lars", "Maya", "Nikolai", "Olga", "Pablo", "Quinn", "Rosa", "Samir", "Tomas",
    "Ulla", "Viktor", "Wren", "Ximena", "Yusuf", "Zora",
)
_LAST = (
    "Abernethy", "Baptiste", "Castellan", "Dunmore", "Eskildsen", "Fairbrook", "Galloway",
    "Halvorsen", "Ingram", "Jaskolski", "Kettering", "Lindqvist", "Marchetti", "Novak",
    "Okonkwo", "Pellegrini", "Quillon", "Rasmussen", "Sandoval", "Thornbury", "Uyeda",
    "Valdez", "Whitcombe", "Yilmaz", "Zielinski",
)
_TOWN_HEAD = (
    "Ash", "Bram", "Cal", "Dun", "Elm", "Fen", "Gor", "Hal", "Ivy", "Kel", "Lor", "Mar",
    "Nor", "Oak", "Pen", "Rav", "Sel", "Tarn", "Wex",
)
_TOWN_TAIL = (
    "bridge", "by", "combe", "dale", "field", "ford", "gate", "haven", "holm", "mere",
    "minster", "moor", "stead", "ton", "wick",
)
_ITEMS = (
    "barley flour", "copper wire", "rock salt", "olive oil", "wool yarn", "pine planks",
    "roofing slate", "canned tomatoes", "lamp oil", "dried lentils", "steel bolts",
    "glass jars", "linen sheets", "coffee beans", "rope coils", "clay bricks",
)
_MACHINES = (
    "forklift", "conveyor belt", "grain dryer", "pallet wrapper", "cold-store compressor",
    "loading crane", "label printer", "generator",
)
_PARTS = (
    "hydraulic seals", "drive chain", "bearings", "control board", "brake pads",
    "cooling fan", "fuel pump", "wiring harness",
)
_ROLES = ("clerk", "driver", "loader", "mechanic", "planner")
_VEHICLES = ("van", "truck", "tractor", "barge")
_MONTHS = (
    "January", "February", "March", "April", "May", "June", "July", "August", "September",
    "October", "November", "December",
)
# fmt: on
_CODE_LETTERS = "ACDEFHJKLMNPRTVWXY"


def approx_tokens(text: str) -> int:
    """A tokenizer-free estimate (English prose averages about 4 characters a token)."""
    return math.ceil(len(text) / 4)


@dataclass(frozen=True)
class Document:
    """A generated report, a question about its one unique fact, and the answer."""

    seed: int
    text: str
    question: str
    answer: str

    def prompt(self) -> str:
        """The report followed by the question, as a user message would hold them."""
        return (
            f"{self.text}\n\nAnswer the question using only the report above.\n"
            f"Question: {self.question}"
        )


class _Writer:
    """Draws the names, numbers and sentences of one report from one seeded generator."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.year = self.rng.randint(1987, 2031)

    def name(self) -> str:
        return f"{self.rng.choice(_FIRST)} {self.rng.choice(_LAST)}"

    def town(self) -> str:
        return self.rng.choice(_TOWN_HEAD) + self.rng.choice(_TOWN_TAIL)

    def date(self) -> str:
        return f"{self.rng.randint(1, 28)} {self.rng.choice(_MONTHS)} {self.year}"

    def code(self) -> str:
        letters = "".join(self.rng.choice(_CODE_LETTERS) for _ in range(2))
        return f"{self.rng.randint(1000, 9999)}-{letters}"

    def sentence(self, town: str) -> str:
        r = self.rng
        items = r.sample(_ITEMS, 3)
        choices: tuple[Callable[[], str], ...] = (
            lambda: (
                f"On {self.date()}, the {town} depot received {r.randint(12, 900)} crates of "
                f"{items[0]} from {self.name()} of {self.town()}; {r.randint(0, 11)} of them "
                "arrived damaged and were sent back."
            ),
            lambda: (
                f"Stock at the end of {r.choice(_MONTHS)}: {r.randint(40, 9000)} units of "
                f"{items[0]}, {r.randint(40, 9000)} units of {items[1]} and "
                f"{r.randint(40, 9000)} units of {items[2]}."
            ),
            lambda: (
                f"{self.name()} logged {r.randint(2, 140)} hours of maintenance on the "
                f"{r.choice(_MACHINES)} (serial {r.choice('BGKQSZ')}{r.randint(10000, 99999)}), "
                f"mostly on the {r.choice(_PARTS)}."
            ),
            lambda: (
                f"Shipments from {town} to {self.town()} rose by {r.randint(1, 60)} percent "
                f"compared with {r.choice(_MONTHS)} {self.year - 1}, driven by orders of "
                f"{items[1]}."
            ),
            lambda: (
                f"A safety inspection by {self.name()} on {self.date()} found "
                f"{r.randint(0, 9)} minor issues, all resolved within {r.randint(1, 21)} days."
            ),
            lambda: (
                f"The depot's {r.choice(_VEHICLES)} fleet covered {r.randint(800, 60000)} "
                f"kilometres in {r.choice(_MONTHS)}, using {r.randint(90, 9000)} litres of fuel."
            ),
            lambda: (
                f"The cold store averaged {r.randint(1, 7)}.{r.randint(0, 9)} degrees, with a "
                f"peak of {r.randint(8, 15)}.{r.randint(0, 9)} degrees on {self.date()}."
            ),
            lambda: (
                f"{self.name()} joined the {town} team as a {r.choice(_ROLES)} "
                f"on {self.date()}, raising the headcount to {r.randint(6, 80)}."
            ),
        )
        return r.choice(choices)()

    def section(self, number: int, town: str) -> str:
        head = (
            f"Depot {number}: {town}. The depot is managed by {self.name()}, who took over "
            f"from {self.name()} on {self.date()}."
        )
        body = [self.sentence(town) for _ in range(self.rng.randint(4, 7))]
        return " ".join([head, *body])


def make_document(
    seed: int, tokens: int, count_tokens: Callable[[str], int] | None = None
) -> Document:
    """A report of at least ``tokens`` tokens as counted by ``count_tokens``.

    Pass the model's tokenizer as ``count_tokens`` (``lambda s: len(tok(s).input_ids)``)
    for an exact floor; the default is the :func:`approx_tokens` estimate. The needle
    sits at a seeded depth between 10% and 90% of the sections.
    """
    if tokens < 1:
        raise ValueError(f"tokens must be positive, got {tokens}")
    count = count_tokens or approx_tokens
    w = _Writer(seed)
    company = w.town()
    title = f"Operations report of the {company} Cooperative for the year {w.year}."
    towns: list[str] = []
    sections: list[str] = []
    while True:
        town = w.town()
        if town in towns:
            town = f"North {town}" if f"North {town}" not in towns else f"{town} {len(towns)}"
        towns.append(town)
        sections.append(w.section(len(sections) + 1, town))
        # The needle adds text, so a body that is long enough stays long enough.
        if count("\n\n".join([title, *sections])) >= tokens:
            break
    depth = w.rng.randint(
        len(sections) // 10, max(len(sections) * 9 // 10 - 1, len(sections) // 10)
    )
    answer = w.code()
    needle = (
        f"The door code of the records room at the {towns[depth]} depot is {answer}; "
        f"its spare key is kept by {w.name()}."
    )
    sections[depth] = f"{sections[depth]} {needle}"
    question = f"What is the door code of the records room at the {towns[depth]} depot?"
    return Document(
        seed=seed, text="\n\n".join([title, *sections]), question=question, answer=answer
    )
