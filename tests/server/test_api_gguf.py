"""A real server on a GGUF file: the official client streams and gets schema-valid JSON; the file's weight types
are in dots_serve_info; bad files are refused before the server starts, with the file and tensor named."""
import json
import re
import subprocess
import sys
from pathlib import Path

import gguf
import httpx
import openai
import pytest
from api_server import REPO, ServerProcess
from gguf_checkpoints import hf_to_gguf
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoTokenizer

from model.embedded import EMBEDDED_MODEL_DIR

NAME = "dots1-tiny-q8"
PROMPT = "In the beginning"
FIXTURES = REPO / "tests" / "fixtures" / "gguf"
CITY_SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                                "population": {"type": "integer", "minimum": 0, "maximum": 9999}},
               "required": ["name", "population"], "additionalProperties": False}


@pytest.fixture(scope="module")
def q8_file(tmp_path_factory) -> Path:
    """The embedded model in Q8_0, declaring BOS ',' (id 11) as published dots1 GGUFs do."""
    path = tmp_path_factory.mktemp("gguf_server") / "dots1-tiny-Q8_0.gguf"
    hf_to_gguf.write_dots1_gguf(EMBEDDED_MODEL_DIR, path, "Q8_0", overrides={"tokenizer.ggml.bos_token_id": 11})
    return path


def info_labels(url: str) -> dict[str, str]:
    families = text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text)
    [sample] = [sample for family in families if family.name == "dots_serve_info" for sample in family.samples]
    return sample.labels


def test_a_gguf_file_serves_chat_streams_and_json_schema(q8_file: Path) -> None:
    with ServerProcess("--model", str(q8_file), "--served-model-name", NAME) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
        messages = [{"role": "user", "content": "Who went out to the field?"}]
        reply = client.chat.completions.create(model=NAME, messages=messages, max_tokens=24, temperature=0)
        streamed = "".join(chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
            model=NAME, messages=messages, max_tokens=24, temperature=0, stream=True) if chunk.choices)
        structured = client.chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": "A city as JSON?"}], max_tokens=60, temperature=0,
            response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": CITY_SCHEMA}})
        prompt_tokens = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=1).usage.prompt_tokens
        labels = info_labels(server.url)
        log = server.log_text()
    assert prompt_tokens == len(AutoTokenizer.from_pretrained(EMBEDDED_MODEL_DIR)(PROMPT)["input_ids"])  # no BOS
    assert "not prepending the declared BOS token id 11" in log
    assert reply.choices[0].message.content and streamed == reply.choices[0].message.content
    city = json.loads(structured.choices[0].message.content)
    assert set(city) == {"name", "population"} and isinstance(city["population"], int)
    assert labels["weight_dtype"] == "Q8_0+float32" and labels["device"] == "cpu"
    assert "GGUF dots1-tiny-Q8_0.gguf: 62 tensors (23 F32, 39 Q8_0); kept in their GGUF bits on the CPU" in log
    assert "weight bytes by type: Q8_0 " in log


def test_a_k_quant_mix_from_llama_cpp_serves(tmp_path: Path) -> None:
    [fixture] = [path for path in FIXTURES.glob("*.gguf") if "Q4_K_M" in path.name]
    with ServerProcess("--model", str(fixture)) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
        completion = client.completions.create(model=fixture.stem, prompt=PROMPT, max_tokens=8,
                                               temperature=0, extra_body={"ignore_eos": True})
        labels = info_labels(server.url)
        log = server.log_text()
    assert completion.usage.completion_tokens == 8
    assert {"Q4_K", "Q6_K"} <= set(labels["weight_dtype"].split("+"))
    assert "GGUF fixture-Q4_K_M.gguf" in log


def write_variant(source: Path, destination: Path, edit) -> Path:
    """A copy of ``source`` with ``edit(bytearray, reader)`` applied to its bytes."""
    data = bytearray(source.read_bytes())
    edit(data, gguf.GGUFReader(source))
    destination.write_bytes(bytes(data))
    return destination


def refusal(path: Path) -> str:
    """stderr of a server started on ``path``, which must exit at once with status 2 and no traceback."""
    result = subprocess.run([sys.executable, "-m", "server", "--model", str(path), "--port", "1"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    return result.stderr


def test_bad_gguf_files_are_refused_with_file_and_tensor_named(q8_file: Path, tmp_path: Path) -> None:
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(q8_file.read_bytes()[:-1000])
    message = refusal(truncated)
    assert re.search(rf"{re.escape(str(truncated))}: tensor '[\w.]+' ends at byte \d+, past the end of the file "
                     r"\(\d+ bytes\): the file is truncated", message), message

    def unknown_type(data: bytearray, reader: gguf.GGUFReader) -> None:
        field = next(t for t in reader.tensors if t.name == "blk.1.attn_q.weight").field
        start = field.offset + sum(int(part.nbytes) for part in field.parts[:4])  # the type id, after name and dims
        data[start:start + 4] = (99).to_bytes(4, "little")

    unknown = write_variant(q8_file, tmp_path / "unknown-type.gguf", unknown_type)
    assert f"{unknown}: tensor 'blk.1.attn_q.weight' has tensor type id 99" in refusal(unknown)

    def other_architecture(data: bytearray, reader: gguf.GGUFReader) -> None:
        field = reader.get_field("general.architecture")
        start = field.offset + sum(int(part.nbytes) for part in field.parts[:-1])
        data[start:start + 5] = b"llama"

    llama = write_variant(q8_file, tmp_path / "llama.gguf", other_architecture)
    assert f"{llama}: general.architecture is 'llama'" in refusal(llama)
