"""Models, tokenizer routes and probes on the shared server."""
import httpx
from conftest import MODEL
from openai_schema import validate


def test_models_list_and_card(http: httpx.Client) -> None:
    listing = http.get("/v1/models").json()
    validate(listing, "ListModelsResponse")
    assert [model["id"] for model in listing["data"]] == [MODEL]
    card = http.get(f"/v1/models/{MODEL}").json()
    validate(card, "Model")
    assert card["id"] == MODEL


def test_tokenize_and_detokenize_round_trip(http: httpx.Client) -> None:
    text = "Hello wörld, 你好!"
    tokenized = http.post("/tokenize", json={"model": MODEL, "prompt": text}).json()
    assert tokenized["count"] == len(tokenized["tokens"]) > 0
    assert tokenized["max_model_len"] == 2048
    assert http.post("/detokenize", json={"tokens": tokenized["tokens"]}).json() == {"prompt": text}


def test_tokenize_messages_uses_the_chat_template(http: httpx.Client) -> None:
    messages = [{"role": "user", "content": "Hi"}]
    tokens = http.post("/tokenize", json={"messages": messages}).json()["tokens"]
    rendered = http.post("/detokenize", json={"tokens": tokens}).json()["prompt"]
    assert rendered == (
        "<|system|>You are a helpful assistant.<|endofsystem|><|userprompt|>Hi<|endofuserprompt|><|response|>"
    )


def test_probes_and_metrics(http: httpx.Client) -> None:
    assert http.get("/ready").json() == {"status": "ready"}
    health = http.get("/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert http.get("/v1/models/some-unknown-model").status_code == 404
    metrics = http.get("/metrics")
    assert metrics.status_code == 200
    assert metrics.headers["content-type"].startswith("text/plain")
    assert 'dots_serve_ready{model_name="dots1-tiny"} 1.0' in metrics.text
    # HTTP requests are counted by route template, not by raw path.
    assert 'route="/v1/models/{model_id:path}",status="404"' in metrics.text
    assert "some-unknown-model" not in metrics.text
