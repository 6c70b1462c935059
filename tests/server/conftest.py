from collections.abc import Iterator

import httpx
import openai
import pytest
from api_server import ServerProcess

MODEL = "dots1-tiny"


@pytest.fixture(scope="session")
def server() -> Iterator[ServerProcess]:
    """One server shared by every test that does not need its own flags."""
    with ServerProcess("--max-concurrent-requests", "64") as process:
        yield process


@pytest.fixture(scope="session")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="session")
def http(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as http_client:
        yield http_client
