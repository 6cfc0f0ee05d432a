"""Write answer_format.jsonl: a few hundred short questions whose answers all follow one new format,

    Answer: <the answer alone>
    Reason: <one sentence>

so a fine-tune's effect is plain to see: an instruct model that answers in paragraphs learns to answer like this.
Every answer is computed here (arithmetic, conversions, counting, calendars) or taken from the small tables below,
so the file is correct by construction. Alpaca-style records, with every fifth one chat-style to show both forms.

    python examples/answer_format/make_data.py        # rewrites examples/answer_format/answer_format.jsonl
"""

from __future__ import annotations

import json
import random
from pathlib import Path

CAPITALS = {"France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
            "Japan": "Tokyo", "China": "Beijing", "India": "New Delhi", "Canada": "Ottawa", "Mexico": "Mexico City",
            "Brazil": "Brasilia", "Argentina": "Buenos Aires", "Egypt": "Cairo", "Kenya": "Nairobi",
            "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki", "Poland": "Warsaw", "Greece": "Athens",
            "Ireland": "Dublin", "Austria": "Vienna", "Belgium": "Brussels", "Netherlands": "Amsterdam",
            "Australia": "Canberra", "Peru": "Lima", "Chile": "Santiago", "Turkey": "Ankara", "Thailand": "Bangkok",
            "Vietnam": "Hanoi", "South Korea": "Seoul"}
OPPOSITES = {"hot": "cold", "up": "down", "early": "late", "full": "empty", "light": "dark", "open": "closed",
             "fast": "slow", "old": "new", "tall": "short", "happy": "sad", "wet": "dry", "hard": "soft",
             "loud": "quiet", "strong": "weak", "rich": "poor", "inside": "outside", "first": "last",
             "push": "pull", "win": "lose", "buy": "sell"}
WORDS = ("garden", "river", "pencil", "window", "planet", "orange", "bridge", "castle", "rabbit", "summer", "market",
         "silver", "forest", "candle", "button", "dragon", "island", "lemon", "mirror", "rocket", "tiger", "violin")
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
UNITS = [("minutes", "hours", 60, "hour", "minutes"), ("seconds", "minutes", 60, "minute", "seconds"),
         ("meters", "kilometers", 1000, "kilometer", "meters"), ("grams", "kilograms", 1000, "kilogram", "grams"),
         ("centimeters", "meters", 100, "meter", "centimeters"), ("days", "weeks", 7, "week", "days")]


def arithmetic(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    op = rng.choice(["plus", "minus", "times"])
    if op == "times":
        a, b = rng.randint(2, 12), rng.randint(2, 12)
    if op == "minus" and b > a:
        a, b = b, a
    value = {"plus": a + b, "minus": a - b, "times": a * b}[op]
    sign = {"plus": "+", "minus": "-", "times": "x"}[op]
    return f"What is {a} {op} {b}?", str(value), f"{a} {sign} {b} = {value}."


def capital(rng: random.Random) -> tuple[str, str, str]:
    country = rng.choice(sorted(CAPITALS))
    return (f"What is the capital of {country}?", CAPITALS[country],
            f"{CAPITALS[country]} is the capital city of {country}.")


def convert(rng: random.Random) -> tuple[str, str, str]:
    small, big, factor, one, plural = rng.choice(UNITS)
    n = rng.randint(2, 12)
    return (f"How many {small} are in {n} {big}?", str(n * factor),
            f"Each {one} has {factor} {plural}, and {n} x {factor} = {n * factor}.")


def compare(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.sample(range(10, 1000), 2)
    return f"Which is larger, {a} or {b}?", str(max(a, b)), f"{max(a, b)} is greater than {min(a, b)}."


def letters(rng: random.Random) -> tuple[str, str, str]:
    word = rng.choice(WORDS)
    return (f"How many letters are in the word '{word}'?", str(len(word)),
            f"{'-'.join(word)} has {len(word)} letters.")


def weekday(rng: random.Random) -> tuple[str, str, str]:
    start, n = rng.randrange(7), rng.randint(1, 12)
    end = DAYS[(start + n) % 7]
    return (f"What day comes {n} days after {DAYS[start]}?", end,
            f"Counting {n} days on from {DAYS[start]} reaches {end}.")


def opposite(rng: random.Random) -> tuple[str, str, str]:
    word = rng.choice(sorted(OPPOSITES))
    return (f"What is the opposite of '{word}'?", OPPOSITES[word],
            f"'{OPPOSITES[word]}' is the usual opposite of '{word}'.")


KINDS = (arithmetic, capital, convert, compare, letters, weekday, opposite)


def records(n: int, seed: int = 0) -> list[dict]:
    rng, seen, out = random.Random(seed), set(), []
    while len(out) < n:
        question, answer, reason = rng.choice(KINDS)(rng)
        if question in seen:
            continue
        seen.add(question)
        reply = f"Answer: {answer}\nReason: {reason}"
        if len(out) % 5 == 4:
            out.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]})
        else:
            out.append({"instruction": question, "output": reply})
    return out


if __name__ == "__main__":
    path = Path(__file__).with_name("answer_format.jsonl")
    path.write_text("".join(json.dumps(r) + "\n" for r in records(400)), encoding="utf-8")
    print(f"wrote {path}")
