"""POST /v1/chat/completions through the official openai client and raw httpx, every response schema-checked."""
import httpx
import openai
import pytest
from conftest import MODEL
from openai_schema import validate
from sse_events import DONE, stream

HELLO = [{"role": "user", "content": "Hello, who are you?"}]
GREEDY = {"temperature": 0.0}


def chat(http: httpx.Client, **body: object) -> dict:
    response = http.post("/v1/chat/completions", json={"model": MODEL, "messages": HELLO, **body})
    assert response.status_code == 200, response.text
    payload = response.json()
    validate(payload, "CreateChatCompletionResponse")
    return payload


def prompt_token_ids(http: httpx.Client, messages: list[dict], **options: object) -> list[int]:
    response = http.post("/tokenize", json={"model": MODEL, "messages": messages, **options})
    assert response.status_code == 200, response.text
    return response.json()["tokens"]


def test_chat_completion_with_the_openai_client(client: openai.OpenAI, http: httpx.Client) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=HELLO, max_tokens=12, temperature=0.0, extra_body={"ignore_eos": True}
    )
    validate(raw.http_response.json(), "CreateChatCompletionResponse")
    assert raw.headers["x-request-id"]
    completion = raw.parse()
    assert completion.id.startswith("chatcmpl-")
    assert completion.model == MODEL
    assert completion.object == "chat.completion"
    [choice] = completion.choices
    assert choice.message.role == "assistant"
    assert choice.message.content
    assert choice.finish_reason == "length"
    assert completion.usage.completion_tokens == 12
    assert completion.usage.prompt_tokens == len(prompt_token_ids(http, HELLO))
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + 12
    assert completion.usage.prompt_tokens_details.cached_tokens >= 0


def test_stream_chunk_order_and_schema(http: httpx.Client) -> None:
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 10, "stream_options": {"include_usage": True},
            "ignore_eos": True, **GREEDY}
    events = stream(http, "/v1/chat/completions", body)
    assert events[-1] == DONE
    chunks = events[:-1]
    for chunk in chunks:
        validate(chunk, "CreateChatCompletionStreamResponse")
        assert chunk["object"] == "chat.completion.chunk"
    assert len({chunk["id"] for chunk in chunks}) == 1
    assert len({chunk["created"] for chunk in chunks}) == 1
    role, *content, finish, usage = chunks
    assert role["choices"][0]["delta"]["role"] == "assistant"
    assert all(chunk["choices"][0]["delta"].get("content") is not None for chunk in content)
    assert all(chunk["usage"] is None for chunk in [role, *content, finish])
    assert finish["choices"][0]["finish_reason"] == "length"
    assert finish["choices"][0]["delta"] == {}
    assert usage["choices"] == []
    assert usage["usage"]["completion_tokens"] == 10
    streamed = "".join(chunk["choices"][0]["delta"]["content"] for chunk in content)
    assert streamed == chat(http, max_tokens=10, ignore_eos=True, **GREEDY)["choices"][0]["message"]["content"]


def test_stream_with_the_openai_client(client: openai.OpenAI) -> None:
    pieces, finish_reasons, usages = [], [], []
    for chunk in client.chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=8, stream=True, stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    ):
        if chunk.usage is not None:
            usages.append(chunk.usage)
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            if choice.finish_reason:
                finish_reasons.append(choice.finish_reason)
    assert "".join(pieces)
    assert finish_reasons == ["length"]
    [usage] = usages
    assert usage.completion_tokens == 8


def test_n_choices_and_seed_reproduce(client: openai.OpenAI) -> None:
    def sample() -> list[str]:
        completion = client.chat.completions.create(
            model=MODEL, messages=HELLO, max_tokens=8, n=3, seed=1234, temperature=1.0,
            extra_body={"ignore_eos": True},
        )
        assert [choice.index for choice in completion.choices] == [0, 1, 2]
        assert completion.usage.completion_tokens == 3 * 8
        return [choice.message.content for choice in completion.choices]

    first = sample()
    assert sample() == first
    assert len(set(first)) > 1  # each choice samples its own continuation


def test_stream_n_choices_each_get_role_content_and_finish(http: httpx.Client) -> None:
    events = stream(http, "/v1/chat/completions",
                    {"model": MODEL, "messages": HELLO, "max_tokens": 5, "n": 2, "ignore_eos": True})
    assert events[-1] == DONE
    by_index: dict[int, list[dict]] = {0: [], 1: []}
    for chunk in events[:-1]:
        validate(chunk, "CreateChatCompletionStreamResponse")
        [choice] = chunk["choices"]
        by_index[choice["index"]].append(choice)
    for choices in by_index.values():
        assert choices[0]["delta"]["role"] == "assistant"
        assert choices[-1]["finish_reason"] == "length"
        assert all(choice["finish_reason"] is None for choice in choices[:-1])


