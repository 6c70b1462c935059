"""The OpenAI Agents SDK (``openai-agents``) runs an agent with a function tool to its final output against the real
server, over the Responses API (the SDK's default).

The first turn is forced to call the tool (``tool_choice="required"``); the SDK then sends the tool's output back and
resets the tool choice to auto, so the model answers in text. Should the model call the tool again there (it is free
to under auto), the second call ends the run with the tool's result instead of looping: either way the run ends with
a final output after a function_call_output round trip, whatever the model's weights. The text turn ends at the first
full stop (``stop``, sent through ``extra_body``) so that it completes: the SDK refuses an incomplete response; the
tool's argument is an enum, so that no call contains a full stop.
"""
import asyncio
from typing import Literal

import openai
import pytest
from api_server import ServerProcess
from conftest import MODEL

agents = pytest.importorskip("agents")


def test_agent_with_a_function_tool(server: ServerProcess) -> None:
    calls: list[str] = []

    @agents.function_tool
    def get_weather(city: Literal["Paris", "London", "Rome"]) -> str:
        """The current weather in a city."""
        calls.append(city)
        return f"Sunny in {city}."

    def final_after_repeated_call(context: object, results: list) -> agents.ToolsToFinalOutputResult:
        if len(calls) > 1:
            return agents.ToolsToFinalOutputResult(is_final_output=True, final_output=str(results[-1].output))
        return agents.ToolsToFinalOutputResult(is_final_output=False)

    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)
    agent = agents.Agent(
        name="forecaster", instructions="Answer with the weather.", tools=[get_weather],
        model=agents.OpenAIResponsesModel(model=MODEL, openai_client=client),
        model_settings=agents.ModelSettings(tool_choice="required", temperature=0, max_tokens=200,
                                            parallel_tool_calls=False, extra_body={"stop": ["."]}),
        tool_use_behavior=final_after_repeated_call,
    )
    result = asyncio.run(agents.Runner.run(agent, "What is the weather in Paris?", max_turns=4,
                                           run_config=agents.RunConfig(tracing_disabled=True)))
    assert calls and set(calls) <= {"Paris", "London", "Rome"}
    assert isinstance(result.final_output, str) and result.final_output
    assert len(result.raw_responses) >= 2
    items = result.to_input_list()
    assert [item["type"] for item in items if item.get("type") == "function_call_output"]
    assert any(item.get("type") == "function_call" and item["name"] == "get_weather" for item in items)
