"""Generated chat turns that teach the embedded model the server's formats: JSON answers, tool calls, replies to
tool results, and short greetings.

``conversations(count, rng, plain_turn)`` returns ``Conversation``s (OpenAI-style messages plus the offered tools);
the training script renders them with ``server/chat_templates/dots1-tools.jinja``, so the tools sit in the system
turn exactly as the server puts them there and a call is ``<tool_call>{"name":...,"arguments":{...}}</tool_call>``.
JSON is compact (``{"name":"Ruth","age":34}``), as the server's grammars force it, and its numbers are short so the
model learns to close them. ``plain_turn`` supplies the plain answers (a King James verse) given when tools are
offered but the question fits none of them.
"""
import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

NAMES = ["Ruth", "David", "Anna", "John", "Mary", "Peter", "Sarah", "Thomas", "Alice", "Maria", "James", "Esther",
         "Paul", "Martha", "Daniel", "Lydia", "Samuel", "Hannah", "Tom", "Emma", "Jacob", "Rachel", "Noah", "Leah"]
CITIES = ["Paris", "London", "Rome", "Berlin", "Madrid", "Tokyo", "Cairo", "Lisbon", "Vienna", "Dublin", "Oslo",
          "Athens", "Boston", "Denver", "Chicago", "Seattle", "Sydney", "Toronto", "Jerusalem", "Nazareth", "Prague",
          "Warsaw", "Zurich", "Austin", "Dallas", "Miami", "Delhi", "Lima", "Quito", "York", "Naples", "Munich",
          "Geneva", "Bergen", "Milan", "Venice", "Hamburg", "Kyoto", "Osaka", "Seoul", "Manila", "Nairobi", "Accra",
          "Dakar", "Tunis", "Havana", "Bogota", "Santiago", "Phoenix", "Portland", "Ottawa", "Montreal",
          "Glasgow", "Leeds", "Bristol", "Cardiff", "Krakow", "Riga", "Tallinn", "Helsinki", "Bethel", "Damascus"]
COUNTRIES = ["France", "England", "Italy", "Germany", "Spain", "Japan", "Egypt", "Portugal", "Austria", "Ireland",
             "Norway", "Greece", "Canada", "Israel", "Peru", "India", "Chile", "Kenya"]
TITLES = ["The Sea", "Good News", "The Long Road", "Morning Light", "The Garden", "Bread and Wine", "The Shepherd",
          "Still Waters", "The Last Letter", "A Small House", "The River", "Green Hills", "The Lamp"]
COLORS = ["red", "blue", "green", "white", "black", "yellow", "purple", "brown", "gold"]
FRUITS = ["apple", "pear", "grape", "fig", "olive", "lemon", "plum", "date", "cherry", "orange"]
ANIMALS = [("dog", 4), ("cat", 4), ("bird", 2), ("horse", 4), ("spider", 8), ("ant", 6), ("sheep", 4), ("goat", 4),
           ("duck", 2), ("lion", 4), ("camel", 4), ("bee", 6)]
TOPICS = ["the weather", "bread", "horses", "the sea", "music", "gardens", "the stars", "history", "wine", "trains"]
CONDITIONS = ["sunny", "cloudy", "rainy", "windy", "snowy", "clear", "foggy"]
TIMEZONES = ["UTC", "CET", "EST", "PST", "JST", "GMT"]


def person(rng: random.Random) -> dict[str, Any]:
    return {"name": rng.choice(NAMES), "age": rng.randint(2, 90)}


def book(rng: random.Random) -> dict[str, Any]:
    return {"title": rng.choice(TITLES), "year": rng.randint(1600, 2024)}


def city(rng: random.Random) -> dict[str, Any]:
    return {"city": rng.choice(CITIES), "population": rng.randint(10, 990)}


def capital(rng: random.Random) -> dict[str, Any]:
    return {"country": rng.choice(COUNTRIES), "capital": rng.choice(CITIES)}


def fruit(rng: random.Random) -> dict[str, Any]:
    return {"fruit": rng.choice(FRUITS), "color": rng.choice(COLORS)}


def animal(rng: random.Random) -> dict[str, Any]:
    name, legs = rng.choice(ANIMALS)
    return {"animal": name, "legs": legs}


def product(rng: random.Random) -> dict[str, Any]:
    return {"name": rng.choice(FRUITS), "price": rng.randint(1, 99), "in_stock": rng.random() < 0.5}


def resident(rng: random.Random) -> dict[str, Any]:
    return {"name": rng.choice(NAMES), "age": rng.randint(2, 90), "city": rng.choice(CITIES)}


@dataclass(frozen=True)
class Entity:
    noun: str  # "a person"
    make: Callable[[random.Random], dict[str, Any]]
    describe: str  # a sentence stating the values, e.g. "{name} is {age} years old."


