"""The embedded model, served for real, fills a schema through ``parse()`` and calls an offered tool on its own.

Sampled at the server's default temperature over 8 seeds; each feature has to work in at least 6 of them.
"""
import json

import openai
from conftest import MODEL
from pydantic import BaseModel

SEEDS = range(8)
MIN_SUCCESSES = 6
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


class Person(BaseModel):
    name: str
    age: int


def test_parse_fills_a_pydantic_model_by_itself(client: openai.OpenAI) -> None:
    """The grammar only keeps the JSON valid; closing the string and the number before max_tokens, and writing a
    plausible person (a name with letters, an age under 130), is the model's."""
    people, failures = [], []
    for seed in SEEDS:
        try:
            completion = client.chat.completions.parse(
                model=MODEL, messages=[{"role": "user", "content": "Give me a person as JSON."}],
                response_format=Person, seed=seed, max_tokens=64,
            )
        except openai.LengthFinishReasonError as error:
            failures.append(error.completion.choices[0].message.content)
            continue
        [choice] = completion.choices
        assert choice.finish_reason == "stop"
        assert isinstance(choice.message.parsed, Person)
        people.append(choice.message.parsed)
    plausible = [person for person in people if any(c.isalpha() for c in person.name) and 0 < person.age < 130]
    assert len(plausible) >= MIN_SUCCESSES, f"parsed {people}; cut off at max_tokens: {failures}"


def test_weather_question_gets_a_tool_call_under_auto(client: openai.OpenAI) -> None:
    calls, texts = [], []
    for seed in SEEDS:
        completion = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "What is the weather in Paris?"}],
            tools=[WEATHER_TOOL], tool_choice="auto", seed=seed, max_tokens=96,
        )
        [choice] = completion.choices
        if not choice.message.tool_calls:
            texts.append(choice.message.content)
            continue
        assert choice.finish_reason == "tool_calls"
        [call] = choice.message.tool_calls
        assert call.function.name == "get_weather"
        arguments = json.loads(call.function.arguments)
        assert isinstance(arguments["city"], str) and arguments["city"]
        calls.append(arguments)
    assert len(calls) >= MIN_SUCCESSES, f"calls {calls}; text answers {texts}"
