"""``dots-serve`` / ``python -m server``: flags, an optional YAML preset (``--config``), then serve."""
import argparse
import logging
import os
import re
import sys
from dataclasses import fields
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import yaml

from model.embedded import EMBEDDED_MODEL_DIR
from scheduler.config import EngineConfig
from scheduler.kv_events_config import KVEventsConfig, kv_events_config_from
from scheduler.waiting_queue import SCHEDULING_POLICIES
from server.chat_template import load_chat_template
from server.config import ServerConfig

API_KEY_ENV = "DOTS_SERVE_API_KEY"
SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2, "mib": 1024**2,
              "g": 1000**3, "gb": 1000**3, "gib": 1024**3, "t": 1000**4, "tb": 1000**4, "tib": 1024**4}
PATH_KEYS = ("model", "chat_template")


def byte_size(text: str | int) -> int:
    """``1073741824``, ``1GiB``, ``512MiB``, ``2GB``."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    if match is None or match.group(2).lower() not in SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 1073741824, 512MiB, 2GiB)")
    return int(float(match.group(1)) * SIZE_UNITS[match.group(2).lower()])


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"not a whole number of 0 or more: {text!r}")
    return value


def unit_fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"not a fraction above 0 and at most 1: {text!r}")
    return value


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except the ones that are None (their help says what happens then)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dots-serve",
        description="OpenAI-compatible server for the dots.llm1 (Dots1) mixture-of-experts model.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--config", type=Path, help="YAML preset (see configs/); its keys are these flags with "
                        "underscores; flags given on the command line override it")
    model = parser.add_argument_group("model")
    model.add_argument("--model", default=str(EMBEDDED_MODEL_DIR), help="local Hugging Face checkpoint directory, "
                       "or a dots1 GGUF file (the first file of a split set: *-00001-of-0000N.gguf)")
    model.add_argument("--served-model-name", nargs="+", help="name(s) clients use in 'model'; the first is "
                       "reported in responses (default: the checkpoint directory's name, or the GGUF file's name "
                       "without .gguf)")
    model.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                       help="weights and activations; auto: bfloat16 on CUDA, float32 on CPU")
    model.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    model.add_argument("--load-format", default="auto", choices=["auto", "dummy"],
                       help="auto: safetensors from --model; dummy: random weights for the config (benchmarks)")
    model.add_argument("--quantization", choices=["fp8", "int8", "int4"], help="quantize a bf16/fp16/fp32 "
                       "checkpoint's Linear weights while loading. fp8: float8 per output channel (GPU); int8: "
                       "8-bit with a scale per 32 weights, int4: 4-bit with a scale and min per 32 weights (CPU "
                       "kernels). FP8 checkpoints and GGUF files need no flag")
    model.add_argument("--chat-template", help="a Jinja file or template overriding the checkpoint's chat template")
    model.add_argument("--seed", type=int, default=0, help="seed of the engine's sampler for unseeded requests")
    engine = parser.add_argument_group("engine")
    engine.add_argument("--max-model-len", type=int, help="context length (prompt + completion); default: the "
                        "model's max_position_embeddings")
    engine.add_argument("--max-num-seqs", type=int, default=256, help="sequences in one batch at most")
    engine.add_argument("--max-num-batched-tokens", type=int, default=8192, help="tokens in one engine step at most")
    engine.add_argument("--scheduling-policy", default="fcfs", choices=list(SCHEDULING_POLICIES),
                        help="fcfs: requests wait in arrival order; priority: by their 'priority' field (lower "
                        "first, ties by arrival), and a preemption takes the lowest priority running request")
    engine.add_argument("--kv-cache-memory", type=byte_size, help="bytes for the KV cache per GPU (e.g. 2GiB), "
                        "overriding --gpu-memory-utilization; default: what that leaves on CUDA, 1 GiB on CPU")
    engine.add_argument("--gpu-memory-utilization", type=unit_fraction, default=0.9,
                        help="fraction of each GPU's total memory this server may use, as in vLLM: the KV cache "
                        "gets what is left of it after the weights, the peak activations of a profiling step of "
                        "--max-num-batched-tokens, the CUDA graphs and the sampler's state; start-up is refused "
                        "when nothing is left")
    engine.add_argument("--block-size", type=int, default=16, help="tokens per KV cache block")
    engine.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "model", "fp8"],
                        help="auto: fp8 for a checkpoint with calibrated KV-cache scales (kv_cache_scheme), else the "
                        "model dtype; model: the model dtype; fp8: float8 e4m3 keys and values (twice the tokens "
                        "per byte)")
    engine.add_argument("--attention-backend", default="auto", choices=["auto", "torch", "triton"],
                        help="auto: triton paged kernels on CUDA (torch if their start-up self-check fails), torch "
                        "elsewhere; triton: refuse to start if the self-check fails")
    engine.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                        help="reuse the KV cache of shared prompt prefixes")
    engine.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs (or CPU processes) per replica")
    engine.add_argument("--enable-expert-parallel", action=argparse.BooleanOptionalAction, default=False,
                        help="place whole experts on ranks instead of splitting every expert")
    engine.add_argument("--enforce-eager", action="store_true",
                        help="run every step eagerly: no CUDA graphs for decode steps")
    engine.add_argument("--engine-process", action=argparse.BooleanOptionalAction, default=True,
                        help="run the engine core in its own process (--no-engine-process: on a thread of the server, "
                        "for debugging)")
    engine.add_argument("--expert-metrics", action=argparse.BooleanOptionalAction, default=True,
                        help="count token-expert assignments for /metrics (--no-expert-metrics saves a little time)")
    engine.add_argument("--moe-backend", default="auto", choices=["auto", "torch", "triton"],
                        help="routed experts: triton (fused MoE kernels, no host syncs) or torch (the reference); "
                        "auto: triton on CUDA (torch if its start-up self-check fails), torch elsewhere; triton: "
                        "refuse to start if the self-check fails")
    engine.add_argument("--kv-events-config", type=kv_events_flag, help="KV-cache events for prefix-aware routers "
                        "(llm-d), as vLLM's JSON, e.g. '{\"enable_kv_cache_events\": true, \"endpoint\": "
                        "\"tcp://*:5557\", \"topic\": \"kv@POD_IP@MODEL\"}'; fields: enable_kv_cache_events, "
                        "publisher (zmq), endpoint, replay_endpoint, topic, buffer_steps, hwm, max_queue_size")
    http = parser.add_argument_group("HTTP")
    http.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for every interface)")
    http.add_argument("--port", type=int, default=8000, help="port to listen on")
    http.add_argument("--api-key", action="append", help=f"accepted API key(s): repeat the flag or separate with "
                      f"commas; also read from ${API_KEY_ENV}; none: no authentication")
    http.add_argument("--max-concurrent-requests", type=int, default=256,
                      help="sequences (n x prompts of each generation request) admitted at once; more get 429 "
                      "with Retry-After")
    http.add_argument("--max-request-body-bytes", type=byte_size, default=8 * 1024 * 1024,
                      help="larger request bodies get 413")
    http.add_argument("--shutdown-timeout", type=float, default=30.0,
                      help="seconds in-flight requests may take to finish after SIGTERM/SIGINT before being aborted")
    http.add_argument("--ui", action=argparse.BooleanOptionalAction, default=True,
                      help="serve the chat page at / (--no-ui: the API only)")
    http.add_argument("--vllm-metrics", action=argparse.BooleanOptionalAction, default=True,
                      help="also export the load and cache series routers read (llm-d's endpoint picker) under "
                      "vLLM's names on /metrics, e.g. vllm:num_requests_waiting")
    http.add_argument("--get-load-format", default="vllm-router", choices=["vllm-router", "sglang"],
                      help="body of GET /get_load for power_of_two routing: vllm-router {\"load\": N}, or "
                      "sglang-router's list of per-rank loads")
    http.add_argument("--responses-store-size", type=non_negative_int, default=64,
                      help="finished /v1/responses kept in memory for previous_response_id and GET/DELETE "
                      "/v1/responses/{id}, the least recently used dropped first; 0: none are kept")
    http.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    http.add_argument("--log-prompts", action="store_true", help="include prompt text in the per-request log line")
    return parser


def kv_events_flag(text: str) -> KVEventsConfig:
    try:
        return kv_events_config_from(text)
    except (TypeError, ValueError) as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def read_preset(path: Path, parser: argparse.ArgumentParser) -> dict[str, Any]:
    try:
        preset = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        parser.error(f"--config {path}: {error}")
    if not isinstance(preset, dict):
        parser.error(f"--config {path}: expected a mapping of flag names to values")
    known = set(vars(parser.parse_args([]))) - {"config"}
    unknown = sorted(set(preset) - known)
    if unknown:
        parser.error(f"--config {path}: unknown keys {unknown}")
    repository_root = path.resolve().parent.parent
    for key in PATH_KEYS:
        value = preset.get(key)
        is_relative_path = isinstance(value, str) and "{" not in value and not Path(value).is_absolute()
        if is_relative_path and not Path(value).exists():
            preset[key] = str(repository_root / value)  # presets name paths relative to the repository root
    if isinstance(preset.get("api_key"), str):
        preset["api_key"] = [preset["api_key"]]
    for key in ("kv_cache_memory", "max_request_body_bytes"):
        if preset.get(key) is not None:
            preset[key] = byte_size(preset[key])
    if preset.get("kv_events_config") is not None:
        try:
            preset["kv_events_config"] = kv_events_config_from(preset["kv_events_config"])
        except (TypeError, ValueError) as error:
            parser.error(f"--config {path}: kv_events_config: {error}")
    return preset


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()
    config_only = argparse.ArgumentParser(add_help=False)
    config_only.add_argument("--config", type=Path)
    known, _ = config_only.parse_known_args(argv)
    if known.config is not None:
        parser.set_defaults(**read_preset(known.config, parser))
    args = parser.parse_args(argv)
    if args.max_concurrent_requests < 1:
        parser.error("--max-concurrent-requests must be at least 1")
    if args.shutdown_timeout < 0:
        parser.error("--shutdown-timeout must not be negative")
    try:
        load_chat_template(args.chat_template)
    except (OSError, ValueError) as error:
        parser.error(str(error))
    return args


def check_gguf(path: str) -> None:
    """Reads a GGUF file's header, metadata and tensor table (not its weights): a file of another architecture, a
    tensor type this engine cannot run or a truncated file is refused here, before the server starts."""
    from model.gguf.config import config_from_gguf
    from model.gguf.reader import read_metadata

    config_from_gguf(read_metadata(path))


def api_keys(args: argparse.Namespace) -> list[str]:
    given = list(args.api_key or [])
    if os.environ.get(API_KEY_ENV):
        given.append(os.environ[API_KEY_ENV])
    return [key.strip() for value in given for key in value.split(",") if key.strip()]


def engine_config(args: argparse.Namespace) -> EngineConfig:
    names = {field.name for field in fields(EngineConfig)}
    return EngineConfig(**{name: value for name, value in vars(args).items() if name in names})


def server_config(args: argparse.Namespace) -> ServerConfig:
    return ServerConfig(
        served_model_names=args.served_model_name or [Path(args.model).name.removesuffix(".gguf")],
        host=args.host,
        port=args.port,
        api_keys=api_keys(args),
        max_concurrent_requests=args.max_concurrent_requests,
        shutdown_timeout=args.shutdown_timeout,
        max_request_body_bytes=args.max_request_body_bytes,
        log_prompts=args.log_prompts,
        log_level=args.log_level,
        engine_process=args.engine_process,
        ui=args.ui,
        vllm_metrics=args.vllm_metrics,
        get_load_format=args.get_load_format,
        responses_store_size=args.responses_store_size,
    )


def package_version() -> str:
    try:
        return version("dots-serve")
    except PackageNotFoundError:
        return "unknown"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = server_config(args)
    engine = engine_config(args)
    info = {"version": package_version(), "model": config.model_name, "dtype": engine.dtype, "device": engine.device,
            "tensor_parallel_size": str(engine.tensor_parallel_size), "block_size": str(engine.block_size)}
    if str(engine.model).endswith(".gguf"):
        try:
            check_gguf(engine.model)
        except (OSError, ValueError) as error:
            print(f"dots-serve: error: {error}", file=sys.stderr)
            sys.exit(2)
    from server.runner import run_server  # torch and the engine load only once the flags are valid

    sys.exit(run_server(config, engine, info))