ENTITIES = [
    Entity("a person", person, "{name} is {age} years old."),
    Entity("a book", book, "The book {title} was written in {year}."),
    Entity("a city", city, "{city} has {population} thousand people."),
    Entity("a country", capital, "The capital of {country} is {capital}."),
    Entity("a fruit", fruit, "The {fruit} is {color}."),
    Entity("an animal", animal, "A {animal} has {legs} legs."),
    Entity("a product", product, "The {name} costs {price} dollars."),
    Entity("a person and their city", resident, "{name} is {age} and lives in {city}."),
]
JSON_REQUESTS = [
    "Give me {noun} as JSON.", "Answer in JSON: describe {noun}.", "Return {noun} as a JSON object.",
    "Make up {noun} and give it as JSON with the keys {keys}.", "JSON only: {noun} with {keys}.",
    "Give me a JSON object with the keys {keys}.", "Describe {noun} in JSON.", "Output JSON for {noun}.",
    "Please answer in JSON. Tell me about {noun}.", "I need {noun} in JSON format, with {keys}.",
]
EXTRACT_REQUESTS = [
    "{sentence}", "{sentence} Give me that as JSON.", "Extract the details as JSON: {sentence}",
    "{sentence} Answer in JSON.", "Turn this into JSON: {sentence}", "Parse this: {sentence}",
]
EXTRACT_SYSTEMS = [
    "Extract the information.", "Extract the details as JSON.", "You extract structured data from text.",
    "Answer in JSON.", "Reply with a JSON object only.", "You are a helpful assistant. Answer in JSON.",
]
GREETING_TURNS = [
    ("Hello", "Hello! How can I help you today?"), ("Hi", "Hi! What can I do for you?"),
    ("Hi there!", "Hello there! How can I help?"), ("Good morning.", "Good morning to you!"),
    ("How are you?", "I am well, thank you. How can I help you?"), ("Thanks!", "You are welcome."),
    ("Thank you.", "You are welcome. Is there anything else?"), ("Bye", "Goodbye, and peace be with you."),
    ("Who are you?", "I am a helpful assistant. Ask me anything."), ("Good night.", "Good night, and rest well."),
    ("Can you help me?", "Yes, gladly. What do you need?"), ("Hey", "Hello! What would you like to know?"),
    ("Hello, who are you?", "I am a small assistant, here to help you."), ("OK", "Good. What else can I do?"),
]


@dataclass
class Conversation:
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] = field(default_factory=list)


def compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def json_turns(rng: random.Random) -> list[dict[str, Any]]:
    entity = rng.choice(ENTITIES)
    value = entity.make(rng)
    keys = list(value)
    key_text = ", ".join(keys[:-1]) + " and " + keys[-1]
    if rng.random() < 0.5:
        user = rng.choice(JSON_REQUESTS).format(noun=entity.noun, keys=key_text)
        messages = [{"role": "user", "content": user[0].upper() + user[1:]}]
    else:
        sentence = entity.describe.format(**value)
        messages = [{"role": "user", "content": rng.choice(EXTRACT_REQUESTS).format(sentence=sentence)}]
        if rng.random() < 0.6:
            messages.insert(0, {"role": "system", "content": rng.choice(EXTRACT_SYSTEMS)})
    return messages + [{"role": "assistant", "content": compact(value)}]


@dataclass(frozen=True)
class ToolKind:
    """A kind of tool: its possible names and argument names, the questions that fit it, and how a result reads."""
    names: list[str]
    description: str
    argument_names: list[str]  # one is picked per tool
    values: Callable[[random.Random], str]
    questions: list[str]  # with {value}
    result: Callable[[random.Random], dict[str, Any]]
    answer: str  # with {value} and the result's keys


def weather_result(rng: random.Random) -> dict[str, Any]:
    return {"temperature": rng.randint(-5, 35), "condition": rng.choice(CONDITIONS)}


def time_result(rng: random.Random) -> dict[str, Any]:
    return {"time": f"{rng.randint(0, 23):02d}:{rng.choice(['00', '15', '30', '45'])}"}


def search_result(rng: random.Random) -> dict[str, Any]:
    return {"result": f"{rng.choice(NAMES)} wrote about {rng.choice(TOPICS)} in {rng.randint(1600, 2020)}."}


def calculator_result(rng: random.Random) -> dict[str, Any]:
    return {"result": rng.randint(2, 999)}


def expression(rng: random.Random) -> str:
    return f"{rng.randint(2, 99)} {rng.choice(['+', '-', '*', '/'])} {rng.randint(2, 99)}"


