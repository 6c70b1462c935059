"""What routers read from a replica: the vllm:* series on /metrics, GET /get_load, the render routes."""
from collections.abc import Iterator

import httpx
import pytest
from api_server import ServerProcess, wait_for
from long_streams import MODEL, LongStreams
from prometheus_client.parser import text_string_to_metric_families

MAX_NUM_SEQS = 2
PICKER_GAUGES = ("vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc",
                 "vllm:cache_config_info")


@pytest.fixture(scope="module")
def busy_server() -> Iterator[ServerProcess]:
    """A batch of two sequences, so that a third and fourth request wait; /get_load in sglang-router's shape."""
    with ServerProcess("--max-num-seqs", str(MAX_NUM_SEQS), "--get-load-format", "sglang") as process:
        yield process


@pytest.fixture(scope="module")
def http(busy_server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=busy_server.url, timeout=60) as client:
        yield client


def scrape(http: httpx.Client) -> dict[str, list]:
    """Every sample of /metrics by sample name, parsed by prometheus_client."""
    response = http.get("/metrics")
    assert response.status_code == 200
    samples: dict[str, list] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
    return samples


def only_value(samples: dict[str, list], name: str) -> float:
    [sample] = samples[name]
    return sample.value


def test_picker_gauges_follow_running_and_waiting_requests(http: httpx.Client, busy_server: ServerProcess):
    idle = scrape(http)
    for name in PICKER_GAUGES:
        assert len(idle[name]) == 1, name
    [cache_info] = idle["vllm:cache_config_info"]
    assert cache_info.value == 1
    assert cache_info.labels["block_size"] == "16" and int(cache_info.labels["num_gpu_blocks"]) > 0
    native_info = only_value(idle, "dots_serve_info")
    assert native_info == 1
    [native] = idle["dots_serve_info"]
    assert cache_info.labels["num_gpu_blocks"] == native.labels["num_kv_blocks"]
    assert only_value(idle, "vllm:num_requests_running") == 0
    assert only_value(idle, "vllm:num_requests_waiting") == 0

    with LongStreams(busy_server.url, count=MAX_NUM_SEQS + 2):
        def batch_full() -> bool:
            samples = scrape(http)
            return (only_value(samples, "vllm:num_requests_running") == MAX_NUM_SEQS
                    and only_value(samples, "vllm:num_requests_waiting") == 2)

        wait_for(batch_full, 120, "two running and two waiting requests on /metrics")
        busy = scrape(http)
        for name in PICKER_GAUGES:
            assert len(busy[name]) == 1, name
        usage = only_value(busy, "vllm:kv_cache_usage_perc")
        assert 0 < usage <= 1
        assert usage == only_value(busy, "dots_serve_kv_cache_usage_ratio")
        assert only_value(busy, "dots_serve_requests_waiting") == 2

        [load] = http.get("/get_load").json()
        assert load["dp_rank"] == 0
        assert load["num_reqs"] == MAX_NUM_SEQS + 2 and load["num_waiting_reqs"] == 2
        blocks = int(cache_info.labels["num_gpu_blocks"])
        assert 0 < load["num_tokens"] <= blocks * 16

    def drained() -> bool:
        samples = scrape(http)
        return (only_value(samples, "vllm:num_requests_running") == 0
                and only_value(samples, "vllm:num_requests_waiting") == 0)

    wait_for(drained, 120, "the closed streams to leave the engine")
    assert http.get("/get_load").json() == [{"dp_rank": 0, "num_reqs": 0, "num_waiting_reqs": 0, "num_tokens": 0}]
    after = scrape(http)
    for name in ("prompt_tokens", "generation_tokens", "prefix_cache_queries", "prefix_cache_hits"):
        assert only_value(after, f"vllm:{name}_total") == only_value(after, f"dots_serve_{name}_total"), name
    assert only_value(after, "vllm:generation_tokens_total") > 0
    assert after["vllm:prompt_tokens_total"][0].labels == {"model_name": MODEL, "engine": "0"}


def test_without_vllm_metrics_only_native_names_remain():
    with ServerProcess("--no-vllm-metrics") as server, httpx.Client(base_url=server.url, timeout=60) as client:
        samples = scrape(client)
        assert not [name for name in samples if name.startswith("vllm:")]
        assert only_value(samples, "dots_serve_requests_running") == 0
        assert client.get("/get_load").json() == {"load": 0}


def test_completion_render_matches_tokenize(http: httpx.Client):
    prompts = ["In the beginning God created", "And the earth was without form"]
    response = http.post("/v1/completions/render", json={"model": MODEL, "prompt": prompts, "max_tokens": 7,
                                                         "temperature": 0.5})
    assert response.status_code == 200
    rendered = response.json()
    assert len(rendered) == 2
    for item, prompt in zip(rendered, prompts):
        tokenized = http.post("/tokenize", json={"model": MODEL, "prompt": prompt}).json()
        assert item["token_ids"] == tokenized["tokens"]
        assert item["model"] == MODEL and item["request_id"].startswith("cmpl-")
        assert item["sampling_params"]["max_tokens"] == 7 and item["sampling_params"]["temperature"] == 0.5
        assert item["stream"] is False and item["features"] is None
    token_prompt = http.post("/v1/completions/render", json={"model": MODEL, "prompt": [5, 6, 7]}).json()
    assert [item["token_ids"] for item in token_prompt] == [[5, 6, 7]]


def test_chat_render_applies_the_chat_template(http: httpx.Client):
    messages = [{"role": "system", "content": "Answer in the words of the King James Bible."},
                {"role": "user", "content": "Who made the light?"},
                {"role": "assistant", "content": "God said, Let there be light."},
                {"role": "user", "content": "And then?"}]
    body = {"model": MODEL, "messages": messages, "stream": True, "stream_options": {"include_usage": True}}
    response = http.post("/v1/chat/completions/render", json=body)
    assert response.status_code == 200
    rendered = response.json()
    assert isinstance(rendered, dict) and rendered["request_id"].startswith("chatcmpl-")
    tokenized = http.post("/tokenize", json={"model": MODEL, "messages": messages}).json()
    assert rendered["token_ids"] == tokenized["tokens"]
    text = http.post("/detokenize", json={"model": MODEL, "tokens": rendered["token_ids"]}).json()["prompt"]
    assert "Who made the light?" in text and text.index("Who made the light?") < text.index("And then?")
    assert rendered["stream"] is True and rendered["stream_options"]["include_usage"] is True
    # The router-side copy of a conversation one turn longer shares this prompt as its prefix.
    longer = http.post("/v1/chat/completions/render", json={
        "model": MODEL, "messages": messages + [{"role": "assistant", "content": "Evening."},
                                                 {"role": "user", "content": "More."}]}).json()
    assert len(longer["token_ids"]) > len(rendered["token_ids"])


@pytest.mark.parametrize(("path", "body", "status", "param"), [
    ("/v1/completions/render", {"model": "other", "prompt": "x"}, 404, "model"),
    ("/v1/chat/completions/render", {"model": MODEL, "messages": []}, 400, "messages"),
    ("/v1/completions/render", {"model": MODEL, "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions/render", {"model": MODEL, "prompt": [999999]}, 400, "prompt"),
    ("/v1/completions/render", {"model": MODEL, "prompt": "x " * 3000}, 400, "prompt"),
])
def test_render_refuses_what_generation_would_refuse(http: httpx.Client, path: str, body: dict, status: int,
                                                     param: str):
    response = http.post(path, json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["message"]


def test_render_refuses_a_body_that_is_not_json(http: httpx.Client):
    response = http.post("/v1/chat/completions/render", content=b"{messages",
                         headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_json"
