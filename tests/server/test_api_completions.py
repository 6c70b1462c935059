"""POST /v1/completions: prompt forms, echo with prompt logprobs, streaming, n, seed; schema-checked."""
import httpx
import openai
from conftest import MODEL
from openai_schema import validate
from sse_events import DONE, stream

PROMPT = "The quick brown fox"


def complete(http: httpx.Client, **body: object) -> dict:
    response = http.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT, **body})
    assert response.status_code == 200, response.text
    payload = response.json()
    validate(payload, "CreateCompletionResponse")
    return payload


def token_ids(http: httpx.Client, text: str) -> list[int]:
    return http.post("/tokenize", json={"prompt": text}).json()["tokens"]


def test_completion_with_the_openai_client(client: openai.OpenAI, http: httpx.Client) -> None:
    completion = client.completions.create(model=MODEL, prompt=PROMPT, extra_body={"ignore_eos": True})
    assert completion.object == "text_completion"
    assert completion.id.startswith("cmpl-")
    [choice] = completion.choices
    assert choice.text and choice.finish_reason == "length"
    assert completion.usage.completion_tokens == 16  # OpenAI's default max_tokens for completions
    assert completion.usage.prompt_tokens == len(token_ids(http, PROMPT))


def test_every_prompt_form_gives_the_same_greedy_text(http: httpx.Client) -> None:
    ids = token_ids(http, PROMPT)
    options = {"max_tokens": 6, "temperature": 0.0, "ignore_eos": True}
    expected = complete(http, **options)["choices"][0]["text"]
    assert complete(http, prompt=ids, **options)["choices"][0]["text"] == expected
    batch = complete(http, prompt=[PROMPT, "Another prompt"], n=2, **options)
    assert [choice["index"] for choice in batch["choices"]] == [0, 1, 2, 3]
    assert batch["choices"][0]["text"] == batch["choices"][1]["text"] == expected
    assert batch["usage"]["prompt_tokens"] == len(ids) + len(token_ids(http, "Another prompt"))
    assert batch["usage"]["completion_tokens"] == 4 * 6
    token_batch = complete(http, prompt=[ids, ids[:2]], **options)
    assert token_batch["choices"][0]["text"] == expected
    assert len(token_batch["choices"]) == 2


def test_echo_with_prompt_logprobs(http: httpx.Client) -> None:
    payload = complete(http, echo=True, logprobs=2, max_tokens=4, temperature=0.0, ignore_eos=True)
    [choice] = payload["choices"]
    usage = payload["usage"]
    assert choice["text"].startswith(PROMPT)
    logprobs = choice["logprobs"]
    count = usage["prompt_tokens"] + usage["completion_tokens"]
    assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == len(logprobs["text_offset"]) == count
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    assert all(value <= 0.0 for value in logprobs["token_logprobs"][1:])
    assert logprobs["text_offset"][0] == 0
    assert logprobs["text_offset"] == sorted(logprobs["text_offset"])
    text, offsets = choice["text"], logprobs["text_offset"]
    for token, offset, end in zip(logprobs["tokens"], offsets, [*offsets[1:], len(text)]):
        if end == offset and token.startswith("<|") and token.endswith("|>"):
            continue  # a special token: named in tokens, kept out of the text (skip_special_tokens)
        assert text[offset:end] == token
    for tokens, top in zip(logprobs["tokens"][1:], logprobs["top_logprobs"][1:]):
        assert 2 <= len(top) <= 3 and tokens in top


def test_stream_matches_the_non_streamed_text(http: httpx.Client) -> None:
    options = {"max_tokens": 8, "temperature": 0.0, "ignore_eos": True}
    expected = complete(http, **options)["choices"][0]["text"]
    events = stream(http, "/v1/completions",
                    {"model": MODEL, "prompt": PROMPT, "stream_options": {"include_usage": True}, **options})
    assert events[-1] == DONE
    chunks = events[:-1]
    for chunk in chunks:
        validate(chunk, "CreateCompletionStreamResponse")
    *text_chunks, finish, usage = chunks
    assert "".join(chunk["choices"][0]["text"] for chunk in text_chunks) == expected
    assert finish["choices"][0]["finish_reason"] == "length"
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 8


def test_stream_with_the_openai_client_and_echo(client: openai.OpenAI) -> None:
    texts, usages = [], []
    for chunk in client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, echo=True, stream=True,
                                           stream_options={"include_usage": True}):
        texts.extend(choice.text for choice in chunk.choices)
        if chunk.usage is not None:
            usages.append(chunk.usage)
    assert "".join(texts).startswith(PROMPT)
    assert len(usages) == 1


def test_seeded_sampling_reproduces(http: httpx.Client) -> None:
    options = {"max_tokens": 10, "temperature": 1.0, "seed": 7, "n": 2, "ignore_eos": True}
    first = [choice["text"] for choice in complete(http, **options)["choices"]]
    second = [choice["text"] for choice in complete(http, **options)["choices"]]
    assert first == second


def test_return_token_ids_per_choice(http: httpx.Client) -> None:
    ids = token_ids(http, PROMPT)
    payload = complete(http, max_tokens=3, return_token_ids=True, ignore_eos=True)
    [choice] = payload["choices"]
    assert choice["prompt_token_ids"] == ids
    assert len(choice["token_ids"]) == 3