TOOL_KINDS = [
    ToolKind(["get_weather", "get_current_weather", "weather", "current_weather"], "Get the current weather",
             ["city", "location", "place"], lambda rng: rng.choice(CITIES),
             ["What is the weather in {value}?", "What's the weather like in {value} today?",
              "Is it raining in {value}?", "How warm is it in {value}?", "Weather in {value}, please.",
              "Will I need a coat in {value} today?", "Tell me the weather in {value}."],
             weather_result, "It is {temperature} degrees and {condition} in {value}."),
    ToolKind(["get_time", "get_current_time", "current_time"], "Get the current time",
             ["city", "location", "timezone"], lambda rng: rng.choice(CITIES),
             ["What time is it in {value}?", "What is the time in {value} now?", "Tell me the time in {value}."],
             time_result, "It is {time} in {value}."),
    ToolKind(["search", "web_search", "search_web", "lookup"], "Search the web",
             ["query", "q", "text"], lambda rng: rng.choice(TOPICS),
             ["Search the web for {value}.", "Look up {value} for me.", "Find something about {value}.",
              "Can you search for {value}?"],
             search_result, "I found this: {result}"),
    ToolKind(["calculator", "calculate", "evaluate"], "Evaluate an arithmetic expression",
             ["expression", "expr", "formula"], expression,
             ["What is {value}?", "Calculate {value}.", "How much is {value}?", "Compute {value} for me."],
             calculator_result, "The answer is {result}."),
]
UNITS = ["celsius", "fahrenheit"]


def tool_definition(kind: ToolKind, rng: random.Random) -> tuple[dict[str, Any], str, bool]:
    """An OpenAI tool of ``kind`` with a picked name and argument name; (tool, argument name, has a unit enum)."""
    argument = rng.choice(kind.argument_names)
    properties: dict[str, Any] = {argument: {"type": "string"}}
    if rng.random() < 0.5:
        properties[argument]["description"] = f"The {argument}"
    has_unit = kind is TOOL_KINDS[0] and rng.random() < 0.4
    if has_unit:
        properties["unit"] = {"type": "string", "enum": UNITS}
    parameters = {"type": "object", "properties": properties, "required": [argument]}
    function = {"name": rng.choice(kind.names), "description": kind.description, "parameters": parameters}
    return {"type": "function", "function": function}, argument, has_unit


def joined_question(questions: list[str]) -> str:
    """One question, or two asked at once: "What is the weather in Paris, and what time is it in Rome?"."""
    if len(questions) == 1:
        return questions[0]
    first, second = questions
    return f"{first.rstrip('?.!')}, and {second[0].lower()}{second[1:]}"


def tool_turns(rng: random.Random, plain_turn: Callable[[random.Random], tuple[str, str]]) -> Conversation:
    """Tools offered; the question fits one of them, or two at once (one call each; sometimes the results and an
    answer that uses them), or none (a plain answer)."""
    kinds = rng.sample(TOOL_KINDS, 1 if rng.random() < 0.6 else 2)
    offered = [tool_definition(kind, rng) for kind in kinds]
    tools = [tool for tool, _, _ in offered]
    messages: list[dict[str, Any]] = []
    if rng.random() < 0.3:
        messages.append({"role": "system", "content": rng.choice(["You are a helpful assistant.", "Be brief."])})
    if rng.random() < 0.25:
        user, answer = plain_turn(rng) if rng.random() < 0.6 else rng.choice(GREETING_TURNS)
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        return Conversation(messages, tools)
    asked = [0, 1] if len(kinds) == 2 and rng.random() < 0.35 else [rng.randrange(len(kinds))]
    questions, calls, results, answers = [], [], [], []
    for index in asked:
        kind, (tool, argument, has_unit) = kinds[index], offered[index]
        value = kind.values(rng)
        arguments: dict[str, Any] = {argument: value}
        if has_unit:
            arguments["unit"] = rng.choice(UNITS)
        result = kind.result(rng)
        questions.append(rng.choice(kind.questions).format(value=value))
        calls.append({"type": "function", "function": {"name": tool["function"]["name"], "arguments": arguments}})
        results.append({"role": "tool", "content": compact(result)})
        answers.append(kind.answer.format(value=value, **result))
    messages += [{"role": "user", "content": joined_question(questions)},
                 {"role": "assistant", "content": "", "tool_calls": calls}]
    if rng.random() < 0.5:
        messages += results + [{"role": "assistant", "content": " ".join(answers)}]
    return Conversation(messages, tools)


def conversations(count: int, rng: random.Random,
                  plain_turn: Callable[[random.Random], tuple[str, str]]) -> list[Conversation]:
    """``count`` conversations: 40% with tools offered, 45% JSON answers, 15% greetings."""
    result = []
    for _ in range(count):
        kind = rng.random()
        if kind < 0.4:
            result.append(tool_turns(rng, plain_turn))
        elif kind < 0.85:
            result.append(Conversation(json_turns(rng)))
        else:
            user, answer = rng.choice(GREETING_TURNS)
            result.append(Conversation([{"role": "user", "content": user}, {"role": "assistant", "content": answer}]))
    return result
