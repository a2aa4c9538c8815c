"""Token ids to the text a client is sent, with OpenAI's ``stop`` strings.

Decoding is the tokenizer's own incremental decoder (``tokenizers.decoders.DecodeStream``, as
``transformers serve`` does it): byte-level tokens that end inside a UTF-8 character yield
nothing until the character is whole. Stop strings are ours — the engine stops on token ids, not
on text: text that might be the start of a stop string is held back until it is known not to be,
and the text ends before the first stop found (OpenAI does not return the stop sequence).
"""

from __future__ import annotations

from typing import Any


class TextStream:
    """One request's output text, fed token ids as they come."""

    def __init__(self, tokenizer: Any, stops: tuple[str, ...] = ()) -> None:
        from tokenizers.decoders import DecodeStream

        self._tokenizer = getattr(tokenizer, "_tokenizer", tokenizer)  # the Rust tokenizer
        self._decoder = DecodeStream(skip_special_tokens=True)
        self._stops = tuple(stop for stop in stops if stop)
        self._hold = max((len(stop) for stop in self._stops), default=1) - 1
        self._pending = ""
        self.stopped = False  # a stop string was found: the caller ends the request

    def feed(self, token_ids: list[int]) -> str:
        """The text these tokens add that can be sent now ("" while it may start a stop)."""
        if self.stopped:
            return ""
        for token_id in token_ids:
            piece = self._decoder.step(self._tokenizer, token_id)
            if piece:
                self._pending += piece
        if not self._stops:
            out, self._pending = self._pending, ""
            return out
        found = [i for i in (self._pending.find(stop) for stop in self._stops) if i >= 0]
        if found:
            out, self._pending, self.stopped = self._pending[: min(found)], "", True
            return out
        keep = min(self._hold, len(self._pending))
        cut = len(self._pending) - keep
        out, self._pending = self._pending[:cut], self._pending[cut:]
        return out

    def flush(self) -> str:
        """What is left when the request ends without a stop string."""
        out, self._pending = ("" if self.stopped else self._pending), ""
        return out
