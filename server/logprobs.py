"""Log-probabilities in OpenAI's two shapes: chat ``content`` entries and the legacy completions arrays."""
import math

from scheduler.outputs import TokenLogprob
from server.token_text import TokenTexts

LOWEST_LOGPROB = -9999.0  # what OpenAI reports for a token with no probability; JSON has no -inf


def finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) and logprob > LOWEST_LOGPROB else LOWEST_LOGPROB


def chat_logprobs(entries: list[TokenLogprob], texts: TokenTexts) -> dict[str, list | None]:
    """``choices[i].logprobs`` of a chat completion or chunk."""
    content = []
    for entry in entries:
        text, raw = texts.get(entry.token_id)
        top = []
        for token_id, logprob in entry.top:
            top_text, top_raw = texts.get(token_id)
            top.append({"token": top_text, "logprob": finite(logprob), "bytes": top_raw})
        content.append({"token": text, "logprob": finite(entry.logprob), "bytes": raw, "top_logprobs": top})
    return {"content": content, "refusal": None}


class CompletionLogprobs:
    """Builds ``tokens``/``token_logprobs``/``top_logprobs``/``text_offset``; offsets run on across chunks and index
    the choice's text: a special token that ``skip_special_tokens`` keeps out of the text keeps its name in
    ``tokens`` but takes no room."""

    def __init__(self, texts: TokenTexts, skip_special_tokens: bool = True) -> None:
        self.texts = texts
        self.skip_special_tokens = skip_special_tokens
        self.offset = 0

    def skip_text(self, text: str) -> None:
        """Text in the output that has no token entry here (an echoed prompt sent without logprobs)."""
        self.offset += len(text)

    def build(self, token_ids: list[int], entries: list[TokenLogprob | None]) -> dict[str, list]:
        tokens, token_logprobs, top_logprobs, text_offset = [], [], [], []
        for token_id, entry in zip(token_ids, entries):
            text = self.texts.text(token_id)
            tokens.append(text)
            text_offset.append(self.offset)
            if not (self.skip_special_tokens and token_id in self.texts.special_ids):
                self.offset += len(text)
            if entry is None:  # the first prompt token has no logprob
                token_logprobs.append(None)
                top_logprobs.append(None)
                continue
            token_logprobs.append(finite(entry.logprob))
            top = {self.texts.text(top_id): finite(logprob) for top_id, logprob in entry.top}
            top.setdefault(text, finite(entry.logprob))
            top_logprobs.append(top)
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
                "text_offset": text_offset}
