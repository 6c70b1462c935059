"""Turns one choice's generated token ids into text deltas, and finds stop strings in them.

Text is decoded in a small window (the tokens since the last complete read, with the previous read as context), so
a character whose bytes span several tokens is only released once complete: the deltas always concatenate to the
decoded full output. While stop strings apply, text that could still be the start of one is held back, and a
matched stop string (and anything after it) is never released unless ``include_stop_str_in_output``.
"""
from transformers import PreTrainedTokenizerBase

INCOMPLETE_CHARACTER = "\ufffd"  # what decoding gives for the bytes of a character that is not complete yet


class IncrementalDetokenizer:
    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        skip_special_tokens: bool = True,
        stop: list[str] | None = None,
        include_stop_str_in_output: bool = False,
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop = list(stop or [])
        self.include_stop_str_in_output = include_stop_str_in_output
        self.token_ids: list[int] = []
        self.text = ""  # the decoded output so far, complete characters only; cut at a matched stop string
        self.stop_reason: str | None = None  # the stop string that matched
        self._prefix_offset = 0  # token_ids[_prefix_offset:_read_offset] is context for decoding the next tokens
        self._read_offset = 0
        self._released = 0  # characters of text already returned
        self._searched = 0  # text[:_searched] has been searched for stop strings
        self._unchecked = 0  # text[:_unchecked] was released without stop checks; no match may start in it
        self._max_stop_len = max((len(s) for s in self.stop), default=0)

    def add_tokens(self, token_ids: list[int], check_stop: bool = True) -> str:
        """Appends generated tokens and returns the text now safe to release.

        With ``check_stop`` False (before ``min_tokens``), stop strings are neither searched nor held back for.
        """
        self.token_ids.extend(token_ids)
        self._decode_pending(final=False)
        if check_stop and self.stop:
            return self._release_checking_stop()
        self._searched = self._unchecked = len(self.text)
        return self._release(len(self.text))

    def flush(self) -> str:
        """At the end of the output: releases everything still held back, incomplete characters included."""
        self._decode_pending(final=True)
        return self._release(len(self.text))

    def _decode_pending(self, final: bool) -> None:
        if self._read_offset == len(self.token_ids):
            return
        context = self._decode(self.token_ids[self._prefix_offset : self._read_offset])
        decoded = self._decode(self.token_ids[self._prefix_offset :])
        if len(decoded) > len(context) and (final or not decoded.endswith(INCOMPLETE_CHARACTER)):
            self.text += decoded[len(context) :]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self.token_ids)

    def _release_checking_stop(self) -> str:
        start = max(self._unchecked, self._searched - self._max_stop_len + 1)
        self._searched = len(self.text)
        match: tuple[int, str] | None = None
        for stop in self.stop:
            at = self.text.find(stop, start)
            if at != -1 and (match is None or at < match[0]):
                match = (at, stop)
        if match is not None:
            at, stop = match
            self.stop_reason = stop
            self.text = self.text[: at + len(stop)] if self.include_stop_str_in_output else self.text[:at]
            return self._release(len(self.text))
        if self.include_stop_str_in_output:
            return self._release(len(self.text))
        return self._release(len(self.text) - self._possible_stop_start_len())

    def _possible_stop_start_len(self) -> int:
        """Length of the longest unreleased suffix of text that is a proper prefix of some stop string."""
        limit = len(self.text) - self._released
        longest = 0
        for stop in self.stop:
            for length in range(min(len(stop) - 1, limit), longest, -1):
                if self.text.endswith(stop[:length]):
                    longest = length
                    break
        return longest

    def _release(self, end: int) -> str:
        delta = self.text[self._released : end]
        self._released = max(self._released, end)
        return delta

    def _decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=self.skip_special_tokens)
