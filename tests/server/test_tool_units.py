"""The tool-aware template, the tool-call parser and the tool grammars, without a server."""
import json
import random

import pytest
from transformers import AutoTokenizer

from model.embedded import EMBEDDED_MODEL_DIR
from scheduler.structured_output.factory import create_structured_output
from server.chat_template import TOOL_TEMPLATE_PATH, ChatRenderer, handles_tools
from server.protocol.chat import ChatCompletionRequest, ChatMessage
from server.tool_parser import ToolCallParser
from server.tools import parse_tools, tool_call_spec

TOOLS = [{"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"],
    "additionalProperties": False}}}]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(EMBEDDED_MODEL_DIR), local_files_only=True)


def messages(*items: dict) -> list[ChatMessage]:
    return [ChatMessage.model_validate(item) for item in items]


CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": [{"type": "text", "text": "a"},
                                                                              {"type": "text", "text": "b"}]}],
    [{"role": "developer", "content": "Rules."}, {"role": "user", "content": "x"}, {"role": "system", "content": "y"}],
]


@pytest.mark.parametrize("conversation", CONVERSATIONS)
def test_without_tools_the_tool_template_renders_the_plain_format(tokenizer, conversation: list[dict]) -> None:
    renderer = ChatRenderer(tokenizer, None)
    tool_renderer = ChatRenderer(tokenizer, TOOL_TEMPLATE_PATH.read_text())
    for add_generation_prompt in (True, False):
        expected = renderer.render(messages(*conversation), add_generation_prompt, False)
        assert tool_renderer.render(messages(*conversation), add_generation_prompt, False) == expected


def test_tools_calls_and_results_are_rendered(tokenizer) -> None:
    renderer = ChatRenderer(tokenizer, None)
    assert not handles_tools(renderer.template) and handles_tools(renderer.tool_template)
    conversation = messages(
        {"role": "user", "content": "1+2?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}},
            {"id": "call_2", "type": "function", "function": {"name": "add", "arguments": '{"a":3,"b":4}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "3"},
        {"role": "tool", "tool_call_id": "call_2", "content": "7"},
    )
    text = renderer.render(conversation, True, False, tools=TOOLS)
    system = text[: text.index("<|endofsystem|>")]
    assert system.startswith("<|system|>You are a helpful assistant.") and json.dumps(TOOLS[0]["function"]) in system
    assert ('<|response|><tool_call>{"name":"add","arguments":{"a":1,"b":2}}</tool_call>'
            '<tool_call>{"name":"add","arguments":{"a":3,"b":4}}</tool_call><|endofresponse|>') in text
    assert text.endswith("<|userprompt|><tool_response>3</tool_response><tool_response>7</tool_response>"
                         "<|endofuserprompt|><|response|>")


def test_the_parser_gives_the_same_calls_whatever_the_chunking() -> None:
    text = ('Let me see. <tool_call>{"name":"add","arguments":{"a":1,"b":{"c":"}</tool_call"}}}</tool_call>'
            '<tool_call>{"name":"add","arguments":{}}</tool_call>')
    whole = ToolCallParser()
    content = whole.feed(text)[0] + whole.finish()[0]
    assert content == "Let me see. "
    assert [(c.name, c.arguments) for c in whole.calls] == [("add", '{"a":1,"b":{"c":"}</tool_call"}}'), ("add", "{}")]
    rng = random.Random(0)
    for _ in range(50):
        parser, streamed, calls, at = ToolCallParser(), "", {}, 0
        while at <= len(text):
            step = rng.randint(1, 5)
            piece_content, deltas = parser.feed(text[at : at + step]) if at < len(text) else parser.finish()
            at += step
            streamed += piece_content
            for delta in deltas:
                if delta.id is not None:
                    calls[delta.index] = [delta.name, delta.arguments]
                else:
                    calls[delta.index][1] += delta.arguments
        assert streamed == content
        assert [tuple(call) for call in calls.values()] == [(c.name, c.arguments) for c in whole.calls]


def grammar_for(tokenizer, **fields: object):
    request = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "x"}], "tools": TOOLS,
                                                    **fields})
    manager = create_structured_output(tokenizer, len(tokenizer), [tokenizer.eos_token_id])
    return manager.compiler.compile(tool_call_spec(parse_tools(request))), manager


def consume_text(matcher, tokenizer, text: str) -> bool:
    return all(matcher.consume(token) for token in tokenizer.encode(text, add_special_tokens=False))


def test_auto_allows_text_then_constrains_once_a_call_starts(tokenizer) -> None:
    grammar, _ = grammar_for(tokenizer, tool_choice="auto")
    text_only = grammar.new_matcher()
    assert consume_text(text_only, tokenizer, "Just text, <b>no</b> calls.")
    assert text_only.consume(tokenizer.eos_token_id)
    call = grammar.new_matcher()
    assert consume_text(call, tokenizer, 'Sure. <tool_call>{"name":"add","arguments":{"a":1,"b":2}}</tool_call>')
    assert call.consume(tokenizer.eos_token_id)
    started = grammar.new_matcher()
    assert consume_text(started, tokenizer, "Sure. <tool_call>")
    assert not consume_text(started, tokenizer, "never mind")  # inside a call only the call's JSON is allowed


def test_required_calls_match_a_tool_and_one_call_is_the_most_without_parallel(tokenizer) -> None:
    one = '<tool_call>{"name":"add","arguments":{"a":1,"b":2}}</tool_call>'
    grammar, _ = grammar_for(tokenizer, tool_choice="required", parallel_tool_calls=False)
    matcher = grammar.new_matcher()
    assert consume_text(matcher, tokenizer, one) and matcher.is_finished()
    assert not consume_text(grammar.new_matcher(), tokenizer, "Hello")
    assert not consume_text(grammar.new_matcher(), tokenizer, '<tool_call>{"name":"sub"')
    assert not consume_text(grammar.new_matcher(), tokenizer, '<tool_call>{"name":"add","arguments":{"a":"x"')
    parallel, _ = grammar_for(tokenizer, tool_choice="required")
    matcher = parallel.new_matcher()
    assert consume_text(matcher, tokenizer, one + one) and not matcher.is_finished()


def test_a_template_that_handles_tools_itself_is_kept(tokenizer) -> None:
    own = ("{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
           "{% if tools %}(tools: {{ tools | map(attribute='function.name') | join(',') }}){% endif %}")
    renderer = ChatRenderer(tokenizer, own)
    assert renderer.tool_template == own
    rendered = renderer.render(messages({"role": "user", "content": "x"}), False, False, tools=TOOLS)
    assert rendered == "[user]x(tools: add)"
