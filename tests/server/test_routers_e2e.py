"""vllm-router and sglang-router (the PyPI wheels) in front of two real replicas of the tiny model.

Where a request went is read from each replica's own counters: every short request here finishes with "length" or
"stop", the long streams that keep a replica busy end as "abort" when the test closes them.
"""
from collections.abc import Iterator

import httpx
import openai
import pytest
from api_server import ServerProcess, wait_for
from long_streams import MODEL, LongStreams
from prometheus_client.parser import text_string_to_metric_families
from router_process import SGLANG_ROUTER, VLLM_ROUTER, RouterProcess

LONG_STREAMS = 3
SYSTEM_PROMPT = (
    "Thou art a scribe who answereth only in the words of the King James Bible. In the beginning God created the "
    "heaven and the earth. And the earth was without form, and void; and darkness was upon the face of the deep. "
    "And the Spirit of God moved upon the face of the waters. And God said, Let there be light: and there was "
    "light. And God saw the light, that it was good: and God divided the light from the darkness. "
)


@pytest.fixture(scope="module")
def replicas() -> Iterator[list[ServerProcess]]:
    with ServerProcess() as first, ServerProcess() as second:
        yield [first, second]


def finished_requests(replica: ServerProcess) -> int:
    """Requests the replica's engine finished with "stop" or "length"."""
    text = httpx.get(f"{replica.url}/metrics", timeout=30).text
    return int(sum(
        sample.value
        for family in text_string_to_metric_families(text) for sample in family.samples
        if sample.name == "dots_serve_request_success_total" and sample.labels["finished_reason"] in ("stop", "length")
    ))


def complete(router: RouterProcess, prompt: str) -> None:
    response = httpx.post(f"{router.url}/v1/completions", timeout=120,
                          json={"model": MODEL, "prompt": prompt, "max_tokens": 2, "ignore_eos": True})
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["finish_reason"] == "length"


def test_power_of_two_sends_new_requests_away_from_a_busy_replica(replicas: list[ServerProcess]):
    busy, idle = replicas
    with RouterProcess(VLLM_ROUTER, [busy.url, idle.url], "power_of_two") as router:
        with LongStreams(busy.url, count=LONG_STREAMS):
            wait_for(lambda: httpx.get(f"{busy.url}/get_load").json()["load"] == LONG_STREAMS, 120,
                     "the busy replica to report its long streams")

            def router_saw_the_load() -> bool:
                complete(router, "And God said")  # vllm-router logs the loads it compares at each pick
                return f"{busy.url}={LONG_STREAMS} " in router.log_text()

            # vllm-router polls /get_load every 5 s; until then both replicas look alike to it.
            wait_for(router_saw_the_load, 120, "vllm-router to poll the busy replica's /get_load")
            busy_before, idle_before = finished_requests(busy), finished_requests(idle)
            for index in range(6):
                complete(router, f"And the evening and the morning were the day number {index}")
            assert finished_requests(busy) == busy_before
            assert finished_requests(idle) == idle_before + 6


def converse(client: openai.OpenAI, system_prompt: str, turns: int) -> None:
    messages = [{"role": "system", "content": system_prompt}]
    for turn in range(turns):
        messages.append({"role": "user", "content": f"Tell me of the day number {turn}."})
        reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8)
        assert reply.choices[0].finish_reason in ("stop", "length")
        messages.append({"role": "assistant", "content": reply.choices[0].message.content})


@pytest.mark.parametrize("command", [VLLM_ROUTER, SGLANG_ROUTER], ids=["vllm-router", "sglang-router"])
def test_cache_aware_keeps_a_conversation_on_one_replica(replicas: list[ServerProcess], command: list[str]):
    wait_for(lambda: all(httpx.get(f"{r.url}/get_load").json()["load"] == 0 for r in replicas), 120,
             "both replicas to be idle")
    with RouterProcess(command, [replica.url for replica in replicas], "cache_aware") as router:
        client = openai.OpenAI(base_url=f"{router.url}/v1", api_key="unused", max_retries=0, timeout=120)
        before = [finished_requests(replica) for replica in replicas]
        converse(client, SYSTEM_PROMPT + f"This conversation is held through {command[0]}.", turns=4)
        served = [finished_requests(replica) - count for replica, count in zip(replicas, before)]
        assert sorted(served) == [0, 4], served
