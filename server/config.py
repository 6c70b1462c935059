"""What the HTTP layer needs to know, next to the engine's own ``EngineConfig``."""
from dataclasses import dataclass, field


@dataclass
class ServerConfig:
    served_model_names: list[str]  # the first is the name reported in responses; the others are aliases
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: list[str] = field(default_factory=list)  # empty: no authentication
    max_concurrent_requests: int = 256  # admitted generation requests; beyond it 429
    shutdown_timeout: float = 30.0  # seconds in-flight requests may take to finish after SIGTERM
    max_request_body_bytes: int = 8 * 1024 * 1024
    log_prompts: bool = False
    log_level: str = "info"
    engine_process: bool = True  # the engine core in its own process; False: on a thread of the server (debugging)
    ui: bool = True  # the chat page at /
    vllm_metrics: bool = True  # router-facing series also under vLLM's names (server/vllm_metrics.py)
    get_load_format: str = "vllm-router"  # the body of GET /get_load: "vllm-router" or "sglang"
    responses_store_size: int = 64  # finished /v1/responses kept for previous_response_id and GET; 0: none

    @property
    def model_name(self) -> str:
        return self.served_model_names[0]
