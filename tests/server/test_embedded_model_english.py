"""The embedded model, served for real, writes English words and ends its own replies."""
import re
from pathlib import Path

import openai
import pytest
from conftest import MODEL

WORD_LIST = Path("/usr/share/dict/american-english")  # Debian's wamerican (scripts/install-system-deps.sh)
WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)*")
PROMPTS = ["Hello, who are you?", "Tell me about the sea.", "What is wisdom?", "Quote John 3:16.",
           "Continue: And God said"]
SEEDS = [1, 2, 3, 4]
MAX_TOKENS = 128


@pytest.fixture(scope="module")
def dictionary() -> set[str]:
    if not WORD_LIST.exists():
        pytest.fail(f"{WORD_LIST} is missing: run scripts/install-system-deps.sh")
    return {line.strip().lower() for line in WORD_LIST.read_text(encoding="utf-8").splitlines() if line.strip()}


def dictionary_share(texts: list[str], dictionary: set[str]) -> float:
    words = [word.lower() for text in texts for word in WORD.findall(text)]
    return sum(word in dictionary for word in words) / len(words)


def test_word_share_counts_dictionary_words(dictionary: set[str]) -> None:
    assert dictionary_share(["The LORD is my shepherd; I shall not want."], dictionary) == 1.0
    assert dictionary_share(["impmended adlock termin the"], dictionary) == 0.25


def test_replies_are_mostly_english_and_end_by_themselves(client: openai.OpenAI, dictionary: set[str]) -> None:
    texts, finish_reasons = [], []
    for prompt in PROMPTS:
        for seed in SEEDS:
            completion = client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": prompt}], temperature=0.8, seed=seed,
                max_tokens=MAX_TOKENS,
            )
            [choice] = completion.choices
            texts.append(choice.message.content)
            finish_reasons.append(choice.finish_reason)
    word_share = dictionary_share(texts, dictionary)
    stop_share = finish_reasons.count("stop") / len(finish_reasons)
    report = f"word share {word_share:.2f}, self-ended {stop_share:.2f}; replies: {texts}"
    assert word_share >= 0.70, report
    assert stop_share > 0.5, report
    assert len(set(texts)) > len(PROMPTS)  # seeds matter: it samples rather than reciting one reply per prompt
