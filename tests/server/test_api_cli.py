"""The command line: flags, YAML presets with flags overriding them, API keys, sizes."""
import argparse
from pathlib import Path

import pytest

from model.embedded import EMBEDDED_MODEL_DIR
from server.cli import api_keys, byte_size, engine_config, parse_args, server_config

REPO = Path(__file__).resolve().parents[2]


def test_defaults_serve_the_embedded_model_on_localhost() -> None:
    args = parse_args([])
    config = server_config(args)
    assert (config.host, config.port) == ("127.0.0.1", 8000)
    assert config.served_model_names == ["dots1-tiny"]
    assert engine_config(args).model == str(EMBEDDED_MODEL_DIR)
    assert config.api_keys == []


def test_every_shipped_preset_loads_and_flags_override_it() -> None:
    for preset in sorted((REPO / "configs").glob("*.yaml")):
        engine_config(parse_args(["--config", str(preset)]))
    for local in ("dots1-tiny.yaml", "cpu-dev.yaml"):  # relative model paths resolve against the repository
        assert Path(engine_config(parse_args(["--config", str(REPO / "configs" / local)])).model).is_dir()
    args = parse_args(["--config", str(REPO / "configs" / "cpu-dev.yaml"), "--max-num-seqs", "3", "--port", "9000"])
    engine = engine_config(args)
    assert engine.dtype == "float32" and engine.device == "cpu"  # from the preset
    assert engine.max_num_seqs == 3 and server_config(args).port == 9000  # from the flags


def test_preset_with_an_unknown_key_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    preset = tmp_path / "bad.yaml"
    preset.write_text("max_num_seqs: 4\nwarp_speed: 9\n")
    with pytest.raises(SystemExit):
        parse_args(["--config", str(preset)])
    assert "warp_speed" in capsys.readouterr().err


def test_api_keys_from_repeated_flags_commas_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOTS_SERVE_API_KEY", "env-a,env-b")
    args = parse_args(["--api-key", "one", "--api-key", "two, three"])
    assert api_keys(args) == ["one", "two", "three", "env-a", "env-b"]


def test_engine_flags_reach_the_engine_config() -> None:
    engine = engine_config(parse_args([
        "--tensor-parallel-size", "2", "--enable-expert-parallel", "--no-expert-metrics", "--kv-cache-memory", "2GiB",
        "--no-enable-prefix-caching", "--block-size", "32", "--max-model-len", "1024", "--load-format", "dummy",
        "--enforce-eager",
    ]))
    assert engine.tensor_parallel_size == 2 and engine.enable_expert_parallel and not engine.expert_metrics
    assert engine.kv_cache_memory == 2 * 1024**3 and not engine.enable_prefix_caching
    assert (engine.block_size, engine.max_model_len, engine.load_format) == (32, 1024, "dummy")
    assert engine.enforce_eager and not engine_config(parse_args([])).enforce_eager


def test_unreadable_chat_template_is_refused_before_loading() -> None:
    with pytest.raises(SystemExit):
        parse_args(["--chat-template", "/no/such/template.jinja"])
    assert parse_args(["--chat-template", "{{ messages[0]['content'] }}"]).chat_template


def test_byte_sizes() -> None:
    assert byte_size("1073741824") == 1024**3
    assert byte_size("512MiB") == 512 * 1024**2
    assert byte_size("2GB") == 2 * 1000**3
    with pytest.raises(argparse.ArgumentTypeError):
        byte_size("lots")


def test_kv_events_config_takes_vllms_json_from_the_flag_or_a_preset(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert engine_config(parse_args([])).kv_events_config is None
    flag = '{"enable_kv_cache_events": true, "endpoint": "tcp://*:6000", "topic": "kv@pod@dots1-tiny"}'
    events = engine_config(parse_args(["--kv-events-config", flag])).kv_events_config
    assert (events.publishes, events.endpoint, events.topic, events.hwm) == (True, "tcp://*:6000", "kv@pod@dots1-tiny",
                                                                             100_000)
    preset = tmp_path / "events.yaml"
    preset.write_text("kv_events_config:\n  enable_kv_cache_events: true\n  replay_endpoint: tcp://*:6001\n")
    assert engine_config(parse_args(["--config", str(preset)])).kv_events_config.replay_endpoint == "tcp://*:6001"
    for bad, message in [('{"enable_kv_cache_events": tru', "not JSON"), ('{"hwm": -1}', "hwm"),
                         ('{"port": 5557}', "unknown fields")]:
        with pytest.raises(SystemExit):
            parse_args(["--kv-events-config", bad])
        assert message in capsys.readouterr().err
    preset.write_text("kv_events_config:\n  buffer_steps: 0\n")
    with pytest.raises(SystemExit):
        parse_args(["--config", str(preset)])
    assert "kv_events_config: buffer_steps" in capsys.readouterr().err


def test_gpu_memory_utilization_is_a_fraction_of_the_total_memory(capsys: pytest.CaptureFixture[str]) -> None:
    assert engine_config(parse_args(["--gpu-memory-utilization", "0.8"])).gpu_memory_utilization == 0.8
    assert engine_config(parse_args([])).gpu_memory_utilization == 0.9
    for bad in ("0", "1.2", "-0.5", "most"):
        with pytest.raises(SystemExit):
            parse_args(["--gpu-memory-utilization", bad])
        assert "not a fraction above 0 and at most 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "fraction of each GPU's total memory this server may use, as in vLLM" in help_text
