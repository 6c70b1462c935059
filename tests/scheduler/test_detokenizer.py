"""Incremental detokenization on the embedded checkpoint's byte-level BPE tokenizer."""
import random

import pytest

from model.embedded import EMBEDDED_MODEL_DIR
from scheduler.detokenizer import INCOMPLETE_CHARACTER, IncrementalDetokenizer
from scheduler.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(EMBEDDED_MODEL_DIR)


def stream(detokenizer: IncrementalDetokenizer, token_ids: list[int]) -> list[str]:
    deltas = []
    for token_id in token_ids:
        deltas.append(detokenizer.add_tokens([token_id]))
        if detokenizer.stop_reason is not None:
            return deltas
    deltas.append(detokenizer.flush())
    return deltas


def test_characters_split_across_tokens_are_released_whole(tokenizer) -> None:
    text = "Hello wörld 你好 🙂 end"
    ids = tokenizer.encode(text)
    assert any(INCOMPLETE_CHARACTER in tokenizer.decode([i]) for i in ids)  # the case under test really occurs
    deltas = stream(IncrementalDetokenizer(tokenizer), ids)
    assert all(INCOMPLETE_CHARACTER not in d for d in deltas)
    assert "".join(deltas) == text
    assert "🙂" in deltas  # released in one piece once its last byte arrived


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_deltas_concatenate_to_the_full_decode_for_random_tokens(tokenizer, skip_special_tokens: bool) -> None:
    rng = random.Random(5)
    special = tokenizer.all_special_ids
    for _ in range(200):
        ids = [rng.choice(special) if rng.random() < 0.05 else rng.randrange(len(tokenizer)) for _ in range(rng.randrange(1, 40))]
        deltas = stream(IncrementalDetokenizer(tokenizer, skip_special_tokens), ids)
        assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


def test_special_tokens_are_skipped_or_kept(tokenizer) -> None:
    ids = tokenizer.encode("abc<|endofresponse|>def")
    assert "".join(stream(IncrementalDetokenizer(tokenizer, True), ids)) == "abcdef"
    assert "".join(stream(IncrementalDetokenizer(tokenizer, False), ids)) == "abc<|endofresponse|>def"


def test_a_stop_string_split_across_tokens_is_never_released(tokenizer) -> None:
    ids = tokenizer.encode("The answer is STOP here")
    assert [tokenizer.decode([i]) for i in ids][-5:-1] == [" S", "T", "O", "P"]  # "STOP" spans four tokens
    detokenizer = IncrementalDetokenizer(tokenizer, stop=["STOP"])
    deltas = stream(detokenizer, ids)
    assert detokenizer.stop_reason == "STOP"
    assert "".join(deltas) == "The answer is "
    assert deltas[-4:] == [" ", "", "", ""]  # "S", "T" and "O" held back while they could start "STOP"


def test_include_stop_str_in_output_keeps_the_stop_but_not_what_follows(tokenizer) -> None:
    ids = tokenizer.encode("The answer is STOP here")
    detokenizer = IncrementalDetokenizer(tokenizer, stop=["STO"], include_stop_str_in_output=True)
    assert "".join(stream(detokenizer, ids)) == "The answer is STO"
    assert detokenizer.text == "The answer is STO"


def test_held_text_is_released_once_it_cannot_be_a_stop(tokenizer) -> None:
    ids = tokenizer.encode("is STAR")
    detokenizer = IncrementalDetokenizer(tokenizer, stop=["STOP"])
    deltas = stream(detokenizer, ids)
    assert detokenizer.stop_reason is None
    assert "".join(deltas) == "is STAR"


def test_the_earliest_of_several_stop_strings_wins(tokenizer) -> None:
    ids = tokenizer.encode("x\n\nEND.")
    detokenizer = IncrementalDetokenizer(tokenizer, stop=["END", "\n\n"])
    assert "".join(stream(detokenizer, ids)) == "x"
    assert detokenizer.stop_reason == "\n\n"


def test_stop_strings_are_ignored_while_check_stop_is_off(tokenizer) -> None:
    ids = tokenizer.encode("a STOP b STOP c")
    detokenizer = IncrementalDetokenizer(tokenizer, stop=["STOP"])
    # Off for the first five tokens ("a STOP b"), as before min_tokens is reached.
    released = ""
    for n, token_id in enumerate(ids):
        released += detokenizer.add_tokens([token_id], check_stop=n >= 5)
        if detokenizer.stop_reason is not None:
            break
    assert detokenizer.stop_reason == "STOP"
    assert released == "a STOP b "