def test_stop_string_ends_the_text_before_it(client: openai.OpenAI) -> None:
    def complete(**options: object) -> openai.types.chat.ChatCompletion:
        return client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=24, temperature=0.0,
                                              extra_body={"ignore_eos": True, **options.pop("extra", {})}, **options)

    full = complete().choices[0].message.content
    assert len(full) > 8
    stop = full[4:7]
    expected = full[: full.index(stop)]
    stopped = complete(stop=[stop]).choices[0]
    assert stopped.finish_reason == "stop"
    assert stopped.message.content == expected
    kept = complete(stop=stop, extra={"include_stop_str_in_output": True}).choices[0]
    assert kept.message.content == expected + stop


def test_logprobs_in_openai_shape(client: openai.OpenAI, http: httpx.Client) -> None:
    payload = chat(http, max_tokens=6, logprobs=True, top_logprobs=3, ignore_eos=True, **GREEDY)
    [choice] = payload["choices"]
    entries = choice["logprobs"]["content"]
    assert len(entries) == payload["usage"]["completion_tokens"] == 6
    for entry in entries:
        assert len(entry["top_logprobs"]) == 3
        # Greedy: the chosen token is the most likely one.
        assert entry["logprob"] == pytest.approx(entry["top_logprobs"][0]["logprob"])
        assert entry["token"] == entry["top_logprobs"][0]["token"]
        assert entry["logprob"] <= 0.0
    raw = bytes(byte for entry in entries for byte in entry["bytes"])
    assert raw.decode("utf-8", errors="replace") == choice["message"]["content"]
    completion = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=3, logprobs=True)
    assert len(completion.choices[0].logprobs.content) == 3
    assert completion.choices[0].logprobs.content[0].top_logprobs == []


def test_stream_logprobs_and_continuous_usage(http: httpx.Client) -> None:
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 6, "logprobs": True, "top_logprobs": 2,
            "ignore_eos": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    events = stream(http, "/v1/chat/completions", body)
    chunks = events[:-1]
    for chunk in chunks:
        validate(chunk, "CreateChatCompletionStreamResponse")
        assert chunk["usage"]["prompt_tokens"] > 0
    counts = [chunk["usage"]["completion_tokens"] for chunk in chunks]
    assert counts == sorted(counts) and counts[-1] == 6
    content_chunks = [c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")]
    assert sum(len(c["choices"][0]["logprobs"]["content"]) for c in content_chunks) == 6


def test_return_token_ids(http: httpx.Client) -> None:
    payload = chat(http, max_tokens=7, return_token_ids=True, ignore_eos=True, **GREEDY)
    [choice] = payload["choices"]
    assert len(choice["token_ids"]) == 7
    assert payload["prompt_token_ids"] == prompt_token_ids(http, HELLO)
    detokenized = http.post("/detokenize", json={"tokens": choice["token_ids"]}).json()["prompt"]
    assert detokenized == choice["message"]["content"]


def test_text_parts_and_developer_role_render_like_strings(http: httpx.Client) -> None:
    as_parts = [{"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
                {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]}]
    as_strings = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi\nthere"}]
    expected = prompt_token_ids(http, as_strings)
    assert prompt_token_ids(http, as_parts) == expected
    payload = chat(http, messages=as_parts, max_tokens=2, return_token_ids=True)
    assert payload["prompt_token_ids"] == expected


def test_continue_final_message_extends_the_assistant_turn(http: httpx.Client) -> None:
    messages = [*HELLO, {"role": "assistant", "content": "I am"}]
    options = {"add_generation_prompt": False, "continue_final_message": True}
    continued = prompt_token_ids(http, messages, **options)
    closed = prompt_token_ids(http, messages, add_generation_prompt=False)
    assert continued == closed[: len(continued)] and len(continued) < len(closed)
    payload = chat(http, messages=messages, max_tokens=3, return_token_ids=True, **options)
    assert payload["prompt_token_ids"] == continued


def test_max_completion_tokens_limits_the_completion(http: httpx.Client) -> None:
    payload = chat(http, max_completion_tokens=4, max_tokens=50, ignore_eos=True)
    assert payload["usage"]["completion_tokens"] == 4
    assert payload["choices"][0]["finish_reason"] == "length"


def test_client_request_id_is_echoed(http: httpx.Client) -> None:
    response = http.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 1},
                         headers={"X-Request-Id": "trace-42"})
    assert response.headers["x-request-id"] == "trace-42"
    generated = http.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 1})
    assert len(generated.headers["x-request-id"]) == 32


def test_repeated_prompt_reports_cached_tokens(http: httpx.Client) -> None:
    messages = [{"role": "user", "content": "A long shared prefix for the cache test. " * 8}]
    chat(http, messages=messages, max_tokens=1)
    usage = chat(http, messages=messages, max_tokens=1)["usage"]
    assert usage["prompt_tokens_details"]["cached_tokens"] >= 16
    assert usage["prompt_tokens_details"]["cached_tokens"] < usage["prompt_tokens"]
