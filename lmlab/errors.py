"""The one exception type for bad user input.

Anything a user can get wrong (a path, a number, a name, a malformed file) raises `LmlabError` with a
message that names the problem and the fix. The CLI prints it as a single line and exits with code 2;
library callers can catch it like any `ValueError`.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class LmlabError(ValueError):
    """Bad input from the user: the message says what is wrong and how to fix it, in one line. `param`: the
    setting or field it is about, where it is one (an HTTP server names it as OpenAI's error `param`)."""

    def __init__(self, message: str = "", param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class TrainingDiverged(LmlabError):
    """A NaN or inf training loss: a setting (most often the lr) the run cannot train with. Its own type so that
    a learning-rate sweep (lmlab study optimizers) can record the run as diverged instead of stopping."""


def closest(name: str, choices: Iterable[str], cutoff: float = 0.5) -> str:
    """' (did you mean X?)' for the nearest choice (difflib's similarity ratio >= cutoff), or '' when none is."""
    match = difflib.get_close_matches(name, list(choices), n=1, cutoff=cutoff)
    return f" (did you mean {match[0]!r}?)" if match else ""


def unknown(kind: str, name: str, choices: Iterable[str]) -> LmlabError:
    """The error for a name that is not one of `choices`, listing them and suggesting the nearest."""
    choices = sorted(choices)
    return LmlabError(f"unknown {kind} {name!r}{closest(name, choices)}; choose one of: {', '.join(choices)}")
