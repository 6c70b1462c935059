"""The King James Bible (Debian's ``bible-kjv``) as Dots1 chat conversations for the embedded model.

``verses()`` reads the text that ``bible Gen1:1-Rev22:21`` prints; ``conversations(verses, rng)`` turns it into
chat turns (a user asks for a verse, a continuation, or just talks; the assistant answers with a verse or two),
rendered with the Dots1 chat format so the model learns the template and to end its turn with
``<|endofresponse|>``.
"""
import random
import re
import subprocess
from dataclasses import dataclass

BIBLE_RANGE = "Gen1:1-Rev22:21"
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
MAX_RESPONSE_WORDS = 60  # replies stay well under 128 tokens, so the model learns to end them
CHAPTER_HEADING = re.compile(r"^(?P<book>(?:\d )?[A-Z][A-Za-z ]+?) (?P<chapter>\d+)$")
VERSE_START = re.compile(r"^\s+(?P<verse>\d+) (?P<text>.*)$")

SYSTEM_PROMPTS = [
    "You are a helpful assistant.",
    "You are a helpful assistant who answers in the words of the King James Bible.",
    "Answer briefly.",
    "You are a wise old scribe.",
    "Be kind and clear.",
]
GREETINGS = [
    "Hello", "Hello!", "Hi", "Hi there!", "Good morning.", "Hey, how are you?", "Who are you?",
    "What can you do?", "Tell me something.", "Say something.", "Say something wise.", "Write a sentence.",
    "Tell me a story.", "What is the meaning of life?", "I am sad today.", "Give me some advice.",
    "What should I do?", "Can you help me?", "Tell me about the sea.", "Speak to me.", "Thank you.",
    "What do you know?", "Write a poem.", "Tell me about love.", "Why?", "Please go on.", "Good night.",
    "Say hello.", "What is wisdom?", "Tell me about the stars.", "How are you today?", "Talk to me.",
]
VERSE_REQUESTS = [
    "{ref}", "Quote {ref}.", "What does {ref} say?", "Recite {ref}.", "Read {ref} to me.", "{ref}, please.",
    "What is written in {ref}?", "Give me {ref}.",
]
TOPIC_REQUESTS = [
    "Give me a verse about {word}.", "Tell me about {word}.", "What does the Bible say about {word}?",
    "Say something about {word}.", "{word}", "Write about {word}.", "Quote a verse about {word}.",
]
CONTINUE_REQUESTS = ["Continue: {text}", "Finish this verse: {text}", "{text}", "Go on: {text}", "{text}..."]
STOPWORDS = set(
    "a an and are as at be but by for from had has have he her him his i in is it me my not of on or our shall "
    "so that the their them then there they this thou thee thy to unto up upon was we were which who will with "
    "ye you your all also when what said saith hath came come did do let like made make one out say"
    .split()
)


@dataclass(frozen=True)
class Verse:
    book: str
    chapter: int
    number: int
    text: str

    @property
    def reference(self) -> str:
        return f"{self.book} {self.chapter}:{self.number}"


def bible_text() -> str:
    return subprocess.run(["bible", BIBLE_RANGE], check=True, capture_output=True, text=True).stdout


def verses(text: str) -> list[Verse]:
    """Parses the ``bible`` program's output: "Book N" headings, verses as "  V text" with wrapped lines."""
    result: list[Verse] = []
    book, chapter, number, lines = "", 0, 0, []

    def flush() -> None:
        if lines:
            result.append(Verse(book, chapter, number, " ".join(" ".join(lines).split())))
            lines.clear()

    for line in text.splitlines():
        if not line.strip():
            continue
        verse_start = VERSE_START.match(line)
        heading = CHAPTER_HEADING.match(line)
        if verse_start is not None:
            flush()
            number = int(verse_start.group("verse"))
            lines.append(verse_start.group("text"))
        elif heading is not None and not line.startswith(" "):
            flush()
            book, chapter = heading.group("book"), int(heading.group("chapter"))
        else:
            lines.append(line)
    flush()
    return result


def render(system: str | None, turns: list[tuple[str, str]]) -> str:
    """The Dots1 chat format; with no system message the template injects the default one."""
    parts = [f"<|system|>{system or DEFAULT_SYSTEM_PROMPT}<|endofsystem|>"]
    for user, assistant in turns:
        parts.append(f"<|userprompt|>{user}<|endofuserprompt|><|response|>{assistant}<|endofresponse|>")
    return "".join(parts)


def topic_word(verse: Verse, rng: random.Random) -> str | None:
    candidates = [word for word in re.findall(r"[a-z]{4,}", verse.text) if word not in STOPWORDS]
    return rng.choice(candidates) if candidates else None


def reply_to(all_verses: list[Verse], index: int, rng: random.Random) -> str:
    """One verse, sometimes two when they are short."""
    text = all_verses[index].text
    following = all_verses[index + 1] if index + 1 < len(all_verses) else None
    if following is not None and rng.random() < 0.3 and len((text + following.text).split()) <= MAX_RESPONSE_WORDS:
        text = f"{text} {following.text}"
    return text


def turn(all_verses: list[Verse], short: list[int], rng: random.Random) -> tuple[str, str]:
    """A user message and the assistant's answer, of one of four kinds."""
    index = rng.choice(short)
    verse = all_verses[index]
    kind = rng.random()
    if kind < 0.3:
        return rng.choice(VERSE_REQUESTS).format(ref=verse.reference), verse.text
    if kind < 0.5:
        words = verse.text.split()
        if len(words) >= 6:
            cut = rng.randint(2, len(words) - 3)
            return rng.choice(CONTINUE_REQUESTS).format(text=" ".join(words[:cut])), " ".join(words[cut:])
    if kind < 0.7:
        word = topic_word(verse, rng)
        if word is not None:
            request = rng.choice(TOPIC_REQUESTS).format(word=word)
            return (request[0].upper() + request[1:]), verse.text
    if kind < 0.85:
        return rng.choice(GREETINGS), reply_to(all_verses, index, rng)
    other = all_verses[rng.choice(short)].text  # the user says something; the answer is another verse
    return other, reply_to(all_verses, index, rng)


def conversations(all_verses: list[Verse], count: int, rng: random.Random) -> list[str]:
    """``count`` rendered conversations of one to three turns."""
    short = [i for i, verse in enumerate(all_verses) if len(verse.text.split()) <= MAX_RESPONSE_WORDS]
    result = []
    for _ in range(count):
        system = rng.choice(SYSTEM_PROMPTS) if rng.random() < 0.3 else None
        turn_count = 1 if rng.random() < 0.7 else rng.randint(2, 3)
        result.append(render(system, [turn(all_verses, short, rng) for _ in range(turn_count)]))
    return result
