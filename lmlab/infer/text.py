"""The text layer over the engine's token ids: incremental detokenizing and stop strings."""

from __future__ import annotations

from lmlab.tokenizer import Tokenizer


class TextStream:
    """Turns one row's growing token list into text deltas, with the same work for every token however long the
    text grows.

    Decoding is incremental, as text-generation-inference's and vLLM's detokenizers do it: each step decodes only
    the ids since the last character boundary, with the ids of the previous delta in front as context (a
    SentencePiece-style decoder drops a leading space at the start of a text), and keeps what that adds to the
    context's own text. A decode ending in U+FFFD (a UTF-8 character split over tokens) waits for the next token,
    as HF's TextStreamer holds back an unfinished word; after MAX_WAIT ids it is invalid UTF-8, and goes out as is.
    Stop strings are searched for in the new text and the longest stop's length - 1 characters before it, and a
    tail that could still grow into a stop string is held back, so no stop can start in text already handed out.
    """

    MAX_WAIT = 8  # ids: a UTF-8 character has at most 4 bytes, and every byte-level token holds one or more

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...]) -> None:
        self.tokenizer, self.stop = tokenizer, stop
        self.reach = max(map(len, stop), default=1) - 1  # characters a stop can reach back before new text
        self.ids: list[int] = []  # the row's generated ids, as last fed: ids[:fed] are text
        self.fed = self.prefix = self.read = 0  # ids[prefix:read] decoded to context_text; ids[read:fed] are new
        self.context_text = ""
        self.pending, self.stopped = "", False  # text decoded but not yet handed out

    def feed(self, ids: list[int]) -> bool:
        """Take in the row's generated ids so far (EOS excluded); True once a stop string has appeared."""
        self.ids, self.fed = ids, len(ids)
        if not self.stopped and self.fed > self.read:
            self._add(self._decode(final=False))
        return self.stopped

    def _decode(self, final: bool) -> str:
        """The text ids[read:fed] add after the context, once it ends on a whole character (or `final`)."""
        text = self.tokenizer.decode(self.ids[self.prefix:self.fed])
        whole = len(text) > len(self.context_text) and not text.endswith("\ufffd")
        if not (whole or final or self.fed - self.read > self.MAX_WAIT):
            return ""
        new = text[len(self.context_text):]
        self.prefix, self.read = self.read, self.fed
        self.context_text = self.tokenizer.decode(self.ids[self.prefix:self.read])
        return new

    def _add(self, new: str) -> None:
        if not new:
            return
        start = max(0, len(self.pending) - self.reach)
        self.pending += new
        found = [at for at in (self.pending.find(stop, start) for stop in self.stop) if at >= 0]
        if found:
            self.pending, self.stopped = self.pending[:min(found)], True

    def take(self, final: bool = False) -> str:
        """The text not yet handed out that is safe to hand out now (all of it when `final`)."""
        if final and not self.stopped and self.fed > self.read:
            self._add(self._decode(final=True))
        hold = 0
        if not (final or self.stopped):
            hold = max((k for stop in self.stop for k in range(1, len(stop))
                        if self.pending.endswith(stop[:k])), default=0)
        delta, self.pending = self.pending[:len(self.pending) - hold], self.pending[len(self.pending) - hold:]
        return delta
