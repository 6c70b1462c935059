"""The text and UTF-8 bytes of single tokens, for logprobs (a token may hold part of a character)."""
from functools import lru_cache

from transformers import PreTrainedTokenizerBase


@lru_cache(maxsize=1)
def byte_level_alphabet() -> dict[str, int]:
    """Inverse of the GPT-2 byte-level BPE alphabet: printable stand-in character -> byte value."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    characters = list(printable)
    shift = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            characters.append(256 + shift)
            shift += 1
    return {chr(character): byte for byte, character in zip(printable, characters)}


class TokenTexts:
    """Memoised ``token id -> (text, bytes)``; byte-level pieces are mapped back to their raw bytes."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self.special_ids = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
        self.cache: dict[int, tuple[str, list[int]]] = {}

    def get(self, token_id: int) -> tuple[str, list[int]]:
        cached = self.cache.get(token_id)
        if cached is None:
            cached = self.cache[token_id] = self.compute(token_id)
        return cached

    def text(self, token_id: int) -> str:
        return self.get(token_id)[0]

    def bytes(self, token_id: int) -> list[int]:
        return self.get(token_id)[1]

    def compute(self, token_id: int) -> tuple[str, list[int]]:
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if piece is None:  # padded vocabulary rows have no token
            return "", []
        alphabet = byte_level_alphabet()
        if token_id in self.special_ids or not all(character in alphabet for character in piece):
            raw = piece.encode("utf-8")
        else:
            raw = bytes(alphabet[character] for character in piece)
        return raw.decode("utf-8", errors="replace"), list(raw)
